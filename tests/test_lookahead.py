"""LCM-Lookahead inference: extended self-attention, 3-way guidance, FreeU, LoRA scales, previews."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from util import logged_messages
from util import make_settings as _settings
from util import px as _px
from util import tiny_components

from lcmla import SettingsError
from lcmla.attention.context import AMPlan, AttentionContext, KVCache
from lcmla.attention.processors import SelfAttnProcessor
from lcmla.guidance import LookaheadGuidance, lookahead_cfg
from lcmla.preview import ddpm_noise, ddpm_x0, lcm_x0
from lcmla.settings import AttentionSettings

# ---- extended self-attention -------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_attn():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    return Attention(query_dim=32, heads=2, dim_head=16).eval()


def _ctx(kv=None, kv_index=None, record=False):
    return AttentionContext(ip_scale=1.0, am=AMPlan.from_settings(AttentionSettings(), 1), kv=kv,
                            kv_index=kv_index, kv_record=record)


def _call(attn, proc, x, ctx=None):
    attn.set_processor(proc)
    with torch.no_grad():
        return attn(x, **({"lcmla": ctx} if ctx is not None else {}))


def test_empty_cache_is_plain_self_attention(self_attn):
    from diffusers.models.attention_processor import AttnProcessor2_0

    x = torch.randn(3, 10, 32)
    ref = _call(self_attn, AttnProcessor2_0(), x)
    proc = SelfAttnProcessor("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor")
    assert torch.equal(_call(self_attn, proc, x), ref)
    assert torch.equal(_call(self_attn, proc, x, _ctx(KVCache(), kv_index=(0, 0, 0))), ref)


def test_extended_attention_appends_reference_kv(self_attn):
    name = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    proc = SelfAttnProcessor(name)
    ref_x = torch.randn(1, 6, 32)
    cache = KVCache()
    _call(self_attn, proc, ref_x, _ctx(cache, record=True))
    assert cache.store[name][0].shape == (1, 6, 32)
    x = torch.randn(3, 10, 32)
    out = _call(self_attn, proc, x, _ctx(cache, kv_index=(-1, 0, 0)))
    plain = _call(self_attn, proc, x, _ctx())
    assert torch.equal(out[:1], plain[:1])  # samples without a KV row are untouched
    # by hand: K = [K_gen ; K_ref], V = [V_gen ; V_ref] for the others
    a = self_attn
    with torch.no_grad():
        q = a.to_q(x).view(3, -1, 2, 16).transpose(1, 2)
        k = torch.cat([a.to_k(x), a.to_k(ref_x).expand(3, -1, -1)], 1).view(3, -1, 2, 16).transpose(1, 2)
        v = torch.cat([a.to_v(x), a.to_v(ref_x).expand(3, -1, -1)], 1).view(3, -1, 2, 16).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
        hand = a.to_out[0](att.transpose(1, 2).reshape(3, -1, 32))
    assert torch.allclose(out[1:], hand[1:], atol=1e-5)
    assert not torch.allclose(out[1:], plain[1:], atol=1e-4)


def test_kv_rows_route_each_sample_to_its_reference(self_attn):
    """Two encoder rows; each denoiser sample attends to the row its kv_index names."""
    name = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    proc = SelfAttnProcessor(name)
    refs = torch.randn(2, 6, 32)
    cache = KVCache(rows=2)
    _call(self_attn, proc, refs, _ctx(cache, record=True))
    assert cache.store[name][0].shape == (2, 6, 32)
    x = torch.randn(3, 10, 32)
    out = _call(self_attn, proc, x, _ctx(cache, kv_index=(1, -1, 0)))
    for i, row in ((0, 1), (2, 0)):
        one = KVCache()
        _call(self_attn, proc, refs[row:row + 1], _ctx(one, record=True))
        alone = _call(self_attn, proc, x[i:i + 1], _ctx(one, kv_index=(0,)))
        assert torch.allclose(out[i:i + 1], alone, atol=1e-6)
    assert torch.equal(out[1:2], _call(self_attn, proc, x, _ctx())[1:2])  # bit for bit in the same batch


def test_kv_drop_is_training_only_and_fixed_per_cache():
    k = torch.randn(2, 1000, 8)
    cache = KVCache(rows=2)
    cache.record("x", k, k)
    assert cache.read("x")[0].shape == (2, 1000, 8)  # inference: nothing dropped
    cache = KVCache(rows=2, drop_rate=0.05, generator=torch.Generator().manual_seed(0))
    cache.record("x", k, k)
    kept = cache.read("x")[0]
    assert 900 < kept.shape[1] < 1000 and kept.shape[0] == 2
    again = cache.read("x")[0]
    cache.record("x", k, k)  # a recomputation (gradient checkpointing) keeps the same tokens
    assert torch.equal(cache.read("x")[0], kept) and torch.equal(again, kept)


class _CopyParking:
    """A parking that really moves: each park a copy (as into host memory), each unpark another."""

    def __init__(self):
        self.parked, self.unparked = 0, 0

    def park(self, t):
        self.parked += 1
        return t.clone()

    def unpark(self, t):
        self.unparked += 1
        return t.clone()


def test_release_on_read_frees_each_layer_once_read_and_refuses_a_second_read():
    k = torch.randn(2, 10, 8)
    cache = KVCache(rows=2, release_on_read=True)
    cache.record("a", k, k * 2)
    cache.record("b", k, k)
    got = cache.read("a")
    assert torch.equal(got[1], (k * 2).reshape(2, -1, 8)) and set(cache.store) == {"b"}
    with pytest.raises(RuntimeError, match="layer a read twice"):
        cache.read("a")
    assert cache.read("unrecorded") is None
    kept = KVCache(rows=2)  # the default (training, previews): the cache stays whole
    kept.record("a", k, k)
    first, second = kept.read("a"), kept.read("a")  # read twice: both times the recorded K/V
    assert torch.equal(first[0], k.reshape(2, -1, 8)) and torch.equal(second[0], k.reshape(2, -1, 8)) and len(kept) == 1


def test_parked_kv_comes_back_for_its_layer():
    from lcmla.attention.context import HostParking

    k = torch.randn(1, 10, 8)
    parking = _CopyParking()
    cache = KVCache(parking=parking)
    cache.record("a", k, -k)
    assert parking.parked == 2 and cache.store["a"][0].data_ptr() != k.data_ptr()
    key, value = cache.read("a")
    assert parking.unparked == 2 and torch.equal(key, k) and torch.equal(value, -k)
    cpu = HostParking("cpu")  # nothing to save off CUDA: the same tensor
    assert cpu.park(k) is k and cpu.unpark(k) is k


def test_the_kv_path_releases_its_cache_unless_previews_read_it_and_the_low_mode_parks_it(engine, face_path,
                                                                                       monkeypatch):
    """The denoiser's call is the cache's last reader on the KV path, so each layer's K/V go once
    read; previews read it once more (the LCM preview's call), so then it stays whole. Parking the
    K/V (the low-VRAM mode's, here copying) and releasing them change no pixel."""
    caches = []
    encode = engine._encode_reference

    def spy(*args, **kwargs):
        caches.append(encode(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(engine, "_encode_reference", spy)
    settings = _settings(lookahead__kv=True)
    plain = engine.generate(settings, [face_path])
    assert caches and all(c.release_on_read and not c.store and c.released for c in caches)
    layers = len(caches[0].released)
    caches.clear()
    engine.previews(settings, [face_path])
    assert caches and all(not c.release_on_read and len(c) == layers for c in caches)
    parking = _CopyParking()
    monkeypatch.setattr(engine, "kv_parking", parking)
    parked = engine.generate(settings, [face_path])
    steps = len(parked.branch_calls)
    assert parking.parked == parking.unparked == 2 * layers * steps
    assert np.array_equal(_px(parked.images[0]), _px(plain.images[0]))


# ---- guidance and previews, by hand -------------------------------------------------------------


def test_lookahead_cfg_by_hand():
    mk = lambda v: torch.full((1, 1, 1, 1), float(v))
    preds = {"uncond": mk(1), "nokv": mk(2), "full": mk(4), "kv": mk(7)}
    # 1 + 3·1 + 2·3 + 2·6 = 22
    assert lookahead_cfg(preds, 3.0, 2.0, 2.0).item() == 22.0
    assert torch.equal(lookahead_cfg({"nokv": mk(2)}, 1.0, 0.0, 0.0), mk(2))  # ε_u and zero-scale branches unused
    assert LookaheadGuidance(3, 2, 2).branches(0) == ("uncond", "nokv", "full", "kv")
    assert LookaheadGuidance(1, 0, 0).branches(0) == ("nokv",)
    assert LookaheadGuidance(3, 2, 0).branches(0) == ("uncond", "nokv", "full")
    assert LookaheadGuidance(3, 2, 2, lcm_scheduler=True).branches(0) == ("full",)
    # the guidance object passes each scale to its own branch: 1 + 3·1 + 0.5·3 + 1.5·6 = 14.5
    assert LookaheadGuidance(3.0, 0.5, 1.5).combine(preds, 0).item() == 14.5
    assert LookaheadGuidance(3.0, 0.5, 1.5, lcm_scheduler=True).combine(preds, 0).item() == 4.0  # ε_full alone


def test_lcm_x0_equals_lcm_scheduler_step():
    from diffusers import LCMScheduler

    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing")
    sched.set_timesteps(4)
    torch.manual_seed(1)
    for i, t in enumerate(sched.timesteps):
        z, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        sched._step_index = i
        denoised = sched.step(eps, t, z, return_dict=True).denoised
        assert torch.allclose(lcm_x0(z, eps, sched.alphas_cumprod, t), denoised, atol=1e-6)


def test_ddpm_x0_inverts_forward_noising():
    acp = torch.linspace(0.99, 0.01, 1000)
    z0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    zt = ddpm_noise(z0, eps, acp, 500)
    assert torch.allclose(ddpm_x0(zt, eps, acp, 500), z0, atol=1e-5)


# ---- the engine ---------------------------------------------------------------------------------


def test_kv_path_batches_four_branches_plus_encoder(engine, face_path):
    calls = []
    hook = engine.pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        r = engine.generate(_settings(lookahead__kv=True), [face_path])
    finally:
        hook.remove()
    assert r.branch_calls == [("uncond", "nokv", "full", "kv")] * 4
    assert calls == [2, 4] * 4  # encoder pass (null + text rows), then ONE denoiser call per step
    calls.clear()
    hook = engine.pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        r2 = engine.generate(_settings(lookahead__kv=True, lookahead__s_kv=0.0), [face_path])
    finally:
        hook.remove()
    assert r2.branch_calls[0] == ("uncond", "nokv", "full")
    assert calls == [1, 3] * 4  # only the text row is encoded when no branch reads the null row


def test_kv_one_nokv_equals_no_kv_prediction(engine, face_path):
    """s_nokv = 1, others 0: exactly the plain (no-KV) full-condition generation."""
    kv = engine.generate(_settings(lookahead__kv=True, lookahead__s_nokv=1.0, lookahead__s_full=0.0,
                                   lookahead__s_kv=0.0), [face_path])
    plain = engine.generate(_settings(), [face_path])
    assert kv.branch_calls[0] == ("nokv",)
    assert np.array_equal(_px(kv.images[0]), _px(plain.images[0]))


def test_kv_reference_face_matters(engine, face_path, other_face):
    a = engine.generate(_settings(lookahead__kv=True, identity__ip_adapter_scale=0.0), [face_path])
    b = engine.generate(_settings(lookahead__kv=True, identity__ip_adapter_scale=0.0), [other_face])
    plain = engine.generate(_settings(identity__ip_adapter_scale=0.0), [face_path])
    assert not np.array_equal(_px(a.images[0]), _px(b.images[0]))
    assert not np.array_equal(_px(a.images[0]), _px(plain.images[0]))


def test_kv_path_holds_no_second_unet(engine, face_path):
    before = sum(p.numel() for p in engine.pipe.unet.parameters())
    modules = len(list(engine.pipe.unet.modules()))
    engine.generate(_settings(lookahead__kv=True), [face_path])
    assert sum(p.numel() for p in engine.pipe.unet.parameters()) == before
    assert len(list(engine.pipe.unet.modules())) == modules


def test_settings_reject_dcg_with_kv():
    with pytest.raises(SettingsError, match="guidance.dcg and lookahead.kv"):
        _settings(guidance__dcg=True, lookahead__kv=True)


def test_freeu_per_request(engine, face_path):
    base = _px(engine.generate(_settings(), [face_path]).images[0])
    on = _px(engine.generate(_settings(freeu__enabled=True), [face_path]).images[0])
    assert not np.array_equal(on, base)
    assert np.array_equal(_px(engine.generate(_settings(freeu__enabled=False), [face_path]).images[0]), base)
    other = _px(engine.generate(_settings(freeu__enabled=True, freeu__b1=1.4), [face_path]).images[0])
    assert not np.array_equal(other, on)


def test_consecutive_requests_with_different_kv_freeu_lora_equal_alone(engine, face_path):
    cases = [
        _settings(lookahead__kv=True, freeu__enabled=True, output__seed=3),
        _settings(identity__lora_scale=0.2, output__seed=3),
        _settings(lookahead__kv=True, lookahead__s_kv=4.0, identity__lora_scale=0.5, output__seed=3),
        _settings(freeu__enabled=True, freeu__s2=0.5, output__seed=3),
    ]
    alone = [_px(engine.generate(s, [face_path]).images[0]) for s in cases]
    for s, ref in zip(reversed(cases), reversed(alone)):
        assert np.array_equal(_px(engine.generate(s, [face_path]).images[0]), ref)


def test_lcm_lora_scale_zero_equals_adapter_disabled():
    """At the UNet: the LCM-LoRA adapter at scale 0 is bit-identical to the UNet without it."""
    from lcmla.loading import load_components
    from lcmla.presets import PRESETS
    from lcmla.tiny import tiny_paths

    with_lcm = load_components(PRESETS["tiny"], tiny_paths(), lcm_lora=True).pipe
    without = load_components(PRESETS["tiny"], tiny_paths(), lcm_lora=False).pipe
    with_lcm.set_adapters(["faceid", "lcm"], [1.0, 0.0])
    unet_a, unet_b = with_lcm.unet, without.unet
    torch.manual_seed(0)
    x = torch.randn(1, 4, 16, 16)
    cond = dict(encoder_hidden_states=torch.randn(1, 77, 64),
                added_cond_kwargs={"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]]),
                                   "image_embeds": [torch.randn(1, 1, 512)]})
    for u in (unet_a, unet_b):
        proj = u.encoder_hid_proj.image_projection_layers[0]
        proj.clip_embeds = torch.zeros(1, 1, 50, 32)
    with torch.no_grad():
        a = unet_a(x, 500, **cond).sample
        b = unet_b(x, 500, **cond).sample
        with_lcm.set_adapters(["faceid", "lcm"], [1.0, 1.0])
        c = unet_a(x, 500, **cond).sample
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_previews_stream_both_previews(engine, face_path):
    seen = []
    res = engine.previews(_settings(), [face_path], callback=seen.append)
    assert [f.step for f in res.frames] == [0, 1, 2, 3] and seen == res.frames
    assert all(f.x0.size == (256, 256) and f.lcm.size == (256, 256) for f in res.frames)
    assert not np.array_equal(_px(res.frames[0].x0), _px(res.frames[0].lcm))
    plain = engine.generate(_settings(), [face_path])
    assert np.array_equal(_px(res.image), _px(plain.images[0]))  # previews do not change the generation
    some = engine.previews(_settings(lookahead__lcm_lora_scale=0.3), [face_path], steps=[1, 3])
    assert [f.step for f in some.frames] == [1, 3]
    assert not np.array_equal(_px(some.frames[0].lcm), _px(res.frames[1].lcm))  # the LCM scale matters
    assert np.array_equal(_px(some.frames[0].x0), _px(res.frames[1].x0))


@pytest.mark.parametrize("design", ["encoder", "kv-copy"])
def test_kv_encoder_lora_round_trip_and_encoder_only(engine, face_path, tmp_path, design):
    from lcmla import Engine
    from lcmla.attention.kv_copy import kv_copies
    from lcmla.kv_lora import (
        add_kv_encoder_lora,
        kv_lora_state_dict,
        read_kv_lora_metadata,
        save_kv_encoder_lora,
    )

    unet = tiny_components().pipe.unet
    add_kv_encoder_lora(unet, rank=4, design=design)
    torch.manual_seed(0)
    for m in unet.modules():
        if isinstance(getattr(m, "lora_B", None), torch.nn.ModuleDict) and "kv_encoder" in m.lora_B:
            torch.nn.init.normal_(m.lora_B["kv_encoder"].weight, std=0.5)
    for copy in kv_copies(unet).values():
        torch.nn.init.normal_(copy.to_k.lora_B.weight, std=0.5)
        torch.nn.init.normal_(copy.to_v.lora_B.weight, std=0.5)
    path = save_kv_encoder_lora(unet, tmp_path / "kv.safetensors", training={"steps": 1})
    meta = read_kv_lora_metadata(path)
    assert meta["rank"] == "4" and meta["version"] == "2" and meta["reference_kv"] == design
    saved = kv_lora_state_dict(unet)
    assert any(k.startswith("kv_copy.") for k in saved) == (design == "kv-copy")
    with logged_messages("diffusers") as said:
        e2 = Engine.load("tiny", kv_encoder_lora=path)
    assert not [m for m in said if "No LoRA keys" in m]  # the text encoders have none: nothing to say
    loaded = kv_lora_state_dict(e2.pipe.unet)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)

    def alpha_over_rank(u):  # the file stores no alpha: B·A must apply unscaled, before and after
        return {n: m.lora_alpha["kv_encoder"] / m.r["kv_encoder"] for n, m in u.named_modules()
                if isinstance(getattr(m, "lora_alpha", None), dict) and "kv_encoder" in m.lora_alpha}

    made = alpha_over_rank(unet)
    assert made and made == alpha_over_rank(e2.pipe.unet) and set(made.values()) == {1.0}
    s = _settings()
    plain = e2.generate(s, [face_path])  # the LoRA acts on the KV path only: off, the same image, and a note says so
    assert np.array_equal(_px(plain.images[0]), _px(engine.generate(s, [face_path]).images[0]))
    assert any("KV-encoder LoRA acts only on the KV path" in n for n in plain.notes)
    kv = s.replace(lookahead__kv=True)
    on = e2.generate(kv, [face_path])
    assert not np.array_equal(_px(on.images[0]), _px(engine.generate(kv, [face_path]).images[0]))
    assert not any("KV-encoder LoRA" in n for n in on.notes)
    bogus = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bogus))
    with pytest.raises(ValueError, match="not an lcmla KV-encoder LoRA"):
        Engine.load("tiny", kv_encoder_lora=bogus)


def test_version_1_kv_encoder_lora_reads_as_the_encoder_design(engine, face_path, tmp_path):
    """A version-1 file (encoder LoRA only, no reference_kv / kv_copy_rank metadata) loads as the
    "encoder" design: the same LoRA tensors, no KV copies, active on the encoder pass only."""
    from safetensors.torch import load_file, save_file

    from lcmla import Engine
    from lcmla.attention.kv_copy import kv_copies
    from lcmla.kv_lora import TARGET_MODULES, add_kv_encoder_lora, kv_lora_state_dict, read_kv_lora_metadata

    unet = tiny_components().pipe.unet
    add_kv_encoder_lora(unet, rank=4, design="encoder")
    torch.manual_seed(0)
    for m in unet.modules():
        if isinstance(getattr(m, "lora_B", None), torch.nn.ModuleDict) and "kv_encoder" in m.lora_B:
            torch.nn.init.normal_(m.lora_B["kv_encoder"].weight, std=0.5)
    state = kv_lora_state_dict(unet)
    assert state and all(k.startswith("unet.") for k in state)
    v1 = tmp_path / "kv_v1.safetensors"  # what lcmla wrote before version 2
    save_file(state, str(v1), metadata={"format": "lcmla-kv-encoder-lora", "version": "1", "rank": "4",
                                        "target_modules": TARGET_MODULES, "training": "{}"})
    meta = read_kv_lora_metadata(v1)
    assert meta["version"] == "1" and meta["reference_kv"] == "encoder"
    e1 = Engine.load("tiny", kv_encoder_lora=v1)
    loaded = kv_lora_state_dict(e1.pipe.unet)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert kv_copies(e1.pipe.unet) == {} and load_file(str(v1)).keys() == state.keys()
    s = _settings(output__width=64, output__height=64)
    assert np.array_equal(_px(e1.generate(s, [face_path]).images[0]), _px(engine.generate(s, [face_path]).images[0]))
    kv = s.replace(lookahead__kv=True)
    assert not np.array_equal(_px(e1.generate(kv, [face_path]).images[0]), _px(engine.generate(kv, [face_path]).images[0]))


def test_the_kv_copy_design_leaves_the_last_transformer_block_out_of_the_encoder_lora():
    """In the kv-copy design the last transformer block of the up path computes nothing a recorded
    K/V reads, so its q/k/v/out are not trained (as the authors do); the encoder design trains all."""
    from diffusers import UNet2DConditionModel

    from lcmla.kv_lora import encoder_lora_targets, last_transformer_block
    from lcmla.tiny import TINY_UNET

    unet = UNet2DConditionModel(**TINY_UNET)
    blocks = [n[: -len(".attn1.processor")] for n in unet.attn_processors if n.endswith(".attn1.processor")]
    last = last_transformer_block(unet)
    numbers = lambda b: tuple(int(x) for x in b.split(".") if x.isdigit())  # noqa: E731
    assert last == max((b for b in blocks if b.startswith("up_blocks.")), key=numbers) == "up_blocks.1.attentions.2.transformer_blocks.0"
    every, kv_copy = encoder_lora_targets(unet, "encoder"), encoder_lora_targets(unet, "kv-copy")
    projections = ("to_q", "to_k", "to_v", "to_out.0")
    assert sorted(every) == sorted(f"{b}.{a}.{p}" for b in blocks for a in ("attn1", "attn2") for p in projections)
    assert sorted(set(every) - set(kv_copy)) == sorted(f"{last}.{a}.{p}" for a in ("attn1", "attn2") for p in projections)
    assert set(kv_copy) < set(every)


def test_a_kv_lora_of_another_version_or_with_copies_for_missing_layers_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from lcmla.errors import LcmlaError
    from lcmla.kv_lora import FORMAT, add_kv_encoder_lora, load_kv_encoder_lora, read_kv_lora_metadata, save_kv_encoder_lora

    future = tmp_path / "future.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(4, 8)}, str(future), metadata={"format": FORMAT, "version": "3"})
    with pytest.raises(LcmlaError, match=r"has KV-encoder LoRA version '3'; this lcmla reads 1, 2"):
        read_kv_lora_metadata(future)
    pickled = tmp_path / "pytorch_lora_weights.bin"  # what the authors' training writes: a torch pickle
    torch.save({"unet.x.lora_A.weight": torch.zeros(4, 8)}, pickled)
    with pytest.raises(LcmlaError, match=r"is not a safetensors file .*authors' checkpoint\? convert it with "
                                         r"`python -m lcmla convert-lookahead`"):
        read_kv_lora_metadata(pickled)
    renamed = tmp_path / "adapter.pt"  # a safetensors file of another kind, named like theirs
    save_file({"x": torch.zeros(1)}, str(renamed))
    with pytest.raises(LcmlaError, match=r"is not an lcmla KV-encoder LoRA .*convert-lookahead"):
        read_kv_lora_metadata(renamed)
    unet = tiny_components().pipe.unet
    add_kv_encoder_lora(unet, rank=4, design="kv-copy")
    path = save_kv_encoder_lora(unet, tmp_path / "kv.safetensors", training={"steps": 1})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    some = next(k for k in state if k.startswith("kv_copy.") and ".attn1.to_k." in k)
    layer = some[len("kv_copy."):].split(".attn1.")[0]
    state[some.replace(layer, "up_blocks.9.attentions.0.transformer_blocks.0")] = state[some].clone()
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=meta)
    pipe = tiny_components().pipe
    with pytest.raises(LcmlaError, match=r"has KV-copy weights for layers this UNet lacks, e\.g\. up_blocks\.9\."):
        load_kv_encoder_lora(pipe, bad)


