"""The web app: its knob table, then every tab end to end through gradio_client on the tiny preset."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from apputils import ROOT, CountingEngine, serve  # first: puts the repository root (app.py) on sys.path
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError

import app
from lcmla import GenerationSettings, SettingsError, settings_from_png
from lcmla.presets import get_preset
from lcmla.methods import method_changes

SIZE = 64  # the smallest size the settings allow: keeps the model calls cheap
# gradio's queue calls a pandas option that pandas 3 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword is deprecated).*")


# ---- without a server -------------------------------------------------------------------------


def test_importing_the_app_loads_no_torch():
    code = (
        "import sys, app\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'lcmla.engine') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert callable(app.build_demo) and callable(app.main)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_every_setting_has_exactly_one_knob():
    flat = {k for k in app._flatten(GenerationSettings().to_dict())}
    assert len(set(app.KNOB_NAMES)) == len(app.KNOB_NAMES)
    assert set(app.KNOB_NAMES) == flat - app.NOT_KNOBS
    assert app.GENERATE_INPUTS == ("app.faces", *app.KNOB_NAMES, "app.randomize_seed", "app.weights")


def test_settings_round_trip_through_the_widgets():
    tiny = get_preset("tiny")
    settings = GenerationSettings(prompt="an oil painting of a face", negative_prompt="blurry", preset="tiny").replace_dotted({
        **method_changes("am2", "tiny"),
        "guidance.dcg_a": [1, 2.5, 2, 1], "guidance.dcg_variant": "text-first", "attention.steps": [1, 2], "attention.tokens": [1, 3],
        "attention.targets": ["mid", "up"], "identity.face_index": 2, "lookahead.kv": True, "freeu.enabled": True,
        "freeu.s2": 0.3, "output.seed": 12345, "output.width": 128, "output.height": 96, "guidance.steps": 6,
        "guidance.guidance_scale": 1.5, "guidance.scheduler": "DPMSolverMultistepScheduler",
        "lookahead.reference_framing": "face",
    })
    ui = app.settings_to_ui(settings, tiny)
    assert ui["guidance.dcg_a"] == "1, 2.5, 2, 1" and ui["attention.steps"] == "1, 2" and ui["attention.tokens"] == ["1", "3"]
    assert app.settings_from_ui(ui, tiny) == settings
    # open fields show the preset's defaults; the defaults build valid settings
    defaults = app.ui_defaults(tiny)
    assert (defaults["output.width"], defaults["guidance.steps"]) == (tiny.width, tiny.steps)
    assert app.settings_from_ui(defaults, tiny) == app.preset_settings(tiny)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("guidance.dcg_a", "1, banana", r"a per step \(guidance\.dcg_a\).*not a list of numbers"),
        ("guidance.dcg_b", "  ", r"dcg_b\) is empty"),
        ("attention.steps", "1.5", r"whole numbers"),
        ("output.seed", None, r"Seed \(output\.seed\) is empty"),
        ("guidance.rescale_phi", 7.0, r"guidance\.rescale_phi must be a finite number in \[0\.0, 1\.0\]"),
        ("output.width", 100, r"output\.width must be a multiple of 8"),
    ],
)
def test_bad_widget_values_name_the_control(name, value, message):
    tiny = get_preset("tiny")
    with pytest.raises(SettingsError, match=message):
        app.settings_from_ui({**app.ui_defaults(tiny), name: value}, tiny)


def test_command_line_defaults_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LCMLA_PRESET", "sdxl-turbo")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    args = app.parse_args([])
    assert (args.preset, args.host, args.port, args.share) == ("sdxl-turbo", "0.0.0.0", 7999, False)
    for var in ("LCMLA_PRESET", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(var)
    args = app.parse_args(["--weights-dir", "/w", "--device", "cpu", "--share"])
    assert (args.preset, args.host, args.port, args.weights_dir, args.device, args.share) == ("tiny", "127.0.0.1", 7860, "/w", "cpu", True)
    with pytest.raises(SystemExit):
        app.parse_args(["--preset", "no-such-preset"])



def test_a_taken_port_is_one_line_before_the_model_loads(monkeypatch, capsys):
    """python app.py on a port another server holds: one line naming the port and --port, exit 2,
    and no model is loaded first (it was gradio's OSError traceback after the load)."""
    import socket

    import lcmla.ui.cli as cli

    monkeypatch.setattr(cli, "load_engine", lambda args: pytest.fail("the engine was loaded"))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert cli.main(["--port", str(port)]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"error: cannot listen on 127.0.0.1:{port} (") and f"--port {port + 1}" in out, out
    assert cli.port_problem("127.0.0.1", port) is None  # released: free again


def test_a_bad_gradio_server_port_is_one_line_before_gradio_is_imported():
    """gradio reads $GRADIO_SERVER_PORT with int() on import: 'abc' was its ValueError traceback."""
    from lcmla.argtypes import server_port_env_problem

    assert server_port_env_problem({}) is None and server_port_env_problem({"GRADIO_SERVER_PORT": "7861"}) is None
    for bad in ("abc", "", "0", "70000", "-5"):
        assert "is not a port number (1 to 65535)" in server_port_env_problem({"GRADIO_SERVER_PORT": bad}), bad
    run = subprocess.run([sys.executable, str(ROOT / "app.py"), "--help"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "GRADIO_SERVER_PORT": "abc"})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == ("error: GRADIO_SERVER_PORT='abc' is not a port number (1 to 65535): set it to one, "
                                  "or unset it and pass --port")


def test_spaces_gpu_decorator_only_when_spaces_is_importable(monkeypatch):
    import types

    def fn():
        return 1

    monkeypatch.setitem(sys.modules, "spaces", None)  # import spaces -> ImportError
    assert app._gpu(fn) is fn
    wrapped = []
    fake = types.SimpleNamespace(GPU=lambda f: wrapped.append(f) or (lambda: 2))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert app._gpu(fn)() == 2 and wrapped == [fn]


def test_python_app_py_serves_tiny_with_a_banner_when_weights_are_missing(tiny_cache, tmp_path):
    """The README's main command, on a machine without the chosen preset's weights."""
    import json
    import urllib.request

    from apputils import free_port

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LCMLA_CACHE": str(tiny_cache), "LCMLA_PRESET": "hyper-sdxl-4step",
           "INSIGHTFACE_HOME": str(tmp_path / "no-insightface"), "HF_HOME": str(tmp_path / "hf"),
           "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "app.py", "--weights-dir", str(tmp_path / "none")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        config = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as reply:
                    config = json.loads(reply.read())
                break
            except OSError:
                time.sleep(1)
        assert config is not None, f"app.py did not serve (exit code {proc.poll()})"
        text = json.dumps(config)
        assert "Random weights" in text and "are not on this machine" in text and "hyper-sdxl-4step" in text
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert "tiny preset has random weights" in out


# ---- through the server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def counting(engine):
    return CountingEngine(engine)


@pytest.fixture(scope="module")
def client(counting):
    with serve(counting) as (_demo, url):
        yield Client(url, verbose=False)


@pytest.fixture(scope="module")
def values(engine, face_path):
    """Widget values of a good small request, by input name."""
    return {**app.ui_defaults(engine.preset), "app.faces": [handle_file(str(face_path))], "output.width": SIZE,
            "output.height": SIZE, "prompt": "a pencil drawing of a face"}


def _kw(values, names=app.GENERATE_INPUTS, **changes):
    """The request as the API's named parameters (every endpoint is called by name)."""
    merged = {**values, **changes}
    return {app.api_param(name): merged[name] for name in names}


def _pixels(item) -> np.ndarray:
    from PIL import Image

    path = item["image"] if isinstance(item, dict) else item
    path = path["path"] if isinstance(path, dict) else path
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.int16)


