"""Consistent-identity synthetic data (LCM-Lookahead §4.4, SPEC §5): generation, shards, reading.

``identities`` (deterministic identities, templates, seeds), ``generate`` (render → detect →
filter), ``shards`` (webdataset tars + manifest, crash-safe), ``reader`` (samples and training
pairs), ``importer`` (the authors' folder format), ``inspect_shards``, ``cli``.
"""
