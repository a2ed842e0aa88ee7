"""The app's handlers as plain functions of (context, inputs), called without a server or browser."""

from __future__ import annotations

import json
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from apputils import ROOT, PassThrough  # noqa: F401 - puts the repository root on sys.path

from lcmla import GenerationSettings, SettingsError
from lcmla.knobs import KNOB
from lcmla.methods import METHOD_LABELS, METHODS, SAMPLER_KNOBS, method_changes
from lcmla.pngmeta import settings_from_png
from lcmla.settings import OutputSettings
from lcmla.ui import attention, compare, generate, previews
from lcmla.ui.common import COMPARE_METHODS, GENERATE_INPUTS, Context, Trained, ui_defaults

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
    told = []
    images, files, info, used, seed, settings_json = generate.run_generate(
        ctx, dict(ui), lambda *a, **k: told.append(k.get("desc")))
    assert told[0] == "finding the face"  # the progress bar says what the wait is before the first step
    settings = GenerationSettings.from_json(settings_json)
    direct = engine.generate(settings, [face_path])
    # the gallery shows the saved PNG, settings embedded (its own download button gives them)
    assert images[0][0] == files[0] and settings_from_png(images[0][0]) == settings
    with Image.open(images[0][0]) as shown:
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(direct.images[0]))
    assert len(files) == 1 and seed == 0 and info.startswith("**1 image** · seeds 0") and used


LONG_PROMPT = "a pencil drawing of a face, " * 20  # well past CLIP's 75 prompt tokens


def test_the_engines_notes_reach_the_summaries(ctx, ui, engine, face_path):
    """What the engine notes of a request (here: a prompt the text encoders cut, AM steps past the
    last step) is in the Generate, Attention and Previews summaries, not only in the CLI's stderr."""
    asked = {**ui, "prompt": LONG_PROMPT, "attention.mode": "am1", "attention.steps": "7"}
    direct = engine.generate(ctx.request_settings(asked), [face_path])
    assert len(direct.notes) == 2 and "all past the last" in direct.notes[0] and "left out" in direct.notes[1]
    assert "of a face, a pencil" in direct.notes[1]  # the cut words as written, not as BPE pieces
    info = generate.run_generate(ctx, asked, _quiet)[2]
    assert info.count("_Note: ") == 2 and "text encoders read the first 75" in info and "all past the last" in info
    state, *_, info = attention.run_attention(ctx, {**asked, "app.capture_mode": "as set in Generate"}, _quiet)
    assert "text encoders read the first 75" in info and "all past the last" in info
    assert "text encoders read the first 75" in attention.render_maps(state, "up", 0, "1", True)[3]  # a redraw too
    *_, info = list(previews.run_previews(ctx, {**asked, "app.preview_lcm_scale": 1.0, "app.preview_steps": "0"},
                                          _quiet))[-1]
    assert "text encoders read the first 75" in info
    plain = generate.run_generate(ctx, dict(ui), _quiet)[2]
    assert "Note" not in plain  # a request with nothing to note has no note


@pytest.fixture
def infos(monkeypatch):
    """The gr.Info toasts a handler raises, as (title, message)."""
    seen = []
    monkeypatch.setattr(gr, "Info", lambda message, *a, title="", **k: seen.append((title, message)))
    return seen


def test_one_click_configuration_and_png_settings(ctx, ui, infos):
    changes = generate.preset_changes(ctx, "am2+dcg")
    assert changes["attention.mode"] == "am2" and changes["guidance.dcg"] is True
    _images, files, *_ = generate.run_generate(ctx, {**ui, "output.seed": 9}, _quiet)
    loaded = generate.load_settings(ctx, files[0])
    assert loaded["output.seed"] == 9 and loaded["prompt"] == "a pencil drawing of a face"
    assert infos == [("Settings loaded", "Every control now holds the settings of that PNG.")]
    assert generate.load_settings(ctx, None) == {}
    # a PNG of another preset loads with a warning that the picture will differ
    from lcmla.pngmeta import save_png

    other = settings_from_png(files[0]).replace(preset="sdxl-turbo")
    save_png(Image.new("RGB", (8, 8)), files[0] + ".turbo.png", other)
    with pytest.warns(UserWarning, match="made with the 'sdxl-turbo' preset; the app runs 'tiny'"):
        assert generate.load_settings(ctx, files[0] + ".turbo.png")["output.seed"] == 9


def test_attention_handler_and_redraw(ctx, ui):
    state, block, step, token, before, after, diff, info = attention.run_attention(
        ctx, {**ui, "app.capture_mode": "am2"}, _quiet)
    assert state["mode"] == "am2" and before is not None and diff is not None and "AM2" in info
    assert attention.render_maps(None, "all", 0, "0", False)[3].startswith("Press")
    again = attention.render_maps(state, "up", 0, "1", True)
    assert again[0] is not None and "before:" in again[3]
    # what the caption says of the numbers: before AM the identity tokens' probabilities sum to 1 at
    # each pixel; after AM2 they do not
    maps = state["store"].maps
    sums_before = np.concatenate([m[0].sum(0).numpy().ravel() for m in maps.values()])
    sums_after = np.concatenate([m[1].sum(0).numpy().ravel() for m in maps.values()])
    assert np.allclose(sums_before, 1.0, atol=1e-4)
    assert np.abs(sums_after - 1.0).max() > 0.05
    assert "Before AM the identity tokens' weights at a pixel sum to 1" in attention.UNITS_CAPTION
    assert "after AM they no longer sum to 1" in attention.UNITS_CAPTION