def _generate(client, values, **changes):
    gallery, files, info, found, seed, settings_json = client.predict(**_kw(values, **changes), api_name="/generate")
    return gallery, files, info, found, seed, settings_json


def test_generate_end_to_end(client, values):
    gallery, files, info, found, seed, settings_json = _generate(client, values, **{"output.num_images": 2, "output.seed": 5})
    assert [g["caption"] for g in gallery] == ["seed 5", "seed 6"]
    assert _pixels(gallery[0]).shape == (SIZE, SIZE, 3) and _pixels(gallery[0]).std() > 1.0
    assert len(files) == 2 and all(str(f).endswith(".png") for f in files)
    assert "seeds 5, 6" in info and "Random weights" in info
    assert len(found) == 1 and found[0]["caption"] == "used face" and _pixels(found[0]).shape[2] == 3
    assert seed == 5
    # each download reproduces its own image: its settings, its seed, one image
    stored = settings_from_png(files[1])
    assert stored.output.seed == 6 and stored.output.num_images == 1 and stored.prompt == "a pencil drawing of a face"
    assert GenerationSettings.from_json(settings_json).output.num_images == 2
    assert np.array_equal(_pixels(files[1]), _pixels(gallery[1]))


@pytest.fixture(scope="module")
def first_image(client, values):
    """The image of the good small request, seed 0."""
    return _pixels(_generate(client, values)[0][0])


