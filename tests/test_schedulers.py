"""Every mechanism runs on every scheduler family of the presets (DDIM, Euler, Euler ancestral, LCM)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

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
    steps = []
    a = sched_engine.generate(s, [face_path], callback=steps.append)
    b = sched_engine.generate(s, [face_path])
    px = np.asarray(a.images[0]).astype(np.int16)
    assert all(torch.isfinite(info.latents).all() and torch.isfinite(info.x0).all() for info in steps)
    assert a.images[0].size == (256, 256) and px.std() > 1 and len(steps) == 4
    assert np.array_equal(px, np.asarray(b.images[0]))  # deterministic, ancestral noise included
    if mode == "kv" and type(sched_engine.pipe.scheduler).__name__ == "LCMScheduler":
        assert a.branch_calls[0] == ("full",)  # with LCM only the full branch, as in the paper


def test_plain_generation_equals_stock_diffusers_on_scheduler(sched_engine, face_path):
    """No identity (λ = 0) and no guidance: the engine's loop (input scaling, the initial noise's
    σ, the scheduler's own step and its noise) gives stock diffusers' image on every family, from
    the same seed (diffusers draws the initial noise, then the step noise, from one generator)."""
    from util import stock_pipeline

    s = GenerationSettings(prompt="a pencil drawing of a face", output={"seed": 5}, identity={"ip_adapter_scale": 0.0},
                           guidance={"guidance_scale": 1.0})
    ours = sched_engine.generate(s, [face_path]).images[0]
    pipe = stock_pipeline(sched_engine, ip_adapter=False, lora=True)
    assert type(pipe.scheduler) is type(sched_engine.pipe.scheduler)
    ref = pipe(prompt="a pencil drawing of a face", num_inference_steps=4, guidance_scale=1.0, width=256, height=256,
               generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.abs(np.asarray(ours, dtype=int) - np.asarray(ref, dtype=int)).max() <= 1


@pytest.mark.parametrize("kv", [False, True])
def test_previews_on_scheduler(sched_engine, face_path, kv):
    """x̂0 and LCM previews on every scheduler family, the KV path included: finite, one frame per
    step, the generation unchanged by previewing."""
    s = GenerationSettings(prompt="a pencil drawing of a face", output={"seed": 4}, lookahead={"kv": kv})
    res = sched_engine.previews(s, [face_path])
    assert [f.step for f in res.frames] == [0, 1, 2, 3]
    assert all(np.asarray(f.lcm).std() > 0 for f in res.frames)
    plain = sched_engine.generate(s, [face_path])
    assert np.array_equal(np.asarray(res.image), np.asarray(plain.images[0]))
    assert res.timings["previews"] > 0


def test_fractional_euler_timesteps_use_interpolated_alphas():
    """Euler's "linspace" spacing gives fractional timesteps; x̂0 must use ᾱ(t) of the scheduler's
    interpolated σ(t), not ᾱ at the truncated integer t."""
    from diffusers import EulerDiscreteScheduler

    from lcmla.preview import alpha_at, ddpm_noise, ddpm_x0

    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="linspace")
    sched.set_timesteps(5)  # 999, 749.25, 499.5, …
    t = sched.timesteps[1]
    assert float(t) != int(t)
    sigma = float(sched.sigmas[1])
    assert float(alpha_at(sched.alphas_cumprod, t)) == pytest.approx(1 / (1 + sigma**2), rel=1e-6)
    torch.manual_seed(0)
    z0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    zt = ddpm_noise(z0, eps, sched.alphas_cumprod, t)
    assert torch.allclose(ddpm_x0(zt, eps, sched.alphas_cumprod, t), z0, atol=1e-5)
    truncated = float(sched.alphas_cumprod[int(t)])
    assert abs(truncated - float(alpha_at(sched.alphas_cumprod, t))) > 1e-5


@pytest.mark.parametrize("family", ["EulerDiscreteScheduler", "LCMScheduler"])
def test_the_loop_scales_the_input_and_reports_the_schedulers_clean_prediction(family):
    """``sampling.sample`` hands the model the scheduler's scaled input (Euler: z / √(σ² + 1)) and
    reports the scheduler's own clean-latent prediction (Euler: z − σ·ε; LCM: its ``denoised``,
    ẑ0 of LCM-Lookahead Eq. 3), not the next latents."""
    import diffusers

    from lcmla.preview import lcm_x0
    from lcmla.sampling import sample

    sched = getattr(diffusers, family)(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(4)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.full_like(z, 0.1)
    inputs, reports = [], []

    def denoise(z_in, t, step):
        inputs.append(z_in.clone())
        return eps

    out = sample(denoise, sched, z.clone(), generator=torch.Generator().manual_seed(1),
                 callback=lambda k, t, latents, x0: reports.append((t, latents.clone(), x0.clone())))
    assert len(inputs) == len(reports) == 4 and torch.equal(reports[-1][1], out)
    t0, after, x0 = reports[0]
    if family == "EulerDiscreteScheduler":
        sigma = float(sched.sigmas[0])
        assert sigma > 5 and torch.allclose(inputs[0], z / (sigma**2 + 1) ** 0.5, atol=1e-5)
        assert torch.allclose(x0, z - sigma * eps, atol=1e-4)
    else:
        assert torch.equal(inputs[0], z)
        want = lcm_x0(z, eps, sched.alphas_cumprod, t0, sched.config.timestep_scaling)
        assert torch.allclose(x0, want, atol=1e-5)
        assert not torch.allclose(x0, after, atol=1e-3)  # the next latents carry fresh noise
