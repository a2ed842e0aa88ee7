"""LCM-Lookahead on the denoiser's own UNet: the KV-encoder pass and the one-step previews.

Used by inference (:class:`~lcmla.engine.Engine`) and by training (``training/``):

- :func:`frame_reference` — the reference photo at the output size (the whole photo, or a crop
  around the face), keeping the aspect ratio and padding with the photo's own border;
- :func:`encode_reference` — the KV-encoder pass (SPEC §4): the reference latents noised to the
  current t with the generation's own noise, run through the UNet under the encoder rows'
  conditions with the null identity, every self-attention layer recording its K and V into a
  :class:`~lcmla.attention.context.KVCache`;
- :func:`lcm_preview_eps` and :func:`decode_tiny` — the LCM one-step preview's prediction and its
  TAESD decode.

Which adapters, LoRAs and FreeU are active during a pass is module state that the caller sets
(the engine under its lock, the trainer per pass); these functions only run the passes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from PIL import Image

from .attention.context import AMPlan, AttentionContext, KVCache
from .denoiser import UNetBatch, unet_forward
from .preview import ddpm_noise
from .settings import AttentionSettings

__all__ = ["decode_tiny", "encode_reference", "encoder_rows", "frame_reference", "framing_used", "kv_reference_images",
           "lcm_preview_eps", "preview_latents", "record_reference_kv", "reference_latents"]

FRAMINGS = ("photo", "face")


def _fit_box(cx: float, cy: float, half_w: float, half_h: float) -> tuple[int, int, int, int]:
    return (round(cx - half_w), round(cy - half_h), round(cx + half_w), round(cy + half_h))


def frame_reference(image: Image.Image, box: tuple[float, float, float, float] | None, size: tuple[int, int],
                    framing: str = "photo") -> Image.Image:
    """The KV encoder's reference image at the output ``size`` = (width, height).

    "photo": the whole photo (the authors' released inference), scaled to fit and centred;
    "face": a crop centred on the face ``box`` spanning twice its larger side, in the output's
    aspect ratio. Either way the aspect ratio is kept and any area outside the photo is filled by
    repeating the photo's own border pixels (edge padding), not black.
    """
    import numpy as np

    if framing not in FRAMINGS:
        raise ValueError(f"reference framing must be one of {', '.join(FRAMINGS)} (got {framing!r})")
    out_w, out_h = size
    aspect = out_w / out_h
    w, h = image.size
    if framing == "face" and box is not None:
        x1, y1, x2, y2 = box
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        side = 2 * max(x2 - x1, y2 - y1)  # the crop's smaller side spans twice the face
        half_w, half_h = (side * aspect / 2, side / 2) if aspect >= 1 else (side / 2, side / aspect / 2)
    else:  # the whole photo, letter-boxed to the output aspect
        cx, cy = w / 2, h / 2
        half_w, half_h = (max(w, h * aspect) / 2, max(h, w / aspect) / 2)
    left, top, right, bottom = _fit_box(cx, cy, half_w, half_h)
    pad = (max(0, -top), max(0, bottom - h)), (max(0, -left), max(0, right - w)), (0, 0)
    arr = np.asarray(image.convert("RGB"))
    if any(p for pair in pad for p in pair):
        arr = np.pad(arr, pad, mode="edge")
        left, top, right, bottom = left + pad[1][0], top + pad[0][0], right + pad[1][0], bottom + pad[0][0]
    crop = Image.fromarray(arr[top:bottom, left:right])
    return crop.resize((out_w, out_h), Image.BICUBIC)


def kv_reference_images(identity: Any, size: tuple[int, int], framing: str) -> list[Image.Image]:
    """The KV encoder's reference images at the output ``size`` = (width, height), one per
    reference photo of ``identity`` (a ``FaceIdentity``), framed as :func:`framing_used` says (all
    photos alike: "face" only when every photo has its face box); an identity without photos falls
    back to its aligned crops, fitted whole."""
    if identity.images:
        used = framing_used(identity, framing)
        return [frame_reference(img, box, size, used) for img, box in zip(identity.images, identity.boxes)]
    return [frame_reference(crop, None, size, "photo") for crop in identity.crops]


def framing_used(identity: Any, framing: str) -> str:
    """The framing :func:`kv_reference_images` applies: "face" needs the photos and their face
    boxes; an identity of aligned crops only is framed whole ("photo")."""
    if framing == "face" and not (identity.images and all(box is not None for box in identity.boxes)):
        return "photo"
    return framing


def encoder_rows(text: dict[str, tuple[torch.Tensor, torch.Tensor]], null_identity: tuple, time_ids: torch.Tensor
                 ) -> dict[str, UNetBatch]:
    """The KV encoder's two rows (SPEC §4, as the authors released it): "null" (the null text) and
    "text" (the encoder prompt, ``text["text"]``), both with the null identity (the encoder's cross
    attention sees text only; the identity rows are unused at λ = 0 but the UNet needs them)."""
    return {name: UNetBatch(text[key][0], text[key][1], time_ids, *null_identity)
            for name, key in (("null", "null"), ("text", "text"))}


@torch.no_grad()
def reference_latents(pipe, images: list[Image.Image], dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """VAE latents of the reference images, (n, 4, h, w), scaled like the UNet's input, on
    ``device`` (default: the VAE's; the low-VRAM mode passes the execution device, the VAE then
    sitting in CPU memory until it runs).

    The posterior mean, once (the authors draw a fresh posterior sample every step; the mean is the
    deterministic choice SPEC §4 allows, and the VAE's posterior is narrow).
    """
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(images).to(device or vae.device, vae.dtype)  # (n, 3, H, W)
    latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    return latents.to(dtype)


def record_reference_kv(unet, z_t: torch.Tensor, batch: UNetBatch, t: torch.Tensor, cache: KVCache,
                        kv_copy_scale: float = 1.0) -> KVCache:
    """One KV-encoder pass (SPEC §4): the noised reference latents ``z_t`` (n, 4, h, w) under
    ``batch``'s conditions (row for row) at timestep ``t`` (scalar or (n,)), identity attention off
    (λ = 0: the encoder's cross attention sees text only); every self-attention layer records its
    K/V (or, with a KV copy, the copy's projection at ``kv_copy_scale``) into ``cache``, whose
    ``rows`` groups the n samples (n = rows × photos). Differentiable: training calls it with
    gradients on, inference under no_grad."""
    ctx = AttentionContext(ip_scale=0.0, am=_NO_AM, kv=cache, kv_record=True, kv_copy_scale=kv_copy_scale)
    cache.store.clear()
    unet_forward(unet, z_t, t, batch, ctx)
    return cache


def encode_reference(unet, latents: torch.Tensor, rows: UNetBatch, t: torch.Tensor, noise: torch.Tensor,
                     alphas_cumprod: torch.Tensor, cache: KVCache, kv_copy_scale: float = 1.0) -> KVCache:
    """The inference KV-encoder pass at timestep t: P reference photos ``latents`` (P, 4, h, w), each
    noised to t with an image's own initial noise (``noise``: (N, 4, h, w), one per image of the
    request), under R encoder rows ``rows``; the encoder batch is N × R × P (image, then row, then
    photo). Returns ``cache`` holding (N·R, P·N_tok, C) per layer: image j's row r is cache row
    j·R + r, the photos' tokens side by side in each row."""
    r, p, images = len(rows), latents.shape[0], noise.shape[0]
    batch = rows.repeat(p) if p > 1 else rows
    z_ref = torch.cat([ddpm_noise(latents, noise[j:j + 1].expand_as(latents), alphas_cumprod, t).repeat(r, 1, 1, 1)
                       for j in range(images)])  # (N·R·P, 4, h, w)
    cache.rows = r * images
    return record_reference_kv(unet, z_ref, batch.tile(images) if images > 1 else batch, t, cache, kv_copy_scale)


_NO_AM = AMPlan.from_settings(AttentionSettings(), 1)


def lcm_preview_eps(unet, z_in: torch.Tensor, t: torch.Tensor, row: UNetBatch, ctx: AttentionContext,
                    kv_row: int | None = None) -> torch.Tensor:
    """ε for the LCM one-step preview: one full-condition row, no guidance, nothing captured; on
    the KV path it reads the step's reference K/V (``ctx.kv``) of encoder row ``kv_row``. The
    caller activates the LCM-LoRA."""
    kv_index = (kv_row,) if kv_row is not None and ctx.kv is not None else None
    lcm_ctx = dataclasses.replace(ctx, capture=None, capture_index=0, kv_index=kv_index, am_group=1)
    return unet_forward(unet, z_in, t, row, lcm_ctx)


def preview_latents(unet, step: Any, row: UNetBatch, kv_row: int | None, alphas_cumprod: torch.Tensor,
                    lcm_scaling: tuple[float, float], lcm_active: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The two previews of a denoising ``step`` (a ``GuidedStep``), as latents (SPEC §4):
    x̂0 from the step's guided prediction, and the LCM one-step preview ẑ0 from one more UNet call
    under ``row`` (the full condition; on the KV path reading encoder row ``kv_row``) with the
    LCM-LoRA active (``lcm_active()``: a context manager the caller provides, which sets and
    restores module state) and the boundary scalings ``lcm_scaling`` = (timestep_scaling, σ_data)."""
    from .preview import ddpm_x0, lcm_x0

    x0 = ddpm_x0(step.z_in, step.eps, alphas_cumprod, step.timestep)
    with lcm_active():
        eps_lcm = lcm_preview_eps(unet, step.z_in, step.timestep, row, step.ctx, kv_row)
    return x0, lcm_x0(step.z_in, eps_lcm, alphas_cumprod, step.timestep, *lcm_scaling)


@torch.no_grad()
def decode_tiny(taesd, image_processor, latents: torch.Tensor) -> Any:
    """TAESD decode for previews (latents as the UNet sees them; TAESD's scaling factor is 1)."""
    image = taesd.decode(latents.to(taesd.dtype), return_dict=False)[0]
    return image_processor.postprocess(image.float().clamp(-1, 1), output_type="pil")[0]