def test_other_knobs_change_the_image_and_repeating_gives_it_again(client, values, first_image):
    other = _pixels(_generate(client, values, **{"guidance.dcg": True, "identity.ip_adapter_scale": 0.2})[0][0])
    assert np.abs(first_image - other).mean() > 0.1
    again = _generate(client, values, **{"app.randomize_seed": True})  # a new seed, shown in the seed field
    seed = again[4]
    assert 0 <= seed < 2**31 and again[0][0]["caption"] == f"seed {seed}"
    if seed != 0:
        assert not np.array_equal(_pixels(again[0][0]), first_image)
    assert np.array_equal(_pixels(_generate(client, values)[0][0]), first_image)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("bad")
    (folder / "notes.txt").write_text("not a photo\n")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    Image.new("RGB", (256, 256), (128, 128, 128)).save(folder / "grey.png")
    return folder


def test_bad_inputs_give_messages_and_the_next_request_works(client, values, bad_files, first_image):
    cases = [
        ({"app.faces": [handle_file(str(bad_files / "notes.txt"))]}, r"(?i)invalid file type"),
        ({"app.faces": [handle_file(str(bad_files / "broken.png"))]}, r"broken\.png"),
        ({"app.faces": [handle_file(str(bad_files / "grey.png"))]}, r"no face found in face photo 'grey\.png'"),
        ({"app.faces": None}, r"Upload at least one photo"),
        ({"output.width": 100000}, r"greater than maximum"),
        ({"output.num_images": 0}, r"less than minimum"),
        ({"output.width": 70}, r"Width \(output\.width\) must be a multiple of 8 \(got 70; try 64 or 72\)"),
        ({"output.seed": -5}, r"Seed \(output\.seed\) must be a whole number from 0 to 9007199254740991 \(got -5\)"),
        ({"output.seed": 1.5}, r"Seed \(output\.seed\) must be a whole number \(got 1\.5\)"),  # not rounded to 2
        ({"guidance.dcg_a": "1, banana"}, r"guidance\.dcg_a"),
        ({"guidance.dcg": True, "guidance.dcg_schedule": "linear"}, r"two values \(start, end\)"),
        ({"prompt": "   "}, r"Prompt \(prompt\) must not be empty"),
        ({"prompt": "x" * 5000}, r"at most 2000"),
    ]
    for changes, message in cases:
        with pytest.raises(AppError, match=message):
            _generate(client, values, **changes)
    assert np.array_equal(_pixels(_generate(client, values)[0][0]), first_image)  # nothing leaked


