"""One-step previews of the clean image from a noisy latent (LCM-Lookahead §3, SPEC §4).

Pure functions of (z_t, ε, ᾱ, t), shapes (B, C, H, W); and the result types of
``Engine.previews``, which decodes both previews with TAESD at chosen steps of a generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def _alpha(alphas_cumprod: torch.Tensor, t: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.to(like.device)[torch.as_tensor(t, device=like.device).long()]
    return a.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))  # (B or 1, 1, 1, 1)


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

    Equals the ``denoised`` of diffusers' ``LCMScheduler.step`` for the same inputs.
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
