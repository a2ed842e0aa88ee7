"""FastFace inside the engine: DCG branch batching, AM processors, map capture, per-request knobs."""

from __future__ import annotations

import dataclasses

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


def _am2_attn2_by_hand(attn, stock, hidden, enc, lam, d, qa, s, w, pooled, per_head=True):
    """SPEC §3 steps 1–7 written out on one attn2 layer (float64): token 0 inverted, min–max over
    (heads, queries) per sample — or over the whole batch (the authors' pooling) —, quantile of A,
    sigmoid, scale and cap, token 0 turned back, AdaIN (unbiased σ, ε = 1e-6 on σ_x) on the
    probabilities over tokens and on the branch output per head over head_dim."""
    text, ip = enc
    b, heads = hidden.shape[0], attn.heads
    split = lambda x: x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)
    q = split(attn.to_q(hidden))
    text_out = torch.softmax(q @ split(attn.to_k(text)).transpose(-1, -2) * attn.scale, -1) @ split(attn.to_v(text))
    k_ip, v_ip = split(stock.to_k_ip[0](ip[0][:, 0])), split(stock.to_v_ip[0](ip[0][:, 0]))
    a0 = torch.softmax(q @ k_ip.transpose(-1, -2) * attn.scale, -1)  # (B, heads, Q, T)
    x = a0.clone()
    x[..., 0] = 1 - x[..., 0]
    dims = (0, 1, 2) if pooled else (1, 2)
    norm = lambda y: (y - y.amin(dims, keepdim=True)) / (y.amax(dims, keepdim=True) - y.amin(dims, keepdim=True))
    qv = torch.quantile(x, qa, dim=-2, keepdim=True).clamp_min(1e-6)
    m = torch.clamp(s * norm(torch.sigmoid(d * (norm(x) - qv))), max=10.0)
    m[..., 0] = m[..., 0].amax(dim=-1, keepdim=True) - m[..., 0]
    ada = lambda y, ref: w * y + (1 - w) * ((y - y.mean(-1, keepdim=True)) * (ref.std(-1, keepdim=True) / (y.std(-1, keepdim=True) + 1e-6)) + ref.mean(-1, keepdim=True))
    a = ada(m, a0)
    merge = lambda y: y.transpose(1, 2).reshape(b, -1, heads * y.shape[-1])
    if per_head:
        hs = merge(ada(a @ v_ip, a0 @ v_ip))  # statistics per head over head_dim
    else:  # statistics over all heads·head_dim channels after the merge (a different transform)
        hs = ada(merge(a @ v_ip), merge(a0 @ v_ip))
    return attn.to_out[0](merge(text_out) + lam * hs)


