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
    consecutive group of ``group`` samples: (B, 1, 1, T) each. The reciprocal is at least float32
    whatever x's dtype: a flat map (range below EPS, e.g. AM2's sigmoid at sharpness 0) gives 1/EPS = 1e6,
    which float16 would round to inf and 0 · inf to NaN."""
    b, t = x.shape[0], x.shape[-1]
    if b % group:
        raise ValueError(f"a batch of {b} samples does not split into groups of {group}")
    flat = x.reshape(b // group, -1, t)  # (B/group, group·heads·Q, T)
    lo, hi = torch.aminmax(flat, dim=1, keepdim=True)  # (B/group, 1, T) each
    inv = (hi - lo).to(torch.promote_types(x.dtype, torch.float32)).clamp_min(EPS).reciprocal()  # see the docstring
    if group > 1:
        lo, inv = lo.repeat_interleave(group, dim=0), inv.repeat_interleave(group, dim=0)
    return lo.unsqueeze(1), inv.unsqueeze(1)


def minmax_norm(x: torch.Tensor, group: int = 1) -> torch.Tensor:
    """norm(·) of FastFace Eq. 9: min–max to [0, 1] over heads and queries, separately for every
    token and every sample (``group`` = 1) or group of ``group`` consecutive samples.
    x: (B, heads, Q, T) → (B, heads, Q, T)."""
    lo, inv = _minmax_stats(x, group)
    return (x - lo).mul_(inv)  # in x's dtype (the float32 factor is applied element by element)


def quantile_positions(n: int, p: float) -> tuple[int, int, float]:
    """Where the p-quantile of n sorted values lies, with ``torch.quantile``'s linear
    interpolation: (lower index, upper index, fraction between them)."""
    pos = p * (n - 1)
    lo = int(pos)
    return lo, min(lo + 1, n - 1), pos - lo


def quantile_over_queries(a: torch.Tensor, p: float, at: tuple[int, int, float] | None = None) -> torch.Tensor:
    """The p-quantile over the query axis (linear interpolation, as ``torch.quantile``), per
    sample/head/token: (B, heads, Q, T) → (B, heads, 1, T). No dtype round-trip.
    ``at``: :func:`quantile_positions` computed by the caller (a compiled caller must: under
    ``torch.compile`` with symbolic floats, ``int(p · (Q − 1))`` is not traced faithfully)."""
    lo_i, hi_i, frac = at if at is not None else quantile_positions(a.shape[2], p)
    # two order statistics (selection, not a full sort: the sort was a third of AM2's time)
    rows = a.transpose(2, 3).contiguous()  # (B, H, T, Q): one copy, then selection along the last axis
    lo = rows.kthvalue(lo_i + 1, dim=-1).values.unsqueeze(2)  # (B, H, 1, T)
    hi = rows.kthvalue(hi_i + 1, dim=-1).values.unsqueeze(2)
    return lo + frac * (hi - lo)


def scheduled_softmask(
    probs: torch.Tensor,
    sharpness: float,
    quantile: float,
    scale: float,
    cap: float = 10.0,
    invert_first_token: bool = True,
    group: int = 1,
    quantile_at: tuple[int, int, float] | None = None,
) -> torch.Tensor:
    """AM2 "scheduled softmask", FastFace Eq. 9 as corrected by SPEC §3 (steps 1–6).

    1. token 0 inverted (A₀ ← 1 − A₀): its map attends to the background;
    2. norm(A): min–max over (heads, queries) per token and per sample (or per ``group`` of
       consecutive samples: the authors' pooling over the branches of one image);
    3. q = quantile of A (not of norm(A)) over queries, per sample/head/token, floored at 1e-6;
    4. M = norm(sigmoid(d · (norm(A) − q)));
    5. Ã = min(s · M, cap);
    6. token 0 turned back: Ã₀ ← max over queries(Ã₀) − Ã₀.
    probs: (B, heads, Q, T) → (B, heads, Q, T). ``sharpness``/``scale`` are this step's d_k, s_k;
    ``quantile_at``: see :func:`quantile_over_queries`.
    """
    a = probs
    if invert_first_token:
        a = probs.clone()
        a[..., 0] = 1.0 - a[..., 0]
    # The authors' custom_dca.py rounds this quantile to float16 (``torch.quantile(...).half()``)
    # whatever the model's dtype; we keep it in the working dtype. In float32 that is the one
    # remaining authors-vs-ours difference of AM2: about 2e-4 relative on the probabilities.
    q = quantile_over_queries(a, quantile, quantile_at).clamp_min(EPS)  # (B, H, 1, T)
    # d·(norm(A) − q) = A·(d/range) − d·(lo/range + q): the affine parts are folded into small
    # (B, H, 1, T) tensors so the full-size map sees one fused multiply-add and the sigmoid.
    lo, inv = _minmax_stats(a, group)
    big = torch.finfo(a.dtype).max  # the folded factors are ≥ float32; in a's dtype they must stay finite
    bias = (-sharpness * (lo.to(inv.dtype) * inv + q.to(inv.dtype))).clamp(-big, big).to(a.dtype)
    m = torch.sigmoid(torch.addcmul(bias, a, (sharpness * inv).clamp(max=big).to(a.dtype)))
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
    # w·x + (1 − w)·AdaIN(x), written out: torch.lerp's scalar weight would be a compile-time constant
    blended = x * weight + adain * (1.0 - weight)
    return torch.where(blended.isnan(), x, blended)


def adain_blend_mixtures(mix: torch.Tensor, ref_mix: torch.Tensor, value: torch.Tensor, weight: float,
                         eps: float = EPS) -> torch.Tensor:
    """:func:`adain_blend` of the outputs x = mix·V against ref = ref_mix·V over head_dim (SPEC §3
    step 7, AM2's output AdaIN), computed from the mixtures instead of the outputs.

    Every output row is a mixture x = a V of the T value rows (a: (T,), V: (T, d)), so its
    statistics over d follow from T-sized quantities: μ = a·m and σ² = a G aᵀ, with m the row means
    of V and G = (V − m)(V − m)ᵀ / (d − 1). The blend w·x + (1 − w)·((x − μ_x)·σ_r/(σ_x + ε) + μ_r)
    is then x·α + β per row, with α = w + (1 − w)·r, β = (1 − w)·(μ_r − μ_x·r), r = σ_r/(σ_x + ε),
    and the whole result is ONE matmul of [a·α, β] with [V; 1]: no elementwise pass over the
    (B, heads, Q, d) output. Rows whose blend is NaN (NaN inputs) keep x, as in ``adain_blend``.
    mix, ref_mix: (B, heads, Q, T); value: (B, heads, T, d) → (B, heads, Q, d).
    """
    d = value.shape[-1]
    # the statistics are small tensors: in float32 at least, whatever the model's dtype
    work = torch.promote_types(value.dtype, torch.float32)
    v32 = value.to(work)
    means = v32.mean(dim=-1)  # (B, H, T)
    centred = v32 - means.unsqueeze(-1)
    gram = torch.matmul(centred, centred.transpose(-1, -2)) / max(d - 1, 1)  # (B, H, T, T)

    def sd_mean(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, H, Q, 1) each
        a = a.to(work)
        mu = (a * means.unsqueeze(-2)).sum(dim=-1, keepdim=True)
        var = (torch.matmul(a, gram) * a).sum(dim=-1, keepdim=True).clamp_min(0.0)
        return var.sqrt(), mu

    sd_x, mu_x = sd_mean(mix)
    sd_r, mu_r = sd_mean(ref_mix)
    r = sd_r / (sd_x + eps)
    alpha = weight + (1.0 - weight) * r  # (B, H, Q, 1)
    beta = (1.0 - weight) * (mu_r - mu_x * r)
    bad = alpha.isnan() | beta.isnan()
    alpha, beta = torch.where(bad, 1.0, alpha), torch.where(bad, 0.0, beta)
    ones = torch.ones_like(value[..., :1, :])  # (B, H, 1, d)
    rows = torch.cat([mix * alpha.to(mix.dtype), beta.to(mix.dtype)], dim=-1)  # (B, H, Q, T + 1)
    return torch.matmul(rows, torch.cat([value, ones], dim=-2))


def am_transform(
    probs: torch.Tensor,
    *,
    mode: str,
    chosen: tuple[bool, ...] | None = None,
    am1_scale: float = 1.0,
    am1_power: float = 1.0,
    sharpness: float = 0.0,
    quantile: float = 0.5,
    am2_scale: float = 1.0,
    adain: bool = False,
    adain_weight: float = 1.0,
    cap: float = 10.0,
    group: int = 1,
    quantile_at: tuple[int, int, float] | None = None,
) -> torch.Tensor:
    """Ã: one AM transform of one layer at one step, FastFace §3.2 (SPEC §3), on the tokens
    ``chosen`` marks (one bool per identity token; None: all); the other tokens keep A. AM1 is
    :func:`scale_power` with this layer's scale; AM2 is :func:`scheduled_softmask` with this
    step's d_k and s_k, then (``adain``) the AdaIN blend against A over the token axis, which sees
    all tokens. A compiled caller passes ``quantile_at`` (:func:`quantile_positions` of Q and the
    quantile).
    probs: (B, heads, Q, T) → (B, heads, Q, T)."""
    if mode == "am1":
        new = scale_power(probs, am1_scale, am1_power, cap)
    elif mode == "am2":
        new = scheduled_softmask(probs, sharpness, quantile, am2_scale, cap, invert_first_token=True, group=group,
                                 quantile_at=quantile_at)
    else:
        raise ValueError(f"unknown AM mode {mode!r}")
    if chosen is not None and not all(chosen):
        # bools, not token indices: under torch.compile, ints become symbols, and a mask built
        # from symbolic indices is not traced faithfully (torch 2.13)
        if len(chosen) != probs.shape[-1]:
            raise ValueError(f"chosen marks {len(chosen)} tokens, the attention has {probs.shape[-1]}")
        keep = torch.tensor([not c for c in chosen], device=probs.device)  # (T,) tokens left as A
        new = torch.where(keep, probs, new)
    if mode == "am2" and adain:
        new = adain_blend(new, probs, adain_weight, dim=-1)  # over the token axis
    return new


def identity_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, softmax_scale: float,
                       **am) -> torch.Tensor:
    """The transformed identity branch Ã V′ of FastFace Eq. 7 in one function (what
    ``lcmla.acceleration`` compiles into a few fused kernels):

        A = softmax(Q K′ᵀ · softmax_scale);  Ã = am_transform(A);  out = Ã V′

    and, for AM2 with AdaIN, the output blended against the untransformed A V′ with statistics per
    head over head_dim (SPEC §3 step 7; :func:`adain_blend_mixtures`, one matmul). ``am``:
    :func:`am_transform`'s keywords.
    query (B, heads, Q, d), key/value (B, heads, T, d) → (B, heads, Q, d)."""
    probs = identity_probs(query, key, softmax_scale)
    return transformed_output(probs, am_transform(probs, **am), value, **am)


def transformed_output(probs: torch.Tensor, new: torch.Tensor, value: torch.Tensor, **am) -> torch.Tensor:
    """Ã V′ from the identity probabilities A and their transform Ã; for AM2 with AdaIN, blended
    against A V′ per head over head_dim (SPEC §3 step 7, :func:`adain_blend_mixtures`).
    probs/new (B, heads, Q, T), value (B, heads, T, d) → (B, heads, Q, d)."""
    if am["mode"] == "am2" and am.get("adain", False):
        return adain_blend_mixtures(new, probs, value, am["adain_weight"])
    return torch.matmul(new, value)


def identity_attention_am1(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, softmax_scale: float,
                           **am) -> torch.Tensor:
    """:func:`identity_attention` for AM1 only: its own code object, so that ``torch.compile``
    keeps AM1's graphs apart from AM2's (dynamo's recompile limit counts per code object)."""
    return identity_attention(query, key, value, softmax_scale, **am)


def identity_attention_am2(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, softmax_scale: float,
                           **am) -> torch.Tensor:
    """:func:`identity_attention` for AM2 only (see :func:`identity_attention_am1`)."""
    return identity_attention(query, key, value, softmax_scale, **am)


def identity_probs(query: torch.Tensor, key: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """A = softmax(Q K′ᵀ · softmax_scale) over the identity tokens, FastFace Eq. 3's second term.
    query (B, heads, Q, d), key (B, heads, T, d) → (B, heads, Q, T)."""
    return (torch.matmul(query, key.transpose(-1, -2)) * softmax_scale).softmax(dim=-1)
