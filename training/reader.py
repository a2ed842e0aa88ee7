"""Training pairs from the consistent-identity shards (``training.datagen``), as ``PairSample``s."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def open_pairs(folders: Sequence[str | Path]):
    """A random-access sequence of :class:`~training.data.PairSample` over the shards in ``folders``
    (see ``training.datagen.reader.PairDataset``)."""
    from .datagen.reader import PairDataset

    return PairDataset(folders)
