"""Evaluation metrics of both papers (SPEC §6), starting with identity similarity.

ID: the cosine similarity between the identity embedding of the reference photo(s) and that of the
largest face found in a generated image. A generated image without a detectable face has no score
(``None``); the papers count those images as failures (``face_fail_count``) instead of scoring them.

This module imports no torch: it works on the face analyzer's numpy embeddings, so the app can use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .errors import ImageError
from .faces import FaceAnalyzer, FaceIdentity, l2_normalize

__all__ = ["cosine_similarity", "face_fail_count", "identity_similarity"]


def cosine_similarity(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """cos(a, b) = a·b / (|a|·|b|) of two flattened vectors of the same length; 0.0 if either is zero."""
    x, y = l2_normalize(np.asarray(a)), l2_normalize(np.asarray(b))
    if x.shape != y.shape:
        raise ValueError(f"embeddings differ in length ({x.shape[0]} vs {y.shape[0]})")
    return float(np.clip(np.dot(x, y), -1.0, 1.0))


def identity_similarity(analyzer: FaceAnalyzer, reference: FaceIdentity | np.ndarray, image: Any) -> float | None:
    """ID score (both papers): cosine of the reference identity embedding and the embedding of the
    largest face in ``image`` (PIL image, path, bytes or array); ``None`` when no face is found.

    With the Haar stand-in backend (``analyzer.is_recognizer`` is False) the number measures pixel
    similarity of the face crops, not identity.
    """
    embedding = reference.embedding if isinstance(reference, FaceIdentity) else np.asarray(reference)
    try:
        faces = analyzer.detect(image)
    except ImageError:  # e.g. a generated image too small for the detector
        return None
    if not faces:
        return None
    return cosine_similarity(embedding, faces[0].embedding)


def face_fail_count(scores: Iterable[float | None]) -> int:
    """FFC: how many images had no detectable face (their score is ``None``)."""
    return sum(score is None for score in scores)