def test_face_boxes_on_upload(client, face_path, bad_files):
    found = client.predict([handle_file(str(face_path))], 0, api_name="/detect_faces")
    assert len(found) == 1 and found[0]["caption"] == "face.png: 1 face"
    grey = client.predict([handle_file(str(bad_files / "grey.png"))], 0, api_name="/detect_faces")
    assert grey[0]["caption"] == "grey.png: 0 faces"  # a warning toast, not an error


def test_one_click_configurations_and_settings_from_a_png(client, values):
    updates = client.predict(api_name="/preset_am2_dcg")
    by_name = dict(zip(app.KNOB_NAMES, updates))
    assert by_name["attention.mode"] == "am2" and by_name["guidance.dcg"] is True
    assert by_name["guidance.dcg_a"] == "1, 1.5, 1.5, 1" and by_name["lookahead.kv"] is False
    assert by_name["prompt"] == {"__type__": "update"}  # everything else stays the user's
    kv = dict(zip(app.KNOB_NAMES, client.predict(api_name="/preset_lookahead_kv")))
    assert kv["lookahead.kv"] is True and kv["freeu.enabled"] is True and kv["attention.mode"] == "none"

    made = {**values, "attention.mode": "am1", "guidance.dcg": True, "output.seed": 77, "identity.lora_scale": 0.55}
    files = _generate(client, made)[1]
    loaded = dict(zip(app.KNOB_NAMES, client.predict(handle_file(str(files[0])), api_name="/load_settings")))
    for name in ("attention.mode", "guidance.dcg", "output.seed", "identity.lora_scale", "prompt", "output.width"):
        assert loaded[name] == made[name], name
    # refused by the box's validator, by the file's own name (not the server's temporary path)
    with pytest.raises(ValidationError, match="'face.png' holds no lcmla settings") as refused:
        client.predict(handle_file(str(ROOT / "assets" / "face.png")), api_name="/load_settings")
    assert "gradio" not in str(refused.value)
    # after "as released" (DPM-Solver++, 50 steps, λ 1.0) a FastFace button puts the preset's sampler back
    released = dict(zip(app.KNOB_NAMES, client.predict(api_name="/preset_lookahead_released")))
    assert released["guidance.steps"] == 50
    back = dict(zip(app.KNOB_NAMES, client.predict("DPMSolverMultistepScheduler", 50, 1.0, api_name="/preset_baseline")))
    assert back["guidance.steps"] == values["guidance.steps"] and back["identity.ip_adapter_scale"] == values["identity.ip_adapter_scale"]


def test_previews_stream_one_frame_per_step(client, values, counting):
    job = client.submit(**_kw(values, app.PREVIEW_INPUTS, **{"app.preview_lcm_scale": 0.5, "app.preview_steps": ""}),
                        api_name="/previews")
    x0, lcm, final, info = job.result(timeout=300)
    outputs = job.outputs()
    assert len(outputs) >= 2  # frames arrived before the end
    steps = values["guidance.steps"]
    assert len(x0) == len(lcm) == steps
    assert [f["caption"].split(" · ")[0] for f in x0] == [f"step {k + 1}" for k in range(steps)]
    assert _pixels(final).shape == (SIZE, SIZE, 3)
    assert "LCM-LoRA scale 0.5" in info
    assert counting.calls[-1] == "previews"
    # a chosen subset of steps
    x0, lcm, final, info = client.predict(
        **_kw(values, app.PREVIEW_INPUTS, **{"app.preview_lcm_scale": 1.0, "app.preview_steps": "1, 3"}), api_name="/previews")
    assert [f["caption"].split(" · ")[0] for f in lcm] == ["step 2", "step 4"] and "2 steps previewed" in info
    with pytest.raises(AppError, match="Steps to preview"):
        client.predict(**_kw(values, app.PREVIEW_INPUTS, **{"app.preview_lcm_scale": 1.0, "app.preview_steps": "one"}),
                       api_name="/previews")


