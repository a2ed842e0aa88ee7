"""FastFace AM transforms against hand computations (Eq. 8, 9, 10; SPEC §3)."""

import pytest
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
    """Straight-line re-statement of SPEC §3 steps 2–5 for one token of one sample: ``a`` is
    (heads, Q); the min–max spans heads and queries, the quantile is per head over queries."""
    lo, hi = a.min(), a.max()
    na = (a - lo) / (hi - lo)
    q = torch.quantile(a, p, dim=-1, keepdim=True).clamp_min(1e-6)  # (heads, 1), floored (step 3)
    m = torch.sigmoid(d * (na - q))
    m = (m - m.min()) / (m.max() - m.min())
    return torch.clamp(s * m, max=cap)


def test_softmask_matches_hand_computation():
    torch.manual_seed(0)
    a = torch.rand(1, 3, 16, 2)  # three heads: pooled-over-heads and per-head statistics differ
    out = scheduled_softmask(a, sharpness=5.0, quantile=0.65, scale=1.55, invert_first_token=False)
    for t in range(2):
        assert torch.allclose(out[0, :, :, t], _softmask_by_hand(a[0, :, :, t], 5.0, 0.65, 1.55, 10.0), atol=1e-6)
    # a per-head min–max would be a different transform: make sure the test can tell them apart
    per_head = torch.stack([_softmask_by_hand(a[0, h:h + 1, :, 0], 5.0, 0.65, 1.55, 10.0)[0] for h in range(3)])
    assert not torch.allclose(per_head, out[0, :, :, 0], atol=1e-3)


def test_softmask_quantile_is_floored_at_1e_6():
    """SPEC §3 step 3: q is floored at 1e-6. A token whose 0.25-quantile is exactly 0, at a
    sharpness where the floor moves the sigmoid visibly (unfloored the middle level would be
    norm(σ(0), σ(1), σ(1e5)) = 0.462 instead of 0.449)."""
    col = torch.tensor([0.0, 0.0, 0.0, 1e-5, 1e-5, 1.0, 1.0, 1.0])
    a = torch.stack([torch.full_like(col, 0.5), col], dim=-1)[None, None]  # (1, 1, 8, 2)
    out = scheduled_softmask(a, sharpness=1e5, quantile=0.25, scale=1.0, invert_first_token=False)
    want = _softmask_by_hand(a[0, :, :, 1].double(), 1e5, 0.25, 1.0, 10.0)[0].float()
    assert torch.allclose(out[0, 0, :, 1], want, atol=1e-4)
    assert abs(float(want[3]) - 0.449) < 2e-3  # and not the unfloored 0.462


def test_softmask_first_token_inversion():
    torch.manual_seed(1)
    a = torch.rand(1, 2, 16, 2)
    out = scheduled_softmask(a, 7.5, 0.65, 1.0, invert_first_token=True)
    inv = _softmask_by_hand(1 - a[0, :, :, 0], 7.5, 0.65, 1.0, 10.0)  # (heads, Q)
    assert torch.allclose(out[0, :, :, 0], inv.amax(dim=-1, keepdim=True) - inv, atol=1e-6)
    assert torch.allclose(out[0, :, :, 1], _softmask_by_hand(a[0, :, :, 1], 7.5, 0.65, 1.0, 10.0), atol=1e-6)


def test_softmask_group_pools_over_the_branches_of_one_image():
    """``group`` = n reproduces the authors' min–max over their whole batch (the n branches of one
    image), and never reaches across images: two images of 3 branches each."""
    torch.manual_seed(4)
    a = torch.rand(6, 2, 16, 3)
    out = scheduled_softmask(a, 5.0, 0.65, 1.55, invert_first_token=False, group=3)
    for img in range(2):
        branches = a[3 * img:3 * img + 3]  # (3, heads, Q, T)
        for t in range(3):
            col = branches[..., t]  # (3, heads, Q)
            lo, hi = col.min(), col.max()  # pooled over branches, heads and queries
            na = (col - lo) / (hi - lo)
            q = torch.quantile(col, 0.65, dim=-1, keepdim=True)
            m = torch.sigmoid(5.0 * (na - q))
            m = (m - m.min()) / (m.max() - m.min())
            assert torch.allclose(out[3 * img:3 * img + 3, :, :, t], torch.clamp(1.55 * m, max=10.0), atol=1e-6)
    # image 1's result does not depend on image 0's branches
    alone = scheduled_softmask(a[3:], 5.0, 0.65, 1.55, invert_first_token=False, group=3)
    assert torch.equal(out[3:], alone)
    # and differs from per-sample statistics
    assert not torch.allclose(out, scheduled_softmask(a, 5.0, 0.65, 1.55, invert_first_token=False), atol=1e-3)


def test_softmask_cap_and_batch_independence():
    torch.manual_seed(2)
    a = torch.rand(2, 3, 16, 4)
    out = scheduled_softmask(a, 5.0, 0.65, 50.0, cap=10.0)
    assert out.max() <= 10.0
    alone = scheduled_softmask(a[:1], 5.0, 0.65, 50.0, cap=10.0)
    assert torch.equal(out[:1], alone)  # a sample never depends on its batch-mates


