"""DCG, rescale and schedules against hand computations on small tensors (FastFace Eq. 5, 6, 16–18)."""

import math

import pytest
import torch

from lcmla.guidance import (
    ClassicGuidance,
    DecoupledGuidance,
    LookaheadGuidance,
    classic_cfg,
    classic_cfg_branches,
    decoupled_cfg,
    guidance_for,
    rescale_guidance,
    schedule,
    stretch,
)
from lcmla.settings import GenerationSettings


@pytest.fixture
def preds():
    # one "pixel" per sample keeps the arithmetic checkable by eye: shape (2, 1, 1, 1)
    mk = lambda a, b: torch.tensor([a, b], dtype=torch.float64).reshape(2, 1, 1, 1)
    return {"uncond": mk(1.0, 0.0), "text": mk(2.0, 1.0), "id": mk(4.0, -1.0), "full": mk(7.0, 3.0)}


def test_dcg_id_first_by_hand(preds):
    # ε∅ + a(ε_i − ε∅) + b(ε_ti − ε_i), a=1.5, b=3: sample 0: 1 + 1.5·3 + 3·3 = 14.5; sample 1: 0 + 1.5·(−1) + 3·4 = 10.5
    out = decoupled_cfg(preds, 1.5, 3.0, "id-first")
    assert out.flatten().tolist() == [14.5, 10.5]


def test_dcg_text_first_by_hand(preds):
    # ε∅ + a(ε_t − ε∅) + b(ε_ti − ε_t): 1 + 2·1 + 0.5·5 = 5.5; 0 + 2·1 + 0.5·2 = 3
    assert decoupled_cfg(preds, 2.0, 0.5, "text-first").flatten().tolist() == [5.5, 3.0]


def test_dcg_independent_by_hand(preds):
    # ε∅ + a(ε_t − ε∅) + b(ε_i − ε∅): 1 + 2·1 + 3·3 = 12; 0 + 2·1 + 3·(−1) = −1
    assert decoupled_cfg(preds, 2.0, 3.0, "independent").flatten().tolist() == [12.0, -1.0]


def test_dcg_per_sample_scales(preds):
    a = torch.tensor([1.5, 1.0])
    b = torch.tensor([3.0, 1.0])
    out = decoupled_cfg(preds, a, b).flatten().tolist()
    assert out == [14.5, 3.0]  # sample 1 at a=b=1 is exactly ε_ti


def _dcg(a, b, variant="id-first", phi=0.75, authors=False):
    return DecoupledGuidance((a,), (b,), variant, phi, authors_batch=authors)


@pytest.mark.parametrize("variant,cond", [("id-first", "id"), ("text-first", "text")])
def test_dcg_at_one_branch_plan_depends_on_phi(preds, variant, cond):
    """SPEC §2: at a = b = 1 the combination is ε_ti, but the rescale still reads σ of both
    conditional branches: two branches with φ > 0, one with φ = 0."""
    assert torch.equal(decoupled_cfg(preds, 1.0, 1.0, variant), preds["full"])
    assert _dcg(1.0, 1.0, variant, phi=0.0).branches(0) == ("full",)
    assert _dcg(1.0, 1.0, variant, phi=0.75).branches(0) == (cond, "full")
    assert len(_dcg(1.5, 3.0, variant).branches(0)) == 3
    assert torch.equal(_dcg(1.0, 1.0, variant, phi=0.0).combine(preds, 0), preds["full"])


def test_dcg_at_one_rescales_by_the_sigma_ratio():
    """f = 1 + (φ/2)·(σ(ε_i)/σ(ε_ti) − 1) at a = b = 1 (SPEC §2), from given σ's."""
    eps_i = torch.tensor([0.0, 2.0 * 0.82]).reshape(1, 1, 1, 2)  # σ_i / σ_ti = 0.82
    eps_ti = torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 2)
    out = _dcg(1.0, 1.0).combine({"id": eps_i, "full": eps_ti}, 0)
    f = 1 + 0.75 / 2 * (0.82 - 1)  # 0.9325: 7 % off when skipped
    assert torch.allclose(out, f * eps_ti)


def test_dcg_branch_sets():
    assert _dcg(1.5, 3.0, "id-first").branches(0) == ("uncond", "id", "full")
    assert _dcg(1.5, 3.0, "text-first").branches(0) == ("uncond", "text", "full")
    assert _dcg(1.0, 1.0, "independent").branches(0) == ("uncond", "text", "id")
    assert _dcg(1.0, 1.0, authors=True).branches(0) == ("uncond", "id", "full")  # the authors' three
    with pytest.raises(ValueError, match="variant"):
        decoupled_cfg({"uncond": torch.zeros(1)}, 1, 1, "both")
    with pytest.raises(ValueError, match="variant"):
        _dcg(1.0, 1.0, "both")


def test_display_branch_per_mode():
    assert _dcg(1.5, 3.0).display_branch(0) == "full"
    assert _dcg(1.5, 3.0, "independent").display_branch(0) == "id"  # no full branch: the identity one
    assert ClassicGuidance(1.0).display_branch(0) == "full"
    assert LookaheadGuidance().display_branch(0) == "full"


