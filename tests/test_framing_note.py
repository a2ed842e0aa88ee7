"""A KV reference that cannot be framed as asked says so."""

from __future__ import annotations

import dataclasses

from util import make_settings

from lcmla.lookahead import framing_used


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