def test_attention_maps_redraw_without_generating(client, values, counting):
    block, step, token, before, after, diff, info = client.predict(
        **_kw(values, app.ATTENTION_INPUTS, **{"app.capture_mode": "am2"}), api_name="/attention_maps")
    assert "AM2" in info and block["value"] == "all" and any(value == "up" for _label, value in block["choices"])
    layers = [value for _label, value in block["choices"] if "." in value]
    assert layers and token["choices"][-1][1] == "3"
    assert not np.array_equal(_pixels(before), _pixels(after))  # AM2 changes the maps
    assert _pixels(diff).shape == _pixels(after).shape
    calls = len(counting.calls)
    redraw = client.predict(layers[-1], step["maximum"], "2", True, api_name="/render_maps")
    assert redraw[0] and redraw[1] and redraw[2] and "before:" in redraw[3]
    assert not np.array_equal(_pixels(redraw[0]), _pixels(before))
    mean_up = client.predict("up", 1, "1", False, api_name="/render_maps")
    assert mean_up[0] and "step" in mean_up[3]
    assert len(counting.calls) == calls  # redraws come from the stored maps
    # no AM: before and after are the same maps, and the difference is zero everywhere
    none = client.predict(**_kw(values, app.ATTENTION_INPUTS, **{"app.capture_mode": "none"}), api_name="/attention_maps")
    assert np.array_equal(_pixels(none[3]), _pixels(none[4])) and "AM is off" in none[6]
    with_am = client.predict(**_kw(values, app.ATTENTION_INPUTS, **{"app.capture_mode": "am2"}), api_name="/attention_maps")
    assert not np.array_equal(_pixels(none[5]), _pixels(with_am[5]))


def test_difference_view_is_zero_without_am():
    """The difference overlay of equal maps draws the photo under the neutral colour everywhere."""
    from PIL import Image

    from lcmla.attention.overlay import overlay_heatmap

    photo = Image.new("RGB", (64, 64), (120, 120, 120))
    maps = np.random.default_rng(0).random((8, 8))
    zero = np.asarray(overlay_heatmap(photo, maps - maps, cmap="coolwarm", vmin=-1e-8, vmax=1e-8, label="x"), np.int16)
    some = np.asarray(overlay_heatmap(photo, maps - 0.5, cmap="coolwarm", vmin=-0.5, vmax=0.5, label="x"), np.int16)
    w = zero.shape[1] * 8 // 10  # the map, left of the colour bar
    assert zero[:, :w].std() < some[:, :w].std()


def test_compare_runs_every_method_with_the_same_seed(client, values):
    job = client.submit(**_kw(values, **{"output.seed": 3}), api_name="/compare")
    gallery, table, info = job.result(timeout=300)
    assert [g["caption"].split(":")[0] for g in gallery] == [label for _key, label in app.COMPARE_METHODS]
    rows = table["data"]
    assert [r[0] for r in rows] == [label for _key, label in app.COMPARE_METHODS]
    for _method, similarity, seconds, branches in rows:
        assert similarity == "no face found" or -1.0 <= float(similarity) <= 1.0
        assert seconds > 0 and branches
    assert rows[0][3] == "1 1 1 1" and rows[3][3].split()[0] == "4"  # baseline: one branch; KV path: four
    assert "Seed 3" in info and "not a face recognizer" in info
    assert len(job.outputs()) >= 2  # each method shows up as soon as it is done


def test_header_says_where_the_face_models_run():
    from types import SimpleNamespace

    def engine(providers):
        return SimpleNamespace(faces=SimpleNamespace(providers=providers))

    assert app._providers(engine(("CUDAExecutionProvider", "CPUExecutionProvider"))) == " on CUDA"
    assert app._providers(engine(("CPUExecutionProvider",))) == " on CPU"
    assert app._providers(engine(())) == ""  # the Haar stand-in runs in OpenCV