def test_a_kv_copy_lora_loads_at_its_own_rank_partial_and_frozen(tmp_path):
    """A checkpoint's KV copies load at the rank its metadata names (here 2, not the default 4);
    layers it has no copy weights for keep a zero update; and the loaded copies are frozen
    (inference weights; a training run that continues them unfreezes what it trains)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lcmla.attention.kv_copy import kv_copies
    from lcmla.kv_lora import add_kv_encoder_lora, load_kv_encoder_lora, save_kv_encoder_lora

    unet = tiny_components().pipe.unet
    add_kv_encoder_lora(unet, rank=2, design="kv-copy")
    torch.manual_seed(0)
    for copy in kv_copies(unet).values():
        torch.nn.init.normal_(copy.to_k.lora_B.weight, std=0.5)
    path = save_kv_encoder_lora(unet, tmp_path / "kv.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["kv_copy_rank"] == "2"
    state = load_file(str(path))
    dropped = sorted(k[len("kv_copy."):].split(".to_")[0] for k in state if k.startswith("kv_copy."))[0]
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith(f"kv_copy.{dropped}.")}, str(partial), metadata=meta)
    pipe = tiny_components().pipe
    load_kv_encoder_lora(pipe, partial)
    loaded = {n[: -len(".processor")]: c for n, c in kv_copies(pipe.unet).items()}
    assert loaded[dropped].to_k.lora_A.weight.shape[0] == 2 and not loaded[dropped].to_k.lora_B.weight.any()
    others = [c for n, c in loaded.items() if n != dropped]
    assert others and all(c.to_k.lora_B.weight.any() for c in others)
    assert not any(p.requires_grad for c in loaded.values() for p in c.parameters())


def test_kv_copy_design_equals_the_encoders_own_kv_until_trained(engine, face_path):
    """The authors' KV copy starts as a copy of attn1's to_k/to_v: with zero LoRA updates it records
    exactly the layer's own K/V; a trained copy LoRA changes only the recorded reference."""
    from lcmla.attention.kv_copy import add_kv_copy

    s = _settings(lookahead__kv=True)
    plain = engine.generate(s, [face_path])
    copies = add_kv_copy(engine.pipe.unet, rank=4)
    try:
        same = engine.generate(s, [face_path])
        assert np.array_equal(_px(same.images[0]), _px(plain.images[0]))
        torch.manual_seed(1)
        for copy in copies.values():
            torch.nn.init.normal_(copy.to_k.lora_B.weight, std=0.5)
        trained = engine.generate(s, [face_path])
        assert not np.array_equal(_px(trained.images[0]), _px(plain.images[0]))
        no_kv = _settings()
        assert np.array_equal(_px(engine.generate(no_kv, [face_path]).images[0]),
                              _px(engine.generate(no_kv, [face_path]).images[0]))
        scaled = engine.generate(s.replace(lookahead__kv_lora_scale=0.0), [face_path])  # scale 0: the base copy
        assert np.array_equal(_px(scaled.images[0]), _px(plain.images[0]))
        half = engine.generate(s.replace(lookahead__kv_lora_scale=0.5), [face_path])  # the knob reaches the copy
        assert not np.array_equal(_px(half.images[0]), _px(plain.images[0]))
        assert not np.array_equal(_px(half.images[0]), _px(trained.images[0]))
    finally:
        for proc in engine.pipe.unet.attn_processors.values():
            if hasattr(proc, "kv_copy"):
                proc.kv_copy = None



