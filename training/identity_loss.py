"""The lookahead identity loss (LCM-Lookahead Eq. 4, SPEC §4): D = 1 − cos(ID(Dec(ẑ0)), ID(I_c)).

ID is a real, differentiable face recognizer (``lcmla.recognizers``: dlib's ResNet offline, or
insightface's ArcFace converted from ONNX). Five landmarks are detected on the decoded preview
without gradient; the face is aligned to the recognizer's template by a similarity transform
applied with ``affine_grid``/``grid_sample``, so the loss reaches the preview's pixels, the TAESD
decoder's input ẑ0, the UNet's prediction and the trained weights. Samples where no face is found
are skipped: the loss is the mean over the others (as the authors' IDLoss), and the graph is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lcmla.recognizers.base import Recognizer, align_faces

#: landmarks of one RGB uint8 image (H, W, 3) in the recognizer's scheme, (5, 2) pixels, or None
LandmarkFn = Callable[[np.ndarray], "np.ndarray | None"]


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] → B RGB uint8 arrays (H, W, 3), for the (non-differentiable) detector."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [a.permute(1, 2, 0).cpu().numpy() for a in x]


@dataclass
class IdentityLoss:
    """1 − cos between the recognizer embeddings of decoded previews and of the references."""

    recognizer: Recognizer
    landmarks: LandmarkFn

    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Landmarks (B, 5, 2) and found (B,) bool, without gradient. Where nothing is found the
        template scaled to the image stands in (its embedding is multiplied by 0 later)."""
        b, _, h, w = images.shape
        template = self.recognizer.template.detach().cpu().double()
        size = self.recognizer.input_size
        stand_in = template * torch.tensor([w / size, h / size], dtype=torch.float64)
        points, found = [], []
        for arr in to_uint8(images):
            kps = self.landmarks(arr)
            found.append(kps is not None)
            points.append(stand_in if kps is None else torch.as_tensor(np.asarray(kps, np.float64)).reshape(5, 2))
        return torch.stack(points).float(), torch.tensor(found)

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Differentiable embeddings (B, D) of images (B, 3, H, W) in [-1, 1] aligned on ``landmarks``."""
        pixels = ((images.float() + 1) / 2).clamp(0, 1)
        crops = align_faces(pixels, landmarks.to(pixels.device), self.recognizer)
        return self.recognizer(crops)

    @torch.no_grad()
    def reference(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, D) of the reference images (no gradient) and whether a face was found."""
        lm, found = self.detect(images)
        return self.embed(images, lm), found

    def __call__(self, previews: torch.Tensor, reference: torch.Tensor,
                 reference_found: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, found): loss = the mean of 1 − cos(ID(preview_i), ref_i) over the samples i with
        found_i = a face in preview i (and in reference i when ``reference_found`` is given); the
        others are skipped (SPEC §4), not counted as zero, so λ does not shrink with the detector's
        misses. 0, with the graph kept, when no face is found."""
        lm, found = self.detect(previews)
        if reference_found is not None:
            found = found & reference_found.cpu()
        emb = self.embed(previews, lm)
        dist = 1.0 - F.cosine_similarity(emb, reference.to(emb.device, emb.dtype), dim=-1)  # (B,)
        mask = found.to(dist.device, dist.dtype)
        return (dist * mask).sum() / mask.sum().clamp(min=1), found


def landmark_fn_from_analyzer(analyzer) -> LandmarkFn:
    """Landmarks from an lcmla ``FaceAnalyzer`` (insightface order: the ArcFace scheme)."""

    def find(image: np.ndarray):
        faces = analyzer.detect(image)
        return None if not faces else faces[0].kps

    return find


def fixed_landmarks(points: Sequence[Sequence[float]]) -> LandmarkFn:
    """Always the same landmarks (tests: random-weight previews hold no face to detect)."""
    pts = np.asarray(points, dtype=np.float64).reshape(5, 2)
    return lambda image: pts
