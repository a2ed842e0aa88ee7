"""lcmla's web app as a package: one module per tab (layout + handlers), the shared context and
helpers in :mod:`.common`, the page in :mod:`.demo`, the command line in :mod:`.cli`. The knob table
is :mod:`lcmla.knobs` (shared with the CLI). ``app.py`` at the top of the repository is the thin
entry that ``python app.py`` and Hugging Face Spaces run.

Handlers are plain functions of (:class:`~lcmla.ui.common.Context`, inputs) that tests call without
a browser. Importing this package loads gradio but nothing heavy (no torch, no model)."""
