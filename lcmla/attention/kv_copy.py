"""The authors' KV projection for the reference (LCM-Lookahead's ``KVCopy``, SPEC §4).

In the released model, the reference keys and values are not the encoder's own self-attention K/V:
each attn1 has a separate copy of its ``to_k``/``to_v`` (initialised from the base weights, frozen)
with its own rank-4 LoRA, applied to the same input norm1(x). ``KVCopyLoRA`` holds that LoRA; the
copy's base weights equal the UNet's own, so the processor reads them from ``attn.to_k``'s base layer:

    K_ref = W_k·x + s·B_k·A_k·x,   V_ref = W_v·x + s·B_v·A_v·x

(s the per-call scale). With B = 0 (untrained) this is exactly the base projection.
"""

from __future__ import annotations

import torch
from torch import nn


class LoRAPair(nn.Module):
    """A low-rank update B·A of one linear layer (peft's layout: ``lora_A``, ``lora_B``; B starts at 0)."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, out_features, bias=False)
        nn.init.normal_(self.lora_A.weight, std=1.0 / rank)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) → (..., out)
        return self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))).to(x.dtype)


class KVCopyLoRA(nn.Module):
    """The LoRA of one attn1's KV copy: ``to_k`` and ``to_v`` updates."""

    def __init__(self, in_features: int, out_features: int, rank: int = 4):
        super().__init__()
        self.rank = rank
        self.to_k = LoRAPair(in_features, out_features, rank)
        self.to_v = LoRAPair(in_features, out_features, rank)


def base_linear(layer: nn.Module) -> nn.Module:
    """The frozen base of a (possibly peft-wrapped) linear layer: its own weights, no adapter."""
    return getattr(layer, "base_layer", layer)


def kv_copy_projection(attn, copy: KVCopyLoRA, hidden: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """K_ref, V_ref of the KV copy on ``hidden`` (norm1(x), (B, N, C)): base weights plus the copy's LoRA."""
    key = base_linear(attn.to_k)(hidden)
    value = base_linear(attn.to_v)(hidden)
    if scale != 0:
        key = key + scale * copy.to_k(hidden)
        value = value + scale * copy.to_v(hidden)
    return key, value


def add_kv_copy(unet, rank: int = 4) -> dict[str, KVCopyLoRA]:
    """Give every self-attention processor (lcmla's ``SelfAttnProcessor``) a fresh KV-copy LoRA;
    returns them by processor name. They become submodules of the UNet (trainable, saved)."""
    from .processors import SelfAttnProcessor

    out = {}
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, SelfAttnProcessor):
            attn = unet.get_submodule(name[: -len(".processor")])
            layer = base_linear(attn.to_k)
            ref = layer.weight
            copy = KVCopyLoRA(layer.in_features, layer.out_features, rank).to(ref.device, ref.dtype)
            proc.kv_copy = copy
            out[name] = copy
    if not out:
        raise ValueError("the UNet has no lcmla self-attention processors; install them first (Engine does)")
    return out


def kv_copies(unet) -> dict[str, KVCopyLoRA]:
    """The KV-copy LoRAs present on the UNet's processors, by processor name."""
    return {n: p.kv_copy for n, p in unet.attn_processors.items() if getattr(p, "kv_copy", None) is not None}
