"""GPU memory: the engine's memory mode, the low-VRAM mode, and out-of-memory as a user error.

Two modes (``Engine.load(memory=...)``, ``--memory``):

- ``full``: every model lives on the device (the fast path);
- ``low``: for 8–12 GB cards. Each model (text encoders, CLIP image encoder, UNet, VAE, TAESD)
  stays in CPU memory and moves to the device only while it runs, the previous one going back
  (accelerate's ``cpu_offload_with_hook``, the mechanism of diffusers' ``enable_model_cpu_offload``;
  the UNet stays on the device for all steps of a request); the VAE decodes in tiles and one image
  at a time (diffusers' ``enable_tiling``/``enable_slicing``).

``auto`` (the default) picks ``low`` on a CUDA device whose free memory at load time is below
:data:`LOW_VRAM_BELOW_GIB`, ``full`` otherwise (always ``full`` on the CPU, where offloading has
nothing to save). A request that runs out of device memory raises :class:`OutOfMemoryError`
(an ``LcmlaError``): the message names the size and suggests the low-VRAM mode or a smaller size,
the allocator's cache is emptied, and the next request runs normally.
"""

from __future__ import annotations

from typing import Any

from .errors import LcmlaError

__all__ = ["LOW_VRAM_BELOW_GIB", "MEMORY_MODES", "OutOfMemoryError", "choose_memory_mode", "enable_low_vram",
           "free_device_memory", "is_out_of_memory", "out_of_memory_error", "release_cached_memory"]

MEMORY_MODES = ("auto", "full", "low")
#: ``auto`` offloads below this much free device memory: SDXL's UNet, both text encoders, the
#: CLIP-H image encoder, the VAE (float32) and FaceID-Plus-v2 take about 8.7 GB in float16, and
#: AM2 + DCG at 1024² (three branches in one call) needs about 3 GB more at its peak.
LOW_VRAM_BELOW_GIB = 14.0


class OutOfMemoryError(LcmlaError):
    """The device ran out of memory for a request (a size or batch too large for the card)."""


def choose_memory_mode(requested: str, device: str, free_bytes: int | None) -> str:
    """The memory mode to run: ``requested`` unless it is ``auto``; ``auto`` → ``low`` on a CUDA
    ``device`` with less than LOW_VRAM_BELOW_GIB free (``free_bytes``; None: unknown → ``full``)."""
    if requested not in MEMORY_MODES:
        raise LcmlaError(f"memory mode {requested!r} is not one of {', '.join(MEMORY_MODES)}")
    if requested != "auto":
        return requested
    if not str(device).startswith("cuda") or free_bytes is None:
        return "full"
    return "low" if free_bytes < LOW_VRAM_BELOW_GIB * 2**30 else "full"


def free_device_memory(device: str) -> int | None:
    """Free bytes on a CUDA ``device`` (None on the CPU or when it cannot be read)."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    try:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
    except (RuntimeError, AssertionError):
        return None
    return int(free)


def enable_low_vram(modules: list[Any], vae: Any, device: str) -> list[Any]:
    """Offload ``modules`` (in the order a request uses them) to the CPU, each moved to ``device``
    while it runs; tile and slice the ``vae``'s decode. Returns the offload hooks."""
    from accelerate import cpu_offload_with_hook

    hooks, previous = [], None
    for module in modules:
        if module is None:
            continue
        module.to("cpu")
        _, previous = cpu_offload_with_hook(module, device, prev_module_hook=previous)
        hooks.append(previous)
    vae.enable_tiling()
    vae.enable_slicing()
    return hooks


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the device allocator's out-of-memory errors (CUDA's and the others torch raises)."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text.lower() or "CUDNN_STATUS_ALLOC_FAILED" in text)


def release_cached_memory(device: str) -> None:
    """Collect garbage and hand the allocator's cached blocks back (after a failed request)."""
    import gc

    import torch

    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def out_of_memory_error(exc: BaseException, device: str, *, width: int, height: int, images: int,
                        mode: str) -> OutOfMemoryError | None:
    """The user error for an out-of-memory ``exc`` (None for any other error): it names the size
    and what to try. The caller raises it OUTSIDE its except block, after
    :func:`release_cached_memory`, so that the failed request's frames and tensors are gone (an
    error raised inside would keep them alive through ``__context__``)."""
    if not is_out_of_memory(exc):
        return None
    said = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    tries = ["a smaller size", "fewer images per request"]
    if mode != "low":
        tries.insert(0, "the low-VRAM mode (--memory low, or Engine.load(..., memory='low'))")
    return OutOfMemoryError(
        f"out of memory on {device} generating {images} image(s) at {width}×{height}: try "
        + ", ".join(tries[:-1]) + f" or {tries[-1]}. (the device said: {said})"
    )
