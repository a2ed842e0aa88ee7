"""Training pairs → batches: a deterministic, rank-sharded, resumable order, and the collation.

A pair is a plain ("photo") image of an identity as the reference and another image of the same
identity as the target, each with the prompt that made it compressed to "a face" (LCM-Lookahead
§4.4-4.5: the denoiser reads the target's, the KV encoder the reference's).
The reference's identity embedding and aligned face crop were computed when the data was made.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image


@dataclass
class PairSample:
    """One training pair (see the module docstring)."""

    reference: Image.Image  # the reference photo
    reference_box: tuple[float, float, float, float] | None  # its face box (for "face" framing)
    reference_crop: Image.Image  # the aligned 224 px face crop (FaceID-Plus's CLIP input)
    reference_embedding: np.ndarray  # (512,) identity embedding
    target: Image.Image
    prompt: str  # the target's prompt, subject compressed to "a face"
    key: str = ""
    reference_prompt: str = "a photo of a face"  # the reference's own prompt, compressed likewise


def batch_order(n_samples: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The batches (lists of sample indices) of process ``rank`` in ``epoch``: a permutation drawn
    from (seed, epoch) alone, split across processes, cut into full batches (the tail is dropped).
    Pure: a resumed run recomputes exactly the same order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_samples, generator=g).tolist()
    mine = perm[rank::world]
    usable = len(mine) // batch_size * batch_size
    return [mine[i:i + batch_size] for i in range(0, usable, batch_size)]


def iterate_batches(n_samples: int, batch_size: int, seed: int, start_epoch: int, start_batch: int,
                    rank: int = 0, world: int = 1) -> Iterator[tuple[int, int, list[int]]]:
    """(epoch, batch index in epoch, indices) forever, starting at (start_epoch, start_batch)."""
    epoch, skip = start_epoch, start_batch
    while True:
        batches = batch_order(n_samples, batch_size, epoch, seed, rank, world)
        if not batches:
            raise ValueError(f"{n_samples} training pairs give no full batch of {batch_size} per process "
                             f"({world} processes); lower --train-batch-size or add data")
        for i in range(skip, len(batches)):
            yield epoch, i, batches[i]
        epoch, skip = epoch + 1, 0


class _BatchReader:
    """A map-style dataset whose items are batch descriptors (epoch, index, sample indices): reads
    and collates one batch, and returns the skipped-sample counts it met while reading."""

    def __init__(self, pairs, collate: Callable[[list], Any]):
        self.pairs, self.collate = pairs, collate

    def __getitem__(self, item: tuple[int, int, list[int]]):
        epoch, index, idx = item
        before = Counter(self.pairs.skipped)
        batch = self.collate([self.pairs[i] for i in idx])
        return epoch, index, batch, dict(Counter(self.pairs.skipped) - before)


def _as_is(item):
    return item


def load_batches(pairs, collate: Callable[[list], Any], order: Iterable[tuple[int, int, list[int]]],
                 num_workers: int = 0, pin_memory: bool = False) -> Iterator[tuple[int, int, Any]]:
    """(epoch, batch index, collated batch) in ``order``'s order, read in the main process
    (``num_workers`` 0) or ahead of the step by a ``torch.utils.data.DataLoader``'s worker
    processes (the same batches in the same order: the reading is deterministic; the data cursor a
    checkpoint keeps is the batch handed out, not the ones read ahead). Samples a worker skips as
    corrupt are added to ``pairs.skipped`` here, as if read in this process."""
    if num_workers <= 0:
        for epoch, index, idx in order:
            yield epoch, index, collate([pairs[i] for i in idx])
        return
    loader = torch.utils.data.DataLoader(_BatchReader(pairs, collate), sampler=order, batch_size=None, num_workers=num_workers,
                                         collate_fn=_as_is, pin_memory=pin_memory)
    for epoch, index, batch, skipped in loader:
        pairs.skipped.update(skipped)
        yield epoch, index, batch


def _square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` and centre-crop (diffusers' training default)."""
    w, h = image.size
    s = size / min(w, h)
    image = image.convert("RGB").resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL → (3, H, W) float in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


@dataclass
class Collate:
    """PairSamples → a TrainBatch on ``device`` (targets centre-cropped to ``resolution``; references
    framed as the KV encoder sees them at inference, ``framing`` "photo" or "face")."""

    resolution: int
    clip_processor: Any
    framing: str = "photo"
    device: Any = "cpu"

    def __call__(self, samples: Sequence[PairSample]):
        from lcmla.lookahead import frame_reference

        from .objective import TrainBatch

        size = (self.resolution, self.resolution)
        target = torch.stack([_to_tensor(_square(s.target, self.resolution)) for s in samples])
        reference = torch.stack([_to_tensor(frame_reference(s.reference, s.reference_box, size, self.framing))
                                 for s in samples])
        clip = self.clip_processor(images=[s.reference_crop.convert("RGB") for s in samples], return_tensors="pt").pixel_values
        ids = torch.stack([torch.as_tensor(np.asarray(s.reference_embedding, np.float32)).reshape(-1) for s in samples])
        dev = self.device
        return TrainBatch(target.to(dev), reference.to(dev), clip.to(dev), ids.to(dev), [s.prompt for s in samples],
                          reference_prompts=[s.reference_prompt for s in samples])
