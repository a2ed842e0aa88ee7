"""Shared fixtures: everything offline, tiny models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# pytest-xdist workers (pytest.ini: -n auto) share the cores: each one's torch, and the processes its
# tests start, take their share of them instead of all of them each (set before torch is imported)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

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
