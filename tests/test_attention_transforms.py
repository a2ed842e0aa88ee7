"""FastFace AM transforms against hand computations (Eq. 8, 9, 10; SPEC §3)."""

import torch

from lcmla.attention import adain_blend, minmax_norm, scale_power, scheduled_softmask


def test_scale_power_by_hand_and_cap():
    a = torch.tensor([0.25, 0.5, 1.0]).reshape(1, 1, 3, 1)
    out = scale_power(a, 2.0, 2.0).flatten().tolist()
    assert out == [0.125, 0.5, 2.0]
    assert scale_power(a * 8, 2.0, 2.0, cap=10.0).flatten().tolist() == [8.0, 10.0, 10.0]
    assert torch.equal(scale_power(a, 1.0, 1.0), a)


def test_minmax_norm_per_sample_and_token():
    x = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]]).reshape(1, 1, 3, 2)
    y = torch.cat([x, 2 * x])  # second sample: different range, same normalised values
    n = minmax_norm(y)
    assert torch.allclose(n[0, 0, :, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.allclose(n[0], n[1])  # samples are normalised independently


def _softmask_by_hand(a, d, p, s, cap):
    """Straight-line re-statement of SPEC §3 steps 1–6 for one token column (no token 0 here)."""
    lo, hi = a.min(), a.max()
    na = (a - lo) / (hi - lo)
    q = torch.quantile(a, p)
    m = torch.sigmoid(d * (na - q))
    m = (m - m.min()) / (m.max() - m.min())
    return torch.clamp(s * m, max=cap)


def test_softmask_matches_hand_computation():
    torch.manual_seed(0)
    a = torch.rand(1, 1, 16, 2)
    out = scheduled_softmask(a, sharpness=5.0, quantile=0.65, scale=1.55, invert_first_token=False)
    for t in range(2):
        assert torch.allclose(out[0, 0, :, t], _softmask_by_hand(a[0, 0, :, t], 5.0, 0.65, 1.55, 10.0), atol=1e-6)


def test_softmask_first_token_inversion():
    torch.manual_seed(1)
    a = torch.rand(1, 1, 16, 2)
    out = scheduled_softmask(a, 7.5, 0.65, 1.0, invert_first_token=True)
    inv = _softmask_by_hand(1 - a[0, 0, :, 0], 7.5, 0.65, 1.0, 10.0)
    assert torch.allclose(out[0, 0, :, 0], inv.max() - inv, atol=1e-6)
    assert torch.allclose(out[0, 0, :, 1], _softmask_by_hand(a[0, 0, :, 1], 7.5, 0.65, 1.0, 10.0), atol=1e-6)


def test_softmask_cap_and_batch_independence():
    torch.manual_seed(2)
    a = torch.rand(2, 3, 16, 4)
    out = scheduled_softmask(a, 5.0, 0.65, 50.0, cap=10.0)
    assert out.max() <= 10.0
    alone = scheduled_softmask(a[:1], 5.0, 0.65, 50.0, cap=10.0)
    assert torch.equal(out[:1], alone)  # a sample never depends on its batch-mates


def test_adain_blend_by_hand():
    x = torch.tensor([1.0, 3.0])  # μ 2, σ √2
    ref = torch.tensor([10.0, 14.0])  # μ 12, σ 2√2
    out = adain_blend(x, ref, 0.25, dim=0)
    # AdaIN(x) = (x − 2)·2 + 12 = [10, 14]; blend = 0.25·x + 0.75·[10, 14]
    assert torch.allclose(out, torch.tensor([7.75, 11.25]))
    assert torch.equal(adain_blend(x, ref, 1.0, dim=0), x)


def test_adain_keeps_x_where_undefined():
    x = torch.tensor([[2.0, 2.0], [1.0, 3.0]])  # first row has σ = 0
    ref = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out = adain_blend(x, ref, 0.5, dim=-1)
    assert torch.equal(out[0], x[0])
    assert torch.isfinite(out).all()


def test_quantile_matches_torch_quantile():
    from lcmla.attention import quantile_over_queries

    torch.manual_seed(3)
    a = torch.rand(2, 3, 37, 4)
    for p in (0.0, 0.3, 0.65, 1.0):
        assert torch.allclose(quantile_over_queries(a, p), torch.quantile(a, p, dim=2, keepdim=True), atol=1e-7)