def test_adain_blend_by_hand():
    x = torch.tensor([1.0, 3.0], dtype=torch.float64)  # μ 2, σ √2 (unbiased)
    ref = torch.tensor([10.0, 14.0], dtype=torch.float64)  # μ 12, σ 2√2
    out = adain_blend(x, ref, 0.25, dim=0, eps=0.0)
    # AdaIN(x) = (x − 2)·2 + 12 = [10, 14]; blend = 0.25·x + 0.75·[10, 14]
    assert torch.allclose(out, torch.tensor([7.75, 11.25], dtype=torch.float64))
    assert torch.equal(adain_blend(x, ref, 1.0, dim=0), x)
    # the authors' ε on σ_x: ratio σ_ref/(σ_x + 1e-6)
    ratio = (2 * 2**0.5) / (2**0.5 + 1e-6)
    with_eps = adain_blend(x, ref, 0.25, dim=0)
    assert torch.allclose(with_eps, 0.25 * x + 0.75 * ((x - 2) * ratio + 12), atol=1e-12)


def test_adain_statistics_are_unbiased_and_per_row():
    x = torch.tensor([[0.0, 1.0, 5.0], [2.0, 2.0, 8.0]], dtype=torch.float64)
    ref = torch.tensor([[1.0, 1.0, 4.0], [0.0, 3.0, 3.0]], dtype=torch.float64)
    out = adain_blend(x, ref, 0.7, dim=-1)
    for r in range(2):
        sx, mx = x[r].std(), x[r].mean()  # torch.std is unbiased
        sr, mr = ref[r].std(), ref[r].mean()
        want = 0.7 * x[r] + 0.3 * ((x[r] - mx) * sr / (sx + 1e-6) + mr)
        assert torch.allclose(out[r], want, atol=1e-12)


def test_adain_constant_rows_and_nan():
    x = torch.tensor([[2.0, 2.0], [1.0, float("nan")]])  # σ = 0 in the first row; NaN in the second
    ref = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out = adain_blend(x, ref, 0.5, dim=-1)
    # σ_x = 0: with the authors' ε the AdaIN term is μ_ref (finite), so the blend is defined
    assert torch.allclose(out[0], 0.5 * x[0] + 0.5 * torch.tensor([0.5, 0.5]))
    assert torch.equal(out[1, :1], x[1, :1]) and torch.isnan(out[1, 1])  # NaN blends keep x


def test_quantile_matches_torch_quantile():
    from lcmla.attention import quantile_over_queries

    torch.manual_seed(3)
    a = torch.rand(2, 3, 37, 4)
    for p in (0.0, 0.3, 0.65, 1.0):
        assert torch.allclose(quantile_over_queries(a, p), torch.quantile(a, p, dim=2, keepdim=True), atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_softmask_of_a_flat_map_is_finite_in_every_dtype(dtype):
    """Sharpness 0 makes sigmoid(·) constant: its range is 0, norm(M) is 0 (Ã = 0 on every token),
    not 0 · (1/ε) = 0 · inf = NaN in half precision."""
    probs = torch.rand(2, 3, 16, 4).softmax(-1).to(dtype)
    out = scheduled_softmask(probs, 0.0, 0.65, 1.55)
    assert out.dtype == dtype and torch.equal(out, torch.zeros_like(out))
    sharp = scheduled_softmask(probs, 7.5, 0.65, 1.55).double()
    ref = scheduled_softmask(probs.double(), 7.5, 0.65, 1.55)
    assert torch.isfinite(sharp).all() and (sharp - ref).abs().max() < (0.01 if dtype == torch.float16 else 0.08)


def test_am2_schedules_are_resampled_to_the_step_count():
    """AM2's per-step sharpness d_k and scale s_k written for 4 steps, run at 7: each step reads the
    value :func:`lcmla.guidance.stretch` gives it (ends kept, nearest neighbour between), as the
    guidance schedules do; past the end of a list nothing is read."""
    from torch import nn

    from lcmla.attention.context import AMPlan, AttentionContext
    from lcmla.attention.processors import IdentityAttnProcessor
    from lcmla.settings import AttentionSettings

    s = AttentionSettings(mode="am2", am2_sharpness=(1.0, 2.0, 3.0, 4.0), am2_scale=(1.0, 1.5, 2.0, 2.5))
    plan = AMPlan.from_settings(s, 7)
    proc = IdentityAttnProcessor("up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor",
                                 nn.ModuleList(), nn.ModuleList())
    got = [proc.am_arguments(AttentionContext(ip_scale=1.0, am=plan, step=k), queries=16, tokens=4)
           for k in range(7)]
    assert [a["sharpness"] for a in got] == [1.0, 2.0, 2.0, 3.0, 3.0, 3.0, 4.0]
    assert [a["am2_scale"] for a in got] == [1.0, 1.5, 1.5, 2.0, 2.0, 2.0, 2.5]
    assert AMPlan.from_settings(s, 4).am2_sharpness == (1.0, 2.0, 3.0, 4.0)


def test_mean_over_a_block_kind_averages_that_kind_only():
    """``MapStore.mean_over``: the maps of the blocks of one kind at one step, resized to the
    largest of them; "all" takes every block."""
    from lcmla.attention.context import MapStore

    store = MapStore((8, 8))
    down = torch.rand(2, 16, 3)  # (heads, Q, T): a 4x4 grid
    up = torch.rand(2, 64, 3)  # an 8x8 grid
    store.record("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", 0, down, down)
    store.record("up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", 0, up, up)
    want = down.mean(0)[:, 1].reshape(4, 4)
    assert torch.allclose(store.mean_over("down", 0, token=1), want, atol=1e-6)
    assert torch.allclose(store.mean_over("up", 0, token=1), up.mean(0)[:, 1].reshape(8, 8), atol=1e-6)
    both = store.mean_over("all", 0, token=1)
    assert both.shape == (8, 8) and not torch.allclose(both, store.mean_over("up", 0, token=1))
    with pytest.raises(KeyError, match="mid"):
        store.mean_over("mid", 0, token=1)