def test_a_kv_copy_lora_in_float32_gives_the_models_dtype():
    """Training keeps the KV-copy LoRA in float32 beside a half-precision UNet: its update comes
    back in the input's dtype, so the recorded K/V stay in the model's dtype."""
    from lcmla.attention.kv_copy import LoRAPair

    pair = LoRAPair(8, 8, 4)
    torch.nn.init.normal_(pair.lora_B.weight)
    x = torch.randn(2, 5, 8).to(torch.bfloat16)
    out = pair(x)
    assert out.dtype == torch.bfloat16 and pair.lora_B.weight.dtype == torch.float32
    want = (x.float() @ pair.lora_A.weight.T @ pair.lora_B.weight.T).to(torch.bfloat16)
    assert torch.allclose(out.float(), want.float(), rtol=1e-2, atol=1e-2)


def test_kv_copy_projection_is_the_base_plus_s_times_its_lora():
    """K_ref = W_k·x + s·B_k·A_k·x and V_ref likewise (the authors' KVCopy), written out with the
    matrices: at s = 0.5 and 1.3 (not only at 0, where the LoRA drops out), with the base read
    under a peft wrapper's own adapter (the KV-encoder LoRA) rather than through it."""
    from diffusers.models.attention_processor import Attention
    from peft import LoraConfig, inject_adapter_in_model

    from lcmla.attention.kv_copy import KVCopyLoRA, kv_copy_projection

    torch.manual_seed(0)
    attn = Attention(query_dim=12, heads=2, dim_head=6)
    copy = KVCopyLoRA(12, 12, rank=3)
    for pair in (copy.to_k, copy.to_v):
        torch.nn.init.normal_(pair.lora_B.weight, std=0.7)
    x = torch.randn(2, 5, 12)
    wk, wv = attn.to_k.weight.detach().clone(), attn.to_v.weight.detach().clone()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_k", "to_v"], init_lora_weights=False), attn)
    assert not torch.allclose(attn.to_k(x), x @ wk.T)  # the wrapper's own adapter is live ...
    with torch.no_grad():
        for s in (0.0, 0.5, 1.3):
            key, value = kv_copy_projection(attn, copy, x, s)
            for got, w, pair in ((key, wk, copy.to_k), (value, wv, copy.to_v)):
                a, b = pair.lora_A.weight, pair.lora_B.weight  # (r, in), (out, r)
                torch.testing.assert_close(got, x @ w.T + s * (x @ a.T @ b.T))  # ... and not read here

