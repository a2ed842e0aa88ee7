"""Shared fixtures: everything offline, tiny models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FACE = ASSETS / "face.png"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """Where the tiny preset's weights live for this test session (LCMLA_CACHE if CI set one)."""
    if not os.environ.get("LCMLA_CACHE"):
        os.environ["LCMLA_CACHE"] = str(tmp_path_factory.mktemp("lcmla-cache"))
    return Path(os.environ["LCMLA_CACHE"])


@pytest.fixture(scope="session")
def engine(tiny_cache):
    from lcmla import Engine

    return Engine.load("tiny", device="cpu")


@pytest.fixture(scope="session")
def face_path() -> Path:
    return FACE


@pytest.fixture(scope="session")
def other_face(tmp_path_factory, face_path):
    """A second identity: the reference photo mirrored, posterised and slightly rotated."""
    from PIL import Image, ImageOps

    img = ImageOps.mirror(ImageOps.posterize(Image.open(face_path).convert("RGB"), 3)).rotate(3)
    path = tmp_path_factory.mktemp("faces") / "other.png"
    img.save(path)
    return path
