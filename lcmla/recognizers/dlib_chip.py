"""dlib's face chip geometry for 5-point shapes (``get_face_chip_details``), in torch.

dlib places the five landmarks of ``shape_predictor_5_face_landmarks`` (the outer and inner
corner of each eye, the bottom of the nose) at fixed points of the unit square, moved inwards by
the padding: p ← (padding + p)/(2·padding + 1), times the chip size. The chip is the least-squares
similarity transform from those chip points to the image landmarks (dlib fits chip → image and
samples the image through it; :func:`chip_transform` returns the inverse, image → chip, as
``warp_affine`` takes it).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import similarity_transform

#: dlib's unit-square positions of the 5 landmarks (dlib/image_transforms/interpolation.h)
UNIT_TEMPLATE5 = np.array([
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
])


def chip_template(size: int = 150, padding: float = 0.25) -> np.ndarray:
    """The five landmark positions in a ``size`` px chip with ``padding``: (5, 2)."""
    return (padding + UNIT_TEMPLATE5) / (2 * padding + 1) * size


def chip_transform(landmarks: torch.Tensor, size: int = 150, padding: float = 0.25) -> torch.Tensor:
    """Image → chip affine matrices (B, 2, 3) of dlib's chips for landmarks (B, 5, 2)."""
    template = torch.as_tensor(chip_template(size, padding), dtype=torch.float64)
    lm = landmarks.detach().double().reshape(-1, 5, 2)
    to_image = similarity_transform(template.expand_as(lm), lm)  # chip → image, dlib's direction
    a, t = to_image[:, :, :2], to_image[:, :, 2:]
    inv = torch.linalg.inv(a)
    return torch.cat([inv, -inv @ t], dim=2).to(landmarks.dtype if landmarks.is_floating_point() else torch.float32)