class _Recording(PassThrough):
    """An engine that records the settings of each generate call, then runs the real engine."""

    def __init__(self, inner):
        super().__init__(inner)
        self.settings: list[GenerationSettings] = []

    def generate(self, settings, faces=None, **kwargs):
        self.settings.append(settings)
        return self._inner.generate(settings, faces, **kwargs)


def test_compare_columns_are_the_named_methods(engine, ui):
    """Each column runs its lcmla.methods configuration on the same base settings, with the stock
    engine; the trained column runs the trained engine with the trained weights' method."""
    stock, trained_engine = _Recording(engine), _Recording(engine)
    trained = Trained(trained_engine, None, "kv_encoder_lora.safetensors")
    assert [key for key, _l, _w in compare.compare_runs(Context(stock))] == [k for k, _ in COMPARE_METHODS]
    runs = compare.compare_runs(Context(stock, trained))
    assert [(key, label) for key, label, _w in runs] == [*COMPARE_METHODS, ("lookahead-kv", "Trained · LCM-Lookahead KV")]
    assert [w for _k, _l, w in runs] == [None] * len(COMPARE_METHODS) + [trained]
    for key, label, _w in runs:
        assert key in METHODS and METHOD_LABELS[key] in label  # a named method, under its own label

    ctx = Context(stock, trained)
    asked = {**ui, "output.seed": 5, "output.num_images": 3, "prompt": LONG_PROMPT}
    *_, (gallery, rows, info) = compare.run_compare(ctx, asked, _quiet)
    base = ctx.request_settings({**asked, "output.num_images": 1}, {"output.num_images": 1})
    expected = [base.replace_dotted(method_changes(key, engine.preset.name)) for key, _label in COMPARE_METHODS]
    assert stock.settings == expected  # one image each, the method's changes on the user's settings
    assert trained_engine.settings == [base.replace_dotted(method_changes("lookahead-kv", engine.preset.name))]
    assert len({s.to_json() for s in expected}) == len(expected)  # four different configurations
    assert [r[0] for r in rows] == [label for _k, label, _w in runs] and len(gallery) == len(runs)
    assert "Seed 5" in info
    # every column's request cut the prompt: the note is shown once, not under each column's name
    assert info.count("text encoders read the first 75") == 1 and "_Note: prompt is" in info
    by_key = dict(zip((k for k, _ in COMPARE_METHODS), expected))
    assert by_key["baseline"].attention.mode == "none" and not by_key["baseline"].guidance.dcg
    assert by_key["am2+dcg"].attention.mode == "am2" and by_key["am2+dcg"].guidance.dcg
    assert by_key["lookahead-kv"].lookahead.kv and by_key["lookahead-kv"].freeu.enabled


def test_random_weight_previews_are_stamped_and_captioned(ctx, ui):
    """On a random-weights preset (tiny) the previews are contrast-stretched, and say so in the
    caption, the info and on the image itself (a white-on-black stamp in the top-left corner)."""
    assert ctx.preset.random_weights
    outputs = list(previews.run_previews(ctx, {**ui, "app.preview_lcm_scale": 1.0, "app.preview_steps": "0, 2"}, _quiet))
    x0, lcm, final, info = outputs[-1]
    assert [c for _img, c in x0] == [c for _img, c in lcm] and len(x0) == 2
    for image, caption in x0 + lcm:
        assert caption.endswith(" · contrast-stretched")
        pixels = np.asarray(image.convert("RGB"))
        assert min(pixels.shape[:2]) >= 192  # scaled up so the stamp is legible
        band = pixels[:16, :90].astype(int).sum(-1)  # the stamp's band: black, with white (antialiased) text
        assert (band <= 30).mean() > 0.5 and (band >= 600).sum() > 20
    assert "contrast-stretched" in info and "stamped" in info
    assert np.asarray(final).shape[:2] == (SIZE, SIZE)  # the final image itself is not stretched


def test_previews_strip_without_stretching():
    """A real-weights preset: the frames as decoded, captioned with step and timestep only."""
    from PIL import Image

    frames = [SimpleNamespace(step=k, timestep=999 - 250 * k, x0=Image.new("RGB", (64, 64), (9, 9, 9)), lcm=None)
              for k in range(2)]
    plain = previews._strip(frames, "x0")
    assert [c for _i, c in plain] == ["step 1 · t=999", "step 2 · t=749"]
    assert all(img is f.x0 for (img, _c), f in zip(plain, frames))
    stretched = previews._strip(frames, "x0", stretch=True)
    assert stretched[0][1] == "step 1 · t=999 · contrast-stretched" and stretched[0][0].size == (192, 192)


def test_every_generate_input_has_a_default(engine):
    assert set(ui_defaults(engine.preset)) == set(GENERATE_INPUTS)
    json.dumps({k: v for k, v in ui_defaults(engine.preset).items()})  # plain values, no widgets


def _sampler(changes):
    return {n: changes[n] for n in SAMPLER_KNOBS if n in changes}


