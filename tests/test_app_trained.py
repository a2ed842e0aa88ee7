"""The app with trained weights (--adapter / --kv-lora) and evaluation reports: the Weights choice,
Compare's trained column (and Compare equal to Generate for the same inputs), the report view."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from apputils import PassThrough, kv_lora, reports, serve, trained_adapter  # noqa: F401 - first: puts app.py on sys.path; shared fixtures
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app
from lcmla.methods import method_changes

SIZE = 64


@pytest.fixture(scope="module")
def client(engine, kv_lora, reports):
    from lcmla import Engine

    trained = app.Trained(Engine.load("tiny", device="cpu", kv_encoder_lora=kv_lora), None, str(kv_lora))
    with serve(engine, trained=trained, reports=[str(reports)]) as (demo, url):
        yield Client(url, verbose=False), demo


def _ui(changes):
    """Settings changes (dotted → settings values) as widget values, as the one-click buttons set them."""
    return {n: app._KNOB[n].show(v) for n, v in changes.items() if n in app._KNOB}


def _kw(engine, face_path, **changes):
    values = {**app.ui_defaults(engine.preset), "app.faces": [handle_file(str(face_path))], "output.width": SIZE,
              "output.height": SIZE, "prompt": "a pencil drawing of a face", **changes}
    return {app.api_param(n): values[n] for n in app.GENERATE_INPUTS}


def _pixels(item):
    from PIL import Image

    path = item["image"] if isinstance(item, dict) else item
    path = path["path"] if isinstance(path, dict) else path
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_header_and_weights_choice(client, engine, face_path, kv_lora):
    c, demo = client
    config = json.dumps(demo.config, default=str)
    assert "Trained weights" in config and kv_lora.name in config
    kv = _ui(method_changes("lookahead-kv", "tiny"))
    stock = c.predict(**_kw(engine, face_path, **kv), api_name="/generate")[0][0]
    trained = c.predict(**_kw(engine, face_path, **kv, **{"app.weights": "trained"}), api_name="/generate")[0][0]
    assert np.abs(_pixels(stock) - _pixels(trained)).mean() > 0.5  # the KV LoRA changes the KV path


def test_compare_adds_the_trained_column_and_equals_generate(client, engine, face_path):
    c, _ = client
    job = c.submit(**_kw(engine, face_path, **{"output.seed": 2}), api_name="/compare")
    gallery, table, _info = job.result(timeout=600)
    labels = [r[0] for r in table["data"]]
    assert labels == [label for _k, label in app.COMPARE_METHODS] + ["Trained · " + app.METHOD_LABELS["lookahead-kv"]]
    changes = _ui({**method_changes("lookahead-kv", "tiny"), "output.seed": 2})
    generated = c.predict(**_kw(engine, face_path, **changes), api_name="/generate")[0][0]
    trained = c.predict(**_kw(engine, face_path, **changes, **{"app.weights": "trained"}), api_name="/generate")[0][0]
    kv_column = [k for k, _ in app.COMPARE_METHODS].index("lookahead-kv")
    assert np.array_equal(_pixels(gallery[kv_column]), _pixels(generated))  # Compare's KV image is Generate's
    assert np.array_equal(_pixels(gallery[-1]), _pixels(trained))


def test_report_view(client, reports):
    c, _ = client
    c.predict(api_name="/list_reports")  # the refresh button answers (its choices are a dropdown update)
    chosen = str((reports / "eval-tiny").resolve())
    plots, table, text = c.predict(chosen, api_name="/open_report")
    assert [p["caption"] for p in plots] == ["pareto-dlib", "grid-lookahead"]
    assert table["headers"] == ["method", "scale", "id_dlib_mean"] and len(table["data"]) == 2
    assert "# Evaluation" in text and "![" not in text
    assert app.find_reports([reports]) == [chosen]
    for outside in (reports / "not-a-report", reports / "eval-tiny" / ".." / ".." ):
        with pytest.raises(AppError, match="not in the list of choices"):  # the dropdown refuses it
            c.predict(str(outside), api_name="/open_report")
        with pytest.raises(app.LcmlaError, match="not an evaluation report"):  # and so does the reader
            app.read_report(str(outside), [reports])


def test_trained_weights_without_any_loaded_is_a_clear_error(engine, face_path):
    with serve(engine) as (_demo, url):
        c = Client(url, verbose=False)
        with pytest.raises(AppError, match="no trained weights are loaded"):
            c.predict(**_kw(engine, face_path, **{"app.weights": "trained"}), api_name="/generate")


def test_app_flags_for_trained_files(monkeypatch, tmp_path):
    monkeypatch.setenv("LCMLA_ADAPTER", "/nowhere/adapter.safetensors")
    monkeypatch.setenv("LCMLA_KV_LORA", "/nowhere/kv.safetensors")
    monkeypatch.setenv("LCMLA_REPORTS", os.pathsep.join([str(tmp_path), "/elsewhere"]))
    args = app.parse_args([])
    assert args.adapter == "/nowhere/adapter.safetensors" and args.kv_lora == "/nowhere/kv.safetensors"
    assert args.reports == [str(tmp_path), "/elsewhere"]
    # the flags win over the environment
    flagged = app.parse_args(["--adapter", "a.safetensors", "--kv-lora", "k.safetensors", "--reports", "a", "--reports", "b"])
    assert (flagged.adapter, flagged.kv_lora, flagged.reports) == ("a.safetensors", "k.safetensors", ["a", "b"])
    with pytest.raises(app.LcmlaError, match="--adapter /nowhere/adapter.safetensors: no such file"):
        app.load_trained(args, engine=None)
    for var in ("LCMLA_ADAPTER", "LCMLA_KV_LORA", "LCMLA_REPORTS"):
        monkeypatch.delenv(var)
    with pytest.raises(app.LcmlaError, match="--kv-lora /nowhere/kv.safetensors: no such file"):
        app.load_trained(app.parse_args(["--kv-lora", "/nowhere/kv.safetensors"]), engine=None)
    bare = app.parse_args([])
    assert (bare.adapter, bare.kv_lora, bare.reports) == (None, None, [])
    assert app.load_trained(bare, engine=None) is None  # nothing given: no second engine


@pytest.fixture(scope="module")
def adapter_only(engine, trained_adapter):
    """What ``python app.py --adapter FILE`` loads: a second tiny engine with the exported adapter."""
    return app.load_trained(app.parse_args(["--adapter", str(trained_adapter)]), engine)


def test_load_trained_loads_the_exported_adapter(adapter_only, engine, trained_adapter):
    trained = adapter_only
    assert (trained.adapter, trained.kv_lora, trained.method) == (str(trained_adapter), None, "baseline")
    assert trained.engine is not engine and trained.engine.preset.name == engine.preset.name
    assert str(trained.engine.device) == str(engine.device) and trained.engine.dtype == engine.dtype
    header = app._header(engine, trained)
    assert "**Trained weights:** adapter `ip-adapter-faceid-plusv2_sdxl.safetensors`" in header
    assert "KV-encoder LoRA" not in header


def test_compare_with_an_adapter_only_trained_column(adapter_only, engine, face_path):
    """Adapter only (no KV-encoder LoRA): the trained column runs the baseline method with the
    trained adapter; its image is Generate's with Weights = trained, and not the stock baseline's."""
    from lcmla.ui import compare, generate

    ctx = app.Context(engine, adapter_only)
    ui = {**app.ui_defaults(engine.preset), "app.faces": [str(face_path)], "output.width": SIZE, "output.height": SIZE,
          "prompt": "a pencil drawing of a face", "output.seed": 4}
    *_, (gallery, rows, _info) = compare.run_compare(ctx, dict(ui), lambda *a, **k: None)
    labels = [r[0] for r in rows]
    assert labels == [label for _k, label in app.COMPARE_METHODS] + ["Trained · Baseline"]
    assert gallery[-1][1].startswith("Trained · Baseline: ")
    baseline = {**ui, **_ui(method_changes("baseline", "tiny"))}
    trained = generate.run_generate(ctx, {**baseline, "app.weights": "trained"}, lambda *a, **k: None)[0][0][0]
    stock = np.asarray(gallery[0][0], np.int16)
    assert np.array_equal(np.asarray(gallery[-1][0], np.int16), _pixels(trained))  # Generate shows the saved PNG
    assert np.abs(np.asarray(gallery[-1][0], np.int16) - stock).mean() > 0.5  # the trained adapter changes the image


def test_examples_hold_all_18_evaluation_prompts():
    prompts = [line.strip() for line in (app.ASSETS / "prompts.txt").read_text().splitlines() if line.strip()]
    assert len(prompts) == 18 and [e[1] for e in app._examples()] == prompts


def _wait_for_the_previews_worker(seconds: float = 120) -> None:
    import threading
    import time

    deadline = time.time() + seconds
    while any(t.name == "lcmla-previews" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "lcmla-previews" for t in threading.enumerate()), "the previews worker kept running"


def _preview_ui(engine, face_path, preview_steps: str):
    return {**app.ui_defaults(engine.preset), "app.faces": [str(face_path)], "output.width": SIZE, "output.height": SIZE,
            "prompt": "a pencil drawing of a face", "guidance.steps": 12, "app.preview_lcm_scale": 1.0,
            "app.preview_steps": preview_steps}


def test_previews_stop_when_the_client_leaves(engine, face_path):
    """Closing the streaming handler (what Gradio does when the client goes) stops the worker at its
    next step and frees the engine, instead of running every step to the end. This engine wrapper
    has no per-step hook (``on_step``): the frames alone stop it."""
    computed: list[int] = []

    class Spy(PassThrough):
        def previews(self, settings, faces, steps=None, callback=None):
            def counted(frame):
                computed.append(frame.step)
                callback(frame)

            return self._inner.previews(settings, faces, steps=steps, callback=counted)

    from lcmla.ui.previews import _takes_on_step, run_previews

    ui = _preview_ui(engine, face_path, "")
    assert not _takes_on_step(Spy(engine).previews)
    stream = run_previews(app.Context(Spy(engine)), ui, lambda *a, **k: None)
    first = next(stream)
    assert "Step 1 of 12" in first[3]
    stream.close()
    _wait_for_the_previews_worker()
    assert len(computed) < 12  # stopped early
    engine.generate(app.settings_from_ui(ui, engine.preset), [face_path])  # the engine is free again


def test_previews_of_a_late_step_stop_at_the_next_step(engine, face_path):
    """Only the last of 12 steps previewed: the handler still reports every step, and when the
    client leaves after the first one the worker stops at the next step (the engine's ``on_step``
    hook), long before it would compute the step-12 preview."""
    steps_run: list[int] = []
    frames: list[int] = []

    class Spy(PassThrough):
        def previews(self, settings, faces, steps=None, callback=None, on_step=None):
            def frame(f):
                frames.append(f.step)
                callback(f)

            def step(info):
                steps_run.append(info.step)
                on_step(info)

            return self._inner.previews(settings, faces, steps=steps, callback=frame, on_step=step)

    from lcmla.ui.previews import _takes_on_step, run_previews

    assert _takes_on_step(engine.previews)  # the hook this test cancels through
    ui = _preview_ui(engine, face_path, "11")
    stream = run_previews(app.Context(Spy(engine)), ui, lambda *a, **k: None)
    x0, lcm, final, info = next(stream)
    assert (x0, lcm, final) == ([], [], None)
    assert info.startswith("Step 1 of 12") and "next preview at step 12" in info
    stream.close()
    _wait_for_the_previews_worker()
    assert frames == [] and len(steps_run) < 12, (frames, steps_run)  # stopped long before step 12
    engine.generate(app.settings_from_ui(ui, engine.preset), [face_path])  # the engine is free again

    # not cancelled: every step is reported, and the one preview comes at step 12
    steps_run.clear()
    outputs = list(run_previews(app.Context(Spy(engine)), ui, lambda *a, **k: None))
    assert [o[3].split(" (")[0] for o in outputs[:-1]] == [f"Step {k} of 12" for k in range(1, 13)]
    assert frames == [11] and steps_run == list(range(12))
    x0, lcm, final, info = outputs[-1]
    assert len(x0) == len(lcm) == 1 and x0[0][1].startswith("step 12 · t=")
    assert final is not None and "**1 step previewed**" in info