@pytest.mark.parametrize(("pooled", "step", "d", "s"), [(False, 1, 5.0, 1.55), (True, 1, 5.0, 1.55), (False, 0, 7.5, 1.0)])
def test_am2_attn2_output_equals_spec_by_hand(pooled, step, d, s):
    """The whole attn2 output under AM2, per-head output AdaIN included, against the equations
    written out (4 heads, 3 samples = one image's DCG branches); ``pooled`` is the authors-exact
    scope (min–max over the image's branches). Step 0 reads the schedules' first entries
    (d 7.5, s 1.0), the later steps their plateau (5, 1.55)."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    torch.manual_seed(5)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=4, dim_head=16).double().eval()
    stock = IPAdapterAttnProcessor2_0(hidden_size=64, cross_attention_dim=32, num_tokens=(4,), scale=0.8).double()
    torch.nn.init.normal_(stock.to_k_ip[0].weight)
    torch.nn.init.normal_(stock.to_v_ip[0].weight)
    hidden = torch.randn(3, 64, 64, dtype=torch.float64)  # 3 samples, 8x8 grid
    enc = (torch.randn(3, 7, 32, dtype=torch.float64), [torch.randn(3, 1, 4, 32, dtype=torch.float64)])
    ours = IdentityAttnProcessor.take_over("up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor", stock)
    ctx = AttentionContext(ip_scale=0.8, am=AMPlan.from_settings(AttentionSettings(mode="am2"), 4), step=step,
                           am_group=3 if pooled else 1)
    out = _run(attn, ours, hidden, enc, ctx)
    with torch.no_grad():
        hand = _am2_attn2_by_hand(attn, stock, hidden, enc, 0.8, d, 0.65, s, 0.7, pooled)
    assert torch.allclose(out, hand, atol=1e-10, rtol=0)
    with torch.no_grad():  # the test tells the axes and the scopes apart
        merged = _am2_attn2_by_hand(attn, stock, hidden, enc, 0.8, d, 0.65, s, 0.7, pooled, per_head=False)
        other_scope = _run(attn, ours, hidden, enc, dataclasses.replace(ctx, am_group=1 if pooled else 3))
    assert not torch.allclose(out, merged, atol=1e-4)
    assert not torch.allclose(out, other_scope, atol=1e-4)


@pytest.mark.parametrize(("block", "scale"), [("down_blocks.1", 1.55), ("up_blocks.0", 1.45)])
def test_am1_attn2_output_equals_spec_by_hand(block, scale):
    """AM1 with its defaults on a down and an up layer: text + λ·min(s·A^1.3, 10)·V′ written out,
    s = 1.55 in the down blocks and 1.45 in the up blocks (FastFace's am1 config)."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

    torch.manual_seed(6)
    attn = Attention(query_dim=64, cross_attention_dim=32, heads=4, dim_head=16).double().eval()
    stock = IPAdapterAttnProcessor2_0(hidden_size=64, cross_attention_dim=32, num_tokens=(4,), scale=0.8).double()
    torch.nn.init.normal_(stock.to_k_ip[0].weight)
    torch.nn.init.normal_(stock.to_v_ip[0].weight)
    hidden = torch.randn(2, 64, 64, dtype=torch.float64)
    text, ip = torch.randn(2, 7, 32, dtype=torch.float64), torch.randn(2, 1, 4, 32, dtype=torch.float64)
    ours = IdentityAttnProcessor.take_over(f"{block}.attentions.0.transformer_blocks.0.attn2.processor", stock)
    ctx = AttentionContext(ip_scale=0.8, am=AMPlan.from_settings(AttentionSettings(mode="am1"), 4), step=0)
    out = _run(attn, ours, hidden, (text, [ip]), ctx)
    with torch.no_grad():
        b, heads = 2, attn.heads
        split = lambda x: x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        merge = lambda y: y.transpose(1, 2).reshape(b, -1, heads * y.shape[-1])  # noqa: E731
        q = split(attn.to_q(hidden))
        text_out = torch.softmax(q @ split(attn.to_k(text)).transpose(-1, -2) * attn.scale, -1) @ split(attn.to_v(text))
        a = torch.softmax(q @ split(stock.to_k_ip[0](ip[:, 0])).transpose(-1, -2) * attn.scale, -1)
        new = torch.clamp(scale * a.pow(1.3), max=10.0)
        hand = attn.to_out[0](merge(text_out) + 0.8 * merge(new @ split(stock.to_v_ip[0](ip[:, 0]))))
    assert torch.allclose(out, hand, atol=1e-10, rtol=0)


def test_am2_adain_switch(attn_case):
    attn, stock, hidden, enc = attn_case
    ours = IdentityAttnProcessor.take_over("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", stock)
    on = _run(attn, ours, hidden, enc, _ctx("am2", step=1))
    off = _run(attn, ours, hidden, enc, _ctx("am2", step=1, am2_adain=False))
    assert not torch.allclose(on, off, atol=1e-4)


# ---- the engine ---------------------------------------------------------------------------------


def _count_unet_batches(engine, fn):
    calls = []
    hook = engine.pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        result = fn()
    finally:
        hook.remove()
    return result, calls


def test_dcg_branch_plan_with_and_without_rescale(engine, identity):
    """SPEC §2: a = b = 1 steps still need σ(ε_i) for the rescale when φ > 0: two branches, not one."""
    r, calls = _count_unet_batches(engine, lambda: engine.generate(_settings(guidance__dcg=True), identity))
    assert r.branch_calls == [("id", "full"), ("uncond", "id", "full"), ("uncond", "id", "full"), ("id", "full")]
    assert calls == [2, 3, 3, 2]
    r0, calls0 = _count_unet_batches(engine, lambda: engine.generate(
        _settings(guidance__dcg=True, guidance__rescale_phi=0.0), identity))
    assert r0.branch_calls == [("full",), ("uncond", "id", "full"), ("uncond", "id", "full"), ("full",)]
    assert calls0 == [1, 3, 3, 1]
    tf = engine.generate(_settings(guidance__dcg=True, guidance__dcg_variant="text-first"), identity)
    assert tf.branch_calls == [("text", "full"), ("uncond", "text", "full"), ("uncond", "text", "full"), ("text", "full")]
    ind = engine.generate(_settings(guidance__dcg=True, guidance__dcg_variant="independent"), identity)
    assert ind.branch_calls == [("uncond", "text", "id")] * 4  # never reduces


def test_dcg_at_one_without_rescale_equals_plain_in_one_branch(engine, identity):
    plain, n_plain = _count_unet_batches(engine, lambda: engine.generate(_settings(), identity))
    dcg, calls = _count_unet_batches(engine, lambda: engine.generate(_settings(
        guidance__dcg=True, guidance__dcg_schedule="constant", guidance__dcg_a=[1.0], guidance__dcg_b=[1.0],
        guidance__rescale_phi=0.0), identity))
    assert calls == n_plain == [1, 1, 1, 1]  # one UNet call per step, batch of one branch
    assert np.array_equal(_px(dcg.images[0]), _px(plain.images[0]))
    assert dcg.branch_calls == [("full",)] * 4


def test_engine_dcg_equals_decoupled_cfg_and_rescale_by_hand(engine, identity):
    """Replay the engine's trajectory from its own branch predictions with the equations written
    out (Eq. 5 and Eq. 6, rescale at every step including a = b = 1): every step's latents match."""
    from lcmla.guidance import decoupled_cfg

    outs, latents = [], []
    hook = engine.pipe.unet.register_forward_hook(lambda m, args, out: outs.append(out[0].clone()))
    try:
        r = engine.generate(_settings(guidance__dcg=True), identity, callback=lambda info: latents.append(info.latents))
    finally:
        hook.remove()
    sched = engine._scheduler(r.settings)
    noise = torch.randn((1, 4, 32, 32), generator=torch.Generator("cpu").manual_seed(0))
    z = noise * sched.init_noise_sigma
    a, b, phi = [1.0, 1.5, 1.5, 1.0], [1.0, 3.0, 3.0, 1.0], 0.75
    sd = lambda x: x.std(dim=(1, 2, 3), keepdim=True)
    for k, t in enumerate(sched.timesteps):
        preds = dict(zip(r.branch_calls[k], outs[k].chunk(len(r.branch_calls[k]))))
        if a[k] == b[k] == 1.0:
            eps = preds["full"]
        else:
            eps = decoupled_cfg(preds, a[k], b[k], "id-first")
        f = phi * (sd(preds["id"]) + sd(preds["full"])) / (2 * sd(eps)) + (1 - phi)
        if a[k] == 1.0:  # the a = b = 1 form of SPEC §2: f = 1 + (φ/2)(σ_i/σ_ti − 1)
            assert torch.allclose(f, 1 + phi / 2 * (sd(preds["id"]) / sd(preds["full"]) - 1))
            assert f.item() != 1.0  # the rescale acts at these steps too (tiny: σ_i ≈ σ_ti)
        z = sched.step(f * eps, t, z).prev_sample
        assert torch.allclose(z, latents[k], atol=1e-6), k


def test_dcg_changes_the_image(engine, identity):
    r = engine.generate(_settings(guidance__dcg=True), identity)
    base = engine.generate(_settings(), identity)
    assert not np.array_equal(_px(r.images[0]), _px(base.images[0]))


def test_authors_exact_mode_runs_three_branches_and_pools_per_image(engine, identity):
    exact = apply_fastface_preset(_settings(attention__am_norm_scope="image-branches"), "am2+dcg")
    r, calls = _count_unet_batches(engine, lambda: engine.generate(exact.replace(output__num_images=2), identity))
    assert r.branch_calls == [("uncond", "id", "full")] * 4 and calls == [3] * 8
    # an image depends on its own branches only: image 2 of a request equals that seed alone
    alone = engine.generate(exact.replace(output__seed=1), identity)
    assert np.array_equal(_px(r.images[1]), _px(alone.images[0]))
    # and pooling over the branches is a different transform from per-sample statistics
    per_sample = engine.generate(exact.replace(attention__am_norm_scope="sample"), identity)
    assert not np.array_equal(_px(r.images[0]), _px(per_sample.images[0]))
    # without AM the switch only changes the branch set: classic CFG written as DCG a = b = s
    base = engine.generate(_settings(guidance__guidance_scale=2.0), identity)
    as_dcg = engine.generate(_settings(guidance__guidance_scale=2.0, attention__am_norm_scope="image-branches"), identity)
    assert as_dcg.branch_calls == [("uncond", "id", "full")] * 4
    assert np.abs(_px(as_dcg.images[0]) - _px(base.images[0])).max() <= 1


def test_stretched_schedule_at_two_steps_is_noted(engine, identity):
    r = engine.generate(_settings(guidance__dcg=True, guidance__steps=2), identity)
    assert r.branch_calls == [("id", "full"), ("id", "full")]
    assert any("no decoupled guidance" in n for n in r.notes)
    three = engine.generate(_settings(guidance__dcg=True, guidance__steps=3), identity)
    assert three.branch_calls[1] == ("uncond", "id", "full") and three.notes == []


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


def test_maps_are_the_display_branchs_and_am2_pools_over_the_branches_only_when_asked(engine, identity, monkeypatch):
    """The captured maps are those of the display branch ("full", the third sample of the authors'
    batch): at step 0 (the same latents in every mode) they equal a one-branch request's. AM2's
    min–max statistics pool over the three branches of an image in the authors' scope, per sample
    otherwise."""
    import lcmla.attention.transforms as transforms

    for am in ("none", "am1"):  # AM1 acts per sample: the full branch's maps do not see the others
        batched = engine.generate(_settings(guidance__guidance_scale=2.0, attention__am_norm_scope="image-branches",
                                            attention__mode=am, attention__capture_maps=True), identity)
        assert batched.branch_calls[0] == ("uncond", "id", "full")
        single = engine.generate(_settings(attention__mode=am, attention__capture_maps=True), identity)
        assert single.branch_calls[0] == ("full",)
        a, b = batched.attention_maps[0], single.attention_maps[0]
        assert a.blocks() == b.blocks()
        for block in a.blocks():
            assert torch.allclose(a.maps[(block, 0)], b.maps[(block, 0)], atol=1e-5), (am, block)
        if am == "am1":
            assert any(not torch.equal(m[0], m[1]) for m in a.maps.values())  # the transform acted

    groups = []
    original = transforms._minmax_stats
    monkeypatch.setattr(transforms, "_minmax_stats", lambda x, group=1: groups.append(group) or original(x, group))
    exact = apply_fastface_preset(_settings(attention__am_norm_scope="image-branches"), "am2+dcg")
    engine.generate(exact, identity)
    assert groups and set(groups) == {3}
    groups.clear()
    engine.generate(exact.replace(attention__am_norm_scope="sample"), identity)
    assert groups and set(groups) == {1}


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


# ---- the named presets against the authors' released configs ------------------------------------

# Transcribed from ControlGenAI/FastFace configs/ (the fields that decide the method) and
# custom_dca.py's constants; "apply_adain" absent in a file means False (patch_pipe's default).
RELEASED = {
    "am1": dict(dcg=None, transforms=["pow", "scale"], adain=False),  # am_only/scalepow.json
    "am2": dict(dcg=None, transforms=["adaptive_softmask", "scale"], adain=False),  # am_only/softmask_scheduled.json
    "dcg": dict(dcg=dict(a=[1.0, 1.5, 1.5, 1.0], b=[1.0, 3.0, 3.0, 1.0], rescale=0.75), transforms=None),  # dcg2_style
    "am1+dcg": dict(dcg=dict(a=[1.0, 1.5, 1.5, 1.0], b=[1.0, 3.0, 3.0, 1.0], rescale=0.75),
                    transforms=["pow", "scale"], adain=False),  # fastface/am1_and_dcg.json
    "am2+dcg": dict(dcg=dict(a=[1.0, 1.5, 1.5, 1.0], b=[1.0, 3.0, 3.0, 1.0], rescale=0.75),
                    transforms=["adaptive_softmask", "scale"], adain=True),  # fastface/am2_and_dcg.json
}
RELEASED_AM = dict(targets=["down", "up"], tokens=[0, 1, 2, 3], pow=1.3, scale_down=1.55, scale_up=1.45,
                   softmask_s=[7.5, 5.0, 5.0, 5.0], softmask_scale=[1.0, 1.55, 1.55, 1.55], qa=0.65, adain_w=0.7)
RESET_GS = {"sdxl-lcm-lora": 1.5, "sdxl-base": 5.0, "hyper-sdxl-4step": 1.0, "sdxl-lightning-4step": 1.0}


@pytest.mark.parametrize("name", list(RELEASED))
def test_presets_equal_the_released_configs(name):
    rel = RELEASED[name]
    s = apply_fastface_preset(_settings(preset="hyper-sdxl-4step"), name)
    g, a = s.guidance, s.attention
    if rel["dcg"] is None:  # AM only: dcg_type 3 with a = b = the backbone's plain guidance, no rescale
        assert not g.dcg and g.guidance_scale == 1.0
    else:
        assert g.dcg and g.dcg_variant == "id-first" and g.dcg_schedule == "list"
        assert list(g.dcg_a) == rel["dcg"]["a"] and list(g.dcg_b) == rel["dcg"]["b"]
        assert g.rescale_phi == rel["dcg"]["rescale"]
    if rel["transforms"] is None:
        assert a.mode == "none"
        return
    assert list(a.targets) == RELEASED_AM["targets"] and list(a.tokens) == RELEASED_AM["tokens"] and a.steps is None
    if rel["transforms"][0] == "pow":
        assert a.mode == "am1" and a.am1_power == RELEASED_AM["pow"]
        assert (a.am1_scale_down, a.am1_scale_up) == (RELEASED_AM["scale_down"], RELEASED_AM["scale_up"])
    else:
        assert a.mode == "am2" and a.am2_adain == rel["adain"]
        assert list(a.am2_sharpness) == RELEASED_AM["softmask_s"] and list(a.am2_scale) == RELEASED_AM["softmask_scale"]
        assert a.am2_quantile == RELEASED_AM["qa"] and a.adain_weight == RELEASED_AM["adain_w"]
    assert a.am_norm_scope == "sample"  # the documented difference; "image-branches" is the authors' pooling


@pytest.mark.parametrize("backbone", list(RESET_GS))
def test_plain_guidance_presets_use_the_authors_scale_per_backbone(backbone):
    for name in ("baseline", "am1", "am2"):
        assert apply_fastface_preset(_settings(preset=backbone), name).guidance.guidance_scale == RESET_GS[backbone]
    assert apply_fastface_preset(_settings(preset=backbone, guidance__guidance_scale=7.0), "dcg").guidance.guidance_scale == 7.0
