"""Load-time speed options: ``torch.compile`` and the channels-last memory format.

``compile`` (``Engine.load(compile=...)``, ``--compile``) is one of :data:`COMPILE_MODES`:

- ``none``: everything eager (the default);
- ``am``: FastFace's transformed identity branch (softmax, AM1/AM2, Ã V′ and the output AdaIN,
  ``transforms.identity_attention``) compiled into a few fused kernels, so AM costs little over the
  fused SDPA it replaces; its Python scalars (d_k, s_k, the AdaIN weight …) are graph inputs, so a
  new value of a knob does not recompile (tested);
- ``unet``: ``am`` plus the UNet itself compiled in place (``nn.Module.compile``: the state dict, the
  LoRA adapters and every module path stay as they are). lcmla's attention processors stay eager
  (the compiled graph calls them: ``torch.compiler.disable``), so the per-request attention context
  never enters a guard; what is compiled is everything between them (resnets, norms, feed-forwards,
  projections). A graph is specialised on the latent size and batch and on the module state a
  request sets (FreeU on/off, which LoRA adapters are active). A float attribute such as a LoRA
  scale or a FreeU factor is a constant in the first graph; dynamo's automatic-dynamic rule makes
  it an input when a second value arrives (one recompile), and later values reuse that graph.

Warm-up: the first request of each new shape (size, images × branches) compiles. Measured by
``benchmarks/bench_gpu.py --compile`` (it prints the first request's time beside the steady state).

``channels_last`` (default on CUDA): the UNet's and VAE's convolutions run in NHWC, which cuDNN's
fastest fp16/bf16 kernels want; the tensors a user sees are unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

from .errors import LcmlaError

__all__ = ["COMPILE_MODES", "apply_channels_last", "apply_compile", "compiled_identity_attention"]

COMPILE_MODES = ("none", "am", "unet")


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise LcmlaError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    return mode


@functools.lru_cache(maxsize=None)
def _compiled(mode: str):
    import torch

    from .attention import transforms

    # dynamic: the layers' shapes (heads, queries, images × branches) and the knobs' floats are
    # symbols from the first call, so neither a new level nor a new d_k, s_k or AdaIN weight
    # recompiles; a structural change (tokens chosen, pooling, a quantile's positions, grad mode)
    # does. Past dynamo's recompile limit (8 graphs per mode) a call runs eagerly: the same
    # result, never a failure.
    return torch.compile(getattr(transforms, f"identity_attention_{mode}"), dynamic=True)


def compiled_identity_attention(query, key, value, softmax_scale: float, **am):
    """``transforms.identity_attention`` compiled with ``torch.compile``, one compiled function per
    AM mode shared by every layer (each compiles at its first call). Arguments as the eager one's,
    resolved as ``IdentityAttnProcessor.am_arguments`` resolves them."""
    return _compiled(am["mode"])(query, key, value, softmax_scale, **am)


def apply_compile(unet: Any, mode: str) -> list[str]:
    """Compile per ``mode`` (see the module docstring). Returns what was compiled, for the engine's
    notes. Call once, at load time, after lcmla's processors are installed."""
    from .attention.processors import IdentityAttnProcessor

    check_compile_mode(mode)
    done: list[str] = []
    if mode == "none":
        return done
    for proc in unet.attn_processors.values():
        if isinstance(proc, IdentityAttnProcessor):
            proc.am_attention = compiled_identity_attention
    done.append("AM identity branch")
    if mode == "unet":  # lcmla's processors are opaque to dynamo (torch.compiler.disable on __call__)
        unet.compile(dynamic=None)
        done.append("UNet")
    return done


def apply_channels_last(*modules: Any) -> None:
    """Convolution weights of ``modules`` (UNet, VAE …; None skipped) in the channels-last format."""
    import torch

    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)
