"""FastFace inside the engine: DCG branch batching, AM processors, map capture, per-request knobs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from util import make_settings as _settings
from util import px as _px

from lcmla.attention.context import AMPlan, AttentionContext, MapStore
from lcmla.attention.processors import IdentityAttnProcessor
from lcmla.fastface import FASTFACE_PRESETS, apply_fastface_preset
from lcmla.settings import AttentionSettings


@pytest.fixture(scope="module")
def identity(engine, face_path):
    return engine.analyze_faces([face_path])


# ---- the processor alone, against diffusers' stock IP-Adapter processor ------------------------


@pytest.fixture(scope="module")
def attn_case():
    """One cross-attention layer with IP-Adapter weights, its inputs, and diffusers' stock processor."""
    from diffusers.models.attention_processor import (
        Attention,
        IPAdapterAttnProcessor2_0,
    )

    torch.manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=2, dim_head=32).eval()
    stock = IPAdapterAttnProcessor2_0(hidden_size=64, cross_attention_dim=32, num_tokens=(4,), scale=0.8)
    torch.nn.init.normal_(stock.to_k_ip[0].weight)
    torch.nn.init.normal_(stock.to_v_ip[0].weight)
    hidden = torch.randn(3, 16, 64)  # 3 samples, 4x4 latent grid
    text = torch.randn(3, 7, 32)
    ip = [torch.randn(3, 1, 4, 32)]
    return attn, stock, hidden, (text, ip)


def _ctx(mode="none", step=0, scale=0.8, capture=False, **am):
    s = AttentionSettings(mode=mode, targets=("down", "mid", "up"), **am)
    return AttentionContext(ip_scale=scale, am=AMPlan.from_settings(s, 4), step=step,
                            capture=MapStore((4, 4)) if capture else None)


def _run(attn, proc, hidden, enc, ctx=None):
    attn.set_processor(proc)
    with torch.no_grad():
        return attn(hidden, encoder_hidden_states=enc, **({"lcmla": ctx} if ctx is not None else {}))


def test_identity_processor_matches_stock(attn_case):
    attn, stock, hidden, enc = attn_case
    ref = _run(attn, stock, hidden, enc)
    ours = IdentityAttnProcessor.take_over("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", stock)
    assert ours.to_k_ip is stock.to_k_ip  # the loaded weights are taken over, not copied
    assert torch.equal(_run(attn, ours, hidden, enc, _ctx(scale=0.8)), ref)
    # identity transforms through the explicit path: AM1 with s = p = 1, AM2 on no token
    am1 = _run(attn, ours, hidden, enc, _ctx("am1", am1_power=1.0, am1_scale_down=1.0, am1_scale_up=1.0))
    assert torch.allclose(am1, ref, atol=1e-5)
    am2 = _run(attn, ours, hidden, enc, _ctx("am2", tokens=()))
    assert torch.allclose(am2, ref, atol=1e-5)
    # and real settings do change it
    assert not torch.allclose(_run(attn, ours, hidden, enc, _ctx("am2")), ref, atol=1e-3)
    assert not torch.allclose(_run(attn, ours, hidden, enc, _ctx("am1")), ref, atol=1e-3)


def test_processor_knobs_are_per_call(attn_case):
    attn, stock, hidden, enc = attn_case
    ours = IdentityAttnProcessor.take_over("up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", stock)
    plain = _run(attn, ours, hidden, enc, _ctx())
    changed = _run(attn, ours, hidden, enc, _ctx("am2", step=1))
    assert torch.equal(_run(attn, ours, hidden, enc, _ctx()), plain)  # nothing stayed behind
    assert torch.equal(_run(attn, ours, hidden, enc, _ctx("am2", step=1)), changed)
    assert not any(isinstance(v, (AMPlan, AttentionContext)) for v in vars(ours).values())


def test_am_respects_blocks_and_steps(attn_case):
    attn, stock, hidden, enc = attn_case
    mid = IdentityAttnProcessor.take_over("mid_block.attentions.0.transformer_blocks.0.attn2.processor", stock)
    plain = _run(attn, mid, hidden, enc, _ctx())
    s = AttentionSettings(mode="am1")  # default targets: down and up, not mid
    ctx = AttentionContext(ip_scale=0.8, am=AMPlan.from_settings(s, 4))
    assert torch.equal(_run(attn, mid, hidden, enc, ctx), plain)
    up = IdentityAttnProcessor.take_over("up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", stock)
    s2 = AttentionSettings(mode="am1", steps=(2,))
    off = AttentionContext(ip_scale=0.8, am=AMPlan.from_settings(s2, 4), step=1)
    on = AttentionContext(ip_scale=0.8, am=AMPlan.from_settings(s2, 4), step=2)
    assert torch.equal(_run(attn, up, hidden, enc, off), _run(attn, up, hidden, enc, _ctx()))
    assert not torch.equal(_run(attn, up, hidden, enc, on), _run(attn, up, hidden, enc, _ctx()))


