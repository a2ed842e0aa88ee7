"""FastFace attention-manipulation transforms (SPEC §3), as pure tensor functions.

All functions take identity-branch attention probabilities laid out (batch, heads, queries, tokens):
A = softmax(Q K′ᵀ / √d) restricted to the identity tokens. By default none of them mixes samples of
a batch, so an image never depends on its batch-mates or on which guidance branches are batched with
it. The authors' code pools AM2's min–max over its whole UNet batch, which is always the three DCG
branches of one image; ``group`` > 1 reproduces that, pooling over consecutive groups of samples
(the branches of one image), never across images (SPEC §3).
"""

from __future__ import annotations

import torch

EPS = 1e-6


def scale_power(probs: torch.Tensor, scale: float | torch.Tensor, power: float, cap: float = 10.0) -> torch.Tensor:
    """AM1 "scale-power", FastFace Eq. 8 (capped): Ã = min(s · A^p, cap).

    probs: (B, heads, Q, T) → (B, heads, Q, T). ``scale`` may be a float or broadcastable tensor.
    """
    return torch.clamp(scale * probs.pow(power), max=cap)


def _minmax_stats(x: torch.Tensor, group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """min and 1/(max − min) over heads and queries per token, per sample (``group`` = 1) or per
    consecutive group of ``group`` samples: (B, 1, 1, T) each."""
    b, t = x.shape[0], x.shape[-1]
    if b % group:
        raise ValueError(f"a batch of {b} samples does not split into groups of {group}")
    flat = x.reshape(b // group, -1, t)  # (B/group, group·heads·Q, T)
    lo, hi = torch.aminmax(flat, dim=1, keepdim=True)  # (B/group, 1, T) each
    inv = (hi - lo).clamp_min(EPS).reciprocal()
    if group > 1:
        lo, inv = lo.repeat_interleave(group, dim=0), inv.repeat_interleave(group, dim=0)
    return lo.unsqueeze(1), inv.unsqueeze(1)


def minmax_norm(x: torch.Tensor, group: int = 1) -> torch.Tensor:
    """norm(·) of FastFace Eq. 9: min–max to [0, 1] over heads and queries, separately for every
    token and every sample (``group`` = 1) or group of ``group`` consecutive samples.
    x: (B, heads, Q, T) → (B, heads, Q, T)."""
    lo, inv = _minmax_stats(x, group)
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
    group: int = 1,
) -> torch.Tensor:
    """AM2 "scheduled softmask", FastFace Eq. 9 as corrected by SPEC §3 (steps 1–6).

    1. token 0 inverted (A₀ ← 1 − A₀): its map attends to the background;
    2. norm(A): min–max over (heads, queries) per token and per sample (or per ``group`` of
       consecutive samples: the authors' pooling over the branches of one image);
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
    # The authors' custom_dca.py rounds this quantile to float16 (``torch.quantile(...).half()``)
    # whatever the model's dtype; we keep it in the working dtype. In float32 that is the one
    # remaining authors-vs-ours difference of AM2: about 2e-4 relative on the probabilities.
    q = quantile_over_queries(a, quantile).clamp_min(EPS)  # (B, H, 1, T)
    # d·(norm(A) − q) = A·(d/range) − d·(lo/range + q): the affine parts are folded into small
    # (B, H, 1, T) tensors so the full-size map sees one fused multiply-add and the sigmoid.
    lo, inv = _minmax_stats(a, group)
    m = torch.sigmoid(torch.addcmul(-sharpness * (lo * inv + q), a, sharpness * inv))
    lo2, inv2 = _minmax_stats(m, group)
    out = (m - lo2).mul_(scale * inv2).clamp_(max=cap)  # min(s · norm(M), cap)
    if invert_first_token:
        first = out[..., 0]  # (B, H, Q)
        out[..., 0] = first.amax(dim=2, keepdim=True) - first
    return out


def _std_mean(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased standard deviation and mean over ``dim`` (keepdim), torch.std's convention, which
    the authors' code uses. Written out because ``torch.std`` over a short last axis is several
    times slower on CPU than these four ops."""
    n = x.shape[dim]
    mu = x.mean(dim=dim, keepdim=True)
    dev = x - mu
    var = (dev * dev).sum(dim=dim, keepdim=True) / max(n - 1, 1)
    return var.sqrt(), mu


def adain_blend(x: torch.Tensor, ref: torch.Tensor, weight: float, dim: int = -1, eps: float = EPS) -> torch.Tensor:
    """AdaIN blend, FastFace Eq. 10 / SPEC §3 step 7, with the authors' ε on σ_x:

        x ← w·x + (1 − w)·((x − μ_x)·σ_ref/(σ_x + ε) + μ_ref),   statistics over ``dim``

    ``ref`` is the untransformed tensor (same shape as x); σ are unbiased standard deviations.
    For the probabilities the axis is the token axis; for the identity-branch output it is head_dim
    in the (batch, heads, queries, head_dim) layout, i.e. per head (SPEC §3). Where the blend is NaN
    (NaN inputs), x is kept.
    """
    sd_x, mu_x = _std_mean(x, dim)
    sd_r, mu_r = _std_mean(ref, dim)
    adain = (x - mu_x) * (sd_r / (sd_x + eps)) + mu_r
    blended = torch.lerp(adain, x, weight)  # w·x + (1 − w)·AdaIN(x)
    return torch.where(blended.isnan(), x, blended)
