"""Guidance rules as pure tensor functions: one equation, one function.

Branch names used across lcmla (SPEC notation ε(text, id)):
    "uncond" = ε(∅, ∅)   negative/empty prompt, zero identity embedding
    "text"   = ε(text, ∅)
    "id"     = ε(∅, id)
    "full"   = ε(text, id)
All predictions share one shape, (batch, C, H, W).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

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


# ---------------------------------------------------------------------------------------------
# FastFace: decoupled classifier-free guidance (SPEC §2)

_DCG_TERMS = {
    # variant: (first term (minuend, subtrahend), second term (minuend, subtrahend))
    "id-first": (("id", "uncond"), ("full", "id")),  # Eq. 5 / 17
    "text-first": (("text", "uncond"), ("full", "text")),  # Eq. 16
    "independent": (("text", "uncond"), ("id", "uncond")),  # Eq. 18
}


def _per_sample(scale, like: torch.Tensor):
    """A float, or a (B,) tensor broadcast over (B, C, H, W)."""
    if isinstance(scale, torch.Tensor) and scale.ndim == 1:
        return scale.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
    return scale


def decoupled_cfg(preds: Mapping[str, torch.Tensor], a, b, variant: str = "id-first") -> torch.Tensor:
    """Decoupled CFG, FastFace Eq. 5/17 (id-first), Eq. 16 (text-first), Eq. 18 (independent):

        id-first:    ε = ε∅ + a·(ε_i − ε∅) + b·(ε_ti − ε_i)
        text-first:  ε = ε∅ + a·(ε_t − ε∅) + b·(ε_ti − ε_t)
        independent: ε = ε∅ + a·(ε_t − ε∅) + b·(ε_i − ε∅)

    preds: branch name → (B, C, H, W); a, b: floats or (B,) tensors.
    """
    try:
        (p1, m1), (p2, m2) = _DCG_TERMS[variant]
    except KeyError:
        raise ValueError(f"unknown DCG variant {variant!r}; choose one of {', '.join(_DCG_TERMS)}") from None
    uncond = preds["uncond"]
    a, b = _per_sample(a, uncond), _per_sample(b, uncond)
    return uncond + a * (preds[p1] - preds[m1]) + b * (preds[p2] - preds[m2])


def dcg_conditional_branches(variant: str) -> tuple[str, str]:
    """The two conditional branches of a variant (the references of the rescale, Eq. 6)."""
    return {"id-first": ("id", "full"), "text-first": ("text", "full"), "independent": ("text", "id")}[variant]


def dcg_is_plain(a: float, b: float, variant: str) -> bool:
    """True when DCG reduces to the full-condition prediction (a = b = 1 for the telescoping
    variants id-first and text-first; the independent variant never does)."""
    return a == 1.0 and b == 1.0 and variant in ("id-first", "text-first")


def dcg_branches(a: float, b: float, variant: str) -> tuple[str, ...]:
    """The branches one DCG step needs; a plain step needs only "full" (one third of the compute)."""
    if dcg_is_plain(a, b, variant):
        return ("full",)
    return ("uncond",) + dcg_conditional_branches(variant)


def std_per_sample(x: torch.Tensor) -> torch.Tensor:
    """σ(x): standard deviation of each sample over (C, H, W). (B, C, H, W) → (B, 1, 1, 1)."""
    return x.std(dim=tuple(range(1, x.ndim)), keepdim=True)


def rescale_guidance(pred: torch.Tensor, refs: Sequence[torch.Tensor], phi: float) -> torch.Tensor:
    """Guidance rescale, FastFace Eq. 6 (after Lin et al., arXiv 2305.08891):

        f = φ · mean_k σ(ref_k) / σ(ε) + (1 − φ);   ε ← f · ε

    pred and each ref: (B, C, H, W); σ per sample over (C, H, W).
    """
    ref_std = torch.stack([std_per_sample(r) for r in refs]).mean(dim=0)  # (B, 1, 1, 1)
    factor = phi * ref_std / std_per_sample(pred) + (1.0 - phi)
    return factor * pred


# ---------------------------------------------------------------------------------------------
# per-step schedules (for DCG's a and b, and any other per-step knob)


def stretch(values: Sequence[float], steps: int) -> list[float]:
    """Resample a per-step list to ``steps`` entries, keeping the first and last values at the
    first and last step (nearest neighbour on the normalised step position)."""
    n = len(values)
    if n == steps:
        return [float(v) for v in values]
    if steps == 1:
        return [float(values[0])]
    return [float(values[round(k * (n - 1) / (steps - 1))]) for k in range(steps)]


def schedule(kind: str, values: Sequence[float], steps: int) -> list[float]:
    """Per-step values: "list" (stretched), "constant" (one value), "linear" or "cosine" (start, end)."""
    if kind == "list":
        return stretch(values, steps)
    if kind == "constant":
        return [float(values[0])] * steps
    start, end = float(values[0]), float(values[-1])
    if steps == 1:
        return [start]
    out = []
    for k in range(steps):
        u = k / (steps - 1)
        if kind == "cosine":
            u = (1.0 - math.cos(math.pi * u)) / 2.0
        elif kind != "linear":
            raise ValueError(f"unknown schedule {kind!r}; choose list, constant, linear or cosine")
        out.append(start + (end - start) * u)
    return out


# ---------------------------------------------------------------------------------------------
# LCM-Lookahead: guidance with the KV path (supplement Eq. 1, SPEC §4)

# what each branch is conditioned on: (text, identity, cached reference K/V)
BRANCH_CONDITIONS = {
    "uncond": (False, False, False),
    "text": (True, False, False),
    "id": (False, True, False),
    "full": (True, True, False),
}
LOOKAHEAD_BRANCH_CONDITIONS = {
    "uncond": (False, False, False),  # all conditions null, no KV
    "nokv": (True, True, False),  # text + adapter, no KV
    "full": (True, True, True),  # everything
    "kv": (False, False, True),  # KV only; text and adapter null
}


def lookahead_weights(s_nokv: float, s_full: float, s_kv: float) -> dict[str, float]:
    """Supplement Eq. 1 regrouped per branch: ε = (1 − Σs)·ε_u + s_nokv·ε_nokv + s_full·ε_full + s_kv·ε_kv."""
    return {"nokv": s_nokv, "full": s_full, "kv": s_kv, "uncond": 1.0 - (s_nokv + s_full + s_kv)}


def lookahead_cfg(preds: Mapping[str, torch.Tensor], s_nokv: float = 3.0, s_full: float = 2.0, s_kv: float = 2.0) -> torch.Tensor:
    """LCM-Lookahead 3-way guidance (supplement Eq. 1):

        ε = ε_u + s_nokv·(ε_nokv − ε_u) + s_full·(ε_full − ε_u) + s_kv·(ε_kv − ε_u)

    computed as (1 − Σs)·ε_u + Σ s_b·ε_b, so a branch whose weight is 0 (including ε_u when the
    scales sum to 1) need not be in ``preds``. preds: branch → (B, C, H, W).
    """
    out = None
    for name, w in lookahead_weights(s_nokv, s_full, s_kv).items():
        if w == 0:
            continue
        term = w * preds[name]
        out = term if out is None else out + term
    if out is None:  # every weight zero
        return torch.zeros_like(next(iter(preds.values())))
    return out


def lookahead_branches(s_nokv: float, s_full: float, s_kv: float, lcm_scheduler: bool = False) -> tuple[str, ...]:
    """The branches ``lookahead_cfg`` needs, no-KV branches first (they share one attention
    call; the KV branches another). With the LCM scheduler only the full branch runs, as in the paper."""
    if lcm_scheduler:
        return ("full",)
    weights = lookahead_weights(s_nokv, s_full, s_kv)
    return tuple(name for name in ("uncond", "nokv", "full", "kv") if weights[name] != 0) or ("uncond",)