# ---- the KV path as released (two encoder rows, encoder pass state, framing) ---------------------


def _capture_steps(engine, settings, faces):
    steps = []
    engine._run(settings, faces, on_guided=lambda step, denoiser, resolved: steps.append(step))
    return steps


def test_each_kv_branch_reads_the_row_spec_assigns(engine, face_path):
    """ε_full attends to the "a photo of a face" row, ε_kv to the null-text row (SPEC §4, the
    authors' released pipeline); ε_u and ε_nokv to none."""
    from lcmla.guidance import LookaheadGuidance

    s = _settings(lookahead__kv=True)
    seen = []
    original = SelfAttnProcessor._extended

    layers = []

    def spy(attn, query, key, value, ref, kv_index, mask):
        seen.append((tuple(kv_index), ref[0].shape[0]))
        layers.append(attn)
        return original(attn, query, key, value, ref, kv_index, mask)

    SelfAttnProcessor._extended = staticmethod(spy)
    try:
        steps = _capture_steps(engine, s, [face_path])
    finally:
        SelfAttnProcessor._extended = staticmethod(original)
    assert steps[0].branches == ("uncond", "nokv", "full", "kv") and steps[0].kv_rows == ("null", "text")
    assert set(seen) == {((-1, -1, 1, 0), 2)}  # every attn1 layer: full → row 1 (text), kv → row 0 (null)
    # ... and every attn1 layer of the UNet read them, once per step
    unet = engine.pipe.unet
    attn1 = [unet.get_submodule(n[: -len(".processor")]) for n in unet.attn_processors if n.endswith("attn1.processor")]
    assert len(attn1) > 0 and len(seen) == len(attn1) * len(steps) == len(layers)
    assert {id(a) for a in layers} == {id(a) for a in attn1}
    assert all(sum(a is b for b in layers) == len(steps) for a in attn1)
    # the rows hold what an encoder pass over that row alone records
    first, resolved = steps[0], engine_resolve(engine, s)
    setup = engine._kv_setup(resolved, engine._kv_references(engine.analyze_faces([face_path]), resolved))
    noise = torch.randn((1, 4, 32, 32), generator=torch.Generator("cpu").manual_seed(0))
    with torch.no_grad():
        engine._apply_module_state(resolved)
        alone = {r: engine._encode_reference(setup, (r,), noise, first.timestep, resolved) for r in ("null", "text")}
    name = next(iter(first.ctx.kv.store))
    both = first.ctx.kv.read(name)[0]
    assert torch.allclose(both[0], alone["null"].read(name)[0][0], atol=1e-5)
    assert torch.allclose(both[1], alone["text"].read(name)[0][0], atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-4)  # the rows differ: the prompt matters
    assert LookaheadGuidance().conditions["kv"].kv_row == "null"


