"""A KV reference that cannot be framed as asked says so."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
from PIL import Image
from util import make_settings

from lcmla.engine import Engine
from lcmla.lookahead import frame_reference, framing_used, kv_reference_images


def test_face_framing_without_photos_falls_back_and_the_result_says_so(engine, face_path):
    identity = engine.analyze_faces([face_path])
    crops_only = dataclasses.replace(identity, images=[])
    assert framing_used(identity, "face") == "face" and framing_used(crops_only, "face") == "photo"
    assert framing_used(crops_only, "photo") == "photo"
    settings = make_settings(output__width=64, output__height=64, lookahead__kv=True,
                             lookahead__reference_framing="face")
    fell_back = engine.generate(settings, crops_only)
    assert any("framing 'face' needs the photos" in n for n in fell_back.notes)
    assert not any("framing" in n for n in engine.generate(settings, identity).notes)


def _striped(size: int) -> Image.Image:
    """A square "aligned crop": red left and blue right edge bands, a grey ramp between."""
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:] = np.linspace(40, 200, size, dtype=np.uint8)[None, :, None]
    band = size // 8
    arr[:, :band], arr[:, -band:] = (255, 0, 0), (0, 0, 255)
    return Image.fromarray(arr)


def test_crops_only_are_fitted_whole_not_stretched():
    """An identity of aligned (square) crops into a landscape frame: the crop fills the middle at
    its own aspect and its edge columns repeat out to the sides; a stretch would not."""
    crop = _striped(48)
    identity = types.SimpleNamespace(images=[], crops=[crop], boxes=())
    (frame,) = kv_reference_images(identity, (64, 32), "face")
    out = np.asarray(frame).astype(int)
    assert out.shape == (32, 64, 3)
    middle = np.asarray(crop.resize((32, 32), Image.BICUBIC)).astype(int)
    assert np.abs(out[:, 16:48] - middle).max() <= 2
    assert (out[:, :16] == (255, 0, 0)).all() and (out[:, 48:] == (0, 0, 255)).all()  # the edge bands, repeated
    stretched = np.asarray(crop.resize((64, 32), Image.BICUBIC)).astype(int)
    assert np.abs(stretched[:, :16] - out[:, :16]).max() > 50  # the check tells the two apart


def test_face_framing_needs_every_photos_box_and_frames_all_photos_alike():
    """A photo without a face box (an identity put together by hand) makes the whole request's
    reference "photo"-framed: every photo whole, and the note says so."""
    photo = _striped(60).resize((90, 60))
    box = (30.0, 20.0, 50.0, 40.0)
    both = types.SimpleNamespace(images=[photo, photo], crops=[], boxes=(box, box))
    mixed = types.SimpleNamespace(images=[photo, photo], crops=[], boxes=(box, None))
    assert framing_used(both, "face") == "face" and framing_used(mixed, "face") == "photo"
    whole = np.asarray(frame_reference(photo, None, (48, 48), "photo"))
    face = np.asarray(frame_reference(photo, box, (48, 48), "face"))
    assert not np.array_equal(whole, face)
    got = [np.asarray(f) for f in kv_reference_images(mixed, (48, 48), "face")]
    assert all(np.array_equal(g, whole) for g in got)
    assert all(np.array_equal(np.asarray(f), face) for f in kv_reference_images(both, (48, 48), "face"))
    settings = make_settings(lookahead__kv=True, lookahead__reference_framing="face")
    (note,) = Engine._framing_notes(mixed, settings)
    assert "photo 2 has no face box, so every photo was used whole ('photo')" in note
    assert Engine._framing_notes(both, settings) == []
