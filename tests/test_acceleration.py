"""torch.compile of the AM identity branch and of the UNet, and the channels-last format
(lcmla.acceleration): the same images as the eager engine, no recompiles when a knob changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from util import make_settings, px

from lcmla import Engine
from lcmla.acceleration import COMPILE_MODES, compile_regions, compiled_identity_attention
from lcmla.attention.processors import IdentityAttnProcessor
from lcmla.attention.transforms import (adain_blend, adain_blend_mixtures, am_transform, identity_attention, identity_probs,
                                       quantile_positions)
from lcmla.errors import LcmlaError

SMALL = dict(output__width=64, output__height=64)
AM2 = dict(mode="am2", chosen=(True, False, True, False), sharpness=3.0, quantile=0.7, am2_scale=1.5, adain=True, adain_weight=0.4,
           cap=10.0, group=3)


def _qkv(b=3, heads=4, q=64, t=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, heads, q, d, generator=g), torch.randn(b, heads, t, d, generator=g),
            torch.randn(b, heads, t, d, generator=g))


def test_identity_attention_is_the_transform_then_the_output_adain():
    """The one function the engine compiles is A → Ã (only tokens 0 and 2 here) → Ã V′, then the
    output AdaIN against A V′ per head over head_dim (SPEC §3 step 7), written out by hand."""
    q, k, v = _qkv()
    probs = (q @ k.transpose(-1, -2) / np.sqrt(8)).softmax(-1)
    new = am_transform(probs, **AM2)
    assert torch.allclose(identity_probs(q, k, 8 ** -0.5), probs, atol=1e-6)
    by_hand = adain_blend(new @ v, probs @ v, 0.4, dim=-1)  # the output AdaIN over the (B, H, Q, d) outputs
    assert torch.allclose(identity_attention(q, k, v, 8 ** -0.5, **AM2), by_hand, atol=1e-5)
    # and computed from the mixtures (one matmul): equal in float64 to rounding
    q64, k64, v64 = q.double(), k.double(), v.double()
    p64 = identity_probs(q64, k64, 8 ** -0.5)
    n64 = am_transform(p64, **AM2)
    assert torch.allclose(adain_blend_mixtures(n64, p64, v64, 0.4), adain_blend(n64 @ v64, p64 @ v64, 0.4, dim=-1),
                          rtol=1e-12, atol=1e-12)
    nan = n64.clone()
    nan[0, 0, 3] = float("nan")  # a NaN row keeps x, as adain_blend does
    got = adain_blend_mixtures(nan, p64, v64, 0.4)
    assert got[0, 0, 3].isnan().all() and not got[0, 0, 2].isnan().any()
    bad_ref = p64.clone()
    bad_ref[0, 0, 3] = float("nan")  # a NaN in the reference row: the blend is NaN there, so x is kept
    got = adain_blend_mixtures(n64, bad_ref, v64, 0.4)
    assert torch.allclose(got[0, 0, 3], n64[0, 0, 3] @ v64[0, 0], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[0, 0, 2], adain_blend_mixtures(n64, p64, v64, 0.4)[0, 0, 2])
    # token 1 and 3 are not chosen: before the AdaIN over tokens they keep A
    plain = am_transform(probs, **{**AM2, "adain": False})
    assert torch.equal(plain[..., 1], probs[..., 1]) and torch.equal(plain[..., 3], probs[..., 3])
    assert not torch.allclose(plain[..., 0], probs[..., 0])


def test_the_compiled_identity_branch_equals_the_eager_one():
    """The compiled branch, called as the processors call it (the quantile's positions resolved in
    Python), equals the eager one for AM2 and AM1, at new knob values and new shapes too — with
    quantiles that fall between two sorted values (0.5 of 64 queries: 31.5)."""
    fused = compiled_identity_attention
    cases = [({**AM2, "quantile": 0.5}, dict()), ({**AM2, "sharpness": 7.0, "am2_scale": 0.8, "adain_weight": 0.9}, dict()),
             ({**AM2, "quantile": 0.35, "group": 1}, dict(b=2, heads=2, q=16)),
             (dict(mode="am1", chosen=(True, True, False, True), am1_scale=1.3, am1_power=1.2, cap=10.0), dict(b=2))]
    for am, shape in cases:
        q, k, v = _qkv(**shape)
        if am["mode"] == "am2":
            am = {**am, "quantile_at": quantile_positions(q.shape[2], am["quantile"])}
        with torch.no_grad():  # as the engine runs it
            eager = identity_attention(q, k, v, 8 ** -0.5, **am)
            assert torch.allclose(fused(q, k, v, 8 ** -0.5, **am), eager, rtol=1e-4, atol=1e-5), am


def test_unknown_compile_mode_is_a_clear_error(tiny_cache):
    with pytest.raises(LcmlaError, match="compile mode 'fast' is not one of none, am, unet"):
        Engine.load("tiny", device="cpu", compile="fast")
    assert COMPILE_MODES == ("none", "am", "unet")


@pytest.fixture(scope="module")
def am_engine(tiny_cache):
    return Engine.load("tiny", device="cpu", compile="am")


def test_compile_am_gives_the_eager_images_and_knobs_do_not_recompile(engine, am_engine, face_path):
    """Loaded with compile="am", every targeted identity layer runs the compiled branch; the images
    equal the eager engine's (≤ 1 grey level); after the first two values of d_k and s_k (static,
    then dynamic), new values of the knobs reuse the compiled graphs."""
    import torch._dynamo.utils as dyn

    torch._dynamo.reset()  # count this engine's graphs only (other tests compiled the same functions)
    assert am_engine.compiled == ("AM identity branch",) and engine.compiled == ()
    procs = [p for p in am_engine.pipe.unet.attn_processors.values() if isinstance(p, IdentityAttnProcessor)]
    assert procs and all(p.am_attention is compiled_identity_attention for p in procs)
    assert all(p.am_attention is None for p in engine.pipe.unet.attn_processors.values()
               if isinstance(p, IdentityAttnProcessor))

    def request(sharpness, scale, adain_weight):
        return make_settings(**SMALL, attention__mode="am2", attention__targets=("down", "mid", "up"),
                             attention__am2_sharpness=sharpness, attention__am2_scale=scale,
                             attention__adain_weight=adain_weight, guidance__dcg=True)

    first = request((5.0, 4.0, 3.0, 2.0), (1.5, 1.4, 1.3, 1.2), 0.5)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):  # "no new graph" is not a fallback
        for settings in (first, request((6.0, 5.5, 3.5, 2.5), (1.7, 1.1, 1.3, 1.25), 0.3)):
            a = engine.generate(settings, face_path).images[0]
            b = am_engine.generate(settings, face_path).images[0]
            assert np.abs(px(a) - px(b)).max() <= 1
        graphs = dyn.counters["stats"]["unique_graphs"]
        third = request((9.0, 8.0, 1.0, 0.5), (2.0, 0.9, 1.05, 1.6), 0.8)
        again = am_engine.generate(third, face_path).images[0]
    assert dyn.counters["stats"]["unique_graphs"] == graphs, "a new knob value recompiled the AM branch"
    assert np.abs(px(again) - px(engine.generate(third, face_path).images[0])).max() <= 1


def test_compile_unet_gives_the_eager_images(engine, tiny_cache, face_path):
    """compile="unet": every transformer and resnet block compiled in place (state-dict keys and
    module paths unchanged, the processors eager inside them); the plain and the KV path (its
    encoder pass with the LoRAs off: another module state) give the eager engine's images with no
    block past its recompile limit (dynamo is told to fail instead of silently running it
    eagerly), and a new size and image count reuse the graphs (batch and size are symbols).

    The requests run the regions through dynamo with the ``eager`` backend: the graphs, guards and
    recompiles are the engine's; AOT autograd and inductor's C++ codegen are left out (minutes of gcc
    on two cores; AOT alone adds a third to this test). Inductor, with its AOT tracing, compiles the
    two block classes in the next test."""
    import torch._dynamo.utils as dyn
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    compiled = Engine.load("tiny", device="cpu", compile="unet", batch_images=True)  # images × branches per call
    assert compiled.compiled == ("AM identity branch", "UNet")
    assert set(compiled.pipe.unet.state_dict()) == set(engine.pipe.unet.state_dict())
    blocks = [m for m in compiled.pipe.unet.modules() if isinstance(m, (BasicTransformerBlock, ResnetBlock2D))]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert compiled.pipe.unet._compiled_call_impl is None  # the glue between the blocks stays eager
    assert compile_regions(compiled.pipe.unet, backend="eager") == len(blocks)  # the same regions
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for changes in ({}, {"lookahead__kv": True}):
            settings = make_settings(**SMALL, guidance__steps=2, **changes)
            a = engine.generate(settings, face_path).images[0]
            b = compiled.generate(settings, face_path).images[0]
            assert np.abs(px(a) - px(b)).max() <= 1, changes
        graphs = dyn.counters["stats"]["unique_graphs"]
        assert graphs > len({type(m) for m in blocks})  # the blocks did run compiled
        settings = make_settings(output__width=96, output__height=64, output__num_images=2, guidance__steps=1,
                                 lookahead__kv=True)
        a, b = (e.generate(settings, face_path).images for e in (engine, compiled))
    assert dyn.counters["stats"]["unique_graphs"] == graphs, "a new size or image count recompiled"
    assert all(np.abs(px(x) - px(y)).max() <= 1 for x, y in zip(a, b))


def test_inductor_compiles_the_unets_blocks_to_their_eager_outputs(engine):
    """compile_regions with inductor (the engine's backend) on copies of the tiny UNet's first
    resnet block and first transformer block (lcmla's processors inside, the identity tokens in
    its cross-attention): its kernels give the eager outputs, at a second batch and size too,
    which reuse the graphs."""
    import copy

    import torch._dynamo.utils as dyn
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    unet = engine.pipe.unet
    resnet = next(m for m in unet.modules() if isinstance(m, ResnetBlock2D))
    block = next(m for m in unet.modules() if isinstance(m, BasicTransformerBlock))
    eager = torch.nn.ModuleList([copy.deepcopy(resnet), copy.deepcopy(block)])
    fused = copy.deepcopy(eager)
    fused._repeated_blocks = unet._repeated_blocks  # what compile_regions reads off a UNet
    assert compile_regions(fused) == 2

    def features(layer):  # (LoRA-wrapped layers keep theirs on the base layer)
        return getattr(layer, "base_layer", layer).weight.shape[1]

    g = torch.Generator().manual_seed(0)
    width, text_dim = features(block.attn2.to_q), features(block.attn2.to_k)
    ip_dim, temb_dim = features(block.attn2.processor.to_k_ip[0]), features(resnet.time_emb_proj)

    def check(batch, h, w):  # compiled vs eager outputs on fresh inputs of this batch and size
        x = torch.randn(batch, resnet.in_channels, h, w, generator=g)
        temb = torch.randn(batch, temb_dim, generator=g)
        tokens = torch.randn(batch, h * w, width, generator=g)
        text = (torch.randn(batch, 7, text_dim, generator=g), [torch.randn(batch, 1, 4, ip_dim, generator=g)])
        assert torch.allclose(fused[0](x, temb), eager[0](x, temb), rtol=1e-4, atol=1e-4)
        assert torch.allclose(fused[1](tokens, encoder_hidden_states=text), eager[1](tokens, encoder_hidden_states=text),
                              rtol=1e-4, atol=1e-4)

    torch._dynamo.reset()
    with torch.no_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        check(2, 8, 12)
        graphs = dyn.counters["stats"]["unique_graphs"]
        assert graphs >= 2
        check(3, 6, 10)
    assert dyn.counters["stats"]["unique_graphs"] == graphs, "a new batch or size recompiled"


def test_channels_last_gives_the_same_pixels(engine, tiny_cache, face_path):
    nhwc = Engine.load("tiny", device="cpu", channels_last=True)
    assert nhwc.channels_last and not engine.channels_last
    conv = nhwc.pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    settings = make_settings(**SMALL)
    a = engine.generate(settings, face_path).images[0]
    b = nhwc.generate(settings, face_path).images[0]
    assert np.abs(px(a) - px(b)).max() <= 1


def test_the_cli_and_the_app_take_the_compile_flag(monkeypatch):
    from lcmla.cli import build_parser

    assert build_parser().parse_args(["generate", "--face", "a.png", "--prompt", "x", "--compile", "am"]).compile == "am"
    pytest.importorskip("gradio")
    from lcmla.ui.cli import parse_args
    from lcmla.ui.common import _memory_text

    assert parse_args([]).compile == "none"
    monkeypatch.setenv("LCMLA_COMPILE", "unet")
    assert parse_args([]).compile == "unet"

    class Fake:
        device, memory_mode, compiled = "cuda", "full", ("AM identity branch", "UNet")

    assert "torch.compile (AM identity branch, UNet" in _memory_text(Fake())