def engine_resolve(engine, settings):
    from lcmla.presets import resolve_settings

    return resolve_settings(settings, engine.preset)


def test_encoder_pass_has_no_freeu_and_no_denoiser_loras(engine, face_path):
    """The reference K/V recorded while the denoiser runs FreeU and the FaceID LoRA equal those of
    an encoder pass on a UNet that never had them."""
    from diffusers import StableDiffusionXLPipeline

    from lcmla.attention.context import AttentionContext as Ctx
    from lcmla.tiny import ensure_tiny_weights, tiny_paths

    s = _settings(lookahead__kv=True, freeu__enabled=True, identity__lora_scale=1.0)
    step = _capture_steps(engine, s, [face_path])[1]
    # the same encoder pass on stock diffusers' UNet: no IP-Adapter, no LoRA, no FreeU
    plain = StableDiffusionXLPipeline.from_pretrained(tiny_paths(ensure_tiny_weights())["base"], local_files_only=True)
    unet = plain.unet
    procs = {n: (SelfAttnProcessor(n) if n.endswith("attn1.processor") else p) for n, p in unet.attn_processors.items()}
    unet.set_attn_processor(procs)
    resolved = engine_resolve(engine, s)
    setup = engine._kv_setup(resolved, engine._kv_references(engine.analyze_faces([face_path]), resolved))
    noise = torch.randn((1, 4, 32, 32), generator=torch.Generator("cpu").manual_seed(0))
    from lcmla.preview import ddpm_noise

    z = ddpm_noise(setup["latents"], noise, engine._alphas_cumprod(), step.timestep).repeat(2, 1, 1, 1)
    rows = [setup["rows"]["null"], setup["rows"]["text"]]
    cache = KVCache(rows=2)
    with torch.no_grad():
        unet(z, step.timestep, encoder_hidden_states=torch.cat([r.prompt_embeds for r in rows]),
             added_cond_kwargs={"text_embeds": torch.cat([r.text_embeds for r in rows]),
                                "time_ids": torch.cat([r.time_ids for r in rows])},
             cross_attention_kwargs={"lcmla": Ctx(ip_scale=0.0, am=AMPlan.from_settings(AttentionSettings(), 1),
                                                  kv=cache, kv_record=True)})
    ours = step.ctx.kv
    assert ours.store.keys() == cache.store.keys()
    for name in cache.store:
        assert torch.allclose(ours.read(name)[0], cache.read(name)[0], atol=1e-5), name
    # with FreeU on for the encoder too, the up blocks' K/V would differ (the test can tell)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.1, b2=1.1)
    freeu_cache = KVCache(rows=2)
    with torch.no_grad():
        unet(z, step.timestep, encoder_hidden_states=torch.cat([r.prompt_embeds for r in rows]),
             added_cond_kwargs={"text_embeds": torch.cat([r.text_embeds for r in rows]),
                                "time_ids": torch.cat([r.time_ids for r in rows])},
             cross_attention_kwargs={"lcmla": Ctx(ip_scale=0.0, am=AMPlan.from_settings(AttentionSettings(), 1),
                                                  kv=freeu_cache, kv_record=True)})
    up = [n for n in cache.store if n.startswith("up_blocks")]
    assert any(not torch.allclose(freeu_cache.read(n)[0], cache.read(n)[0], atol=1e-5) for n in up)
    # and with the FaceID LoRA on for the encoder pass (the engine's UNet, FreeU off), they would too
    from lcmla.denoiser import UNetBatch
    from lcmla.lookahead import encode_reference

    engine._set_adapters({"faceid": 1.0})
    engine.pipe.unet.disable_freeu()
    try:
        with torch.no_grad():
            faceid = encode_reference(engine.pipe.unet, setup["latents"], UNetBatch.cat(rows), step.timestep, noise,
                                      engine._alphas_cumprod(), KVCache())
    finally:
        engine._apply_module_state(engine_resolve(engine, _settings()))
    assert not _kv_equal(faceid, cache)


