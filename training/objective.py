"""The training objective of one batch (SPEC §4): L = L_diffusion + λ·α·L_LH.

L_diffusion: ε-MSE of the denoiser at t ~ p(t) ∝ 1 − 0.5·cos(πt/T); the reference latent noised to
the same t with the same noise feeds the KV-encoder pass (its own LoRA, no FaceID LoRA, no FreeU)
under the prompt that made the reference, compressed to "a face" (LCM-Lookahead §4.5; the
denoiser reads the target's), one encoder row per sample (sample i attends to reference i), 5 % of
the reference tokens dropped per layer; the text and the identity condition are each dropped in
10 % of the samples, the text in the denoiser and the encoder together (the null text is SDXL's
zero embedding, the null identity the zero ID embedding with CLIP of an all-zero input, as at
inference, where ε_kv reads the null-text encoder row).

L_LH: at t ~ p(t) ∝ 1 − 0.2·cos(πt/M), t < M = ``lookahead_max_t`` (≤ T), the same UNet with the
LCM-LoRA at scale α (α = 1 with probability 0.5, else U(0.1, 1)) and the KV path predicts ε; the
one-step preview ẑ0 (``lcmla.preview.lcm_x0``, LCM-Lookahead Eq. 3) is decoded by TAESD WITH
gradient, and the identity loss compares it with the reference (``training.identity_loss``).
The lookahead term is weighted by λ (1e-3) and by α, as in the authors' code.

Every random draw comes from the generator passed in; every module state is set per pass through
the :class:`~training.passes.PassSwitcher`, so gradient checkpointing recomputes correctly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from lcmla.attention.context import AMPlan, AttentionContext, KVCache
from lcmla.denoiser import UNetBatch, unet_forward
from lcmla.lookahead import record_reference_kv
from lcmla.preview import ddpm_noise, lcm_x0
from lcmla.settings import AttentionSettings

from .passes import PassState, PassSwitcher
from .sampling import drop_mask, sample_lora_scale, sample_timesteps, timestep_probabilities

_NO_AM = AMPlan.from_settings(AttentionSettings(), 1)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The knobs of the objective (defaults: SPEC §4 and the authors' command)."""

    lambda_lookahead: float = 1e-3  # λ; 0 = diffusion loss only
    diffusion_weight: float = 1.0  # 0 = the lookahead term alone (diagnostics and tests)
    kv: bool = True  # the KV path (extended self-attention) in the denoiser
    text_drop: float = 0.1
    identity_drop: float = 0.1
    kv_drop: float = 0.05
    t_alpha: float = 0.5  # timestep annealing of the diffusion loss
    t_alpha_lookahead: float = 0.2
    lookahead_max_t: int = 1000
    lookahead_batch: int | None = None  # samples of the batch that also get the lookahead loss (None: all, as the authors' command)
    lcm_full_prob: float = 0.5
    lcm_min_scale: float = 0.1
    ip_scale: float = 1.0  # λ of the decoupled cross-attention while training
    faceid_lora_scale: float = 1.0
    kv_prompt: str | None = None  # the KV encoder's prompt; None: each reference's own (LCM-Lookahead §4.5)


