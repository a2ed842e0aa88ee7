"""One-step previews of the clean image from a noisy latent (LCM-Lookahead §3, SPEC §4).

Pure functions of (z_t, ε, ᾱ, t), shapes (B, C, H, W); and the result types of
``Engine.previews``, which decodes both previews with TAESD at chosen steps of a generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def alpha_at(alphas_cumprod: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """ᾱ at timestep t, () or (B,) float64. Integer t index ``alphas_cumprod``; a fractional t (the
    interpolated timesteps of Euler-type schedulers) interpolates σ = √((1 − ᾱ)/ᾱ) linearly between
    its neighbouring integer timesteps, as ``EulerDiscreteScheduler`` does, and returns 1/(1 + σ²)."""
    acp = alphas_cumprod.detach().to("cpu", torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64).cpu()
    if torch.equal(t, t.floor()):
        return acp[t.long()]
    lo = t.floor().clamp(0, acp.numel() - 1)
    hi = (lo + 1).clamp(max=acp.numel() - 1)
    w = t - lo
    sigma = ((1 - acp) / acp).sqrt()
    s = (1 - w) * sigma[lo.long()] + w * sigma[hi.long()]
    return 1.0 / (1.0 + s * s)


def _alpha(alphas_cumprod: torch.Tensor, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = alpha_at(alphas_cumprod, t).to(like.device, like.dtype)
    return a.reshape(-1, *([1] * (like.ndim - 1)))  # (B or 1, 1, 1, 1)


def ddpm_x0(latents: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """DDPM/DDIM clean-latent estimate (Ho et al. 2020, Eq. 15): x̂0 = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t."""
    a = _alpha(alphas_cumprod, t, latents)
    return (latents - (1 - a).sqrt() * eps) / a.sqrt()


def ddpm_noise(latents: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: int | torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(z_t | z_0) (Ho et al. 2020, Eq. 4): z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε.
    The result is what the UNet takes as input at t, whatever the sampler's own parametrisation."""
    a = _alpha(alphas_cumprod, t, latents)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def lcm_boundary_scalings(t: int | torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """Consistency-model boundary conditions (LCM, Luo et al. 2023; LCM-Lookahead Eq. 3):
    c_skip = σ_d² / ((s·t)² + σ_d²),  c_out = s·t / √((s·t)² + σ_d²), s = timestep_scaling."""
    st = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / (st**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def lcm_x0(
    latents: torch.Tensor,
    eps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    t: int | torch.Tensor,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> torch.Tensor:
    """LCM one-step preview (LCM-Lookahead Eq. 3): ẑ0 = c_skip·z_t + c_out·x̂0(ε).

    Equals the ``denoised`` of diffusers' ``LCMScheduler.step`` for the same inputs when
    ``timestep_scaling`` and ``sigma_data`` are that scheduler's (its ``config.timestep_scaling``,
    default 10, and ``sigma_data`` 0.5; the engine reads them from the scheduler).
    """
    c_skip, c_out = lcm_boundary_scalings(t, timestep_scaling, sigma_data)
    shape = (-1, *([1] * (latents.ndim - 1)))
    c_skip = c_skip.to(latents.dtype).to(latents.device).reshape(shape)
    c_out = c_out.to(latents.dtype).to(latents.device).reshape(shape)
    return c_skip * latents + c_out * ddpm_x0(latents, eps, alphas_cumprod, t)


@dataclass
class PreviewFrame:
    """The two previews at one step of a generation."""

    step: int
    timestep: int
    x0: Any  # PIL image: DDPM x̂0 from the generation's own (guided) prediction, TAESD-decoded
    lcm: Any  # PIL image: LCM one-step preview (LCM-LoRA at the chosen scale), TAESD-decoded


@dataclass
class PreviewResult:
    """``Engine.previews``: frames at the chosen steps and the final image."""

    frames: list[PreviewFrame]
    image: Any  # PIL: the final image (full VAE)
    settings: Any  # GenerationSettings, resolved
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # the request's notes (``Result.notes``)
