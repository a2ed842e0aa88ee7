"""Guidance rules as pure tensor functions: one equation, one function.

Branch names used across lcmla (SPEC notation ε(text, id)):
    "uncond" = ε(∅, ∅)   negative/empty prompt, zero identity embedding
    "text"   = ε(text, ∅)
    "id"     = ε(∅, id)
    "full"   = ε(text, id)
All predictions share one shape, (batch, C, H, W).
"""

from __future__ import annotations

from typing import Mapping

import torch

BRANCHES = ("uncond", "text", "id", "full")


def classic_cfg(preds: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): ε = ε∅ + s·(ε_ti − ε∅).

    The null condition drops both text and identity, as diffusers does for IP-Adapter.
    A scale of 1 returns ``preds["full"]`` itself (the only branch that is then computed).
    """
    if scale == 1.0:
        return preds["full"]
    uncond, full = preds["uncond"], preds["full"]  # (B, C, H, W) each
    return uncond + scale * (full - uncond)


def classic_cfg_branches(scale: float) -> tuple[str, ...]:
    """The branches ``classic_cfg`` needs at ``scale``."""
    return ("full",) if scale == 1.0 else ("uncond", "full")
