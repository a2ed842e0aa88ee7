"""The app's handlers as plain functions of (context, inputs), called without a server or browser."""

from __future__ import annotations

import json

import numpy as np
import pytest
from apputils import ROOT  # noqa: F401 - puts the repository root on sys.path

from lcmla import GenerationSettings
from lcmla.ui import attention, compare, generate
from lcmla.ui.common import GENERATE_INPUTS, Context, ui_defaults

SIZE = 64


def _quiet(*_a, **_k):
    return None


@pytest.fixture(scope="module")
def ctx(engine):
    return Context(engine)


@pytest.fixture(scope="module")
def ui(engine, face_path):
    return {**ui_defaults(engine.preset), "app.faces": [str(face_path)], "output.width": SIZE, "output.height": SIZE,
            "prompt": "a pencil drawing of a face"}


def test_generate_handler_equals_the_engine(ctx, ui, engine, face_path):
    images, files, info, used, seed, settings_json = generate.run_generate(ctx, dict(ui), _quiet)
    settings = GenerationSettings.from_json(settings_json)
    direct = engine.generate(settings, [face_path])
    assert np.array_equal(np.asarray(images[0][0]), np.asarray(direct.images[0]))
    assert len(files) == 1 and seed == 0 and "1 image" in info and used


def test_one_click_configuration_and_png_settings(ctx, ui):
    changes = generate.preset_changes(ctx, "am2+dcg")
    assert changes["attention.mode"] == "am2" and changes["guidance.dcg"] is True
    _images, files, *_ = generate.run_generate(ctx, {**ui, "output.seed": 9}, _quiet)
    loaded = generate.load_settings(ctx, files[0])
    assert loaded["output.seed"] == 9 and loaded["prompt"] == "a pencil drawing of a face"
    assert generate.load_settings(ctx, None) == {}


def test_attention_handler_and_redraw(ctx, ui):
    state, block, step, token, before, after, diff, info = attention.run_attention(
        ctx, {**ui, "app.capture_mode": "am2"}, _quiet)
    assert state["mode"] == "am2" and before is not None and diff is not None and "AM2" in info
    assert attention.render_maps(None, "all", 0, "0", False)[3].startswith("Press")
    again = attention.render_maps(state, "up", 0, "1", True)
    assert again[0] is not None and "before:" in again[3]


def test_compare_columns_without_trained_weights(ctx):
    assert [label for _k, label, _w in compare.compare_runs(ctx)] == [label for _k, label in compare.COMPARE_METHODS]


def test_every_generate_input_has_a_default(engine):
    assert set(ui_defaults(engine.preset)) == set(GENERATE_INPUTS)
    json.dumps({k: v for k, v in ui_defaults(engine.preset).items()})  # plain values, no widgets