def test_leaving_the_released_configuration_puts_the_presets_sampler_back(ctx, ui, infos):
    """'LCM-Lookahead (as released)' sets DPM-Solver++, 50 steps and λ 1.0; the next configuration
    (which runs on the backbone's own sampler) puts back the preset's own values of those the user
    has not changed since, and says so; with nothing left by the last button, nothing is put back."""
    own = {n: ui[n] for n in SAMPLER_KNOBS}
    released, left, restored = generate.configuration_changes(ctx, "lookahead-released", None, own)
    assert _sampler(released) == {"guidance.scheduler": "DPMSolverMultistepScheduler", "guidance.steps": 50,
                                  "identity.ip_adapter_scale": 1.0} and restored == []
    assert left == {"by": "lookahead-released", "values": _sampler(released)}
    now = {**own, **_sampler(released)}
    for key in ("baseline", "am2+dcg", "lookahead-kv"):
        changes, leaves, restored = generate.configuration_changes(ctx, key, left, now)
        assert _sampler(changes) == own and sorted(restored) == sorted(SAMPLER_KNOBS) and leaves is None, key
    text = generate.restored_text(ctx, "baseline", left, restored, changes)
    assert "Baseline runs on the preset's own sampler" in text and "LCM-Lookahead (as released)" in text
    assert f"Steps: {own['guidance.steps']}" in text
    # a knob the user changed after the released button is theirs: 12 steps stay
    changes, _, restored = generate.configuration_changes(ctx, "baseline", left, {**now, "guidance.steps": 12})
    assert "guidance.steps" not in changes and "guidance.steps" not in restored
    assert changes["guidance.scheduler"] == own["guidance.scheduler"]
    # without the released button before it, a configuration leaves the sampler knobs alone
    changes, leaves, restored = generate.configuration_changes(ctx, "baseline", None, {**own, "guidance.steps": 12})
    assert _sampler(changes) == {} and leaves is None and restored == []
    # the button itself: the widget values and the state it keeps for the next click
    controls = {n: n for n in KNOB}  # knob name → its widget (here the name stands in for it)
    handler = generate._configuration(ctx, "baseline", controls, "state")
    out = handler(left, *(now[n] for n in SAMPLER_KNOBS))
    assert out["state"] is None and out["guidance.steps"] == own["guidance.steps"]
    # ... and its toast says what it put back (the text restored_text makes for these values)
    assert infos == [("The preset's own sampler", text)]
    infos.clear()
    out = handler(None, *(own[n] for n in SAMPLER_KNOBS))  # nothing left by the last button: no toast
    assert infos == [] and out["state"] is None


def test_a_png_without_settings_is_refused_on_its_box_by_name(ctx, ui, tmp_path):
    """The settings box's validator: a PNG without lcmla's settings is invalid, the message names
    the file as uploaded (not the server's temporary path), and a PNG of lcmla is valid."""
    folder = tmp_path / "gradio-upload-3f2a"
    folder.mkdir()
    plain = folder / "holiday.png"
    Image.new("RGB", (16, 16)).save(plain)
    refused = generate.check_settings_png(ctx, str(plain))
    assert refused["is_valid"] is False and "'holiday.png' holds no lcmla settings" in refused["message"]
    assert str(folder) not in refused["message"]
    broken = folder / "broken.png"
    broken.write_bytes(b"not a png")
    refused = generate.check_settings_png(ctx, str(broken))
    assert refused["is_valid"] is False and "'broken.png' is not an image at all" in refused["message"]
    assert generate.check_settings_png(ctx, None)["is_valid"] is True
    _images, files, *_ = generate.run_generate(ctx, dict(ui), _quiet)
    assert generate.check_settings_png(ctx, files[0]) == gr.validate(True, "")


def test_preview_steps_outside_the_run_are_refused_before_running(ctx, ui):
    """Steps to preview past the run (or negative) are refused with the run's range, before the
    engine starts; a parse error's example is step numbers, not the placeholder."""
    calls = []

    class Counting(PassThrough):
        def previews(self, *a, **k):
            calls.append(1)
            return self._inner.previews(*a, **k)

    counting = Context(Counting(ctx.stock))
    steps = ctx.preset.steps
    for text, bad in ((f"0, {steps + 5}", f"{steps + 5} is outside"), ("-1", "-1 is outside")):
        with pytest.raises(gr.Error, match=f"steps to preview {bad} this run's {steps} steps.*0–{steps - 1}"):
            list(previews.run_previews(counting, {**ui, "app.preview_lcm_scale": 1.0, "app.preview_steps": text}, _quiet))
    assert calls == []
    with pytest.raises(gr.Error, match=r"e\.g\. '0, 2'"):
        list(previews.run_previews(counting, {**ui, "app.preview_lcm_scale": 1.0, "app.preview_steps": "first"}, _quiet))
    with pytest.raises(SettingsError, match="outside this run's 4 steps"):  # the engine's own check (API, CLI)
        ctx.stock.previews(ctx.request_settings(ui), [ui["app.faces"][0]], steps=[9])


def test_am_with_nothing_to_change_says_so(ctx, ui):
    """AM with no blocks or no tokens ticked changes nothing: the request says so, in plain words."""
    no_blocks = generate.run_generate(ctx, {**ui, "attention.mode": "am1", "attention.targets": []}, _quiet)[2]
    assert "no blocks are chosen (attention.targets is empty)" in no_blocks and "tick down, mid or up" in no_blocks
    no_tokens = generate.run_generate(ctx, {**ui, "attention.mode": "am2", "attention.tokens": []}, _quiet)[2]
    assert "no identity tokens are chosen (attention.tokens is empty)" in no_tokens
    assert "all past" not in no_tokens  # not "tokens [] are all past the adapter's 4 identity tokens"


def test_the_maps_say_where_am_left_them_alone():
    state = {"mode": "am2", "targets": ["down", "up"], "am_steps": [1, 2]}
    assert "Mid blocks are not among this capture's AM targets (down, up)" in attention.untouched_note(state, "mid", 1)
    assert "Mid blocks" in attention.untouched_note(state, "mid_block.attentions.0.transformer_blocks.0.attn2.processor", 1)
    assert "at steps 1, 2 only" in attention.untouched_note(state, "up", 0)
    assert attention.untouched_note(state, "up", 1) == attention.untouched_note(state, "all", 2) == ""
    assert "AM is off" in attention.untouched_note({**state, "mode": "none"}, "up", 1)


