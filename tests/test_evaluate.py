"""Identity similarity (SPEC §6): cosine of face embeddings, None when the image shows no face."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from lcmla.evaluate import cosine_similarity, face_fail_count, identity_similarity
from lcmla.faces import FaceAnalyzer


@pytest.fixture(scope="module")
def haar() -> FaceAnalyzer:
    return FaceAnalyzer.haar()


def test_cosine_similarity():
    assert cosine_similarity([1, 0], [2, 0]) == pytest.approx(1.0)
    assert cosine_similarity([1, 0], [0, 3]) == pytest.approx(0.0)
    assert cosine_similarity([1, 1], [-1, -1]) == pytest.approx(-1.0)
    assert cosine_similarity([0, 0], [1, 0]) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        cosine_similarity([1, 0], [1, 0, 0])


def test_identity_similarity_of_the_reference_itself_is_one(haar, face_path):
    reference = haar.identity([face_path])
    assert identity_similarity(haar, reference, Image.open(face_path)) == pytest.approx(1.0, abs=1e-5)
    assert identity_similarity(haar, reference.embedding, str(face_path)) == pytest.approx(1.0, abs=1e-5)
    other = ImageOps.posterize(Image.open(face_path).convert("RGB"), 2)
    score = identity_similarity(haar, reference, other)
    assert score is not None and -1.0 <= score < 0.999


def test_no_face_gives_none(haar, face_path):
    reference = haar.identity([face_path])
    grey = Image.new("RGB", (256, 256), (128, 128, 128))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    tiny = Image.new("RGB", (16, 16))  # below the loader's minimum size: no usable face either
    scores = [identity_similarity(haar, reference, img) for img in (grey, noise, tiny)]
    assert scores == [None, None, None]
    assert face_fail_count([0.5, None, 0.1, None]) == 2
