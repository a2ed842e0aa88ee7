"""The trainer as a user runs it (tiny preset, CPU): CLI, kill -9 and resume bit for bit, two
processes over gloo, NaN handling, exported weights in the engine, bf16 with validation, diffusers'
flag spellings, trackers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import datagen_fake  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_cache):
    from training.datagen.generate import generate

    out = tmp_path_factory.mktemp("shards")
    cfg, haar = datagen_fake.config(identities=4, per_shard=2, images=6)
    generate(cfg, out, datagen_fake.fake_render(), haar.detect, log=lambda m: None)
    return out


def _args(shards, out, steps=6, extra=()):
    return ["train", "--preset", "tiny", "--data", str(shards), "--output-dir", str(out), "--max-train-steps", str(steps),
            "--checkpointing-steps", "2", "--resolution", "64", "--train-batch-size", "2", "--id-network", "dlib",
            "--lookahead-batch-size", "1", "--seed", "3", *extra]


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "training", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def uninterrupted(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    r = _run(_args(shards, out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_a_run_writes_checkpoints_and_loadable_weights(uninterrupted, face_path):
    from lcmla import Engine, GenerationSettings

    out = uninterrupted
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for name in ("ip-adapter-faceid-plusv2_sdxl.safetensors", "kv_encoder_lora.safetensors", "training_args.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-6" / "kv_encoder_lora.safetensors").is_file()
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 and '"diffusion"' in lines[0] and '"lookahead"' in lines[0]
    e = Engine.load("tiny", adapter=out / "ip-adapter-faceid-plusv2_sdxl.safetensors",
                    kv_encoder_lora=out / "kv_encoder_lora.safetensors")
    img = e.generate(GenerationSettings(prompt="a photo of a face").replace(lookahead__kv=True), [face_path]).images[0]
    assert np.asarray(img).std() > 1


def test_kill_9_then_resume_is_bit_identical(shards, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "training", *_args(shards, out)], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (out / "checkpoint-4").is_dir():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its checkpoint 4"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for ckpt in out.glob("checkpoint-6*"):  # a kill during the last save leaves at most a temporary
        assert ckpt.name.endswith(".tmp")
    # resumed with two DataLoader workers reading ahead: the same batches, so the same weights
    r = _run(_args(shards, out, extra=("--resume-from-checkpoint", "latest", "--dataloader-num-workers", "2")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "changed settings" not in r.stdout + r.stderr  # workers change no number: no note
    a = load_file(str(uninterrupted / "checkpoint-6" / "trainable.safetensors"))
    b = load_file(str(out / "checkpoint-6" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(uninterrupted / "checkpoint-6" / "train_state-0.pt", weights_only=True)
    sb = torch.load(out / "checkpoint-6" / "train_state-0.pt", weights_only=True)
    assert sa["state"] == sb["state"] and torch.equal(sa["generator"], sb["generator"])
    # the resumed run rewrote the steps after checkpoint 4 instead of appending duplicates
    ma, mb = (_metrics(o) for o in (uninterrupted, out))
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in mb] == [m["loss"] for m in ma]


def test_a_resume_with_another_model_is_refused_and_changed_settings_are_said(shards, uninterrupted, tmp_path):
    """Each checkpoint keeps the settings that trained it: a resume with another --kv-rank (or
    preset, random-weights build, --train) is refused before the model loads (its tensors do not
    fit); other changes that alter the numbers are said in a note, and the run continues."""
    from training.checkpoints import ARGS_FILE, resume_differences

    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    assert json.loads((out / "checkpoint-6" / ARGS_FILE).read_text())["kv_rank"] == 4
    r = _run(_args(shards, out, extra=("--resume-from-checkpoint", "latest", "--kv-rank", "8")))
    assert r.returncode == 2 and "was trained with other model settings (kv_rank was 4, now 8)" in r.stderr, r.stderr[-2000:]
    r = _run(_args(shards, out, extra=("--resume-from-checkpoint", "latest", "--preset", "sdxl-base")))
    assert r.returncode == 2 and 'preset was "tiny", now "sdxl-base"' in r.stderr, r.stderr[-2000:]  # before its
    assert "hf download" not in r.stderr  # missing weights are looked for
    r = _run(_args(shards, out, extra=("--resume-from-checkpoint", "checkpoint-4", "--learning-rate", "2e-05",
                                       "--max-train-steps", "5")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "with changed settings (learning_rate was 1e-05, now 2e-05)" in r.stdout, r.stdout[-2000:]
    # the pure rule: fixed entries refuse, free ones are ignored, an entry an older file lacks is skipped
    before = {"preset": "tiny", "parts": ["proj"], "seed": 3, "report_to": "none", "max_train_steps": 6}
    now = {"preset": "sdxl-base", "parts": ["proj"], "seed": 4, "report_to": "tensorboard", "max_train_steps": 9,
           "kv_rank": 8}
    assert resume_differences(before, now) == (['preset was "tiny", now "sdxl-base"'], ["seed was 3, now 4"])


def _metrics(out):
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_over_gloo_keep_ranks_equal(shards, tmp_path):
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    # accelerate's multi-process launcher; ACCELERATE_USE_CPU makes each process join a gloo group
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", "29577", "-m", "training",
           *_args(shards, out, steps=2, extra=("--train-batch-size", "1"))]
    r = subprocess.run(cmd, cwd=ROOT, env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s0 = torch.load(out / "checkpoint-2" / "train_state-0.pt", weights_only=True)
    s1 = torch.load(out / "checkpoint-2" / "train_state-1.pt", weights_only=True)
    assert s0["params_sha256"] == s1["params_sha256"]
    init = json.loads((out / "training_args.json").read_text())["init_params_sha256"]
    assert s0["params_sha256"] != init  # equal because both moved the same way, not because neither moved
    assert not torch.equal(s0["generator"], s1["generator"])  # each process draws its own noise and data


def test_nan_losses_skip_steps_then_stop_with_a_clear_message(shards, tmp_path, monkeypatch):
    import training.objective as objective
    from training.train import TrainingError, main, parse_args

    calls = []

    def nan_loss(self, batch, generator):
        calls.append(1)
        return torch.tensor(float("nan"), requires_grad=True), {"loss": float("nan")}

    monkeypatch.setattr(objective.Objective, "__call__", nan_loss)
    args = parse_args(_args(shards, tmp_path / "nan", steps=10, extra=("--lookahead-weight", "0", "--max-nan-steps", "3"))[1:])
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row"):
        main(args)
    assert len(calls) == 3
    # the skipped steps moved on through the data but never stepped the optimizer
    opt = torch.load(tmp_path / "nan" / "checkpoint-2" / "optimizer.bin", weights_only=False)
    assert opt["state"] == {}
    lines = (tmp_path / "nan" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all('"loss": NaN' in line for line in lines)


def test_scattered_nan_losses_do_not_add_up_and_the_last_step_is_saved(shards, tmp_path, monkeypatch):
    """--max-nan-steps counts losses that are not finite IN A ROW: a run with every other loss NaN
    finishes; and the last step is checkpointed even when --max-train-steps (5) is not a multiple
    of --checkpointing-steps (2), so "latest" is the end of the run."""
    import training.objective as objective
    from training.checkpoints import list_checkpoints
    from training.train import main, parse_args

    calls = []

    def every_other_nan(self, batch, generator):
        calls.append(1)
        value = float("nan") if len(calls) % 2 else 1.0
        return torch.tensor(value, requires_grad=True), {"loss": value}

    monkeypatch.setattr(objective.Objective, "__call__", every_other_nan)
    args = parse_args(_args(shards, tmp_path / "run", steps=5, extra=("--lookahead-weight", "0", "--max-nan-steps", "2"))[1:])
    main(args)
    assert len(calls) == 5
    assert [step for step, _ in list_checkpoints(tmp_path / "run")][-1] == 5


def test_gradient_accumulation_runs_n_micro_batches_per_step_logs_their_mean_and_clips_once(shards, tmp_path, monkeypatch):
    import accelerate

    import training.objective as objective
    from training.train import main, parse_args

    losses = iter([1.0, 3.0, 5.0, 9.0])
    calls, clipped = [], []

    def loss_of(self, batch, generator):
        value = next(losses)
        calls.append(value)
        return torch.tensor(value, requires_grad=True), {"loss": value}

    monkeypatch.setattr(objective.Objective, "__call__", loss_of)
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", lambda self, params, max_norm: clipped.append(max_norm))
    args = parse_args(_args(shards, tmp_path / "acc", steps=2, extra=("--lookahead-weight", "0", "--gradient-accumulation-steps",
                                                                      "2", "--max-grad-norm", "0.25"))[1:])
    main(args)
    assert calls == [1.0, 3.0, 5.0, 9.0] and clipped == [0.25, 0.25]
    logged = [json.loads(line) for line in (tmp_path / "acc" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"]) for m in logged] == [(1, 2.0), (2, 7.0)]


def test_cli_user_errors(shards, tmp_path):
    r = _run(["train", "--preset", "tiny", "--data", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "o"),
              "--max-train-steps", "1", "--lookahead-weight", "0"])
    assert r.returncode == 2 and "nothing does not exist: pass a folder of training shards" in r.stderr
    # the data is checked before the model loads: a preset whose weights are absent is not reached
    r = _run(["train", "--preset", "sdxl-base", "--data", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "o"),
              "--max-train-steps", "1"])
    assert r.returncode == 2 and "nothing does not exist: pass a folder of training shards" in r.stderr, r.stderr[-2000:]
    r = _run(["train", "--preset", "sdxl-base", "--data", str(shards), "--output-dir", str(tmp_path / "o"),
              "--max-train-steps", "1", "--train-batch-size", "1000"])
    assert r.returncode == 2 and "give no full batch of 1000 per process" in r.stderr, r.stderr[-2000:]
    assert "weights" not in r.stderr.lower(), r.stderr[-2000:]
    r = _run(["train", "--preset", "sdxl-base", "--data", str(shards), "--output-dir", str(tmp_path / "o"),
              "--max-train-steps", "1", "--adapter", str(tmp_path / "gone.safetensors")])
    assert r.returncode == 2 and "--adapter " + str(tmp_path / "gone.safetensors") + " does not exist" in r.stderr, r.stderr[-2000:]
    r = _run(_args(shards, tmp_path / "o", extra=("--train", "adapter,wings")))
    assert r.returncode == 2 and "unknown trainable part 'wings'" in r.stderr
    r = _run(_args(shards, tmp_path / "o", extra=("--no-kv",)))  # the default --train holds kv-lora
    assert r.returncode == 2 and "--no-kv trains no KV encoder: drop kv-lora from --train" in r.stderr, r.stderr[-2000:]
    r = _run(_args(shards, tmp_path / "o", extra=("--validation-steps", "2", "--resolution", "2056")))
    assert r.returncode == 2 and "--resolution: must be a whole number, a multiple of 8, in [64, 2048] (got 2056)" in r.stderr
    assert not (tmp_path / "o").exists()  # refused before any work
    r = _run(["train", "--help"])
    assert r.returncode == 0 and "--gradient-checkpointing" in r.stdout and "--resume-from-checkpoint" in r.stdout
    shown = " ".join(r.stdout.split())  # the ranges are in the help (argparse wraps the lines)
    assert "learning rate of the adapter (projection, identity K/V); a finite number > 0 (default: 1e-05)" in shown
    assert "--adam-beta1 ADAM_BETA1, --adam_beta1 ADAM_BETA1 A finite number in [0, 1) (default: 0.9)" in shown


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--learning-rate", "nan", "--learning-rate/--learning_rate: must be a finite number > 0 (got nan)"),
    ("--learning-rate", "-1", "--learning-rate/--learning_rate: must be a finite number > 0 (got -1.0)"),
    ("--learning-rate", "fast", "--learning-rate/--learning_rate: must be a finite number > 0 (got 'fast')"),
    ("--lora-learning-rate", "0", "--lora-learning-rate/--lora_learning_rate: must be a finite number > 0"),
    ("--text-drop", "2", "--text-drop/--text_drop: must be a finite number in [0, 1] (got 2.0)"),
    ("--kv-drop", "1", "--kv-drop/--kv_drop: must be a finite number in [0, 1) (got 1.0)"),
    ("--lookahead-weight", "inf", "--lookahead-weight/--lookahead_weight: must be a finite number ≥ 0"),
    ("--resolution", "250", "--resolution: must be a whole number, a multiple of 8, in [64, 2048] (got 250)"),
    ("--resolution", "56", "--resolution: must be a whole number, a multiple of 8, in [64, 2048] (got 56)"),
    ("--dataloader-num-workers", "-1", "--dataloader-num-workers/--dataloader_num_workers: must be a whole number in [0, 64]"),
    ("--max-train-steps", "0", "--max-train-steps/--max_train_steps: must be a whole number ≥ 1 (got 0)"),
    ("--kv-rank", "0", "--kv-rank/--kv_rank: must be a whole number in [1, 256]"),
    ("--adam-beta2", "1", "--adam-beta2/--adam_beta2: must be a finite number in [0, 1) (got 1.0)"),
    ("--adam-epsilon", "0", "--adam-epsilon/--adam_epsilon: must be a finite number > 0"),
    ("--lookahead-max-timestep", "0", "--lookahead-max-timestep/--lookahead_max_timestep: must be a whole number in [1, 1000]"),
    ("--checkpoints-total-limit", "0", "--checkpoints-total-limit/--checkpoints_total_limit: must be a whole number ≥ 1"),
    ("--resolution", "100000", "--resolution: must be a whole number, a multiple of 8, in [64, 2048] (got 100000)"),
    ("--train-batch-size", "100000", "--train-batch-size/--train_batch_size: must be a whole number in [1, 1024]"),
    ("--output-dir", "FILE", "--output-dir FILE is a file, not a folder"),
])
def test_numeric_flags_are_checked_before_any_work(flag, value, message, tmp_path, capsys):
    """A learning rate of NaN trained to rc 0 and exported a NaN adapter; now each such flag is
    refused at the start with its name and range."""
    from training.train import parse_args

    if value == "FILE":
        (tmp_path / "FILE").write_text("x")
        value, message = str(tmp_path / "FILE"), message.replace("FILE", str(tmp_path / "FILE"))
    with pytest.raises(SystemExit) as exc:
        parse_args(["--preset", "tiny", "--data", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                    "--max-train-steps", "1", flag, value])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_an_earlier_run_is_kept_unless_resumed_or_overwritten(shards, uninterrupted, tmp_path, capsys):
    """A fresh run into a folder that holds another run replaced its weights silently; now it is
    refused before any work, unless --resume-from-checkpoint (continue) or --overwrite (start
    afresh: the earlier checkpoints go, so that "latest" cannot pick one of them later)."""
    from training.train import parse_args

    base = ["--preset", "tiny", "--data", str(shards), "--output-dir", str(uninterrupted), "--max-train-steps", "1"]
    with pytest.raises(SystemExit) as exc:
        parse_args(base)
    err = " ".join(capsys.readouterr().err.split())
    assert exc.value.code == 2 and (f"--output-dir {uninterrupted} holds an earlier run (checkpoint-2, checkpoint-4, "
                                    "checkpoint-6, training_args.json and 3 more): add --resume-from-checkpoint latest "
                                    "to continue it, pass another --output-dir, or add --overwrite") in err, err
    assert parse_args([*base, "--resume-from-checkpoint", "latest"]).resume_from_checkpoint == "latest"
    assert parse_args([*base, "--overwrite"]).overwrite

    out = tmp_path / "again"
    stale = out / "checkpoint-8"
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_bytes(b"")
    (out / "notes.txt").write_text("mine")
    r = _run(_args(shards, out, steps=2, extra=("--lookahead-weight", "0", "--overwrite")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and (out / "notes.txt").read_text() == "mine"


def test_validation_photos_and_a_named_face_pack_are_checked_before_the_first_step(shards, tmp_path, capsys):
    """A validation photo that is no image, or shows no face, stopped the run only after its first
    validation step had trained (and nothing was saved); --face-models naming a missing pack was
    silently replaced by dlib under --id-network auto."""
    import argparse

    from PIL import Image

    from lcmla.presets import PRESETS
    from training.train import TrainingError, _identity_loss, parse_args

    (tmp_path / "notes.png").write_text("not a photo")
    for photo, says in ((tmp_path / "notes.png", "notes.png"), (tmp_path / "gone.jpg", "gone.jpg")):
        with pytest.raises(SystemExit) as exc:
            parse_args(["--preset", "tiny", "--data", str(shards), "--output-dir", str(tmp_path / "o"), "--max-train-steps",
                        "1", "--validation-steps", "1", "--validation-faces", str(photo)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "--validation-faces: " in err and says in err, err
    Image.new("RGB", (128, 128), (128, 128, 128)).save(tmp_path / "grey.png")
    out = tmp_path / "faceless"
    r = _run(_args(shards, out, steps=2, extra=("--lookahead-weight", "0", "--validation-steps", "1",
                                                "--validation-faces", str(tmp_path / "grey.png"))))
    assert r.returncode == 2 and "error: --validation-faces: " in r.stderr and "grey.png" in r.stderr, r.stderr[-2000:]
    assert not list(out.glob("checkpoint-*")) and not (out / "logs" / "metrics.jsonl").read_text()  # no step ran

    args = argparse.Namespace(id_network="auto", face_models=str(tmp_path / "no-such-pack"))
    with pytest.raises(TrainingError, match=r"--face-models .*no-such-pack: .*fix the path, or drop --face-models"):
        _identity_loss(args, PRESETS["tiny"], "cpu")
    assert _identity_loss(argparse.Namespace(id_network="auto", face_models=None), PRESETS["tiny"], "cpu")[1] in ("arcface", "dlib")


def test_a_kv_rank_other_than_the_kv_lora_files_is_refused(tmp_path, capsys):
    """--kv-lora (rank 4) with --kv-rank 8 trained on at rank 4 without a word."""
    import torch
    from safetensors.torch import save_file

    from lcmla.kv_lora import FORMAT
    from training.train import parse_args

    kv = tmp_path / "kv_encoder_lora.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(4, 8)}, str(kv), metadata={"format": FORMAT, "version": "2", "rank": "4"})
    base = ["--preset", "tiny", "--data", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--max-train-steps", "1"]
    with pytest.raises(SystemExit) as exc:
        parse_args([*base, "--kv-lora", str(kv), "--kv-rank", "8"])
    assert exc.value.code == 2 and "--kv-rank 8 differs from the rank 4 of --kv-lora" in capsys.readouterr().err
    assert parse_args([*base, "--kv-lora", str(kv), "--kv-rank", "4"]).kv_rank == 4
    assert parse_args([*base, "--kv-lora", str(kv)]).kv_rank == 4
    assert parse_args([*base, "--kv-rank", "8"]).kv_rank == 8 and parse_args(base).kv_rank == 4


def test_bf16_with_validation(shards, tmp_path):
    """bf16 autocast on CPU: the float32 trained tensors meet a bf16 UNet in training and in the
    validation engine (which runs under the same autocast)."""
    out = tmp_path / "bf16"
    r = _run(_args(shards, out, steps=2, extra=("--mixed-precision", "bf16", "--validation-steps", "2",
                                                "--reference-framing", "face", "--resolution", "72")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "validation" / "step-000002.png").is_file()
    record = json.loads((out / "validation" / "scores.jsonl").read_text())
    assert record["step"] == 2 and len(record["scores"]) == 2  # 1 face x 2 prompts x 1 seed
    # validation generates as the run trains: its framing and resolution
    assert record["settings"] == {"width": 72, "height": 72, "reference_framing": "face", "kv": True}
    args = json.loads((out / "training_args.json").read_text())
    assert args["mixed_precision"] == "bf16"
    assert load_file(str(out / "kv_encoder_lora.safetensors"))  # exported after a bf16 run


def _corrupt_one_record(src, dst):
    """A copy of the shards with one sample's JSON record overwritten (read as corrupt, skipped)."""
    from training.datagen.shards import iter_members

    shutil.copytree(src, dst)
    shard = dst / "shard-000000.tar"
    _, _, off, size = next(m for m in iter_members(shard) if m[1] == "json")
    with shard.open("r+b") as f:
        f.seek(off)
        f.write(b"\0" * size)


