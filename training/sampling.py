"""The trainer's random draws as small pure functions of an explicit ``torch.Generator`` (SPEC §4).

Every draw of a training run comes from one generator per process, saved in each checkpoint, so a
resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import math

import torch


def timestep_probabilities(t_max: int, alpha: float) -> torch.Tensor:
    """Timestep annealing / importance sampling (Huang et al., ReVersion; LCM-Lookahead §3.3):
    p(t) ∝ 1 − α·cos(π t / t_max) for t ∈ [0, t_max), favouring noisy steps. α = 0.5 for the
    diffusion loss over the scheduler's T timesteps, 0.2 for the lookahead path over its own range
    (SPEC §4; the authors' importance_sampling_fn(t, lcm_max_timestep, 0.2): a lookahead range
    below T keeps the whole cosine, not its first part). → (t_max,) float64, sums to 1."""
    t = torch.arange(t_max, dtype=torch.float64)
    w = 1.0 - alpha * torch.cos(math.pi * t / t_max)
    return w / w.sum()


def sample_timesteps(probs: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps drawn from ``probs`` (with replacement) → (n,) int64."""
    return torch.multinomial(probs, n, replacement=True, generator=generator)


def sample_lora_scale(generator: torch.Generator, p_full: float = 0.5, low: float = 0.1) -> float:
    """The LCM-LoRA scale α of a lookahead iteration (alignment preservation, SPEC §4): 1 with
    probability ``p_full``, else U(low, 1)."""
    u = torch.rand(2, generator=generator, dtype=torch.float64)
    return 1.0 if u[0].item() < p_full else low + (1.0 - low) * u[1].item()


def drop_mask(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Which of n samples drop a condition (classifier-free-guidance dropout): (n,) bool, each True
    with probability p."""
    return torch.rand(n, generator=generator) < p
