"""Load-time speed options: ``torch.compile`` and the channels-last memory format.

``compile`` (``Engine.load(compile=...)``, ``--compile``) is one of :data:`COMPILE_MODES`:

- ``none``: everything eager (the default);
- ``am``: FastFace's transformed identity branch (softmax, AM1/AM2, Ã V′ and the output AdaIN,
  ``transforms.identity_attention``) compiled into a few fused kernels, so AM costs little over the
  fused SDPA it replaces; its Python scalars (d_k, s_k, the AdaIN weight …) are graph inputs, so a
  new value of a knob does not recompile (tested);
- ``unet``: ``am`` plus regional compilation of the UNet (the PyTorch recipe diffusers'
  ``compile_repeated_blocks`` follows): every ``BasicTransformerBlock`` (diffusers' own
  ``UNet2DConditionModel._repeated_blocks``) and every ``ResnetBlock2D`` is compiled in place
  (``nn.Module.compile``: the state dict, the LoRA adapters and every module path stay as they
  are); the glue between them (time embedding, up/down-sampling, FreeU) stays eager. lcmla's
  attention processors stay eager inside the compiled blocks (``torch.compiler.disable``), so the
  per-request attention context never enters a guard. The regions are compiled with
  ``dynamic=True``: the batch (images × branches) and the latent size are symbols from the first
  call, so a new size or image count reuses the graphs (a batch of one is its own graph: dynamo
  specialises sizes 0 and 1; and when the first request is square, duck sizing ties the first
  resnet graph's height to its width, so the first non-square size compiles that one graph
  again: measured on the tiny UNet, 19 graphs then 20); weight shapes stay static, so each
  resnet width gets kernels of its own. SDXL's UNet then needs 38 graphs in all, 19 for a batch of one and 19 for larger batches
  (counted on its real architecture with dynamo alone). ``ResnetBlock2D.forward`` alone holds 26
  of them (12 widths and the mid block's, each at batch one and above): dynamo's default limit is
  8 graphs per code object, past which a block silently runs eagerly, so the regions get
  :data:`RECOMPILE_LIMIT` (tested: no compiled block falls back). A module-state change a
  request makes inside a block (which LoRA adapters are active) is a guard, so it compiles once
  more; a float attribute such as a LoRA scale is a constant in the first graph and, by dynamo's
  automatic-dynamic rule, an input from its second value on.

Warm-up: the first request compiles (and the first with a batch of one or with another module
state); measured by ``benchmarks/bench_gpu.py --compile``, which prints the first request's time
beside the steady state.

``channels_last`` (default on CUDA): the UNet's and VAE's convolutions run in NHWC, which cuDNN's
fastest fp16/bf16 kernels want; the tensors a user sees are unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

from .errors import LcmlaError

__all__ = ["COMPILE_MODES", "RECOMPILE_LIMIT", "apply_channels_last", "apply_compile", "compile_regions",
           "compiled_identity_attention"]

COMPILE_MODES = ("none", "am", "unet")

# The UNet blocks compile="unet" compiles, by class name, besides diffusers' own repeated blocks.
REGION_CLASSES = ("ResnetBlock2D",)
# Graphs one compiled code object may hold before dynamo runs it eagerly (its default is 8): SDXL's
# ResnetBlock2D.forward needs 26 (its widths × {batch 1, batch > 1}); the rest is room for the
# LoRA on/off states a request sets and, for the AM branch, the sets of chosen tokens.
RECOMPILE_LIMIT = 64


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise LcmlaError(f"compile mode {mode!r} is not one of {', '.join(COMPILE_MODES)}")
    return mode


@functools.lru_cache(maxsize=None)
def _compiled(mode: str):
    import torch

    from .attention import transforms

    # dynamic: the layers' shapes (heads, queries, images × branches), the quantile's positions and
    # the knobs' floats are symbols from the first call, so neither a new level or size nor a new
    # d_k, s_k or AdaIN weight recompiles; a structural change (tokens chosen, AdaIN on or off,
    # pooling, grad mode) and a batch of one do: each set of chosen tokens a user tries is a graph
    # of its own, so the function may hold RECOMPILE_LIMIT of them instead of dynamo's 8; past that
    # a call runs eagerly: the same result, never a failure.
    return torch.compile(getattr(transforms, f"identity_attention_{mode}"), dynamic=True,
                         recompile_limit=RECOMPILE_LIMIT)


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
    if mode == "unet":
        compile_regions(unet)
        done.append("UNet")
    return done


def compile_regions(unet: Any, backend: str = "inductor") -> int:
    """Compile, in place, every block of ``unet`` whose class is one of diffusers' repeated blocks
    (``unet._repeated_blocks``) or of :data:`REGION_CLASSES` (see the module docstring), with
    ``torch.compile``'s ``backend`` (the engine's is inductor; the tests also run the regions
    through ``eager``: the same dynamo graphs and guards without inductor's codegen). Returns how many
    blocks were compiled."""
    names = set(getattr(unet, "_repeated_blocks", ()) or ()) | set(REGION_CLASSES)
    blocks = [module for module in unet.modules() if type(module).__name__ in names]
    for block in blocks:
        block.compile(backend=backend, dynamic=True, recompile_limit=RECOMPILE_LIMIT)
    return len(blocks)


def apply_channels_last(*modules: Any) -> None:
    """Convolution weights of ``modules`` (UNet, VAE …; None skipped) in the channels-last format."""
    import torch

    for module in modules:
        if module is not None:
            module.to(memory_format=torch.channels_last)
