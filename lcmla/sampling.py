"""The sampler loop, free of guidance modes (k-diffusion's shape: a loop over a model function).

    latents = sample(denoise, scheduler, latents, generator=g, callback=on_step)

``denoise(z_in, t, step) -> ε`` is any model function: the engine passes a
:class:`~lcmla.denoiser.GuidedDenoiser`, which batches the guidance branches of a step into one UNet
call and combines them. The loop only scales the input, steps the diffusers scheduler and reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["StepInfo", "sample"]


@dataclass(frozen=True)
class StepInfo:
    """What the step callback receives after each denoising step."""

    image_index: int  # which image of the request (0-based)
    step: int  # 0-based step index
    num_steps: int
    timestep: int
    latents: torch.Tensor  # (1, 4, h, w) after the step
    x0: torch.Tensor  # (1, 4, h, w) the scheduler's prediction of the clean latent


Denoise = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def sample(
    denoise: Denoise,
    scheduler,
    latents: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run ``scheduler`` (timesteps already set) from ``latents`` (B, C, h, w) with ``denoise``.

    ``callback(step, t, latents, x0)`` follows every step, with the scheduler's clean-latent
    prediction (``pred_original_sample``, or the LCM scheduler's ``denoised``).
    """
    for k, t in enumerate(scheduler.timesteps):
        z_in = scheduler.scale_model_input(latents, t)
        eps = denoise(z_in, t, k)
        out = scheduler.step(eps, t, latents, generator=generator, return_dict=True)
        latents = out.prev_sample
        if callback is not None:
            x0 = getattr(out, "pred_original_sample", None)
            if x0 is None:
                x0 = getattr(out, "denoised", latents)
            callback(k, t, latents, x0)
    return latents
