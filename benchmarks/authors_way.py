"""The FastFace authors' way of computing the transformed identity branch, for the benchmarks only.

Written from a reading of their ``custom_dca.py`` (not copied): the same mathematics as
``lcmla.attention.transforms.identity_attention`` (AM2 with the output AdaIN, SPEC §3), computed
with the operations they use, so that ``bench_gpu.py`` measures their cost on the same model:

- the attention probabilities by an explicit softmax, with an all-zero bias built in host memory
  and copied to the device at every call;
- the quantile over queries by ``torch.quantile`` on a float32 copy (a full sort), rounded to
  float16, expanded to the map's shape;
- the chosen tokens gathered out and scattered back, token 0 inverted in place;
- a check that the transformed map is non-negative and one that the output AdaIN has no NaN, each
  a device-to-host read (a synchronisation) per layer;
- both AdaINs over full tensors with ``torch.std``, the output one over the (B, heads, Q, d)
  outputs, whose untransformed version is a second matmul.

The installed hook is ``IdentityAttnProcessor.am_attention`` (the one the engine's ``compile``
option sets), so nothing else of the engine changes. The result equals ours to the float16
rounding of the quantile.
"""

from __future__ import annotations

import torch


def _norm(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(0, 1, 2), keepdim=True)  # pooled over the whole batch: the authors' scope
    return (x - lo) / (x.amax(dim=(0, 1, 2), keepdim=True) - lo)


def _adain(x: torch.Tensor, ref: torch.Tensor, w: float, eps: float = 1e-6) -> torch.Tensor:
    rescaled = (x - x.mean(-1, keepdim=True)) * (ref.std(-1, keepdim=True) / (x.std(-1, keepdim=True) + eps)) \
        + ref.mean(-1, keepdim=True)
    return w * x + (1 - w) * rescaled


def authors_identity_attention(query, key, value, softmax_scale: float, **am) -> torch.Tensor:
    """AM2 (+ AdaIN) as the authors compute it; (B, heads, Q, d) like ``identity_attention``.
    Only AM2 with every token chosen is modelled (their am2_and_dcg configuration)."""
    if am["mode"] != "am2" or not all(am["chosen"]):
        raise ValueError("the authors' way is modelled for AM2 on every identity token only")
    n_q, n_t = query.shape[-2], key.shape[-2]
    bias = torch.zeros(n_q, n_t, dtype=query.dtype)  # host memory, copied below
    weights = query @ key.transpose(-2, -1) * softmax_scale
    weights = weights + bias.to(weights.device)
    weights = torch.softmax(weights, dim=-1)
    orig = weights.clone()
    tokens = list(range(n_t))
    targ = weights[:, :, :, tokens]
    targ[:, :, :, [0]] = 1 - targ[:, :, :, [0]]
    qv = torch.quantile(targ.float(), q=am["quantile"], dim=-2, keepdim=True).half().expand_as(targ)
    qv = torch.clamp(qv, min=1e-6)
    mask = 1 / (1 + torch.exp(-am["sharpness"] * (_norm(targ) - qv)))
    targ = torch.clamp(_norm(mask) * am["am2_scale"], max=am["cap"])
    first = targ[:, :, :, [0]]
    targ[:, :, :, [0]] = torch.max(first, dim=-2, keepdim=True).values.expand_as(first) - first
    if not torch.all(targ >= 0):  # a synchronisation, as theirs
        raise ValueError("negative transformed attention")
    weights[:, :, :, tokens] = targ
    if am.get("adain", False):
        weights = _adain(weights, orig, am["adain_weight"])
    out = weights @ value
    if am.get("adain", False):
        rescaled = _adain(out, orig @ value, am["adain_weight"])
        if torch.isnan(rescaled).any():  # a synchronisation, as theirs
            return out
        out = rescaled
    return out
