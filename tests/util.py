"""Small helpers shared by the engine-level tests."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np

from lcmla import GenerationSettings


def px(image) -> np.ndarray:
    """Pixels as signed integers, so differences do not wrap around."""
    return np.asarray(image, dtype=np.int16)


def make_settings(**changes) -> GenerationSettings:
    """The tests' base request with ``replace``-style changes (``identity__lora_scale=0.5``)."""
    return GenerationSettings(prompt="a pencil drawing of a face").replace(**changes)


class _Messages(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__()
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def logged_messages(*logger_names: str) -> Iterator[list[str]]:
    """The messages those loggers (and their children) log while the block runs. The handler sits
    on the loggers themselves: diffusers' loggers do not propagate to the root, so caplog misses them."""
    messages: list[str] = []
    handler = _Messages(messages)
    loggers = [logging.getLogger(name) for name in logger_names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield messages
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
