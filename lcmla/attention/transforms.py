"""FastFace attention-manipulation transforms (SPEC §3), as pure tensor functions.

All functions take identity-branch attention probabilities laid out (batch, heads, queries, tokens):
A = softmax(Q K′ᵀ / √d) restricted to the identity tokens. None of them mixes samples of a batch,
so an image never depends on its batch-mates or on which guidance branches are batched with it
(the authors' code pools the min–max over the batch; this implementation does not).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def scale_power(probs: torch.Tensor, scale: float | torch.Tensor, power: float, cap: float = 10.0) -> torch.Tensor:
    """AM1 "scale-power", FastFace Eq. 8 (capped): Ã = min(s · A^p, cap).

    probs: (B, heads, Q, T) → (B, heads, Q, T). ``scale`` may be a float or broadcastable tensor.
    """
    return torch.clamp(scale * probs.pow(power), max=cap)


def _minmax_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """min and 1/(max − min) over heads and queries per sample and token: (B, 1, 1, T) each."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, heads·Q, T)
    lo, hi = torch.aminmax(flat, dim=1, keepdim=True)  # (B, 1, T) each
    return lo.unsqueeze(1), (hi - lo).clamp_min(EPS).reciprocal().unsqueeze(1)


def minmax_norm(x: torch.Tensor) -> torch.Tensor:
    """norm(·) of FastFace Eq. 9: min–max to [0, 1] over heads and queries, separately for every
    sample and token. x: (B, heads, Q, T) → (B, heads, Q, T)."""
    lo, inv = _minmax_stats(x)
    return (x - lo) * inv


def quantile_over_queries(a: torch.Tensor, p: float) -> torch.Tensor:
    """The p-quantile over the query axis (linear interpolation, as ``torch.quantile``), per
    sample/head/token: (B, heads, Q, T) → (B, heads, 1, T). One sort, no dtype round-trip."""
    q = a.shape[2]
    pos = p * (q - 1)
    lo_i = int(pos)
    frac = pos - lo_i
    srt = a.sort(dim=2).values
    lo = srt[:, :, lo_i : lo_i + 1]
    if frac == 0.0 or lo_i + 1 >= q:
        return lo
    return lo + frac * (srt[:, :, lo_i + 1 : lo_i + 2] - lo)


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
        a = probs.clone()
        a[..., 0] = 1.0 - a[..., 0]
    q = quantile_over_queries(a, quantile).clamp_min(EPS)  # (B, H, 1, T)
    # d·(norm(A) − q) = A·(d/range) − d·(lo/range + q): the affine parts are folded into small
    # (B, H, 1, T) tensors so the full-size map sees one fused multiply-add and the sigmoid.
    lo, inv = _minmax_stats(a)
    m = torch.sigmoid(torch.addcmul(-sharpness * (lo * inv + q), a, sharpness * inv))
    lo2, inv2 = _minmax_stats(m)
    out = (m - lo2).mul_(scale * inv2).clamp_(max=cap)  # min(s · norm(M), cap)
    if invert_first_token:
        first = out[..., 0]  # (B, H, Q)
        out[..., 0] = first.amax(dim=2, keepdim=True) - first
    return out


def _std_mean(x: torch.Tensor, dim: int | tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased standard deviation and mean over ``dim`` (keepdim). Written out because
    ``torch.std`` over a short last axis is several times slower on CPU than these four ops."""
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    n = 1
    for d in dims:
        n *= x.shape[d]
    mu = x.mean(dim=dims, keepdim=True)
    dev = x - mu
    var = (dev * dev).sum(dim=dims, keepdim=True) / max(n - 1, 1)
    return var.sqrt(), mu


def adain_blend(x: torch.Tensor, ref: torch.Tensor, weight: float, dim: int | tuple[int, ...]) -> torch.Tensor:
    """AdaIN blend, FastFace Eq. 10 / SPEC §3 step 7:
    x ← w·x + (1 − w)·((x − μ_x)·σ_ref/σ_x + μ_ref), statistics over ``dim``.

    ``ref`` is the untransformed tensor (same shape as x). Where the blend is NaN (σ_x = 0),
    x is kept (SPEC §3 step 7: "if the blend yields NaN keep x"). Standard deviations are the
    unbiased ones (torch's default); σ_ref/σ_x does not depend on that choice.
    """
    if dim in (-1, x.ndim - 1):
        # fast path on the last axis: layer_norm gives (x − μ_x)/σ_x in one kernel. σ_ref/σ_x is
        # the same with biased or unbiased deviations, so the biased ones are used on both sides.
        # eps = 0 keeps σ_x = 0 undefined (NaN), which the guard below turns back into x.
        normed = F.layer_norm(x, x.shape[-1:], eps=0.0)
        mu_r = ref.mean(dim=-1, keepdim=True)
        dev = ref - mu_r
        sd_r = (dev * dev).mean(dim=-1, keepdim=True).sqrt()
        adain = normed * sd_r + mu_r
    else:
        sd_x, mu_x = _std_mean(x, dim)
        sd_r, mu_r = _std_mean(ref, dim)
        adain = (x - mu_x) * (sd_r / sd_x) + mu_r
    blended = torch.lerp(adain, x, weight)  # w·x + (1 − w)·AdaIN(x)
    return torch.where(blended.isnan(), x, blended)
