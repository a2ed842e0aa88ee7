"""The images of one request share the UNet calls with their guidance branches (images × branches)."""

from __future__ import annotations

import numpy as np
import pytest
from util import make_settings, px

from lcmla.fastface import apply_fastface_preset

SMALL = dict(output__width=64, output__height=64)


@pytest.fixture(autouse=True)
def batching(engine, monkeypatch):
    """Batching is on by default on CUDA only; these tests switch it on for the CPU engine."""
    monkeypatch.setattr(engine, "batch_images", True)


def _unet_batch_sizes(engine, fn):
    sizes = []
    handle = engine.pipe.unet.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    try:
        return fn(), sizes
    finally:
        handle.remove()


CASES = {
    "plain": make_settings(**SMALL),
    "am2+dcg": apply_fastface_preset(make_settings(**SMALL), "am2+dcg"),
    "authors am2+dcg": apply_fastface_preset(make_settings(**SMALL, attention__am_norm_scope="image-branches"), "am2+dcg"),
    "kv": make_settings(**SMALL, lookahead__kv=True),
    "euler a": make_settings(**SMALL, guidance__scheduler="EulerAncestralDiscreteScheduler", guidance__guidance_scale=2.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_batched_images_equal_each_seed_alone(engine, face_path, name):
    """Three images in one sampler loop: every UNet call holds 3 × the step's branches (the KV
    encoder 3 × its rows), and image i equals seed + i generated alone (its own noise, its own
    scheduler noise, its own AM2 pooling group, its own reference K/V rows)."""
    settings = CASES[name].replace(output__num_images=3, output__seed=40)
    identity = engine.analyze_faces([face_path])
    result, sizes = _unet_batch_sizes(engine, lambda: engine.generate(settings, identity))
    assert engine.images_per_call(result.settings, _guidance(engine, result.settings)) == 3
    widths = [len(b) for b in result.branch_calls]
    if name == "kv":  # the encoder pass (2 rows) before each 4-branch denoiser call
        assert sizes == [s for w in widths for s in (3 * 2, 3 * w)]
    else:
        assert sizes == [3 * w for w in widths]
    for i in range(3):
        alone = engine.generate(settings.replace(output__num_images=1, output__seed=40 + i), identity).images[0]
        assert np.abs(px(result.images[i]) - px(alone)).max() <= 1, (name, i)
    assert result.seeds == [40, 41, 42]


def _guidance(engine, settings):
    from lcmla.guidance import guidance_for

    return guidance_for(settings, settings.guidance.steps, lcm_scheduler=engine._is_lcm(settings))


def test_images_per_call_respects_the_sample_budget_and_the_exceptions(engine, monkeypatch):
    s = apply_fastface_preset(make_settings(**SMALL, output__num_images=8), "am2+dcg")
    resolved = s.replace(preset="tiny", guidance__steps=4)
    g = _guidance(engine, resolved)
    assert engine.images_per_call(resolved, g) == engine.max_unet_batch // 3  # 3 branches at the widest step
    assert engine.images_per_call(resolved.replace(attention__capture_maps=True), g) == 1  # a map store per image
    assert engine.images_per_call(resolved.replace(output__num_images=1), g) == 1
    monkeypatch.setattr(engine, "batch_images", False)
    assert engine.images_per_call(resolved, g) == 1


def test_batching_is_on_by_default_on_cuda_only(tiny_cache):
    from lcmla import Engine

    assert Engine.load("tiny", device="cpu").batch_images is False
    assert Engine.load("tiny", device="cpu", batch_images=True).batch_images is True


def test_a_request_larger_than_one_call_is_split(engine, face_path, monkeypatch):
    """With room for two images per call, five images run as 2 + 2 + 1 and still equal their seeds."""
    monkeypatch.setattr(engine, "max_unet_batch", 2)
    settings = make_settings(**SMALL, output__num_images=5, output__seed=3)
    identity = engine.analyze_faces([face_path])
    result, sizes = _unet_batch_sizes(engine, lambda: engine.generate(settings, identity))
    steps = result.settings.guidance.steps
    assert sizes == [2] * steps + [2] * steps + [1] * steps
    alone = engine.generate(settings.replace(output__num_images=1, output__seed=7), identity).images[0]
    assert np.abs(px(result.images[4]) - px(alone)).max() <= 1
