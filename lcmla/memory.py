"""GPU memory: the engine's memory mode, the low-VRAM modes, and out-of-memory as a user error.

Three modes (``Engine.load(memory=...)``, ``--memory``):

- ``full``: every model lives on the device (the fast path);
- ``balanced``: for 12–16 GB cards. The UNet, the VAE and TAESD live on the device; the two text
  encoders and the CLIP image encoder stay in CPU memory, each moving to the device only while it
  computes a request's conditions, and all back before the first denoising step (accelerate's
  ``cpu_offload_with_hook``). The decode is the full mode's, untiled: the images are the same;
- ``low``: for 8–12 GB cards. Each model (text encoders, CLIP image encoder, UNet, VAE, TAESD)
  stays in CPU memory and moves to the device only while it runs, the previous one going back
  (the mechanism of diffusers' ``enable_model_cpu_offload``; the UNet stays on the device for all
  steps of a request); the VAE decodes in tiles and one image at a time (diffusers'
  ``enable_tiling``/``enable_slicing``; at 1024² and below SDXL's VAE decodes in one tile); on the
  KV path the encoder pass's reference K/V wait in pinned host memory until their layer reads them
  (``lcmla.attention.context.HostParking``).

``auto`` (the default) picks by the free memory of a CUDA device at load time: ``full`` from
:data:`BALANCED_BELOW_GIB` up, ``balanced`` from :data:`LOW_VRAM_BELOW_GIB` up, ``low`` below
(always ``full`` on the CPU, where offloading has nothing to save). The thresholds are the peaks
``benchmarks/predict_memory.py`` predicts for SDXL at 1024² in float16 (every configuration;
benchmarks/README.md) plus about 1.3 GiB for kernel workspaces and the allocator's fragmentation.
A request that runs out of device memory raises :class:`OutOfMemoryError` (an ``LcmlaError``):
the message names the size and suggests a lower mode or a smaller size, the allocator's cache is
emptied, and the next request runs normally.
"""

from __future__ import annotations

from typing import Any

from .errors import LcmlaError

__all__ = ["BALANCED_BELOW_GIB", "LOW_VRAM_BELOW_GIB", "MEMORY_MODES", "MEMORY_NOTES", "OFFLOAD_MODES", "OutOfMemoryError",
           "choose_memory_mode", "enable_balanced", "enable_low_vram", "free_device_memory", "is_out_of_memory",
           "out_of_memory_error", "release_cached_memory"]

MEMORY_MODES = ("auto", "full", "balanced", "low")
#: the modes that keep some models in CPU memory (their weights are loaded there)
OFFLOAD_MODES = ("balanced", "low")
#: how the CLI and the app name an offloading mode
MEMORY_NOTES = {
    "balanced": "balanced memory mode (text and image encoders in CPU memory between requests)",
    "low": "low-VRAM mode (models offloaded to CPU memory between uses, VAE tiling)",
}
#: ``auto`` chooses ``balanced`` below this much free device memory. Predicted at 1024² in float16:
#: the models hold 9.55 GiB (UNet with FaceID-Plus-v2 and its LoRAs 6.4, text encoders 1.5, CLIP-H
#: 1.2, the float32 VAE 0.3) and the VAE's float32 decode adds 3.0 GiB: a 12.6 GiB peak.
BALANCED_BELOW_GIB = 14.0
#: ``auto`` chooses ``low`` below this much free device memory: ``balanced`` peaks at 9.9 GiB (the
#: UNet, VAE and TAESD resident, plus the decode), ``low`` at 7.0 GiB (the UNet and its activations;
#: 7.2 on the KV path, whose reference K/V wait in host memory: ``Engine.kv_parking``).
LOW_VRAM_BELOW_GIB = 11.2


class OutOfMemoryError(LcmlaError):
    """The device ran out of memory for a request (a size or batch too large for the card)."""


def choose_memory_mode(requested: str, device: str, free_bytes: int | None) -> str:
    """The memory mode to run: ``requested`` unless it is ``auto``; ``auto`` on a CUDA ``device``
    with ``free_bytes`` free → ``low`` below LOW_VRAM_BELOW_GIB, ``balanced`` below
    BALANCED_BELOW_GIB, ``full`` otherwise (None: unknown → ``full``; the CPU → ``full``)."""
    if requested not in MEMORY_MODES:
        raise LcmlaError(f"memory mode {requested!r} is not one of {', '.join(MEMORY_MODES)}")
    if requested != "auto":
        return requested
    if not str(device).startswith("cuda") or free_bytes is None:
        return "full"
    if free_bytes < LOW_VRAM_BELOW_GIB * 2**30:
        return "low"
    return "balanced" if free_bytes < BALANCED_BELOW_GIB * 2**30 else "full"


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


def _offload_chain(modules: list[Any], device: str) -> list[Any]:
    """Each of ``modules`` (in the order a request uses them) to CPU memory, moved to ``device``
    when its forward starts, the previous one of the chain going back then. Returns the hooks
    (``hook.offload()`` sends a model back)."""
    from accelerate import cpu_offload_with_hook

    hooks, previous = [], None
    for module in modules:
        if module is None:
            continue
        module.to("cpu")
        _, previous = cpu_offload_with_hook(module, device, prev_module_hook=previous)
        hooks.append(previous)
    return hooks


def enable_low_vram(modules: list[Any], vae: Any, device: str) -> list[Any]:
    """The ``low`` mode: offload ``modules`` (in the order a request uses them) to the CPU, each
    moved to ``device`` while it runs; tile and slice the ``vae``'s decode. Returns the hooks."""
    hooks = _offload_chain(modules, device)
    vae.enable_tiling()
    vae.enable_slicing()
    return hooks


def enable_balanced(encoders: list[Any], resident: list[Any], device: str) -> list[Any]:
    """The ``balanced`` mode: the ``encoders`` (text encoders, image encoder) offloaded as in the
    low mode; the ``resident`` models (UNet, VAE, TAESD) moved to ``device`` for good. Returns the
    encoders' hooks (the engine sends them all back once a request's conditions are computed)."""
    for module in resident:
        if module is not None:
            module.to(device)
    return _offload_chain(encoders, device)


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
    if mode == "full":
        tries.insert(0, "the balanced or the low-VRAM mode (--memory balanced or --memory low, or "
                        "Engine.load(..., memory='balanced'))")
    elif mode == "balanced":
        tries.insert(0, "the low-VRAM mode (--memory low, or Engine.load(..., memory='low'))")
    return OutOfMemoryError(
        f"out of memory on {device} generating {images} image(s) at {width}×{height}: try "
        + ", ".join(tries[:-1]) + f" or {tries[-1]}. (the device said: {said})"
    )