def test_messages_name_the_control_and_fit_the_box():
    from lcmla.ui.common import labelled

    with pytest.raises(SettingsError) as err:
        OutputSettings(width=70)
    assert labelled(str(err.value)).startswith("Width (output.width) must be a multiple of 8 (got 70; try 64 or 72)")
    assert labelled("Width (output.width) is empty") == "Width (output.width) is empty"  # not twice
    assert labelled("prompt must not be empty") == "Prompt (prompt) must not be empty"
    with pytest.raises(SettingsError, match=r"Seed \(output\.seed\) must be a whole number from 0 to 9007199254740991 \(got -5\)"):
        KNOB["output.seed"].parse(-5)
    assert KNOB["output.seed"].parse(5) == 5


def test_the_reports_table_is_hidden_until_a_report_has_one(ctx, tmp_path):
    plots, table, text = compare.show_report(ctx, None)
    assert plots == [] and table is None and text == "Pick a report."
    bare, full = tmp_path / "bare", tmp_path / "full"
    for folder in (bare, full):
        folder.mkdir()
        (folder / "report.md").write_text("# Evaluation\n")
    (bare / "summary.csv").write_text("method,scale\n")  # a header, no rows
    (full / "summary.csv").write_text("method,scale\nbaseline,0.8\n")
    assert [compare.report_table_shown(f)["visible"] for f in (None, bare, full)] == [False, False, True]
    assert compare.report_table_shown(tmp_path / "none")["visible"] is False
    # a report deleted after the list was made: said so, and the view is cleared
    with_reports = Context(ctx.stock, reports=[str(tmp_path)])
    assert compare.show_report(with_reports, str(full))[1] is not None
    import shutil

    shutil.rmtree(full)
    plots, table, text = compare.show_report(with_reports, str(full))
    assert plots == [] and table is None and "is no longer there" in text and "Refresh the list" in text


def test_map_titles_sit_under_the_picture():
    """The page's image label covers an overlay's top-left corner: the title goes below."""
    from lcmla.attention.overlay import overlay_heatmap

    photo = Image.new("RGB", (192, 192), (30, 160, 40))
    out = np.asarray(overlay_heatmap(photo, np.zeros((8, 8)), title="down 1 · step 0 · token 0", alpha=0.0))
    picture_w = int(out.shape[1] * 0.8) - 2
    assert (out[2, 10:picture_w - 10] == (30, 160, 40)).all()  # the top rows are the picture itself
    strip = out[-25:, :picture_w]
    assert (strip.min(-1) < 100).any() and not (out[-25:, 10:picture_w - 10] == (30, 160, 40)).all()


def test_more_messages_name_the_control_and_the_file(tmp_path):
    from lcmla.knobs import KNOB as K
    from lcmla.pngmeta import save_png
    from lcmla.ui.common import labelled

    assert (labelled("guidance.dcg_a[0] must be a finite number in [0.0, 30.0]")
            == f"{K['guidance.dcg_a'].label} (guidance.dcg_a[0]) must be a finite number in [0.0, 30.0]")
    assert "(app." not in str(pytest.raises(SettingsError, previews._PREVIEW_STEPS.parse, "first").value)
    # a garbage file named .png: no server path in the message
    fake = tmp_path / "upload-93af" / "fake.png"
    fake.parent.mkdir()
    fake.write_bytes(b"nonsense")
    message = generate.check_settings_png(None, str(fake))["message"]
    assert "'fake.png' is not an image at all" in message and str(fake.parent) not in message
    # settings that do not validate: the file is named
    bad = tmp_path / "old.png"
    good = GenerationSettings(prompt="a face")
    save_png(Image.new("RGB", (8, 8)), bad, good)
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt("lcmla:settings", good.to_json().replace('"width": null', '"width": 63'))
    Image.new("RGB", (8, 8)).save(bad, pnginfo=info)
    with pytest.raises(SettingsError, match="the settings in 'old.png' cannot be used: output.width"):
        settings_from_png(bad, name="old.png")


def test_the_step_box_takes_whole_steps_only(ctx, ui):
    state, *_ = attention.run_attention(ctx, {**ui, "app.capture_mode": "am2"}, _quiet)
    for bad in (1.5, None, ""):
        assert attention.render_maps(state, "all", bad, "0", False)[3].startswith("The step must be a whole number")
    assert attention.render_maps(state, "all", 2.0, "0", False)[0] is not None
    assert f"seed {ui['output.seed']}" in attention.render_maps(state, "all", 1, "0", False)[3]


def test_each_page_load_lists_the_reports_there_are_now(engine, tmp_path):
    """The Report dropdown's choices were fixed when the app started; a page load lists them again."""
    from lcmla.ui.demo import build_demo

    demo = build_demo(engine, reports=[str(tmp_path)])
    ctx = Context(engine, reports=[str(tmp_path)])
    assert compare.list_reports_of(ctx)()["choices"] == []
    (tmp_path / "new-run").mkdir()
    (tmp_path / "new-run" / "report.md").write_text("# Evaluation\n")
    assert compare.list_reports_of(ctx)()["choices"] == [str((tmp_path / "new-run").resolve())]
    loads = [d for d in demo.config["dependencies"] if any(t[1] == "load" for t in d["targets"])]
    dropdown = next(c["id"] for c in demo.config["components"] if c.get("props", {}).get("elem_id") == "report-choice")
    assert any(dropdown in d["outputs"] for d in loads)