def _plain_encoder_kv(unet, setup, rows, noise, t, alphas_cumprod) -> KVCache:
    """The KV-encoder pass by hand on ``unet`` (stock diffusers' processors but lcmla's attn1): the
    reference latents noised to t with ``noise``, the encoder ``rows``, every attn1 recording."""
    from lcmla.preview import ddpm_noise

    z = ddpm_noise(setup["latents"], noise, alphas_cumprod, t).repeat(len(rows), 1, 1, 1)
    batch = [setup["rows"][r] for r in rows]
    cache = KVCache(rows=len(rows))
    ctx = AttentionContext(ip_scale=0.0, am=AMPlan.from_settings(AttentionSettings(), 1), kv=cache, kv_record=True)
    with torch.no_grad():
        unet(z, t, encoder_hidden_states=torch.cat([r.prompt_embeds for r in batch]),
             added_cond_kwargs={"text_embeds": torch.cat([r.text_embeds for r in batch]),
                                "time_ids": torch.cat([r.time_ids for r in batch])},
             cross_attention_kwargs={"lcmla": ctx})
    return cache


def _kv_equal(a: KVCache, b: KVCache) -> bool:
    return a.store.keys() == b.store.keys() and all(
        torch.allclose(a.read(n)[i], b.read(n)[i], atol=1e-5) for n in a.store for i in (0, 1))