def test_the_api_names_every_parameter(client, face_path, first_image):
    # the parameters left out keep the app's defaults: the same image as the full request
    gallery, *_ = client.predict(faces=[handle_file(str(face_path))], prompt="a pencil drawing of a face",
                                 output__width=SIZE, output__height=SIZE, api_name="/generate")
    assert np.array_equal(_pixels(gallery[0]), first_image)
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for endpoint, names in (("/generate", app.GENERATE_INPUTS), ("/previews", app.PREVIEW_INPUTS),
                            ("/attention_maps", app.ATTENTION_INPUTS), ("/compare", app.GENERATE_INPUTS)):
        params = [p["parameter_name"] for p in info[endpoint]["parameters"]]
        assert params == [app.api_param(n) for n in names], endpoint
        assert not any(p.startswith("param_") for p in params)
    assert "identity__ip_adapter_scale" in [p["parameter_name"] for p in info["/generate"]["parameters"]]
    for endpoint, api in info.items():  # every endpoint says what it does, every output what it is
        assert api["description"] and not api["description"].startswith("partial("), endpoint
        assert not [r["label"] for r in api["returns"] if r["label"].startswith("value_")], endpoint
    assert "authors' configuration 'AM2 + DCG'" in info["/preset_am2_dcg"]["description"]
    from_settings = info["/generate_from_settings"]["parameters"]
    assert [p["parameter_name"] for p in from_settings] == ["faces", "settings_json", "prompt"]
    assert [p["parameter_has_default"] for p in from_settings] == [False, False, True]  # the prompt is optional
    assert [r["label"] for r in info["/generate_from_settings"]["returns"]] == ["images", "settings_json", "info"]
    from lcmla.ui.common import FACE_EXAMPLE_URL

    for endpoint in ("/generate", "/previews", "/attention_maps", "/compare", "/generate_from_settings"):
        faces = info[endpoint]["parameters"][0]  # its example is a face photo, not Gradio's sample PDF
        assert [f["url"] for f in faces["example_input"]] == [FACE_EXAMPLE_URL], endpoint


def test_settings_json_endpoint_reproduces_a_png(client, values, face_path):
    _gallery, files, *_ = _generate(client, values, **{"output.seed": 11, "guidance.dcg": True})
    stored = settings_from_png(files[0])
    images, used, info = client.predict(faces=[handle_file(str(face_path))], settings_json=stored.to_json(),
                                        api_name="/generate_from_settings")
    assert np.array_equal(_pixels(images[0]), _pixels(files[0]))
    assert GenerationSettings.from_json(used) == stored  # the settings that ran are the PNG's
    returned = images[0]["image"]["path"] if isinstance(images[0]["image"], dict) else images[0]["image"]
    assert Path(returned).name == "lcmla-11.png" and settings_from_png(returned) == stored  # settings embedded
    assert "seeds 11" in info and "prompt: the JSON's" in info and "the settings name the" not in info
    with pytest.raises(AppError, match="settings_json"):
        client.predict(faces=[handle_file(str(face_path))], settings_json="{not json", api_name="/generate_from_settings")
    with pytest.raises(AppError, match="settings_json is empty"):
        client.predict(faces=[handle_file(str(face_path))], settings_json=" ", api_name="/generate_from_settings")
    with pytest.raises(AppError, match="guidance"):
        client.predict(faces=[handle_file(str(face_path))], settings_json='{"guidance": {"steps": -3}}',
                       api_name="/generate_from_settings")