def test_a_failed_request_marks_what_its_tab_still_shows(engine):
    """Gradio leaves a tab's outputs as they were when its request fails: the summary then says they
    are the request before's (or this one's unfinished part), and every button's event is followed by it."""
    from lcmla.ui.common import FAILED_MARK, failure_note, note_failures  # noqa: F401
    from lcmla.ui.demo import build_demo
    from lcmla.ui.generate import RUN_INFO_START

    done = "**1 image** · seed 7 · 0.4 s"
    old = failure_note(done)
    assert old.startswith(FAILED_MARK) and "from the request before it" in old and old.endswith(done)
    assert failure_note(old) == old  # a second failure in a row: marked once
    part = failure_note("Step 2 of 4 (t = 499) …")
    assert part.startswith(FAILED_MARK) and "before it finished" in part and part.endswith("Step 2 of 4 (t = 499) …")
    for nothing in (None, "", "  "):  # nothing shown yet: nothing to mark
        assert failure_note(nothing) == nothing
    assert failure_note(RUN_INFO_START, RUN_INFO_START) == RUN_INFO_START

    demo = build_demo(engine)
    ids = {c["props"].get("elem_id"): c["id"] for c in demo.config["components"] if c.get("props", {}).get("elem_id")}
    deps = demo.config["dependencies"]
    for button, info, cover in (("generate-btn", "run-info", "gallery"), ("previews-btn", "preview-info", "strip-x0"),
                                ("attention-btn", "map-info", "map-after"), ("compare-btn", "compare-info", "compare-gallery")):
        request = next(d for d in deps if [ids[button], "click"] in [list(t) for t in d["targets"]] and d["outputs"])
        assert ids[cover] in request["outputs"] and ids[info] in request["outputs"]
        marks = [d for d in deps if d["trigger_after"] == request["id"] and d["trigger_only_on_failure"]]
        # the summary is marked; the output where the progress showed gets its "Error" cover lifted
        assert [(m["inputs"], m["outputs"], m["api_visibility"]) for m in marks] == [
            ([ids[info]], [ids[info], ids[cover]], "private")], button
        # what it returns: the marked summary, and the covered output left as it is (an update of nothing)
        marked, left = demo.fns[marks[0]["id"]].fn(done)
        assert marked == failure_note(done) and left == gr.skip(), button


def test_faces_found_are_shown_per_photo_with_a_warning_for_each_unusable_one(ctx, face_path, tmp_path):
    """The Faces-found gallery: one boxed copy per photo with its count, the chosen face highlighted
    only when there is such a face; a photo without a face, or no image at all, warns by name."""
    assert generate.show_faces(ctx, None, 0) == [] and generate.show_faces(ctx, [], 0) == []
    grey, junk = tmp_path / "grey.png", tmp_path / "notes.png"
    Image.new("RGB", (64, 64), (128, 128, 128)).save(grey)
    junk.write_text("not an image")
    with pytest.warns(UserWarning) as said:
        shown = generate.show_faces(ctx, [str(face_path), str(grey), str(junk)], 0)
    messages = [str(w.message) for w in said]
    assert any("no face found in 'grey.png'" in m for m in messages), messages
    # the reader's own message for a non-image (an ImageError), not the unexpected-failure one
    assert any("notes.png" in m and not m.startswith("could not read") for m in messages), messages
    assert [caption for _, caption in shown] == [f"{face_path.name}: 1 face", "grey.png: 0 faces"]
    found = ctx.stock.faces.detect(str(face_path))
    highlighted = ctx.stock.faces.draw_boxes(str(face_path), found, 0)
    plain = ctx.stock.faces.draw_boxes(str(face_path), found, None)
    assert np.array_equal(np.asarray(shown[0][0]), np.asarray(highlighted))
    for index in (5, "banana"):  # no fifth face: none highlighted; an unreadable index: the first
        again = generate.show_faces(ctx, [str(face_path)], index)[0][0]
        assert np.array_equal(np.asarray(again), np.asarray(plain if index == 5 else highlighted)), index


def test_a_configuration_buttons_api_names_its_sampler_inputs_with_the_presets_defaults(ctx):
    import inspect

    from lcmla.knobs import preset_settings, settings_to_ui
    from lcmla.ui.common import api_param

    apply = generate._configuration(ctx, "am1+dcg", {}, None)
    params = inspect.signature(apply).parameters
    own = settings_to_ui(preset_settings(ctx.preset), ctx.preset)
    assert apply.__name__ == "preset_am1_dcg" and list(params) == ["left", *map(api_param, SAMPLER_KNOBS)]
    assert all(params[api_param(n)].default == own[n] for n in SAMPLER_KNOBS)