def test_capture_records_before_and_after(attn_case):
    attn, stock, hidden, enc = attn_case
    ours = IdentityAttnProcessor.take_over("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", stock)
    plain = _run(attn, ours, hidden, enc, _ctx("am2"))
    ctx = _ctx("am2", capture=True)
    assert torch.equal(_run(attn, ours, hidden, enc, ctx), plain)  # capture changes nothing
    maps = ctx.capture.maps[(ours.name, 0)]
    assert maps.shape == (2, 4, 4, 4)  # before/after, tokens, h, w
    assert not torch.allclose(maps[0], maps[1])
    # "before" is the head-averaged softmax of sample 0: each query's token weights sum to 1
    assert torch.allclose(maps[0].sum(0), torch.ones(4, 4), atol=1e-5)


# ---- the engine ---------------------------------------------------------------------------------


def test_dcg_branches_are_batched_and_skipped(engine, identity):
    r = engine.generate(_settings(guidance__dcg=True), identity)
    assert r.branch_calls == [("full",), ("uncond", "id", "full"), ("uncond", "id", "full"), ("full",)]
    tf = engine.generate(_settings(guidance__dcg=True, guidance__dcg_variant="text-first"), identity)
    assert tf.branch_calls[1] == ("uncond", "text", "full")


def test_dcg_at_one_equals_plain_and_runs_one_branch(engine, identity):
    calls = []
    hook = engine.pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        plain = engine.generate(_settings(), identity)
        n_plain = list(calls)
        calls.clear()
        dcg = engine.generate(_settings(guidance__dcg=True, guidance__dcg_schedule="constant",
                                        guidance__dcg_a=[1.0], guidance__dcg_b=[1.0]), identity)
    finally:
        hook.remove()
    assert calls == n_plain == [1, 1, 1, 1]  # one UNet call per step, batch of one branch
    assert np.array_equal(_px(dcg.images[0]), _px(plain.images[0]))
    assert dcg.branch_calls == [("full",)] * 4


def test_dcg_changes_the_image_in_one_call_per_step(engine, identity):
    calls = []
    hook = engine.pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        r = engine.generate(_settings(guidance__dcg=True), identity)
    finally:
        hook.remove()
    assert calls == [1, 3, 3, 1]
    base = engine.generate(_settings(), identity)
    assert not np.array_equal(_px(r.images[0]), _px(base.images[0]))


def test_capture_does_not_change_the_image(engine, identity):
    for preset in ("baseline", "am2+dcg"):
        s = apply_fastface_preset(_settings(), preset)
        off = engine.generate(s, identity)
        on = engine.generate(s.replace(attention__capture_maps=True), identity)
        assert np.array_equal(_px(off.images[0]), _px(on.images[0])), preset
        assert off.attention_maps == [] and len(on.attention_maps) == 1
    store = on.attention_maps[0]
    assert store.steps() == [0, 1, 2, 3]
    assert any(b.startswith("down_blocks") for b in store.blocks()) and any(b.startswith("up_blocks") for b in store.blocks())
    m = store.mean_over("up", step=1, token=0)
    assert m.ndim == 2 and m.shape[0] * 8 <= 256


def test_requests_with_and_without_am_do_not_interfere(engine, identity):
    s_am = apply_fastface_preset(_settings(output__seed=2), "am2")
    s_plain = _settings(output__seed=2)
    alone_am = _px(engine.generate(s_am, identity).images[0])
    alone_plain = _px(engine.generate(s_plain, identity).images[0])
    assert not np.array_equal(alone_am, alone_plain)
    assert np.array_equal(_px(engine.generate(s_plain, identity).images[0]), alone_plain)
    assert np.array_equal(_px(engine.generate(s_am, identity).images[0]), alone_am)
    assert np.array_equal(_px(engine.generate(s_plain, identity).images[0]), alone_plain)


@pytest.mark.parametrize("name", list(FASTFACE_PRESETS))
def test_named_presets_end_to_end(engine, identity, name):
    s = apply_fastface_preset(_settings(), name)
    r = engine.generate(s, identity)
    assert r.images[0].size == (256, 256) and _px(r.images[0]).std() > 1
    if name != "baseline":
        base = engine.generate(_settings(), identity)
        assert not np.array_equal(_px(r.images[0]), _px(base.images[0]))


def test_heatmap_overlay(engine, identity):
    from lcmla.attention.overlay import overlay_heatmap

    r = engine.generate(_settings(attention__mode="am2", attention__capture_maps=True), identity)
    store = r.attention_maps[0]
    img = overlay_heatmap(r.images[0], store.mean_over("down", 1, 1), title="down, step 1, token 1")
    assert img.mode == "RGB" and img.size[0] > 256 * 1.1
    arr = np.asarray(img)
    assert arr.std() > 5