def test_diffusers_spellings_total_limit_validation_and_skipped_counts(shards, tmp_path):
    data = tmp_path / "data"
    _corrupt_one_record(shards, data)
    out = tmp_path / "aliases"
    r = _run(["train", "--preset", "tiny", "--data", str(data), "--output_dir", str(out), "--max_train_steps", "6",
              "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--validation_steps", "3",
              "--train_batch_size", "2", "--resolution", "64", "--id_network", "dlib", "--lookahead_batch_size", "1",
              "--validation_seeds", "0", "1", "--seed", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    # a run whose lookahead previews never showed a face (the tiny preset's random UNet) says so
    steps = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    drawn = [st["faces"] for st in steps if "faces" in st]
    said = "so the lookahead identity loss was 0 throughout (expected with random weights" in " ".join((r.stdout + r.stderr).split())
    assert said == (bool(drawn) and not any(drawn)), (drawn, r.stdout[-1500:])
    # the total limit keeps the newest two
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    grids = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert grids == ["step-000003.png", "step-000006.png"]
    records = [json.loads(line) for line in (out / "validation" / "scores.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in records] == [3, 6]
    for rec in records:
        assert [(c["prompt"], c["seed"]) for c in rec["scores"]] == [
            ("A pencil drawing of a face", 0), ("A pencil drawing of a face", 1),
            ("An oil painting of a face", 0), ("An oil painting of a face", 1)]
        assert all("id" in c for c in rec["scores"])  # None where the recognizer finds no face
    # the corrupt sample is counted: in the log, training_args.json and run_summary.json
    args = json.loads((out / "training_args.json").read_text())
    assert args["skipped"]["corrupt"] == 1 and args["max_train_steps"] == 6
    assert any(line.startswith(f"{args['pairs']} training pairs; skipped (corrupt or face-less): ")
               and "corrupt 1" in line for line in r.stdout.splitlines()), r.stdout[-2000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["skipped"]["corrupt"] >= 1 and summary["step"] == 6 and summary["random_weights"] == "tiny"


def _has_tensorboard() -> bool:
    from accelerate.utils import is_tensorboard_available

    return bool(is_tensorboard_available())


@pytest.mark.skipif(_has_tensorboard(), reason="tensorboard is installed: the error path is tested by test_training_run")
def test_report_to_tensorboard_without_the_package_exits_2_before_loading(shards, tmp_path):
    r = _run(_args(shards, tmp_path / "tb", steps=1, extra=("--report-to", "tensorboard")))
    assert r.returncode == 2, r.stderr[-3000:]
    assert "pip install tensorboard" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "tb").exists()  # nothing was started
    # nor loaded: no loader's bar, no random-weights banner (what the first model load prints)
    assert "Loading" not in r.stderr and "RANDOM WEIGHTS" not in r.stdout


@pytest.mark.skipif(not _has_tensorboard(), reason="tensorboard is not installed (pip install tensorboard)")
def test_report_to_tensorboard_writes_event_files(shards, tmp_path):
    out = tmp_path / "tb"
    r = _run(_args(shards, out, steps=2, extra=("--report-to", "tensorboard", "--lookahead-weight", "0")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_fp16_on_the_cpu_is_refused_with_the_way_out():
    """It failed at the first step with "mat1 and mat2 must have the same dtype" (a traceback)."""
    from training.train import TrainingError, check_precision

    with pytest.raises(TrainingError, match="fp16 needs a CUDA GPU; on the CPU use --mixed-precision bf16 or no"):
        check_precision("fp16", "cpu")
    for ok in (("bf16", "cpu"), ("no", "cpu"), ("fp16", "cuda")):
        check_precision(*ok)