def test_reports_are_found_two_levels_down_by_their_real_path_and_named_when_gone(tmp_path):
    """find_reports: a root that is itself a report, reports one and two folders down (not three),
    each by its resolved path; read_report: a report that was listed and is gone says so, one that
    never was (outside the roots or too deep) is refused as such; summary.csv's blank lines are
    left out; a report that cannot be drawn is a warning and an empty view, not a dead tab."""
    import shutil

    def report(folder):
        folder.mkdir(parents=True)
        (folder / "report.md").write_text("# Evaluation\n")
        return str(folder.resolve())

    root = tmp_path / "runs"
    itself, one, two = report(root), report(root / "a"), report(root / "b" / "c")
    report(root / "d" / "e" / "f")  # three levels down: not looked at
    report(tmp_path / "elsewhere")
    (tmp_path / "a-file").write_text("x")
    via_dotdot = root / "a" / ".."
    assert compare.find_reports([via_dotdot, tmp_path / "a-file", tmp_path / "gone"]) == sorted([itself, one, two])
    assert compare.summary_rows(root) == []
    (root / "a" / "summary.csv").write_text("method,scale\n\nbaseline,0.8\n\n")
    assert compare.summary_rows(root / "a") == [["method", "scale"], ["baseline", "0.8"]]
    assert compare.read_report(one, [root])[1].values.tolist() == [["baseline", "0.8"]]
    for listed in (two, itself):
        shutil.rmtree(listed)
        with pytest.raises(compare.LcmlaError, match="is no longer there"):
            compare.read_report(listed, [root])
    for never in (str(root / "d" / "e" / "f" / "g"), str(tmp_path / "not-there")):
        with pytest.raises(compare.LcmlaError, match="is not an evaluation report in the --reports folders"):
            compare.read_report(never, [root])
    broken = tmp_path / "broken"
    report(broken)
    (broken / "pareto-dlib.png").write_text("not a picture")
    warned = []
    ctx = Context(SimpleNamespace(preset=None), reports=[str(broken)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gr, "Warning", lambda message, **_k: warned.append(message))
        plots, table, text = compare.show_report(ctx, str(broken.resolve()))
    assert plots == [] and table is None and "could not be read (UnidentifiedImageError" in text
    assert warned and "could not be read" in warned[0]


def test_compare_uses_the_face_chosen_in_generate(ctx, ui):
    """The Face index knob picks the face Compare uses (a photo with one face has no face 1)."""
    with pytest.raises(gr.Error, match="face_index 1 is out of range"):
        list(compare.run_compare(ctx, {**ui, "identity.face_index": 1}, _quiet))


def test_similarity_is_shown_to_three_places_or_says_no_face():
    assert compare._similarity_text(0.12345) == "0.123" and compare._similarity_text(-0.5) == "-0.500"
    assert compare._similarity_text(None) == "no face found"


def test_block_labels_read_like_the_unet():
    """A layer's processor name as the Block selector shows it; a name of another shape stays as it is."""
    assert (attention._block_label("down_blocks.1.attentions.0.transformer_blocks.1.attn2.processor")
            == "down 1 · attention 0 · layer 1")
    assert (attention._block_label("up_blocks.0.attentions.2.transformer_blocks.9.attn2.processor")
            == "up 0 · attention 2 · layer 9")
    assert attention._block_label("mid_block.attentions.0.transformer_blocks.3.attn2.processor") == "mid · attention 0 · layer 3"
    assert attention._block_label("conv_in") == "conv_in"
    assert attention._block_label("mid_block.attentions") == "mid_block.attentions"


def test_render_maps_draws_before_after_and_difference_on_the_scales_asked(monkeypatch):
    """From a hand-made store: the before map is the before one; a shared scale spans both maps;
    the difference is on a symmetric scale of its own largest change; the photo is drawn at 384 px
    at least; a choice with no maps (block, step or token) is said, not raised."""
    import torch

    import lcmla.attention.overlay as overlay
    from lcmla.attention.context import MapStore

    block = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"
    pair = torch.full((2, 2, 4, 4), 0.5)
    pair[1, 0, 1, 2], pair[1, 0, 3, 3] = 0.9, 0.1  # AM raised token 0 at one pixel, lowered it at another
    store = MapStore((8, 8), {(block, 0): pair})
    state = {"store": store, "image": Image.new("RGB", (64, 64)), "mode": "am2", "targets": ["up"], "am_steps": None,
             "notes": [], "seed": 3}
    calls = []

    def recording(base, values, **kwargs):  # noqa: ANN001, ANN202
        calls.append((base.size, float(values.min()), float(values.max()), kwargs))
        return base

    monkeypatch.setattr(overlay, "overlay_heatmap", recording)
    *_, info = attention.render_maps(state, block, 0, "0", False)
    assert "before: 0.5…0.5, after: 0.1…0.9" in info and info.startswith("AM2 · seed 3 · 1 layers")
    assert [c[0] for c in calls] == [(384, 384)] * 3
    assert [(c[3]["vmin"], c[3]["vmax"]) for c in calls[:2]] == [(None, None)] * 2  # each map its own range
    diff = calls[2][3]
    assert diff["vmin"] == pytest.approx(-0.4) and diff["vmax"] == pytest.approx(0.4) and diff["cmap"] == "coolwarm"
    calls.clear()
    mean_info = attention.render_maps(state, "up", 0, "0", True)[3]  # the mean over the up blocks, on one scale
    assert [(c[3]["vmin"], c[3]["vmax"]) for c in calls[:2]] == [(pytest.approx(0.1), pytest.approx(0.9))] * 2
    assert "before: 0.5…0.5, after: 0.1…0.9" in mean_info
    off = attention.render_maps({**state, "mode": "none", "notes": ["the prompt was cut"]}, block, 0, "1", False)[3]
    assert off.startswith("No AM · ") and "AM is off, so before and after are the same map" in off
    assert "_Note: the prompt was cut_" in off  # the request's notes stay on every redraw
    for choice in ((block, 1, "0"), ("down_blocks.9", 0, "0"), (block, 0, "7"), (block, 0, "x")):
        assert attention.render_maps(state, *choice, False)[3].startswith("No maps for that choice"), choice


def test_preview_helpers_say_what_is_missing_stamp_legibly_and_read_the_hook():
    """What an engine without the LCM-LoRA or TAESD lacks, named; the stretched label on a black
    band; whether engine.previews takes on_step, by its signature (a **kwargs wrapper passes it on)."""
    full = SimpleNamespace(adapters=("faceid", "lcm"), components=SimpleNamespace(taesd=object()))
    assert previews._preview_requirements(full) == ""
    assert previews._preview_requirements(SimpleNamespace(adapters=("faceid",), components=full.components)) == "the LCM-LoRA"
    assert (previews._preview_requirements(SimpleNamespace(adapters=(), components=SimpleNamespace(taesd=None)))
            == "the LCM-LoRA and TAESD")
    stamped = np.asarray(previews._stamp(Image.new("RGB", (48, 48), (200, 200, 200)), previews.STRETCHED))
    assert stamped.shape == (192, 192, 3)
    band = stamped[:10, :40]
    assert (band == 0).all(-1).mean() > 0.5 and (band.min(-1) > 200).any()  # light text on black
    assert (stamped[100:] == 200).all()  # the picture below the band is untouched

    def takes(settings, faces, *, steps=None, callback=None, on_step=None):  # noqa: ANN001, ANN202
        pass

    def older(settings, faces, *, steps=None, callback=None):  # noqa: ANN001, ANN202
        pass

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        pass

    assert [previews._takes_on_step(f) for f in (takes, older, wrapper)] == [True, False, True]
    assert previews._takes_on_step(object()) is False  # no signature (TypeError)
    assert previews._takes_on_step(vars) is False  # a builtin without one (ValueError)

    class NoSignature:
        __signature__ = "not a signature"

        def __call__(self, *a):  # noqa: ANN002, ANN204
            pass

    assert previews._takes_on_step(NoSignature()) is False  # inspect raises TypeError or ValueError


def test_the_shared_handler_helpers(caplog, tmp_path):
    """user_errors: a gr.Error passes as it is, a user mistake is labelled with its control under
    the tab's title, anything else is logged and named; api_param; named_handler's signature,
    defaults, docstring and its message for a wrong call; with_context's annotations;
    _face_paths for every shape Gradio hands over."""
    import logging
    import os

    from lcmla.ui import common

    mine = gr.Error("as it was")
    with pytest.raises(gr.Error) as caught, common.user_errors("Generate"):
        raise mine
    assert caught.value is mine
    with pytest.raises(gr.Error) as caught, common.user_errors("Generate"):
        raise SettingsError("output.width must be a multiple of 8")
    assert caught.value.message == "Width (output.width) must be a multiple of 8"
    assert caught.value.title == "Generate: please check the input"
    with caplog.at_level(logging.ERROR, "lcmla.app"):
        with pytest.raises(gr.Error) as caught, common.user_errors("Compare"):
            raise RuntimeError("boom")
    assert caught.value.message == "Compare failed unexpectedly (RuntimeError: boom)"
    assert caught.value.title == "Compare failed" and "Compare failed" in caplog.text and "boom" in caplog.text

    assert [common.api_param(n) for n in ("app.faces", "identity.ip_adapter_scale", "prompt")] == [
        "faces", "identity__ip_adapter_scale", "prompt"]

    def handler(ui, progress):  # noqa: ANN001, ANN202
        """What the API page shows."""
        return ui, progress

    wrapped = common.named_handler(handler, ("app.faces", "output.seed"))
    assert list(inspect_params(wrapped)) == ["faces", "output__seed", "progress"]
    assert wrapped.__name__ == "handler" and wrapped.__doc__ == "What the API page shows."
    ui, progress = wrapped("a.png", output__seed=3)
    assert ui == {"app.faces": "a.png", "output.seed": 3} and isinstance(progress, gr.Progress)
    with pytest.raises(gr.Error) as caught:
        wrapped("a.png", 3, 4, 5)
    assert caught.value.message == "handler: too many positional arguments; the parameters are faces, output__seed"

    def needs_ctx(ctx, prompt: str, seed: int = 0) -> list:  # noqa: ANN001
        return [ctx, prompt, seed]

    bound = common.with_context(needs_ctx, "the context")
    assert bound("p") == ["the context", "p", 0] and list(inspect_params(bound)) == ["prompt", "seed"]
    assert bound.__annotations__ == {"prompt": "str", "seed": "int", "return": "list"}

    class Upload:  # what gr.File hands over in some versions: an object with .name
        name = str(tmp_path / "b.png")

    class OnlyFspath(os.PathLike):
        def __fspath__(self):  # noqa: ANN204
            return str(tmp_path / "c.png")

    assert common._face_paths("a.png") == ["a.png"]
    assert common._face_paths(tmp_path / "a.png") == [str(tmp_path / "a.png")]
    assert common._face_paths(Upload()) == [Upload.name]
    assert common._face_paths(["a.png", Upload(), OnlyFspath()]) == ["a.png", Upload.name, str(tmp_path / "c.png")]
    for nothing in (None, []):
        with pytest.raises(gr.Error, match="Upload at least one photo of the face"):
            common._face_paths(nothing)
    with pytest.raises(gr.Error) as caught:
        common._face_paths([3])
    assert caught.value.message == "a face photo arrived as int, not a file: upload the photo again"


def inspect_params(fn):  # noqa: ANN001, ANN201
    import inspect

    return inspect.signature(fn).parameters


def test_the_display_helpers_and_the_request_context(tmp_path, monkeypatch):
    """Request notes escaped for Markdown; timings in the stages' order; which trained files are
    loaded; a notice above the random-weights banner; pictures scaled up by whole factors; the
    per-request folders cleared after their hour; the Weights choice; a random seed when asked;
    the progress over images × steps."""
    import os
    import time

    from lcmla.ui import common

    assert common.notes_text([]) == ""
    assert common.notes_text(["a *b* [c]_d|e#<f>`\\"], prefix="Col: ") == "  \n_Note: Col: a \\*b\\* \\[c\\]\\_d\\|e\\#\\<f\\>\\`\\\\_"
    assert common._timings_text({"total": 2.0, "decode": 0.5, "faces": 0.25, "other": 9}) == "faces 0.25 s · decode 0.50 s · total 2.00 s"
    assert common._trained_text(None).startswith("none loaded")
    both = Trained(engine=None, adapter=str(tmp_path / "ad.safetensors"), kv_lora=str(tmp_path / "kv.safetensors"))
    assert common._trained_text(both) == "adapter `ad.safetensors` · KV-encoder LoRA `kv.safetensors`"
    assert both.method == "lookahead-kv" and Trained(engine=None, adapter="a").method == "baseline"
    random_preset = SimpleNamespace(preset=SimpleNamespace(random_weights=True))
    banner = common._banner(random_preset, "the weights are missing")
    assert banner.startswith("⚠️ the weights are missing\n\n⚠️ **Random weights")
    assert common._banner(SimpleNamespace(preset=SimpleNamespace(random_weights=False)), None) == ""
    small = Image.new("RGB", (50, 30))
    assert common._at_least(small, 192).size == (200, 120)  # ×4: the first whole factor reaching 192
    assert common._at_least(small, 100).size == (100, 60) and common._at_least(small, 50) is small

    monkeypatch.setattr(common.tempfile, "gettempdir", lambda: str(tmp_path))
    outputs = common._Outputs()
    old, recent = outputs.new(), outputs.new()
    hour_ago = time.time() - common.OUTPUT_TTL_S - 5
    os.utime(old, (hour_ago, hour_ago))
    newest = outputs.new()
    assert not old.exists() and recent.is_dir() and newest.is_dir() and newest.parent == tmp_path / "lcmla-app"

    stock, trained = SimpleNamespace(preset=SimpleNamespace(steps=4)), SimpleNamespace(name="trained")
    ctx = Context(stock)
    assert ctx.pick_engine({}) is stock and ctx.pick_engine({"app.weights": "stock"}) is stock
    with pytest.raises(gr.Error, match="no trained weights are loaded"):
        ctx.pick_engine({"app.weights": "trained"})
    with pytest.raises(gr.Error, match="weights must be one of stock, trained, not 'mine'"):
        ctx.pick_engine({"app.weights": "mine"})
    assert Context(stock, trained=Trained(engine=trained)).pick_engine({"app.weights": "trained"}) is trained

    seen = []
    report = ctx.step_progress(lambda value, desc: seen.append((value, desc)),
                               GenerationSettings(prompt="p").replace(output__num_images=2))
    for image, step in ((0, 0), (1, 0), (0, 1)):
        report(SimpleNamespace(step=step, num_steps=4, image_index=image))
    assert seen == [((1, 8), "step 1/4 · image 1/2"), ((2, 8), "step 1/4 · image 2/2"), ((3, 8), "step 2/4 · image 1/2")]
    one = ctx.step_progress(lambda value, desc: seen.append((value, desc)), GenerationSettings(prompt="p"))
    for _ in range(6):  # more steps than the settings said (a scheduler that adds one): the bar never overflows
        one(SimpleNamespace(step=0, num_steps=4, image_index=0))
    assert seen[-1][0] == (6, 6)


def test_previews_ask_for_the_tabs_lcm_scale_and_stretch_random_weights_pictures(engine, ui):
    """The tab's LCM-LoRA scale reaches the engine as lookahead.lcm_lora_scale (one image); on a
    random-weights preset the near-black previews are contrast-stretched."""
    assert engine.preset.random_weights  # the tiny preset: its previews are stretched
    dark = np.zeros((32, 32, 3), np.uint8)
    dark[:16] = 10
    dark[16:] = 30

    class Previewing(PassThrough):
        asked: list = []

        def previews(self, settings, faces, steps=None, callback=None, on_step=None):  # noqa: ANN001, ANN201
            self.asked.append(settings)
            frame = SimpleNamespace(step=0, timestep=999, x0=Image.fromarray(dark), lcm=Image.fromarray(dark))
            callback(frame)
            return SimpleNamespace(frames=[frame], image=Image.fromarray(dark), timings={}, notes=[])

    fake = Previewing(engine)
    asked = {**ui, "output.num_images": 3, "app.preview_lcm_scale": 0.35, "app.preview_steps": ""}
    x0, lcm, final, info = list(previews.run_previews(Context(fake), asked, _quiet))[-1]
    settings = fake.asked[0]
    assert settings.lookahead.lcm_lora_scale == 0.35 and settings.output.num_images == 1
    assert "LCM-LoRA scale 0.35" in info and "**1 step previewed**" in info
    for strip in (x0, lcm):
        picture, caption = strip[0]
        shown = np.asarray(picture.convert("RGB"))[24:]  # below the stamped band
        assert shown.min() == 0 and shown.max() == 255, (shown.min(), shown.max())  # 10…30 stretched to 0…255
        assert caption == f"step 1 · t=999 · {previews.STRETCHED}"


def test_a_knobs_widget_carries_its_info_placeholder_and_room_and_the_seed_is_new_when_asked(ctx, ui):
    from lcmla.ui.common import widget

    with gr.Blocks():
        prompt = widget(KNOB["prompt"], "a face")
        steps = widget(KNOB["attention.steps"], "")
    assert prompt.info == KNOB["prompt"].info and prompt.placeholder == "a pencil drawing of a face"
    assert prompt.lines == 2 and prompt.max_lines == 4 and steps.max_lines == 4 and steps.placeholder == "every step"
    fixed = ctx.request_settings({**ui, "output.seed": 5})
    drawn = {ctx.request_settings({**ui, "output.seed": 5, "app.randomize_seed": True}).output.seed for _ in range(3)}
    assert fixed.output.seed == 5 and 5 not in drawn and len(drawn) == 3  # 2**31 choices: a repeat is 1 in 10**9
