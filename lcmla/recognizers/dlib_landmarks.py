"""dlib's 5-point shape predictor (``shape_predictor_5_face_landmarks.dat``, CC0) in numpy.

An ensemble of regression trees (Kazemi & Sullivan 2014) run as dlib runs it: starting from the
mean shape in the face box's normalised frame, each of the cascade's levels reads a few hundred
pixel intensities at points anchored to the current shape (offsets rotated and scaled by the
similarity between the mean and the current shape, then mapped into the box), each tree of the
level walks its splits on intensity differences (left when the difference exceeds the split's
threshold) and the leaves' shape updates are summed. Not differentiable (it needs none: landmarks
are detected without gradient).

The five points, in dlib's order: the outer and inner corner of the image-left... more precisely
0/1 = the corners of the eye on the image's right, 2/3 = of the eye on the image's left, 4 = the
bottom of the nose (the "dlib5" scheme of ``lcmla.recognizers.base``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dlib_format import DlibFormatError, _Reader


def _matrix(r: _Reader) -> np.ndarray:
    nr, nc = r.int(), r.int()
    return np.array([r.float() for _ in range(abs(nr) * abs(nc))], dtype=np.float32)


def _vector(r: _Reader, item):
    return [item(r) for _ in range(r.int())]


@dataclass
class Cascade:
    """One level: trees as arrays of equal depth."""

    idx1: np.ndarray  # (trees, splits) feature index
    idx2: np.ndarray
    thresh: np.ndarray  # (trees, splits)
    leaves: np.ndarray  # (trees, leaves, 2·parts)
    anchor: np.ndarray  # (features,) the shape point each feature pixel is anchored to
    deltas: np.ndarray  # (features, 2) its offset in the mean shape's frame


def similarity_2x2(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The rotation-and-scale part of the least-squares similarity src → dst ((N, 2) each)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    var = (sc ** 2).sum() / len(src)
    cov = dc.T @ sc / len(src)
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(2)
    if np.linalg.det(cov) < 0 or (np.linalg.det(cov) == 0 and np.linalg.det(u) * np.linalg.det(vt) < 0):
        s[1, 1] = -1
    rot = u @ s @ vt
    scale = np.trace(np.diag(d) @ s) / var if var > 0 else 1.0
    return scale * rot


class ShapePredictor:
    """``predict(gray, box)`` → (5, 2) landmarks in image pixels."""

    def __init__(self, initial: np.ndarray, cascades: list[Cascade]):
        self.initial = initial.reshape(-1, 2).astype(np.float64)  # (parts, 2) normalised
        self.cascades = cascades

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ShapePredictor":
        from .dlib_resnet import model_path

        path = Path(path or model_path("landmarks"))
        r = _Reader(path.read_bytes(), path.name)
        if r.int() != 1:
            raise DlibFormatError(f"{path.name} is not a dlib shape predictor")
        initial = _matrix(r)
        forests = _vector(r, lambda r: _vector(r, lambda r: (
            _vector(r, lambda r: (r.int(), r.int(), r.float())), _vector(r, _matrix))))
        anchors = _vector(r, lambda r: _vector(r, lambda r: r.int()))
        deltas = _vector(r, lambda r: _vector(r, lambda r: (r.float(), r.float())))
        if r.p != len(r.b) or len(forests) != len(anchors) != len(deltas):
            raise DlibFormatError(f"{path.name}: not a dlib shape predictor (layout mismatch)")
        cascades = []
        for trees, anchor, delta in zip(forests, anchors, deltas):
            splits = np.array([[s for s in t[0]] for t in trees], dtype=np.float64)  # (T, S, 3)
            cascades.append(Cascade(splits[..., 0].astype(np.int64), splits[..., 1].astype(np.int64), splits[..., 2],
                                    np.array([t[1] for t in trees], dtype=np.float64), np.array(anchor, np.int64),
                                    np.array(delta, np.float64)))
        return cls(initial, cascades)

    @staticmethod
    def _box_tform(box) -> tuple[np.ndarray, np.ndarray]:
        """dlib's ``unnormalizing_tform``: the unit square onto the box (corners inclusive)."""
        left, top, right, bottom = box
        return np.diag([right - left, bottom - top]), np.array([left, top], dtype=np.float64)

    def predict(self, gray: np.ndarray, box) -> np.ndarray:
        """Landmarks (5, 2) for the face in ``box`` = (left, top, right, bottom) (dlib's inclusive
        rectangle) of the intensity image ``gray`` (H, W) uint8."""
        a, b = self._box_tform(box)
        h, w = gray.shape
        shape = self.initial.copy()
        for c in self.cascades:
            m = similarity_2x2(self.initial, shape)
            pts = (shape[c.anchor] + c.deltas @ m.T) @ a.T + b  # (F, 2) image coordinates
            ij = np.floor(pts + 0.5).astype(np.int64)  # dlib rounds to the nearest pixel
            inside = (ij[:, 0] >= 0) & (ij[:, 0] < w) & (ij[:, 1] >= 0) & (ij[:, 1] < h)
            values = np.zeros(len(pts), dtype=np.float64)
            values[inside] = gray[ij[inside, 1], ij[inside, 0]]
            node = np.zeros(len(c.idx1), dtype=np.int64)
            rows = np.arange(len(c.idx1))
            n_splits = c.idx1.shape[1]
            while True:
                active = node < n_splits
                if not active.any():
                    break
                k = node[active]
                r_ = rows[active]
                go_left = values[c.idx1[r_, k]] - values[c.idx2[r_, k]] > c.thresh[r_, k]
                node[active] = np.where(go_left, 2 * k + 1, 2 * k + 2)
            shape = shape + c.leaves[rows, node - n_splits].sum(0).reshape(-1, 2)
        return shape @ a.T + b


def rgb_intensity(image: np.ndarray) -> np.ndarray:
    """dlib's intensity of an RGB pixel: the integer mean of its three channels."""
    return (image[..., 0].astype(np.uint16) + image[..., 1] + image[..., 2]) // 3