def test_guidance_for_settings():
    s = GenerationSettings().replace(guidance__steps=4, guidance__guidance_scale=2.0)
    assert guidance_for(s, 4) == ClassicGuidance(2.0)
    d = guidance_for(s.replace(guidance__dcg=True), 4)
    assert d.a == (1.0, 1.5, 1.5, 1.0) and d.b == (1.0, 3.0, 3.0, 1.0) and not d.authors_batch
    exact = guidance_for(s.replace(attention__am_norm_scope="image-branches"), 4)
    assert exact == DecoupledGuidance((2.0,) * 4, (2.0,) * 4, "id-first", 0.0, authors_batch=True)
    kv = guidance_for(s.replace(lookahead__kv=True), 4, lcm_scheduler=True)
    assert isinstance(kv, LookaheadGuidance) and kv.branches(0) == ("full",)


def test_rescale_by_hand():
    pred = torch.tensor([[[[0.0, 4.0]]]])  # σ (unbiased) = 2.828…
    r1 = torch.tensor([[[[0.0, 2.0]]]])  # σ = 1.414…
    r2 = torch.tensor([[[[0.0, 8.0]]]])  # σ = 5.656…
    phi = 0.75
    f = phi * ((math.sqrt(2) + 4 * math.sqrt(2)) / 2) / (2 * math.sqrt(2)) + (1 - phi)  # 0.75·1.25 + 0.25 = 1.1875
    out = rescale_guidance(pred, [r1, r2], phi)
    assert f == pytest.approx(1.1875) and torch.allclose(out, f * pred)
    out2 = rescale_guidance(pred, [r1], 0.5)  # f = 0.5·(√2 / 2√2) + 0.5 = 0.75
    assert torch.allclose(out2, 0.75 * pred)
    assert torch.equal(rescale_guidance(pred, [r1], 0.0), pred)


def test_rescale_is_per_sample():
    pred = torch.stack([torch.full((1, 2, 2), 1.0) + torch.arange(4.0).reshape(1, 2, 2), torch.arange(4.0).reshape(1, 2, 2) * 10])
    ref = torch.stack([torch.arange(4.0).reshape(1, 2, 2), torch.arange(4.0).reshape(1, 2, 2)])
    out = rescale_guidance(pred, [ref], 1.0)
    assert torch.allclose(out[0], pred[0])  # same σ → factor 1
    assert torch.allclose(out[1], pred[1] / 10)


def test_classic_cfg(preds):
    assert torch.equal(classic_cfg(preds, 1.0), preds["full"]) and classic_cfg_branches(1.0) == ("full",)
    assert classic_cfg(preds, 2.0).flatten().tolist() == [13.0, 6.0]


def test_schedules():
    assert stretch([1, 1.5, 1.5, 1], 4) == [1, 1.5, 1.5, 1]
    assert stretch([1, 1.5, 1.5, 1], 8) == [1, 1, 1.5, 1.5, 1.5, 1.5, 1, 1]
    # a tie (7 steps: positions 0, ½, 1, …) goes towards the middle: symmetric schedules stay
    # symmetric, with one untouched step at each end as at 4 steps (Python's round sent ½ to 0)
    assert stretch([1, 1.5, 1.5, 1], 7) == [1, 1.5, 1.5, 1.5, 1.5, 1.5, 1]
    assert stretch([1, 3, 3, 1], 5) == [1, 3, 3, 3, 1]
    assert stretch([7.5, 5, 5, 5], 7) == [7.5, 5, 5, 5, 5, 5, 5]
    for values in ([1, 1.5, 1.5, 1], [1, 3, 3, 1], [1, 2, 3, 2, 1], [0, 1, 0]):
        for steps in range(1, 30):
            out = stretch(values, steps)
            assert out == out[::-1], (values, steps)
            assert out[0] == values[0] and len(out) == steps
    assert stretch([0, 1, 2, 3], 7) == [0, 1, 1, 2, 2, 2, 3]  # the middle position (1.5) rounds up
    # fewer steps than values: the ends stay, the interior thins out (1–3 steps spelled out)
    assert stretch([1, 1.5, 1.5, 1], 3) == [1, 1.5, 1]
    assert stretch([1, 1.5, 1.5, 1], 2) == [1, 1]
    assert stretch([1, 1.5, 1.5, 1], 1) == [1]
    assert stretch([7.5, 5, 5, 5], 1) == [7.5]
    assert schedule("constant", [2.0], 3) == [2.0, 2.0, 2.0]
    assert schedule("linear", [1.0, 3.0], 3) == [1.0, 2.0, 3.0]
    cos = schedule("cosine", [1.0, 3.0], 3)
    assert cos[0] == 1.0 and cos[-1] == 3.0 and abs(cos[1] - 2.0) < 1e-12


def test_the_no_dcg_note_needs_a_and_b_both_1_at_every_step():
    """The "no decoupled guidance" note says a = b = 1 at every step; a schedule that keeps a = 1
    but moves b (guidance toward the identity only) is decoupled guidance and gets no note."""
    from lcmla.engine import request_notes

    s = GenerationSettings().replace(guidance__dcg=True, guidance__steps=4)
    only_b = DecoupledGuidance((1.0,) * 4, (1.0, 3.0, 3.0, 1.0), "id-first", 0.0)
    only_a = DecoupledGuidance((1.0, 1.5, 1.5, 1.0), (1.0,) * 4, "id-first", 0.0)
    none = DecoupledGuidance((1.0,) * 4, (1.0,) * 4, "id-first", 0.0)
    assert request_notes(s, only_b, 4) == [] and request_notes(s, only_a, 4) == []
    (note,) = request_notes(s, none, 4)
    assert "no decoupled guidance is applied" in note