@dataclass
class TrainBatch:
    """One batch of (reference, target) pairs, on the device."""

    target: torch.Tensor  # (B, 3, R, R) in [-1, 1]: the image to denoise
    reference: torch.Tensor  # (B, 3, R, R) in [-1, 1]: the reference photo, framed for the KV encoder
    clip_pixels: torch.Tensor  # (B, 3, 224, 224): the reference's aligned face crop, CLIP-normalised
    id_embeds: torch.Tensor  # (B, 512): the reference's identity embedding
    prompts: list[str]  # the targets' prompts with the subject compressed to "a face"
    reference_prompts: list[str] | None = None  # the references' (None: ObjectiveConfig.kv_prompt for all)
    reference_id: torch.Tensor | None = None  # (B, D) recognizer embedding of the reference (no grad)
    reference_found: torch.Tensor | None = None  # (B,) bool

    def to(self, device, non_blocking: bool = False) -> "TrainBatch":
        """The same batch with its tensors on ``device`` (one read by a DataLoader worker on CPU)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return TrainBatch(move(self.target), move(self.reference), move(self.clip_pixels), move(self.id_embeds),
                          list(self.prompts), self.reference_prompts, move(self.reference_id),
                          move(self.reference_found))


@dataclass
class Objective:
    """The loss of a batch (see the module docstring). ``parts`` decides which passes run."""

    pipe: Any
    image_encoder: Any
    taesd: Any
    switcher: PassSwitcher
    config: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    identity_loss: Any = None  # training.identity_loss.IdentityLoss; None: no lookahead term
    lcm_boundary: tuple[float, float] = (10.0, 0.5)

    def __post_init__(self) -> None:
        sched = self.pipe.scheduler.config
        self.num_timesteps = int(sched.num_train_timesteps)
        self.acp = self.pipe.scheduler.alphas_cumprod
        self.p_t = timestep_probabilities(self.num_timesteps, self.config.t_alpha)
        self.p_t_lookahead = timestep_probabilities(min(self.config.lookahead_max_t, self.num_timesteps),
                                                    self.config.t_alpha_lookahead)

    # ---- pass states ---------------------------------------------------------------------------

    def _adapters(self) -> tuple[str, ...]:
        return tuple(getattr(self.pipe.unet, "peft_config", {}).keys())

    def encoder_state(self) -> PassState:
        """The KV-encoder pass: its LoRA alone, no FreeU (SPEC §4)."""
        return PassState.of({"kv_encoder": 1.0} if "kv_encoder" in self._adapters() else {})

    def denoiser_state(self, lcm_scale: float = 0.0) -> PassState:
        scales = {"faceid": self.config.faceid_lora_scale}
        if lcm_scale:
            scales["lcm"] = lcm_scale
        return PassState.of(scales)

    # ---- conditions ----------------------------------------------------------------------------

    @torch.no_grad()
    def _text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        return embeds, pooled

    @torch.no_grad()
    def _clip(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(pixels.to(self.device, self.image_encoder.dtype),
                                  output_hidden_states=True).hidden_states[-2]

    @property
    def device(self) -> torch.device:
        # the first parameter's device: diffusers' ``unet.device`` walks every module (with peft
        # wrappers, 25 ms a call on the tiny UNet, over half of a tiny training step)
        return self.pipe.unet.conv_in.weight.device

    @torch.no_grad()
    def _latents(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=generator).to(self.device, dist.mean.dtype)
        return (dist.mean + dist.std * eps) * vae.config.scaling_factor  # a posterior sample

    def conditions(self, batch: TrainBatch, generator: torch.Generator, dropout: bool = True) -> tuple[UNetBatch, UNetBatch]:
        """(denoiser conditions with dropout, encoder rows): one row per sample each."""
        b, r = batch.target.shape[0], batch.target.shape[-1]
        dtype = self.pipe.unet.dtype
        embeds, pooled = self._text(list(batch.prompts))
        clip = self._clip(batch.clip_pixels)[:, None]  # (B, 1, T, H)
        null_clip = self._clip(torch.zeros_like(batch.clip_pixels[:1]))[:, None].expand_as(clip)
        ids = batch.id_embeds.to(self.device, dtype).reshape(b, 1, -1)
        text_off = drop_mask(b, self.config.text_drop if dropout else 0.0, generator).to(self.device)
        id_off = drop_mask(b, self.config.identity_drop if dropout else 0.0, generator).to(self.device)
        keep_t = (~text_off).to(dtype)
        keep_i = (~id_off).to(dtype)
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=dtype, device=self.device).repeat(b, 1)
        denoiser = UNetBatch(
            prompt_embeds=embeds.to(dtype) * keep_t[:, None, None],  # null text: SDXL's zero embedding
            text_embeds=pooled.to(dtype) * keep_t[:, None],
            time_ids=time_ids,
            image_embeds=ids * keep_i[:, None, None],
            clip_embeds=torch.where(id_off[:, None, None, None], null_clip, clip).to(dtype),
        )
        # the encoder reads the prompt that made its reference (the paper's §4.5; the authors' code),
        # its text dropped with the denoiser's: ε_kv at inference reads the null-text encoder row
        kv_embeds, kv_pooled = self._text(reference_prompts(batch, self.config.kv_prompt))
        encoder = UNetBatch(kv_embeds.to(dtype) * keep_t[:, None, None], kv_pooled.to(dtype) * keep_t[:, None],
                            time_ids, torch.zeros_like(ids), null_clip.to(dtype))
        return denoiser, encoder

    # ---- passes --------------------------------------------------------------------------------

    def _kv(self, z_ref_t: torch.Tensor, rows: UNetBatch, t: torch.Tensor, generator: torch.Generator) -> KVCache:
        cache = KVCache(rows=z_ref_t.shape[0], drop_rate=self.config.kv_drop, generator=generator)
        self.switcher.set(self.encoder_state())
        return record_reference_kv(self.pipe.unet, z_ref_t, rows, t, cache)

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: UNetBatch, cache: KVCache | None, state: PassState) -> torch.Tensor:
        """ε of the denoiser (sample i reads reference row i when ``cache`` is given)."""
        b = z_t.shape[0]
        ctx = AttentionContext(ip_scale=self.config.ip_scale, am=_NO_AM, kv=cache,
                               kv_index=tuple(range(b)) if cache is not None else None)
        self.switcher.set(state)
        return unet_forward(self.pipe.unet, z_t, t, cond, ctx)

    def __call__(self, batch: TrainBatch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        b = batch.target.shape[0]
        z0 = self._latents(batch.target, generator)
        z_ref = self._latents(batch.reference, generator) if cfg.kv else None
        cond, rows = self.conditions(batch, generator)
        # -- diffusion loss
        t = sample_timesteps(self.p_t, b, generator).to(self.device)
        noise = torch.randn(z0.shape, generator=generator).to(self.device, z0.dtype)
        loss = torch.zeros((), device=self.device)
        logs: dict[str, float] = {}
        if cfg.diffusion_weight > 0:
            z_t = ddpm_noise(z0, noise, self.acp, t)
            cache = self._kv(ddpm_noise(z_ref, noise, self.acp, t), rows, t, generator) if cfg.kv else None
            eps = self.predict(z_t, t, cond, cache, self.denoiser_state())
            loss_diff = F.mse_loss(eps.float(), noise.float())
            logs["diffusion"] = loss_diff.item()
            loss = cfg.diffusion_weight * loss_diff
        # -- lookahead loss
        if cfg.lambda_lookahead > 0 and self.identity_loss is not None:
            n = b if cfg.lookahead_batch is None else min(cfg.lookahead_batch, b)
            alpha = sample_lora_scale(generator, cfg.lcm_full_prob, cfg.lcm_min_scale)
            t2 = sample_timesteps(self.p_t_lookahead, n, generator).to(self.device)
            noise2 = torch.randn(z0[:n].shape, generator=generator).to(self.device, z0.dtype)
            z_t2 = ddpm_noise(z0[:n], noise2, self.acp, t2)
            clean, clean_rows = self.conditions(_head(batch, n), generator, dropout=False)
            cache2 = self._kv(ddpm_noise(z_ref[:n], noise2, self.acp, t2), clean_rows, t2, generator) if cfg.kv else None
            eps2 = self.predict(z_t2, t2, clean, cache2, self.denoiser_state(lcm_scale=alpha))
            z_hat = lcm_x0(z_t2, eps2, self.acp, t2, *self.lcm_boundary)
            preview = self.taesd.decode(z_hat.to(self.taesd.dtype), return_dict=False)[0].clamp(-1, 1)
            ref_id, ref_found = batch.reference_id, batch.reference_found
            loss_lh, found = self.identity_loss(preview, ref_id[:n], None if ref_found is None else ref_found[:n])
            loss = loss + cfg.lambda_lookahead * alpha * loss_lh
            logs.update(lookahead=loss_lh.item(), alpha=alpha, faces=float(found.float().mean()))
        logs["loss"] = loss.item()
        return loss, logs


def reference_prompts(batch: TrainBatch, fixed: str | None) -> list[str]:
    """The KV encoder's prompt per sample: ``fixed`` for all when given, else each reference's own
    (a batch without them: "a photo of a face", the inference prompt)."""
    if fixed is not None:
        return [fixed] * len(batch.prompts)
    return list(batch.reference_prompts or ["a photo of a face"] * len(batch.prompts))


def _head(batch: TrainBatch, n: int) -> TrainBatch:
    refs = None if batch.reference_prompts is None else list(batch.reference_prompts[:n])
    return TrainBatch(batch.target[:n], batch.reference[:n], batch.clip_pixels[:n], batch.id_embeds[:n],
                      list(batch.prompts[:n]), reference_prompts=refs)