def test_encoder_pass_on_an_lcm_lora_backbone_runs_without_the_lcm_lora(face_path):
    """sdxl-lcm-lora (the LCM-LoRA is the denoiser's backbone, at guidance.backbone_lora_scale): the
    encoder pass still runs without it (and without FaceID's LoRA and FreeU), as the authors' encoder
    does; controls: either LoRA active on the encoder pass WOULD change the recorded K/V."""
    from diffusers import UNet2DConditionModel

    from lcmla import Engine
    from lcmla.denoiser import UNetBatch
    from lcmla.lookahead import encode_reference
    from lcmla.tiny import random_weights_paths

    lcm = Engine.load("sdxl-lcm-lora", device="cpu", random_weights="tiny")
    assert lcm.preset.lcm_lora and {"lcm", "faceid"} <= set(lcm.adapters)
    s = _settings(lookahead__kv=True, freeu__enabled=True, identity__lora_scale=1.0,
                  output__width=64, output__height=64)
    resolved = engine_resolve(lcm, s)
    assert lcm._denoiser_adapters(resolved) == {"faceid": 1.0, "lcm": resolved.guidance.backbone_lora_scale} \
        and resolved.guidance.backbone_lora_scale > 0  # the denoiser runs both LoRAs (and FreeU)
    steps = _capture_steps(lcm, s, [face_path])
    step = steps[1]
    assert step.kv_rows == ("text",)  # LCM scheduler: the full branch only, so the text row only
    setup = lcm._kv_setup(resolved, lcm._kv_references(lcm.analyze_faces([face_path]), resolved))
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(s.output.seed))
    acp = lcm._alphas_cumprod()
    # a UNet that never had the LCM-LoRA, the FaceID LoRA or FreeU
    stock = UNet2DConditionModel.from_pretrained(random_weights_paths("tiny")["base"], subfolder="unet",
                                                 local_files_only=True)
    stock.set_attn_processor({n: (SelfAttnProcessor(n) if n.endswith("attn1.processor") else p)
                              for n, p in stock.attn_processors.items()})
    plain = _plain_encoder_kv(stock, setup, step.kv_rows, noise, step.timestep, acp)
    assert _kv_equal(step.ctx.kv, plain)

    # controls on the engine's own UNet, the encoder pass with a chosen LoRA state (FreeU off)
    def encoder_kv(adapters):
        lcm._set_adapters(adapters)
        lcm.pipe.unet.disable_freeu()
        try:
            with torch.no_grad():
                batch = UNetBatch.cat([setup["rows"][r] for r in step.kv_rows])
                return encode_reference(lcm.pipe.unet, setup["latents"], batch, step.timestep, noise, acp, KVCache())
        finally:
            lcm._apply_module_state(resolved)

    assert _kv_equal(encoder_kv({}), plain)  # no LoRA: the same K/V by this path too
    assert not _kv_equal(encoder_kv({"lcm": resolved.guidance.backbone_lora_scale}), plain)  # the LCM-LoRA would show
    assert not _kv_equal(encoder_kv({"faceid": 1.0}), plain)  # and so would FaceID's


