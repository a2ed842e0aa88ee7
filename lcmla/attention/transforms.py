"""FastFace attention-manipulation transforms (SPEC §3), as pure tensor functions.

All functions take identity-branch attention probabilities laid out (batch, heads, queries, tokens):
A = softmax(Q K′ᵀ / √d) restricted to the identity tokens. None of them mixes samples of a batch,
so an image never depends on its batch-mates or on which guidance branches are batched with it
(the authors' code pools the min–max over the batch; this implementation does not).
"""

from __future__ import annotations

import torch

EPS = 1e-6


def scale_power(probs: torch.Tensor, scale: float | torch.Tensor, power: float, cap: float = 10.0) -> torch.Tensor:
    """AM1 "scale-power", FastFace Eq. 8 (capped): Ã = min(s · A^p, cap).

    probs: (B, heads, Q, T) → (B, heads, Q, T). ``scale`` may be a float or broadcastable tensor.
    """
    return torch.clamp(scale * probs.pow(power), max=cap)


def minmax_norm(x: torch.Tensor, dims: tuple[int, ...] = (1, 2)) -> torch.Tensor:
    """norm(·) of FastFace Eq. 9: min–max to [0, 1] over ``dims`` (heads and queries by default),
    separately for every sample and token. x: (B, heads, Q, T)."""
    lo = x.amin(dim=dims, keepdim=True)  # (B, 1, 1, T)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(EPS)


def scheduled_softmask(
    probs: torch.Tensor,
    sharpness: float,
    quantile: float,
    scale: float,
    cap: float = 10.0,
    invert_first_token: bool = True,
) -> torch.Tensor:
    """AM2 "scheduled softmask", FastFace Eq. 9 as corrected by SPEC §3 (steps 1–6).

    1. token 0 inverted (A₀ ← 1 − A₀): its map attends to the background;
    2. norm(A): min–max over (heads, queries) per sample and token;
    3. q = quantile of A (not of norm(A)) over queries, per sample/head/token, floored at 1e-6;
    4. M = norm(sigmoid(d · (norm(A) − q)));
    5. Ã = min(s · M, cap);
    6. token 0 turned back: Ã₀ ← max over queries(Ã₀) − Ã₀.
    probs: (B, heads, Q, T) → (B, heads, Q, T). ``sharpness``/``scale`` are this step's d_k, s_k.
    """
    a = probs
    if invert_first_token:
        a = torch.cat([1.0 - a[..., :1], a[..., 1:]], dim=-1)
    q = torch.quantile(a.float(), quantile, dim=2, keepdim=True).clamp_min(EPS).to(a.dtype)  # (B, H, 1, T)
    m = minmax_norm(torch.sigmoid(sharpness * (minmax_norm(a) - q)))
    out = torch.clamp(scale * m, max=cap)
    if invert_first_token:
        first = out[..., :1]
        out = torch.cat([first.amax(dim=2, keepdim=True) - first, out[..., 1:]], dim=-1)
    return out


def adain_blend(x: torch.Tensor, ref: torch.Tensor, weight: float, dim: int | tuple[int, ...]) -> torch.Tensor:
    """AdaIN blend, FastFace Eq. 10 / SPEC §3 step 7:
    x ← w·x + (1 − w)·((x − μ_x)·σ_ref/σ_x + μ_ref), statistics over ``dim``.

    ``ref`` is the untransformed tensor (same shape as x). Where the blend is not finite (σ_x = 0),
    x is kept. Standard deviations are the unbiased ones (torch's default).
    """
    mu_x, sd_x = x.mean(dim=dim, keepdim=True), x.std(dim=dim, keepdim=True)
    mu_r, sd_r = ref.mean(dim=dim, keepdim=True), ref.std(dim=dim, keepdim=True)
    blended = weight * x + (1.0 - weight) * ((x - mu_x) * sd_r / sd_x + mu_r)
    return torch.where(torch.isfinite(blended), blended, x)
