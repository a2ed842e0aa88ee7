"""The command line: generation, --settings-from, and one-line errors for user mistakes."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from util import logged_messages

from lcmla.cli import main, settings_from_args, build_parser
from lcmla.errors import LcmlaError
from lcmla.presets import LIGHTNING_REPO, PRESETS

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_cache) -> subprocess.CompletedProcess:
    env = {**os.environ, "LCMLA_CACHE": str(tmp_cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lcmla", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_generate_and_reproduce(tiny_cache, face_path, tmp_path):
    out = tmp_path / "out"
    r = _run(["generate", "--face", str(face_path), "--prompt", "a pencil drawing of a face", "--preset", "tiny",
              "--seed", "7", "--num-images", "2", "--set", "identity.lora_scale=0.5", "--out", str(out)], tiny_cache)
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["lcmla-7.png", "lcmla-8.png"]
    assert "random weights" in r.stderr and "denoising" in r.stderr  # banner + progress bar
    assert "on cpu, memory mode full" in r.stderr  # which device and memory mode ran, also when not asked for
    again = tmp_path / "again"
    r2 = _run(["generate", "--settings-from", str(files[1]), "--face", str(face_path), "--out", str(again),
               "--quiet"], tiny_cache)
    assert r2.returncode == 0, r2.stderr
    # --quiet: no bars, not even the loaders'; and no "install torchvision" warning (lcmla needs none)
    assert "Loading pipeline components" not in r2.stderr and "denoising" not in r2.stderr
    assert "torchvision" not in r.stderr + r2.stderr
    from PIL import Image

    a = np.asarray(Image.open(files[1]).convert("RGB"))
    b = np.asarray(Image.open(again / "lcmla-8.png").convert("RGB"))
    assert np.array_equal(a, b)
    shown = _run(["show", str(files[1])], tiny_cache)
    assert '"lora_scale": 0.5' in shown.stdout and '"seed": 8' in shown.stdout


def test_cli_user_error_is_one_line_without_traceback(tiny_cache, tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_text("hello")
    r = _run(["generate", "--face", str(junk), "--prompt", "a face", "--quiet", "--out", str(tmp_path)], tiny_cache)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "junk.jpg" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error:")


BAD_FLAGS = [
    (["--steps", "0"], "guidance.steps"),
    (["--width", "100"], "output.width"),
    (["--ip-adapter-scale", "nan"], "identity.ip_adapter_scale"),
    (["--set", "attention.mode=am9"], "attention.mode"),
    (["--set", "nonsense"], "KEY=VALUE"),
    (["--set", "guidance.bogus=1"], "unknown setting"),
    (["--num-images", "0"], "output.num_images"),
]


@pytest.mark.parametrize("flags,needle", BAD_FLAGS, ids=[n for _, n in BAD_FLAGS])
def test_cli_invalid_settings_exit_2_before_loading(flags, needle, face_path, capsys, monkeypatch):
    import lcmla.engine

    monkeypatch.setattr(lcmla.engine.Engine, "load", classmethod(lambda *a, **k: pytest.fail("loaded a model")))
    code = main(["generate", "--face", str(face_path), "--prompt", "a face", *flags])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_an_unusable_out_folder_is_refused_before_loading(face_path, tmp_path, capsys, monkeypatch):
    """--out naming a file (or a folder under one) failed with a traceback after the images were made."""
    import lcmla.engine

    monkeypatch.setattr(lcmla.engine.Engine, "load", classmethod(lambda *a, **k: pytest.fail("loaded a model")))
    assert main(["generate", "--face", str(tmp_path / "nobody.jpg"), "--prompt", "a face", "--out", str(tmp_path)]) == 2
    assert "--face " + str(tmp_path / "nobody.jpg") + ": no such file" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    for out, said in ((tmp_path / "afile", "is a file, not a folder"), (tmp_path / "afile" / "sub", "cannot be created")):
        assert main(["generate", "--face", str(face_path), "--prompt", "a face", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert said in err and "--out" in err and "Traceback" not in err


def test_devices_are_checked_with_a_message():
    import torch

    from lcmla.engine import check_device

    assert check_device("cpu") == "cpu"
    with pytest.raises(LcmlaError, match="unknown device 'tpu': pass cpu, cuda"):
        check_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LcmlaError, match="CUDA is not available here.*--device cpu"):
            check_device("cuda")
    else:
        with pytest.raises(LcmlaError, match="CUDA device"):
            check_device(f"cuda:{torch.cuda.device_count()}")


def test_cli_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--prompt", "x", "--steps"])  # a flag without its value (--face is optional: text only)
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["generate", "--face", "a.jpg", "--prompt", "x", "--preset", "nope"])
    assert info.value.code == 2


def test_cli_settings_precedence(face_path, tmp_path):
    args = build_parser().parse_args(["generate", "--face", "a.jpg", "--prompt", "p", "--seed", "4",
                                      "--set", "guidance.dcg_a=[1, 2]", "--set", "guidance.dcg_schedule=linear",
                                      "--set", "guidance.dcg_b=[1,3]"])
    s = settings_from_args(args)
    assert s.output.seed == 4 and s.guidance.dcg_a == (1.0, 2.0) and s.guidance.dcg_schedule == "linear"


def test_cli_presets_lists_all(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "hyper-sdxl-4step", "sdxl-lightning-4step", "sdxl-lcm-lora", "sdxl-turbo", "sdxl-base"):
        assert name in out
    assert PRESETS["tiny"].notes in out  # a preset's notes, on the line under it


def test_missing_real_weights_message(monkeypatch, tmp_path, face_path, capsys):
    """A real preset on a machine without weights: one message, every file, the fetch commands."""
    from faceutils import write_tiny_buffalo

    packs = write_tiny_buffalo(tmp_path / "buffalo")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code = main(["generate", "--face", str(face_path), "--prompt", "a face", "--preset", "sdxl-lightning-4step",
                 "--face-models", str(packs), "--weights-dir", str(tmp_path / "w"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "sdxl_lightning_4step_unet.safetensors" in err and f"hf download {LIGHTNING_REPO}" in err
    assert "ip-adapter-faceid-plusv2_sdxl.bin" in err and "Traceback" not in err
    # without the face models too: both in the one message (it named only the face models)
    code = main(["generate", "--face", str(face_path), "--prompt", "a face", "--preset", "sdxl-lightning-4step",
                 "--face-models", str(tmp_path / "no-such-pack"), "--weights-dir", str(tmp_path / "w"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "sdxl_lightning_4step_unet.safetensors" in err and f"hf download {LIGHTNING_REPO}" in err
    assert "And the face models: insightface face models not found" in err and "no-such-pack" in err


def test_cli_fastface_and_kv_flags():
    args = build_parser().parse_args(["generate", "--face", "a.jpg", "--prompt", "p", "--fastface", "am2+dcg",
                                      "--set", "attention.adain_weight=0.5"])
    s = settings_from_args(args)
    assert s.attention.mode == "am2" and s.guidance.dcg and s.attention.adain_weight == 0.5
    s2 = settings_from_args(build_parser().parse_args(["generate", "--face", "a.jpg", "--prompt", "p", "--kv"]))
    assert s2.lookahead.kv and not s2.guidance.dcg
    # a named configuration is made for the --preset given, not for the default one
    from lcmla.fastface import plain_guidance_scale

    for preset in ("sdxl-base", "sdxl-lcm-lora"):
        s3 = settings_from_args(build_parser().parse_args(["generate", "--prompt", "p", "--preset", preset,
                                                           "--fastface", "am2"]))
        assert s3.preset == preset and s3.guidance.guidance_scale == plain_guidance_scale(preset) != 1.0
    # --set prompt=… stands for --prompt, spaces around the key or not
    s4 = settings_from_args(build_parser().parse_args(["generate", "--set", " prompt =a sketch"]))
    assert s4.prompt == "a sketch"


def test_every_knob_has_a_flag_from_the_one_table():
    """The CLI's flags come from the app's knob table (lcmla.knobs): one per knob, nothing else to keep in step."""
    from lcmla.knobs import KNOBS, cli_flags

    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]  # noqa: SLF001 - argparse has no public getter
    options = {flag for action in generate._actions for flag in action.option_strings}
    for knob in KNOBS:
        assert set(cli_flags(knob)) <= options, knob.name
    args = parser.parse_args([
        "generate", "--face", "a.jpg", "--prompt", "p", "--attention-mode", "am2", "--guidance-dcg",
        "--guidance-dcg-a", "1,2,2,1", "--attention-steps", "0, 1", "--attention-tokens", "0,2",
        "--attention-am-norm-scope", "image-branches", "--freeu-enabled", "false", "--identity-lora-scale", "0.6",
        "--guidance-scheduler", "EulerDiscreteScheduler"])
    s = settings_from_args(args)
    assert s.attention.mode == "am2" and s.guidance.dcg and s.guidance.dcg_a == (1.0, 2.0, 2.0, 1.0)
    assert s.attention.steps == (0, 1) and s.attention.tokens == (0, 2)
    assert s.attention.am_norm_scope == "image-branches" and not s.freeu.enabled
    assert s.identity.lora_scale == 0.6 and s.guidance.scheduler == "EulerDiscreteScheduler"
    # a named method first, then the flags given win over it
    s2 = settings_from_args(parser.parse_args(["generate", "--face", "a.jpg", "--prompt", "p", "--method",
                                               "lookahead-released", "--guidance-steps", "6"]))
    assert s2.guidance.steps == 6 and s2.lookahead.kv


@pytest.mark.parametrize("argv, message", [
    (["--guidance-dcg", "maybe"], "--guidance-dcg takes true or false"),
    (["--guidance-dcg-a", "1,x"], "guidance.dcg_a"),
    (["--attention-tokens", "a"], "attention.tokens"),
])
def test_knob_flags_name_the_bad_value(argv, message):
    with pytest.raises(LcmlaError, match=message):
        settings_from_args(build_parser().parse_args(["generate", "--face", "a.jpg", "--prompt", "p", *argv]))


def test_cli_prints_the_request_notes(tiny_cache, face_path, tmp_path, capsys):
    """A 2-step DCG request stretches the schedule to a = b = 1 everywhere: the CLI says so. A
    prompt past CLIP's 77 tokens gets one lcmla note naming what was cut, instead of the warnings
    diffusers and transformers log for it."""
    long_prompt = "a face " + "with freckles and a hat " * 25
    with logged_messages("diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
                         "transformers.tokenization_utils_base") as logged:
        code = main(["generate", "--face", str(face_path), "--prompt", long_prompt, "--fastface", "dcg", "--quiet",
                     "--set", "guidance.steps=2", "--set", "output.width=64", "--set", "output.height=64",
                     "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "note: DCG: the a/b schedule stretched to 2 step(s)" in err
    assert "note: prompt is" in err and "the text encoders read the first 75, so 'and a hat with" in err
    assert "negative_prompt is" not in err  # the empty negative prompt is not noted
    logged = " ".join(logged)
    assert "truncated because CLIP" not in logged and "Token indices sequence length" not in logged


def test_attention_knobs_that_select_nothing_get_a_note():
    """--attention-steps past the last step, or tokens past the adapter's, leave AM off: said so;
    steps partly past the run are named as ignored."""
    from lcmla.engine import request_notes
    from lcmla.guidance import ClassicGuidance
    from lcmla.settings import GenerationSettings

    def notes(**changes):
        s = GenerationSettings(prompt="a face").replace_dotted({"attention.mode": "am1", **changes})
        return request_notes(s, ClassicGuidance(1.0), 4, identity_tokens=4)

    assert notes() == [] and notes(**{"attention.tokens": [3, 7]}) == []
    (some_past,) = notes(**{"attention.steps": [3, 9]})  # part of a selection past the run: said, not dropped silently
    assert "attention.steps 9 is past the last of the 4 step(s) (numbered from 0) and ignored; AM runs at steps 3" in some_past
    (past_steps,) = notes(**{"attention.steps": [99]})
    assert "attention.steps [99] are all past the last of the 4 step(s)" in past_steps
    (past_tokens,) = notes(**{"attention.tokens": [7]})
    assert "attention.tokens [7] are all past the adapter's 4 identity tokens" in past_tokens
    s = GenerationSettings(prompt="a face").replace_dotted({"attention.tokens": [7]})  # AM off: nothing to say
    assert request_notes(s, ClassicGuidance(1.0), 4, identity_tokens=4) == []


def test_help_ranges_say_they_are_the_apps_and_print_integers_whole():
    """The knob ranges in --help are the app's sliders (the settings may accept more), and a large
    integer bound prints whole, not as 9.0072e+15."""
    from lcmla.knobs import KNOB, cli_help

    assert "1…50 in the app" in cli_help(KNOB["guidance.steps"])
    seed = cli_help(KNOB["output.seed"])
    assert "e+" not in seed and "0…9007199254740991 in the app" in seed


def test_a_taken_name_gets_the_next_free_one_unless_overwrite(engine, face_path, tmp_path):
    """Images are named by their seed; a second run of the same seed in the same folder (say over
    its own --settings-from PNG) used to replace the first without a word."""
    from lcmla import GenerationSettings
    from lcmla.pngmeta import settings_from_png

    small = {"output.width": 64, "output.height": 64, "output.seed": 7}
    first = engine.generate(GenerationSettings(prompt="a face").replace_dotted(small), [face_path])
    second = engine.generate(GenerationSettings(prompt="a drawing").replace_dotted(small), [face_path])
    assert first.save(tmp_path) == [tmp_path / "lcmla-7.png"]
    assert second.save(tmp_path) == [tmp_path / "lcmla-7-1.png"]
    assert second.save(tmp_path) == [tmp_path / "lcmla-7-2.png"]
    assert settings_from_png(tmp_path / "lcmla-7.png").prompt == "a face"  # the first is kept
    assert second.save(tmp_path, overwrite=True) == [tmp_path / "lcmla-7.png"]
    assert settings_from_png(tmp_path / "lcmla-7.png").prompt == "a drawing"
    assert build_parser().parse_args(["generate", "--face", "x", "--overwrite"]).overwrite
    # the request's own inputs are never written over, --overwrite or not (a face photo named
    # lcmla-7.png in --out was replaced by the picture made from it)
    photo = tmp_path / "lcmla-7.png"
    assert second.save(tmp_path, overwrite=True, keep=[str(tmp_path / "." / "lcmla-7.png")]) == [tmp_path / "lcmla-7-1.png"]
    assert settings_from_png(photo).prompt == "a drawing"
    photo.write_bytes(Path(face_path).read_bytes())  # a face photo of that name, as the CLI's input
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()  # a digest: pytest's diff of two PNGs' bytes takes minutes
    assert main(["generate", "--face", str(photo), "--prompt", "x", "--out", str(tmp_path), "--overwrite",
                 "--seed", "7", "--width", "64", "--height", "64", "--steps", "1", "--quiet"]) == 0
    assert hashlib.sha256(photo.read_bytes()).hexdigest() == digest


def test_seeds_are_read_exactly():
    """A seed went through float(): 123456789012345678 became …680 and 2**63 − 2 overflowed."""
    from lcmla.knobs import KNOB, parse_cli

    for text in ("123456789012345678", "9007199254740993", str(2**63 - 2)):
        assert parse_cli(KNOB["output.seed"], text) == int(text)
    args = build_parser().parse_args(["generate", "--face", "x", "--prompt", "a", "--seed", str(2**63 - 2),
                                      "--num-images", "2"])
    assert settings_from_args(args).output.seed == 2**63 - 2
    assert parse_cli(KNOB["output.seed"], "7.0") == 7  # a whole float is still a seed


def test_a_prompt_given_with_set_counts():
    args = build_parser().parse_args(["generate", "--face", "x", "--set", "prompt=hello there"])
    assert settings_from_args(args).prompt == "hello there"
    with pytest.raises(LcmlaError, match="--prompt is required"):
        settings_from_args(build_parser().parse_args(["generate", "--face", "x", "--set", "output.seed=3"]))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_folder_that_refuses_files_is_refused_before_loading(face_path, capsys, monkeypatch):
    """os.access says yes to root everywhere; /proc takes no new file (nor does a read-only mount)."""
    import lcmla.engine

    monkeypatch.setattr(lcmla.engine.Engine, "load", classmethod(lambda *a, **k: pytest.fail("loaded a model")))
    assert main(["generate", "--face", str(face_path), "--prompt", "a face", "--out", "/proc/lcmla-out"]) == 2
    err = capsys.readouterr().err
    assert "--out /proc/lcmla-out cannot be written: /proc refuses new files" in err and "Traceback" not in err


def test_two_named_configurations_or_an_empty_out_are_refused(tmp_path, capsys):
    """--fastface am1 --method am2 ran am2 without a word; --out '' wrote into the current folder."""
    with pytest.raises(LcmlaError, match="--fastface am1 and --method am2 both name a whole configuration; pass one"):
        settings_from_args(build_parser().parse_args(["generate", "--prompt", "x", "--fastface", "am1", "--method", "am2"]))
    same = settings_from_args(build_parser().parse_args(["generate", "--prompt", "x", "--fastface", "am2", "--method", "am2"]))
    assert same.attention.mode == "am2"
    for empty in ("", "   "):
        assert main(["generate", "--prompt", "x", "--out", empty]) == 2
        assert "--out is empty: pass a folder" in capsys.readouterr().err


def test_every_loading_flag_reaches_the_engine(tmp_path, face_path, capsys, monkeypatch):
    """The flags that choose what is loaded are handed to Engine.load as given; a face photo named
    with ~ is found (the check before loading expands it, as the photo reader does)."""
    import lcmla.engine

    seen = {}

    def fake_load(cls, preset, **kwargs):  # noqa: ANN001, ANN202
        seen.update(kwargs, preset=preset)
        raise LcmlaError("stopped before loading")

    monkeypatch.setattr(lcmla.engine.Engine, "load", classmethod(fake_load))
    monkeypatch.setenv("HOME", str(face_path.parent))
    flags = {"--device": "cpu", "--dtype": "bfloat16", "--weights-dir": str(tmp_path / "w"),
             "--face-models": "haar", "--kv-lora": str(tmp_path / "kv.safetensors"),
             "--adapter": str(tmp_path / "a.safetensors"), "--memory": "low", "--random-weights": "full",
             "--compile": "am", "--preset": "sdxl-base"}
    argv = ["generate", "--face", f"~/{face_path.name}", "--prompt", "a face", "--out", str(tmp_path / "o"), "--download"]
    assert main([*argv, *(x for kv in flags.items() for x in kv)]) == 2
    assert "stopped before loading" in capsys.readouterr().err
    assert seen == {"preset": "sdxl-base", "device": "cpu", "dtype": "bfloat16", "weights_dir": str(tmp_path / "w"),
                    "allow_download": True, "face_models": "haar", "kv_encoder_lora": str(tmp_path / "kv.safetensors"),
                    "adapter": str(tmp_path / "a.safetensors"), "memory": "low", "random_weights": "full",
                    "compile": "am"}


def test_png_text_chunks_name_the_preset_version_seed_and_random_weights(tmp_path):
    """What other tools show: the summary names the prompt, seed, size and scales, and a
    random-weights image says so; lcmla:preset and lcmla:version are their own chunks."""
    from PIL import Image

    from lcmla import GenerationSettings, __version__
    from lcmla.pngmeta import read_png_text, save_png, settings_from_png

    made = GenerationSettings(prompt="a comic of a face", negative_prompt="blurry").replace_dotted(
        {"output.seed": 123, "output.width": 64, "output.height": 96, "identity.ip_adapter_scale": 0.7})
    save_png(Image.new("RGB", (8, 8)), tmp_path / "real.png", made)
    save_png(Image.new("RGB", (8, 8)), tmp_path / "tiny.png", made, random_weights=True)
    real, tiny = read_png_text(tmp_path / "real.png"), read_png_text(tmp_path / "tiny.png")
    assert real["lcmla:preset"] == made.preset and real["lcmla:version"] == __version__
    lines = real["parameters"].splitlines()
    assert lines[:2] == ["a comic of a face", "Negative prompt: blurry"]
    assert "Seed: 123," in lines[2] and "Size: 64x96" in lines[2] and "IP-Adapter scale: 0.7" in lines[2]
    assert "random weights" not in real["parameters"]
    assert tiny["parameters"] == real["parameters"] + "\n(made by the tiny preset: random weights, not a real model)"
    assert settings_from_png(tmp_path / "tiny.png") == made


def test_png_text_reading_names_the_file_and_keeps_only_text(tmp_path, monkeypatch):
    """No blank line where a negative prompt is absent; only text chunks come back (not PIL's dpi
    tuple); a foreign PNG, a missing file and an unreadable one are each named by their path."""
    from PIL import Image

    from lcmla import GenerationSettings, ImageError, SettingsError, get_preset
    from lcmla.pngmeta import read_png_text, save_png, settings_from_png, summary

    save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", GenerationSettings(prompt="a face"))
    lines = read_png_text(tmp_path / "a.png")["parameters"].splitlines()
    assert len(lines) == 2 and lines[0] == "a face", lines
    # fields left to the preset show its numbers, marked (they read "Steps: None", "Size: NonexNone")
    tiny = get_preset("tiny")
    assert (f"Steps: {tiny.steps} (default), CFG: {tiny.guidance_scale} (default)," in lines[1]
            and f"Size: {tiny.width}x{tiny.height} (default)," in lines[1]), lines
    half = summary(GenerationSettings(prompt="a face", preset="sdxl-base").replace(output__width=512, guidance__steps=6))
    base = get_preset("sdxl-base")
    assert (f"Steps: 6, CFG: {base.guidance_scale} (default)," in half
            and f"Size: 512x{base.height} (default)," in half), half
    # a preset this version does not know (a PNG of a later lcmla) has no numbers to show
    later = summary(GenerationSettings(prompt="a face", preset="sdxl-next"))
    assert "Steps: default, CFG: default, Seed: 0, Size: default," in later, later
    Image.new("RGB", (8, 8)).save(tmp_path / "dpi.png", dpi=(300, 300))
    assert read_png_text(tmp_path / "dpi.png") == {}
    with pytest.raises(SettingsError, match=r"'[^']*dpi\.png' holds no lcmla settings"):
        settings_from_png(tmp_path / "dpi.png")
    with pytest.raises(ImageError, match=r"settings file '[^']*gone\.png' does not exist$"):
        settings_from_png(tmp_path / "gone.png")
    locked = str(tmp_path / "locked.png")

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(ImageError) as refused:
        settings_from_png(locked)
    message = str(refused.value)
    assert message.count("locked.png") == 1 and "Permission denied: it" in message, message


def test_settings_from_the_json_that_show_prints(tmp_path, capsys):
    from lcmla import GenerationSettings
    from lcmla.pngmeta import save_png
    from PIL import Image

    made = GenerationSettings(prompt="an oil painting of a face").replace_dotted({"output.seed": 11,
                                                                                   "identity.lora_scale": 0.6})
    save_png(Image.new("RGB", (8, 8)), tmp_path / "a.png", made)
    assert main(["show", str(tmp_path / "a.png")]) == 0
    (tmp_path / "S.JSON").write_text(capsys.readouterr().out)  # the suffix in any case
    args = build_parser().parse_args(["generate", "--face", "x", "--settings-from", str(tmp_path / "S.JSON"),
                                      "--steps", "3"])
    assert settings_from_args(args) == made.replace_dotted({"guidance.steps": 3})
    # text, an empty file, a folder: each named for what it is (was "cannot identify image file it")
    (tmp_path / "notes.png").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    for given, says in (("notes.png", "is not an image at all (empty, or another kind of file); pass a PNG that lcmla saved"),
                        ("empty.png", "is not an image at all"), (".", "is a folder, not a file; pass a PNG")):
        capsys.readouterr()
        assert main(["show", str(tmp_path / given)]) == 2
        err = capsys.readouterr().err
        assert says in err and "cannot identify" not in err, err
    (tmp_path / "folder.json").mkdir()
    for gone in ("gone.json", "folder.json"):  # a missing file, a folder: cannot be read, and said so
        with pytest.raises(LcmlaError, match=r"--settings-from .*: cannot read it \((No such file|Is a directory)"):
            settings_from_args(build_parser().parse_args(["generate", "--settings-from", str(tmp_path / gone)]))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LcmlaError, match="--settings-from .*bad.json: settings are not valid JSON"):
        settings_from_args(build_parser().parse_args(["generate", "--face", "x", "--settings-from",
                                                      str(tmp_path / "bad.json")]))


def test_haar_names_the_stand_in_as_the_datagen_commands_do(tiny_cache):
    """--face-models haar was read as a folder name (~/.insightface/models/haar)."""
    from lcmla import Engine

    engine = Engine.load("tiny", device="cpu", face_models="haar")
    assert engine.faces.backend == "haar" and not engine.faces.is_recognizer


def test_an_offloading_mode_on_the_cpu_says_what_it_does_there(tiny_cache, face_path, tmp_path, capsys, monkeypatch):
    """The notes on how the engine was loaded (memory mode, torch.compile), and a progress bar over
    every step of every image."""
    import lcmla.engine

    real_load = lcmla.engine.Engine.load.__func__

    def load_as_compiled(cls, *args, **kwargs):  # noqa: ANN001, ANN202 - what --compile am reports, without compiling
        engine = real_load(cls, *args, **kwargs)
        engine.compiled = ("AM identity branch",)
        return engine

    monkeypatch.setattr(lcmla.engine.Engine, "load", classmethod(load_as_compiled))
    assert main(["generate", "--face", str(face_path), "--prompt", "a face", "--preset", "tiny", "--device", "cpu",
                 "--memory", "low", "--width", "64", "--height", "64", "--steps", "2", "--num-images", "2",
                 "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "note: low-VRAM mode" in err and "on the CPU the models are in CPU memory anyway" in err
    assert "note: compiled with torch.compile (AM identity branch): the first image compiles first" in err
    assert re.search(r"denoising: 100%.*\b4/4\b", err), err
    assert re.search(r"^done in ", err, re.M), err  # on a line of its own: the bar was closed


def test_generate_without_a_face_is_text_only_and_says_so(tiny_cache, tmp_path, capsys):
    """The API generates from the text alone (faces None); the CLI required --face."""
    assert main(["generate", "--prompt", "a lighthouse at dusk", "--preset", "tiny", "--device", "cpu",
                 "--width", "64", "--height", "64", "--steps", "1", "--quiet", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "no --face given, so the image is made from the text alone" in err
    assert (tmp_path / "lcmla-0.png").is_file()


def test_generate_keeps_its_settings_png_replaces_on_overwrite_and_names_a_failed_write(tiny_cache, face_path,
                                                                                         tmp_path, capsys, monkeypatch):
    """--settings-from a PNG in --out never writes over that PNG, --overwrite or not; --overwrite
    replaces an earlier image of the same seed; a write that fails names --out; attention maps
    asked for on the command line are said to go nowhere."""
    import lcmla.engine

    out = tmp_path / "out"
    common = ["--face", str(face_path), "--device", "cpu", "--quiet", "--out", str(out)]
    assert main(["generate", "--prompt", "a face", "--preset", "tiny", "--width", "64", "--height", "64", "--steps", "1",
                 "--set", "attention.capture_maps=true", *common]) == 0
    first = capsys.readouterr()
    assert first.out.split() == [str(out / "lcmla-0.png")]
    assert "note: attention.capture_maps records the identity-attention maps" in first.err
    made = hashlib.sha256((out / "lcmla-0.png").read_bytes()).hexdigest()  # digests: pytest's diff of bytes is slow
    assert main(["generate", "--settings-from", str(out / "lcmla-0.png"), "--overwrite", *common]) == 0
    assert capsys.readouterr().out.split() == [str(out / "lcmla-0-1.png")]  # its own input is kept
    assert hashlib.sha256((out / "lcmla-0.png").read_bytes()).hexdigest() == made
    (out / "lcmla-0.png").write_bytes(b"an earlier image")
    assert main(["generate", "--settings-from", str(out / "lcmla-0-1.png"), "--overwrite", *common]) == 0
    assert capsys.readouterr().out.split() == [str(out / "lcmla-0.png")]  # replaced, as asked
    assert (out / "lcmla-0.png").read_bytes() != b"an earlier image"

    def full_disk(self, *args, **kwargs):  # noqa: ANN001, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lcmla.engine.Result, "save", full_disk)
    assert main(["generate", "--settings-from", str(out / "lcmla-0-1.png"), *common]) == 2
    err = capsys.readouterr().err
    assert f"error: --out {out}: the images could not be written (No space left on device); pass another folder" in err


def test_ctrl_c_is_one_word_and_the_shells_exit_status(monkeypatch, capsys, tmp_path):
    """Ctrl-C while loading or generating: "interrupted" and 130 (128 + SIGINT), no traceback."""
    import lcmla.engine

    def interrupted(cls, *args, **kwargs):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(lcmla.engine.Engine, "load", classmethod(interrupted))
    assert main(["generate", "--prompt", "a face", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "interrupted\n"