def test_settings_json_endpoint_takes_a_prompt_and_names_another_preset(client, values, face_path):
    """A non-empty prompt replaces the JSON's (the image is /generate's with that prompt); settings
    that name another preset run on the app's and the info says so."""
    other_prompt = "an oil painting of a face"
    made = _generate(client, values, **{"output.seed": 12, "prompt": other_prompt})[1][0]
    stored = settings_from_png(_generate(client, values, **{"output.seed": 12})[1][0])
    assert stored.prompt != other_prompt
    images, used, info = client.predict(faces=[handle_file(str(face_path))], settings_json=stored.to_json(),
                                        prompt=other_prompt, api_name="/generate_from_settings")
    assert np.array_equal(_pixels(images[0]), _pixels(made))
    assert GenerationSettings.from_json(used).prompt == other_prompt and "prompt parameter" in info
    assert "note:" not in info
    _images, _used, info = client.predict(faces=[handle_file(str(face_path))], settings_json=stored.to_json(),
                                          prompt="a pencil drawing of a face, " * 20, api_name="/generate_from_settings")
    assert "note: prompt is" in info and "text encoders read the first 75" in info  # the engine's note
    # a blank prompt keeps the JSON's
    _images, used, _info = client.predict(faces=[handle_file(str(face_path))], settings_json=stored.to_json(),
                                          prompt="   ", api_name="/generate_from_settings")
    assert GenerationSettings.from_json(used).prompt == stored.prompt
    # another preset's settings: they run on this app's preset, and the info says so
    elsewhere = stored.replace(preset="hyper-sdxl-4step")
    images, used, info = client.predict(faces=[handle_file(str(face_path))], settings_json=elsewhere.to_json(),
                                        api_name="/generate_from_settings")
    assert GenerationSettings.from_json(used).preset == "tiny"
    assert "the settings name the 'hyper-sdxl-4step' preset but this app runs 'tiny'" in info
    with pytest.raises(AppError, match="at most 2000"):
        client.predict(faces=[handle_file(str(face_path))], settings_json=stored.to_json(), prompt="x" * 5000,
                       api_name="/generate_from_settings")


def test_settings_json_endpoint_over_the_rest_route(client, values, face_path):
    """The README's curl example: upload, POST /gradio_api/call/generate_from_settings with the
    positional data [faces, settings_json, prompt], then read the event stream."""
    import json

    import httpx

    stored = settings_from_png(_generate(client, values, **{"output.seed": 13})[1][0])
    base = client.src.rstrip("/")
    with face_path.open("rb") as f:
        uploaded = httpx.post(f"{base}/gradio_api/upload", files={"files": ("face.png", f, "image/png")}).json()[0]
    body = {"data": [[{"path": uploaded, "meta": {"_type": "gradio.FileData"}}], stored.to_json(), "a sketch of a face"]}
    event = httpx.post(f"{base}/gradio_api/call/generate_from_settings", json=body).json()["event_id"]
    stream = httpx.get(f"{base}/gradio_api/call/generate_from_settings/{event}", timeout=300).text
    assert "event: complete" in stream, stream[-2000:]
    data = json.loads(stream.split("event: complete", 1)[1].split("data:", 1)[1].strip().splitlines()[0])
    images, used, info = data
    assert len(images) == 1 and GenerationSettings.from_json(used).prompt == "a sketch of a face"
    assert GenerationSettings.from_json(used).output.seed == 13 and "seeds 13" in info


def test_the_cache_clean_up_spares_the_example_photos(engine, tmp_path):
    """The page's timed ``delete_cache`` clean-up removes files the app made, but not the examples'
    cached copies: Gradio makes those once, at build time, and every example row would fail
    after an hour without them."""
    from gradio.route_utils import delete_files_created_by_app

    demo = app.build_demo(engine)
    cached = {f for s in demo.temp_file_sets for f in s if Path(f).name == "face.png"}
    assert cached and all(Path(f).is_file() for f in cached)
    made = tmp_path / "made-by-a-request.png"
    made.write_bytes(b"x")
    demo.temp_file_sets[0].add(str(made))
    delete_files_created_by_app(demo, age=0)  # what the schedule runs, with every file past its age
    assert all(Path(f).is_file() for f in cached)
    assert not made.exists()  # the clean-up still runs for everything else
