"""The interface every torch face recognizer implements, and the differentiable face alignment.

A recognizer takes face crops aligned on five landmarks to its own template and returns unit-length
identity embeddings. Alignment is a similarity transform estimated from detected landmarks (no
gradient flows into the landmarks) and applied with ``affine_grid``/``grid_sample`` (gradients flow
into the image), so a loss on the embedding reaches the pixels of a generated image.

Landmark schemes (the order and meaning of the five points):

- ``"insightface5"``: image-left eye centre, image-right eye centre, nose tip, image-left mouth
  corner, image-right mouth corner (SCRFD / ``buffalo_l``, and lcmla's ``DetectedFace.kps``);
- ``"dlib5"``: dlib's ``shape_predictor_5_face_landmarks`` order (two corners of each eye and the
  bottom of the nose).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("insightface5", "dlib5")


class Recognizer(nn.Module):
    """A face recognizer: aligned crops (B, 3, S, S), RGB in [0, 1] → (B, D) unit embeddings.

    Subclasses set:
        name: a short label for logs and reports (e.g. ``"dlib-resnet-v1"``);
        input_size: S, the side of the aligned crop the network takes;
        embedding_dim: D;
        scheme: the landmark scheme of ``template`` (one of :data:`SCHEMES`);
        template: (5, 2) float tensor buffer, where the five landmarks land in the crop, in pixels.
    """

    name: str = "recognizer"
    input_size: int = 112
    embedding_dim: int = 512
    scheme: str = "insightface5"

    def forward(self, crops: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping the
    points ``src`` onto ``dst`` (Umeyama 1991, Eq. 40–43): the transform insightface's
    ``norm_crop`` and dlib's ``get_face_chip_details`` estimate.

    src, dst: (N, 2) or (B, N, 2) → (2, 3) or (B, 2, 3), float64 inside for stability.
    """
    single = src.ndim == 2
    s = src.reshape(-1, src.shape[-2], 2).double()
    d = dst.reshape(-1, dst.shape[-2], 2).double().expand_as(s)
    n = s.shape[1]
    mu_s, mu_d = s.mean(1, keepdim=True), d.mean(1, keepdim=True)
    sc, dc = s - mu_s, d - mu_d
    var_s = (sc * sc).sum((1, 2)) / n  # (B,)
    cov = dc.transpose(1, 2) @ sc / n  # (B, 2, 2)
    u, sig, vh = torch.linalg.svd(cov)
    sign = torch.ones_like(sig)
    sign[:, 1] = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    rot = u @ torch.diag_embed(sign) @ vh  # (B, 2, 2)
    scale = (sig * sign).sum(1) / var_s  # (B,)
    t = mu_d.transpose(1, 2) - scale[:, None, None] * rot @ mu_s.transpose(1, 2)  # (B, 2, 1)
    m = torch.cat([scale[:, None, None] * rot, t], dim=2).to(src.dtype)  # (B, 2, 3)
    return m[0] if single else m


def warp_affine(images: torch.Tensor, matrix: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``cv2.warpAffine(image, M, size)`` in torch, differentiable in ``images``.

    images: (B, C, H, W); matrix: (B, 2, 3) or (2, 3) mapping input pixel coordinates to output
    pixel coordinates (OpenCV's convention, pixel centres at integers); size: output side or (h, w).
    Bilinear sampling, zeros outside the image (OpenCV's default border is a constant 0).
    Returns (B, C, h, w).
    """
    b, _, h_in, w_in = images.shape
    h_out, w_out = (size, size) if isinstance(size, int) else size
    m = matrix.to(images.dtype).expand(b, 2, 3) if matrix.ndim == 2 else matrix.to(images.dtype)
    # invert: output pixel → input pixel
    a, t = m[:, :, :2], m[:, :, 2:]
    a_inv = torch.linalg.inv(a)
    t_inv = -a_inv @ t
    # normalised output coords (align_corners=False) → output pixels → input pixels → normalised input
    def to_pix(n: int) -> tuple[float, float]:  # x_pix = x_norm * n/2 + (n - 1)/2
        return n / 2.0, (n - 1) / 2.0

    so_x, oo_x = to_pix(w_out)
    so_y, oo_y = to_pix(h_out)
    si_x, oi_x = to_pix(w_in)
    si_y, oi_y = to_pix(h_in)
    pix_out = torch.tensor([[so_x, 0, oo_x], [0, so_y, oo_y], [0, 0, 1]], dtype=images.dtype, device=images.device)
    norm_in = torch.tensor([[1 / si_x, 0, -oi_x / si_x], [0, 1 / si_y, -oi_y / si_y]], dtype=images.dtype,
                           device=images.device)
    inv = torch.cat([a_inv, t_inv], dim=2)  # (B, 2, 3) output pixel → input pixel
    inv3 = torch.cat([inv, torch.tensor([[[0, 0, 1]]], dtype=images.dtype, device=images.device).expand(b, 1, 3)], 1)
    theta = norm_in @ inv3 @ pix_out  # (B, 2, 3) normalised output → normalised input
    grid = F.affine_grid(theta, (b, images.shape[1], h_out, w_out), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def align_faces(images: torch.Tensor, landmarks: torch.Tensor, recognizer: Recognizer) -> torch.Tensor:
    """Crops of ``images`` aligned to ``recognizer``'s template.

    images: (B, 3, H, W); landmarks: (B, 5, 2) in ``recognizer.scheme``, in pixels of ``images``
    (detached: no gradient flows into them). → (B, 3, S, S).
    """
    fit = getattr(recognizer, "alignment_matrix", None)  # a recognizer may fit its own way (dlib's chips)
    lm = landmarks.detach().to(images.device)
    matrix = fit(lm) if fit is not None else similarity_transform(lm, recognizer.template.to(images.device))
    return warp_affine(images, matrix, recognizer.input_size)