def test_reference_framing_on_a_non_square_output(engine, face_path):
    s = _settings(lookahead__kv=True, output__width=128, output__height=64)
    photo = engine.generate(s, [face_path])
    face = engine.generate(s.replace(lookahead__reference_framing="face"), [face_path])
    assert photo.settings.lookahead.reference_framing == "photo"  # the authors' default, recorded
    assert face.settings.lookahead.reference_framing == "face"
    assert photo.images[0].size == (128, 64)
    assert not np.array_equal(_px(photo.images[0]), _px(face.images[0]))
    identity = engine.analyze_faces([face_path])
    refs = engine._kv_references(identity, engine_resolve(engine, s))
    assert refs[0].size == (128, 64)
    # the aspect is kept: the wide frame's central 192x192 is the square frame at the same scale
    # (a stretch squeezes it); the 512x512 photo's "photo" frame pads 64 columns each side, each
    # a copy of the photo's edge column
    from lcmla.lookahead import kv_reference_images

    for framing in ("photo", "face"):
        wide = _px(kv_reference_images(identity, (320, 192), framing)[0])
        square = _px(kv_reference_images(identity, (192, 192), framing)[0])
        assert np.abs(wide[:, 64:256] - square).mean() < 2, framing
        stretched = _px(Image.fromarray(square.astype(np.uint8)).resize((320, 192), Image.BICUBIC))
        assert np.abs(stretched[:, 64:256] - square).mean() > 20, framing  # the check tells a stretch apart
    wide = _px(kv_reference_images(identity, (320, 192), "photo")[0])
    assert np.ptp(wide[:, :60], axis=1).max() <= 1 and np.ptp(wide[:, -60:], axis=1).max() <= 1
    assert not np.array_equal(wide, _px(kv_reference_images(identity, (320, 192), "face")[0]))
    assert np.array_equal(_px(refs[0]), _px(kv_reference_images(identity, (128, 64), "photo")[0]))  # what the engine feeds


def test_lookahead_as_released_configuration(engine, face_path):
    from lcmla.methods import LOOKAHEAD_CONFIGS, method_changes

    changes = method_changes("lookahead-released", "tiny")
    assert changes == LOOKAHEAD_CONFIGS["lookahead-released"]
    assert changes["guidance.scheduler"] == "DPMSolverMultistepScheduler" and changes["guidance.steps"] == 50
    assert changes["identity.ip_adapter_scale"] == 1.0 and not changes["freeu.enabled"]
    s = _settings().replace_dotted({**changes, "guidance.steps": 6})  # 6 steps keep the test fast
    r = engine.generate(s, [face_path])
    assert r.settings.guidance.scheduler == "DPMSolverMultistepScheduler"
    assert r.branch_calls == [("uncond", "nokv", "full", "kv")] * 6
    again = engine.generate(r.image_settings(0), [face_path])
    assert np.array_equal(_px(r.images[0]), _px(again.images[0]))
    ddim = engine.generate(s.replace(guidance__scheduler=None), [face_path])
    assert not np.array_equal(_px(r.images[0]), _px(ddim.images[0]))


def test_previews_x0_inverts_the_steps_own_noising_and_the_kv_lcm_preview_reads_the_full_row(engine, face_path,
                                                                                                monkeypatch):
    """x̂0, noised again with the step's guided ε to the step's own timestep, gives back the step's
    latents; on the KV path the LCM preview (one sample) attends to the encoder row of the full
    branch ("text", row 1) in every self-attention layer."""
    import lcmla.engine as engine_module

    seen, kv_reads = [], []
    original_preview, original_extended = engine_module.preview_latents, SelfAttnProcessor._extended

    def preview_spy(unet, step, *args):
        x0, z_lcm = original_preview(unet, step, *args)
        seen.append((step.z_in, step.eps, step.timestep, x0))
        return x0, z_lcm

    def extended_spy(attn, query, key, value, ref, kv_index, mask):
        kv_reads.append(tuple(kv_index))
        return original_extended(attn, query, key, value, ref, kv_index, mask)

    monkeypatch.setattr(engine_module, "preview_latents", preview_spy)
    monkeypatch.setattr(SelfAttnProcessor, "_extended", staticmethod(extended_spy))
    res = engine.previews(_settings(lookahead__kv=True), [face_path])
    assert len(res.frames) == len(seen) == 4
    acp = engine._alphas_cumprod()
    for z_in, eps, t, x0 in seen:
        assert torch.allclose(ddpm_noise(x0, eps, acp, t), z_in, atol=1e-5), int(t)
    unet = engine.pipe.unet
    attn1 = sum(n.endswith("attn1.processor") for n in unet.attn_processors)
    assert kv_reads.count((1,)) == attn1 * 4  # the LCM preview of each step
    assert kv_reads.count((-1, -1, 1, 0)) == attn1 * 4  # the guided branches, as before


def test_previews_with_the_authors_am2_pooling_over_the_guidance_branches(engine, face_path):
    """AM2 pooled over an image's guidance branches (the authors' scope): the LCM preview's one
    sample is a group of its own."""
    from lcmla.fastface import apply_fastface_preset

    s = apply_fastface_preset(_settings(attention__am_norm_scope="image-branches"), "am2+dcg")
    res = engine.previews(s, [face_path], steps=[0, 3])
    assert [f.step for f in res.frames] == [0, 3]
    assert np.array_equal(_px(res.image), _px(engine.generate(s, [face_path]).images[0]))


def test_reference_latents_are_on_the_denoisers_scale(engine, face_path):
    """The KV encoder's reference latents decode through the engine's own decode (which divides by
    the VAE's scaling factor) to what the VAE's own encode → decode gives: the same scale as the
    latents the UNet denoises."""
    from lcmla.lookahead import reference_latents

    photo = Image.open(face_path).convert("RGB").resize((64, 64))
    latents = reference_latents(engine.pipe, [photo], engine.dtype)  # (1, 4, 8, 8)
    assert latents.shape == (1, 4, 8, 8)
    vae, processor = engine.pipe.vae, engine.pipe.image_processor
    with torch.no_grad():
        own = vae.decode(vae.encode(processor.preprocess([photo]).to(vae.dtype)).latent_dist.mean).sample
    want = np.asarray(processor.postprocess(own.float(), output_type="pil")[0]).astype(int)
    with torch.no_grad():
        got = np.asarray(engine._decode(latents)).astype(int)
    assert np.abs(got - want).max() <= 1
