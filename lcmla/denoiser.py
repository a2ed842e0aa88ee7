"""The model function of a request: guidance branches batched into one UNet call per step.

``GuidedDenoiser(z_in, t, step) -> ε`` is what the sampler loop (:mod:`lcmla.sampling`) calls. It
asks the request's :class:`~lcmla.guidance.Guidance` which branches the step needs, stacks their
conditions into ONE UNet batch (:class:`UNetBatch`), runs the LCM-Lookahead KV encoder first when a
branch reads reference keys/values, carries a fresh per-call
:class:`~lcmla.attention.context.AttentionContext` into the attention processors, and combines the
branch predictions. The trainer calls :func:`unet_forward` with its own batches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .attention.context import AttentionContext
from .guidance import KV_ROWS, Condition, Guidance

__all__ = ["ConditionSet", "GuidedDenoiser", "GuidedStep", "UNetBatch", "unet_forward"]


@dataclass(frozen=True)
class UNetBatch:
    """The conditions of one UNet batch, one row per sample (SDXL + an IP-Adapter).

    ``image_embeds`` is what the IP-Adapter's projection reads: the identity embedding (n, 1, 512)
    for FaceID-Plus-v2 (zeros: the null identity), or CLIP hidden states (n, 1, T, H) for IP-Adapter
    Plus. ``clip_embeds`` (n, 1, T, H): FaceID-Plus's CLIP features of the aligned face crop(s);
    None for Plus.
    """

    prompt_embeds: torch.Tensor  # (n, 77, D) text encoder hidden states
    text_embeds: torch.Tensor  # (n, D_pooled) pooled text embedding
    time_ids: torch.Tensor  # (n, 6) SDXL micro-conditioning
    image_embeds: torch.Tensor
    clip_embeds: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> "UNetBatch":
        return UNetBatch(*(None if (v := getattr(self, f.name)) is None else fn(v) for f in dataclasses.fields(self)))

    def take(self, index: Sequence[int]) -> "UNetBatch":
        """The rows ``index`` (in that order)."""
        idx = list(index)
        return self._map(lambda v: v[idx])

    def repeat(self, times: int) -> "UNetBatch":
        """Every row repeated ``times`` times in place (row r → rows r·times … r·times + times − 1)."""
        return self._map(lambda v: v.repeat_interleave(times, dim=0))

    def tile(self, times: int) -> "UNetBatch":
        """The whole batch ``times`` times over (rows 0 … n−1, then 0 … n−1 again, …)."""
        return self._map(lambda v: v.repeat(times, *([1] * (v.ndim - 1))))

    @staticmethod
    def cat(batches: Sequence["UNetBatch"]) -> "UNetBatch":
        out = []
        for f in dataclasses.fields(UNetBatch):
            parts = [getattr(b, f.name) for b in batches]
            out.append(None if parts[0] is None else torch.cat(parts))
        return UNetBatch(*out)


@dataclass(frozen=True)
class ConditionSet:
    """The text and identity conditions of one request, each in its conditioned and null form.

    text: {"text": (embeds (1, 77, D), pooled (1, P)), "null": (...)};
    identity: {"id": (image_embeds, clip_embeds or None), "null": (...)} (see ``UNetBatch``);
    time_ids: (1, 6).
    """

    text: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    identity: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    time_ids: torch.Tensor

    def row(self, condition: Condition) -> UNetBatch:
        """One row conditioned as ``condition`` says."""
        prompt, pooled = self.text["text" if condition.text else "null"]
        image_embeds, clip = self.identity["id" if condition.identity else "null"]
        return UNetBatch(prompt, pooled, self.time_ids, image_embeds, clip)

    def batch(self, branches: Sequence[str], conditions: Mapping[str, Condition]) -> UNetBatch:
        """The rows of ``branches`` in order."""
        return UNetBatch.cat([self.row(conditions[name]) for name in branches])


def unet_forward(unet, z: torch.Tensor, t: torch.Tensor, batch: UNetBatch, ctx: AttentionContext | None) -> torch.Tensor:
    """One UNet call: z (n, 4, h, w) at timestep t under ``batch``'s conditions → ε (n, 4, h, w).

    FaceID-Plus reads its CLIP features from its projection module (diffusers' design); they are set
    right before the call, which the engine's lock serialises.
    """
    if batch.clip_embeds is not None:
        unet.encoder_hid_proj.image_projection_layers[0].clip_embeds = batch.clip_embeds
    return unet(
        z,
        t,
        encoder_hidden_states=batch.prompt_embeds,
        added_cond_kwargs={"text_embeds": batch.text_embeds, "time_ids": batch.time_ids,
                           "image_embeds": [batch.image_embeds]},
        cross_attention_kwargs={"lcmla": ctx} if ctx is not None else None,
        return_dict=False,
    )[0]


@dataclass(frozen=True)
class GuidedStep:
    """What ``on_guided`` receives after each step's UNet call (previews and tools hook here)."""

    step: int
    timestep: torch.Tensor
    z_in: torch.Tensor  # (1, 4, h, w) the scaled model input of the step
    eps: torch.Tensor  # (1, 4, h, w) the guided prediction handed to the scheduler
    preds: Mapping[str, torch.Tensor]  # branch → (1, 4, h, w)
    branches: tuple[str, ...]
    ctx: AttentionContext  # the context of the step's UNet call (its KV cache included)
    kv_rows: tuple[str, ...] = ()  # the KV-encoder rows in ctx.kv, in order


@dataclass
class GuidedDenoiser:
    """The model function of one image of one request (see the module docstring).

    ``kv_encoder(t, rows) -> KVCache`` runs the LCM-Lookahead encoder pass at t over the named
    encoder rows (only those the step's branches read; None without the KV path). ``calls``
    records each step's branches.
    """

    unet: Any
    conditions: ConditionSet
    guidance: Guidance
    context: AttentionContext  # the request's knobs; a copy with the step's values goes to each call
    kv_encoder: Callable[[torch.Tensor, tuple[str, ...]], Any] | None = None
    on_guided: Callable[[GuidedStep], None] | None = None
    pool_branches: bool = False  # AM2 min–max pooled over this image's branches (authors-exact)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    _batches: dict[tuple[str, ...], UNetBatch] = field(default_factory=dict, repr=False)

    def batch(self, branches: tuple[str, ...]) -> UNetBatch:
        if branches not in self._batches:
            self._batches[branches] = self.conditions.batch(branches, self.guidance.conditions)
        return self._batches[branches]

    def kv_rows(self, branches: Sequence[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The encoder rows the branches read (in KV_ROWS order) and, per branch, the index of its
        row among them, or −1."""
        wanted = {self.guidance.conditions[name].kv_row for name in branches} - {None}
        rows = tuple(r for r in KV_ROWS if r in wanted)
        index = tuple(-1 if (r := self.guidance.conditions[name].kv_row) is None else rows.index(r) for name in branches)
        return rows, index

    def __call__(self, z_in: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        """z_in (N, 4, h, w): N images of one request → their guided ε (N, 4, h, w); the UNet batch is
        images × branches, image-major (image j's branches are samples j·n … j·n + n − 1)."""
        branches = self.guidance.branches(step)
        n, images = len(branches), z_in.shape[0]
        rows, kv_index = self.kv_rows(branches)
        cache = None
        if rows:
            cache = self.kv_encoder(t, rows)  # images × rows encoder rows, image-major
            # only this call reads it unless on_guided (previews) reads it after: each layer's K/V
            # then leave as soon as that layer has read them, so the cache shrinks through the call
            cache.release_on_read = self.on_guided is None
            r = len(rows)
            kv_index = tuple(-1 if i < 0 else j * r + i for j in range(images) for i in kv_index)
        ctx = dataclasses.replace(
            self.context,
            step=step,
            capture_index=branches.index(self.guidance.display_branch(step)),
            kv=cache,
            kv_index=kv_index if cache is not None else None,
            am_group=n if self.pool_branches else 1,
        )
        if images == 1:
            z, batch = z_in.expand(n, -1, -1, -1), self.batch(branches)
        else:
            z, batch = z_in.repeat_interleave(n, dim=0), self.batch(branches).tile(images)
        eps_all = unet_forward(self.unet, z, t, batch, ctx)  # all branches of all images: ONE UNet call
        per_branch = eps_all.unflatten(0, (images, n))  # (N, n, 4, h, w)
        preds = {name: per_branch[:, i] for i, name in enumerate(branches)}
        eps = self.guidance.combine(preds, step)
        self.calls.append(branches)
        if self.on_guided is not None:
            self.on_guided(GuidedStep(step, t, z_in, eps, preds, branches, ctx, rows))
        return eps
