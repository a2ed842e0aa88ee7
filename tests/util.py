"""Small helpers shared by the engine-level tests."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch

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


def tiny_components(**kwargs):
    """The tiny preset's components (``load_components``'s keywords, e.g. ``lcm_lora=True``) with
    lcmla's attention processors on the UNet: a fresh copy a test may change."""
    from lcmla.attention.processors import install_processors
    from lcmla.loading import load_components
    from lcmla.presets import PRESETS
    from lcmla.tiny import tiny_paths

    comps = load_components(PRESETS["tiny"], tiny_paths(), **kwargs)
    install_processors(comps.pipe.unet)
    return comps


def stock_pipeline(engine, *, ip_adapter: bool, lora: bool):
    """The same tiny weights through stock diffusers, without the engine."""
    from diffusers import StableDiffusionXLPipeline

    from lcmla.loading import load_faceid_state_dict
    from lcmla.presets import FACEID_LORA, FACEID_WEIGHTS
    from lcmla.tiny import ensure_tiny_weights, tiny_paths

    paths = tiny_paths(ensure_tiny_weights())
    pipe = StableDiffusionXLPipeline.from_pretrained(paths["base"], local_files_only=True)
    pipe.scheduler = engine.pipe.scheduler.__class__.from_config(engine.pipe.scheduler.config)
    if ip_adapter:
        # the in-file copy of the FaceID LoRA is dropped, as the engine does (it loads the LoRA file)
        state = load_faceid_state_dict(paths["faceid"] / FACEID_WEIGHTS)
        pipe.load_ip_adapter(state, subfolder="", weight_name=FACEID_WEIGHTS, image_encoder_folder=None)
    if lora:
        pipe.load_lora_weights(str(paths["faceid"]), weight_name=FACEID_LORA, adapter_name="faceid")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise(seed: int) -> torch.Tensor:
    """The initial noise the engine draws for ``seed`` at the tiny preset's 256² (a 32² latent)."""
    return torch.randn((1, 4, 32, 32), generator=torch.Generator("cpu").manual_seed(seed))
