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
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

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
    first and last step (nearest neighbour on the normalised step position; a tie goes towards
    the middle, so a symmetric schedule stays symmetric: [1, 1.5, 1.5, 1] at 7 steps is
    [1, 1.5, 1.5, 1.5, 1.5, 1.5, 1], one untouched step at each end as at 4).

    With fewer steps than values the interior is thinned: [1, 1.5, 1.5, 1] gives [1, 1.5, 1] at
    3 steps, [1, 1] at 2 steps and [1] at 1 step, so a schedule that leaves its ends untouched does
    nothing at all at 1–2 steps (the engine says so in ``Result.notes``)."""
    n = len(values)
    if n == steps:
        return [float(v) for v in values]
    if steps == 1:
        return [float(values[0])]

    def nearest(k: int) -> int:  # the value index of step k, ties towards the middle
        if 2 * k > steps - 1:
            return n - 1 - nearest(steps - 1 - k)
        return (2 * k * (n - 1) + steps - 1) // (2 * (steps - 1))  # floor(k(n−1)/(steps−1) + ½), exact

    return [float(values[nearest(k)]) for k in range(steps)]


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


@dataclass(frozen=True)
class Condition:
    """What one guidance branch is conditioned on (SPEC notation ε(text, id), plus the KV path)."""

    text: bool  # the prompt (else the negative/empty prompt)
    identity: bool  # the identity embedding (else the null identity)
    kv_row: str | None = None  # which KV-encoder row's reference K/V the branch attends to; None: none


BRANCH_CONDITIONS = {
    "uncond": Condition(False, False),
    "text": Condition(True, False),
    "id": Condition(False, True),
    "full": Condition(True, True),
}
# LCM-Lookahead's four branches (supplement Eq. 1). The KV encoder runs two rows like a CFG batch,
# "null" (null text) and "text" (the encoder prompt, "a photo of a face"); as in the authors'
# released pipeline, ε_full reads the text row's K/V and ε_kv (text and adapter null) the null row's.
KV_ROWS = ("null", "text")
LOOKAHEAD_BRANCH_CONDITIONS = {
    "uncond": Condition(False, False),  # all conditions null, no KV
    "nokv": Condition(True, True),  # text + adapter, no KV
    "full": Condition(True, True, "text"),  # everything
    "kv": Condition(False, False, "null"),  # KV only; text and adapter null
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


# ---------------------------------------------------------------------------------------------
# One guidance object per mode: which branches a step runs, and how they combine. The sampler
# loop knows nothing about modes; the model function batches ``branches(step)`` into one UNet call
# and hands the predictions to ``combine``.


class Guidance:
    """The interface of a guidance mode (k-diffusion's "wrap the model function", as an object).

    ``branches(step)``: the branch names the step needs, in UNet batch order;
    ``combine(preds, step)``: one guided ε from {branch: (B, C, H, W)};
    ``display_branch(step)``: the branch whose attention maps are captured for display;
    ``conditions``: branch name → :class:`Condition`.
    """

    conditions: ClassVar[Mapping[str, Condition]] = BRANCH_CONDITIONS

    def branches(self, step: int) -> tuple[str, ...]:  # pragma: no cover - interface
        raise NotImplementedError

    def combine(self, preds: Mapping[str, torch.Tensor], step: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def display_branch(self, step: int) -> str:
        """The full-condition branch where a step runs it; otherwise the identity-bearing branch."""
        names = self.branches(step)
        return "full" if "full" in names else next(n for n in names if self.conditions[n].identity)


@dataclass(frozen=True)
class ClassicGuidance(Guidance):
    """Classifier-free guidance ε∅ + s·(ε_ti − ε∅); at s = 1 only the full branch runs."""

    scale: float

    def branches(self, step: int) -> tuple[str, ...]:
        return classic_cfg_branches(self.scale)

    def combine(self, preds, step):
        return classic_cfg(preds, self.scale)


@dataclass(frozen=True)
class DecoupledGuidance(Guidance):
    """FastFace DCG (Eq. 5/16–18) with per-step a, b and the rescale of Eq. 6 at every step.

    Branches per step (SPEC §2): three (ε∅ and the variant's two conditional branches) where
    a ≠ 1 or b ≠ 1. At a = b = 1 the telescoping variants reduce to ε_ti, but the rescale still
    reads σ of both conditional branches: such a step runs those two (one, ε_ti, when φ = 0). The
    independent variant never reduces. ``authors_batch`` runs the authors' three branches at every
    step and combines with their literal formula (for reproducing their numbers exactly).
    """

    a: tuple[float, ...]  # one value per step
    b: tuple[float, ...]
    variant: str = "id-first"
    phi: float = 0.75
    authors_batch: bool = False

    def __post_init__(self) -> None:
        if self.variant not in _DCG_TERMS:
            raise ValueError(f"unknown DCG variant {self.variant!r}; choose one of {', '.join(_DCG_TERMS)}")

    def plain(self, step: int) -> bool:
        """a = b = 1 in a telescoping variant: the combination is ε_ti itself."""
        return (not self.authors_batch and self.a[step] == 1.0 and self.b[step] == 1.0
                and self.variant in ("id-first", "text-first"))

    def branches(self, step: int) -> tuple[str, ...]:
        cond = dcg_conditional_branches(self.variant)
        if not self.plain(step):
            return ("uncond",) + cond
        return cond if self.phi > 0 else ("full",)

    def combine(self, preds, step):
        if self.plain(step):
            eps = preds["full"]  # ε∅ + (ε_i − ε∅) + (ε_ti − ε_i) = ε_ti exactly
        else:
            eps = decoupled_cfg(preds, self.a[step], self.b[step], self.variant)
        if self.phi > 0:
            eps = rescale_guidance(eps, [preds[k] for k in dcg_conditional_branches(self.variant)], self.phi)
        return eps


@dataclass(frozen=True)
class LookaheadGuidance(Guidance):
    """LCM-Lookahead's KV-path guidance (supplement Eq. 1); zero-weight branches are not run, and
    under the LCM scheduler only the full branch runs, as in the paper."""

    s_nokv: float = 3.0
    s_full: float = 2.0
    s_kv: float = 2.0
    lcm_scheduler: bool = False
    conditions: ClassVar[Mapping[str, Condition]] = LOOKAHEAD_BRANCH_CONDITIONS

    def branches(self, step: int) -> tuple[str, ...]:
        """No-KV branches first, KV branches last (each group shares one attention call)."""
        if self.lcm_scheduler:
            return ("full",)
        weights = lookahead_weights(self.s_nokv, self.s_full, self.s_kv)
        return tuple(n for n in ("uncond", "nokv", "full", "kv") if weights[n] != 0) or ("uncond",)

    def combine(self, preds, step):
        if self.lcm_scheduler:
            return preds["full"]
        return lookahead_cfg(preds, self.s_nokv, self.s_full, self.s_kv)


def guidance_for(settings, num_steps: int, lcm_scheduler: bool = False) -> Guidance:
    """The guidance object a request asks for (``settings``: a resolved GenerationSettings)."""
    g, lh, att = settings.guidance, settings.lookahead, settings.attention
    if lh.kv:
        return LookaheadGuidance(lh.s_nokv, lh.s_full, lh.s_kv, lcm_scheduler=lcm_scheduler)
    authors = att.am_norm_scope == "image-branches"
    if g.dcg:
        return DecoupledGuidance(tuple(schedule(g.dcg_schedule, g.dcg_a, num_steps)),
                                 tuple(schedule(g.dcg_schedule, g.dcg_b, num_steps)),
                                 g.dcg_variant, g.rescale_phi, authors_batch=authors)
    if authors:  # the authors run classic CFG as DCG with a = b = s and no rescale, three branches
        scale = (float(g.guidance_scale),) * num_steps
        return DecoupledGuidance(scale, scale, "id-first", 0.0, authors_batch=True)
    return ClassicGuidance(float(g.guidance_scale))
