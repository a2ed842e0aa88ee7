"""Small helpers shared by the engine-level tests."""

from __future__ import annotations

import numpy as np

from lcmla import GenerationSettings


def px(image) -> np.ndarray:
    """Pixels as signed integers, so differences do not wrap around."""
    return np.asarray(image, dtype=np.int16)


def make_settings(**changes) -> GenerationSettings:
    """The tests' base request with ``replace``-style changes (``identity__lora_scale=0.5``)."""
    return GenerationSettings(prompt="a pencil drawing of a face").replace(**changes)
