"""dlib's face models rebuilt in torch/numpy, against dlib's own outputs (pinned in tests/data by
make_dlib_reference.py with dlib 20.0.1; dlib itself is not needed here)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faceutils
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

DATA = Path(__file__).parent / "data"
REF = json.loads((DATA / "dlib_reference.json").read_text())


def _portraits():
    return {name: np.asarray(img) for name, img in faceutils.portraits().items()}


@pytest.fixture(scope="module")
def faces():
    from lcmla.recognizers.dlib_pipeline import DlibFaces

    return DlibFaces.load()


def test_reader_rejects_other_files(tmp_path):
    from lcmla.recognizers.dlib_format import DlibFormatError, read_dnn
    from lcmla.recognizers.dlib_resnet import DlibRecognizer

    bad = tmp_path / "x.dat"
    bad.write_bytes(b"\x01\x01\x01\x05hello" + os.urandom(64))
    with pytest.raises(DlibFormatError, match="unsupported dlib loss"):
        read_dnn(bad)
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(DlibFormatError, match="not a dlib model file"):
        DlibRecognizer.load(bad)
    with pytest.raises(DlibFormatError, match="cannot read"):
        read_dnn(tmp_path / "missing.dat")


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_network_equals_dlib_on_dlib_chips(faces, name):
    chip = np.asarray(Image.open(DATA / f"dlib_chip_{name}.png").convert("RGB"))
    x = torch.from_numpy(chip.copy()).permute(2, 0, 1)[None].float() / 255
    ours = faces.recognizer.descriptor(x)[0].detach().numpy()
    assert np.abs(ours - np.array(REF["faces"][name]["descriptor_of_chip"])).max() < 1e-4


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_landmarks_and_boxes_equal_dlib(faces, name):
    img = _portraits()[name]
    ref = REF["faces"][name]
    box = tuple(float(v) for v in ref["detections"]["0"][0][0])
    from lcmla.recognizers.dlib_landmarks import rgb_intensity

    lm = faces.predictor.predict(rgb_intensity(img), box)
    # dlib returns integer points: the same regression trees give the same points up to that rounding
    assert np.abs(lm - np.array(ref["landmarks"])).max() <= 0.5 + 1e-6
    found = faces.detect(img)
    assert len(found) == 1
    # our pyramid's levels are resampled differently and offset on the stride-8 grid: a few pixels
    assert np.abs(np.array(found[0].box) - np.array(ref["detections"]["0"][0][0])).max() <= 10
    assert found[0].score == pytest.approx(ref["detections"]["0"][0][1], abs=0.05)


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_full_pipeline_agrees_with_dlib(faces, name):
    img = _portraits()[name]
    ours = faces.embed(img, faces.detect(img)[0])
    ref = np.array(REF["faces"][name]["descriptor"])
    assert ours @ (ref / np.linalg.norm(ref)) > 0.995  # bilinear chip vs dlib's pyramid-filtered chip


def test_same_face_beats_different_faces(faces):
    """The recognizer's basic property, on the two public-domain portraits."""
    imgs = _portraits()
    a = faces.embed(imgs["astronaut"], faces.detect(imgs["astronaut"])[0])
    h = faces.embed(imgs["hopper"], faces.detect(imgs["hopper"])[0])
    crop = Image.fromarray(imgs["astronaut"]).crop((20, 10, 470, 480))
    crop = np.asarray(ImageEnhance.Brightness(crop).enhance(1.15))
    a2 = faces.embed(crop, faces.detect(crop)[0])
    assert a @ a2 > 0.98 and a @ h < a @ a2 - 0.05
    # and in dlib's own terms: raw descriptor distances either side of its 0.6 threshold
    ra, rh = np.array(REF["faces"]["astronaut"]["descriptor"]), np.array(REF["faces"]["hopper"]["descriptor"])
    assert np.linalg.norm(ra - rh) > 0.6


def test_gradients_reach_the_pixels(faces):
    from lcmla.recognizers.base import align_faces

    img = _portraits()["astronaut"]
    lm = torch.from_numpy(faces.detect(img)[0].landmarks)[None]
    x = (torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255).requires_grad_(True)
    emb = faces.recognizer(align_faces(x, lm, faces.recognizer))
    emb[0, :5].sum().backward()
    g = x.grad[0].abs().sum(0)
    x1, y1, x2, y2 = faces.detect(img)[0].box
    m = 0.3 * (x2 - x1)  # the chip spans the face plus dlib's padding
    inside = g[int(y1 - m):int(y2 + m), int(x1 - m):int(x2 + m)].sum()
    assert g.sum() > 0 and inside > 0.99 * g.sum()  # the gradient sits on the face and its chip


def test_alignment_reproduces_dlibs_chip(faces):
    from lcmla.recognizers.base import align_faces

    img = _portraits()["hopper"]
    lm = torch.tensor(REF["faces"]["hopper"]["landmarks"], dtype=torch.float32)[None]
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    ours = align_faces(x, lm, faces.recognizer)[0].permute(1, 2, 0).numpy() * 255
    chip = np.asarray(Image.open(DATA / "dlib_chip_hopper.png").convert("RGB")).astype(np.float32)
    # dlib low-pass filters before sampling a chip this much smaller than the face: means agree
    assert np.abs(ours - chip).mean() < 12 and np.corrcoef(ours.ravel(), chip.ravel())[0, 1] > 0.97


def test_insightface_points_from_dlib_points(faces):
    from lcmla.recognizers.dlib_pipeline import dlib5_to_insightface5

    img = _portraits()["astronaut"]
    lm = faces.detect(img)[0].landmarks
    five = dlib5_to_insightface5(lm)
    assert np.allclose(five[0], lm[2:4].mean(0)) and np.allclose(five[1], lm[0:2].mean(0))
    assert five[3, 1] > five[2, 1] > five[0, 1]  # mouth below the nose below the eyes
