"""Every mechanism runs on every scheduler family of the presets (DDIM, Euler, Euler ancestral, LCM)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lcmla import GenerationSettings
from lcmla.fastface import apply_fastface_preset
from lcmla.presets import PRESETS

SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LCMScheduler"]


@pytest.fixture(scope="module", params=SCHEDULERS)
def sched_engine(request, tiny_cache):
    from lcmla import Engine, FaceAnalyzer
    from lcmla.loading import load_components
    from lcmla.tiny import tiny_paths

    preset = dataclasses.replace(PRESETS["tiny"], name=f"tiny-{request.param}", scheduler=request.param)
    comps = load_components(preset, tiny_paths(), lcm_lora=True)
    assert type(comps.pipe.scheduler).__name__ == request.param
    return Engine(preset, comps, FaceAnalyzer.haar(), device="cpu", dtype=comps.pipe.unet.dtype)


@pytest.mark.parametrize("mode", ["baseline", "am2+dcg", "kv", "cfg"])
def test_mechanisms_on_scheduler(sched_engine, face_path, mode):
    s = GenerationSettings(prompt="a pencil drawing of a face", output={"seed": 4})
    if mode == "kv":
        s = s.replace(lookahead__kv=True)
    elif mode == "cfg":
        s = s.replace(guidance__guidance_scale=2.5)
    else:
        s = apply_fastface_preset(s, mode)
    a = sched_engine.generate(s, [face_path])
    b = sched_engine.generate(s, [face_path])
    px = np.asarray(a.images[0])
    assert a.images[0].size == (256, 256) and np.isfinite(px).all() and px.std() > 1
    assert np.array_equal(px, np.asarray(b.images[0]))  # deterministic, ancestral noise included
    if mode == "kv" and type(sched_engine.pipe.scheduler).__name__ == "LCMScheduler":
        assert a.branch_calls[0] == ("full",)  # with LCM only the full branch, as in the paper
