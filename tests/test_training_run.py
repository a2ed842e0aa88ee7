"""The trainer's run-level helpers without a training run: model resolution with random weights,
tracker and distributed-mode checks, log truncation on resume, re-saving a checkpoint safely."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from training.train import (
    TrainingError,
    check_distributed,
    check_trackers,
    parse_args,
    resolve_model,
    truncate_jsonl,
)


def _parse(*extra):
    return parse_args(["--data", "d", "--output-dir", "o", "--max-train-steps", "1", *extra])


# ---- --random-weights ---------------------------------------------------------------------------


def test_random_weights_resolve_any_preset_onto_the_random_build(tiny_cache):
    from lcmla.presets import get_preset
    from lcmla.tiny import random_weights_paths

    args = _parse("--preset", "sdxl-base", "--random-weights", "tiny")
    preset, paths = resolve_model(args)
    real = get_preset("sdxl-base")
    assert preset.random_weights and "RANDOM WEIGHTS" in preset.title and "tiny" in preset.title
    # the preset's own recipe (scheduler, steps, size) over the random build's folders
    assert (preset.scheduler, preset.steps, preset.width) == (real.scheduler, real.steps, real.width)
    assert paths == random_weights_paths("tiny")
    assert {"base", "faceid", "image_encoder", "taesd", "lcm_lora"} <= set(paths)
    assert all(p.is_dir() for p in paths.values())
    # the tiny preset is random weights already: the same folders without the flag
    tiny, tiny_paths = resolve_model(_parse("--preset", "tiny"))
    assert tiny.random_weights and tiny_paths == paths


def test_random_weights_flag_choices():
    assert _parse("--random-weights", "full").random_weights == "full"
    assert _parse("--random_weights", "tiny").random_weights == "tiny"  # diffusers' spelling
    assert _parse().random_weights is None
    with pytest.raises(SystemExit):
        _parse("--random-weights", "huge")


# ---- trackers and distributed modes ------------------------------------------------------------


def test_a_missing_tracker_package_is_a_user_error(monkeypatch):
    import accelerate.tracking
    import accelerate.utils

    check_trackers("none")
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(TrainingError, match=r"tensorboard package is not installed.*pip install tensorboard"):
        check_trackers("tensorboard")
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(TrainingError, match="pip install wandb"):
        check_trackers("wandb")
    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", list)
    with pytest.raises(TrainingError, match="no tracker package is installed"):
        check_trackers("all")
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: True)
    check_trackers("tensorboard")  # available: no error


def test_deepspeed_and_fsdp_are_refused_with_a_message():
    from accelerate.utils import DistributedType

    for kind in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_distributed(SimpleNamespace(distributed_type=kind))
    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(TrainingError, match="plain multi-GPU configuration"):
            check_distributed(SimpleNamespace(distributed_type=kind))


# ---- logs on resume -----------------------------------------------------------------------------


def test_truncate_jsonl_keeps_the_steps_up_to_the_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert truncate_jsonl(path, 3) == 0 and not path.exists()  # nothing yet: nothing written
    lines = [json.dumps({"step": s, "loss": s / 10}) for s in (1, 2, 3, 4, 5)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # a torn last line (killed mid-write)
    assert truncate_jsonl(path, 3) == 3
    assert path.read_text().splitlines() == lines[:3]
    assert truncate_jsonl(path, 0) == 0 and path.read_text() == ""  # a fresh start in the same folder
    assert not path.with_name("metrics.jsonl.tmp").exists()


# ---- checkpoints --------------------------------------------------------------------------------


@pytest.fixture()
def accelerator():
    from accelerate import Accelerator

    return Accelerator()


def test_saving_an_existing_step_again_never_leaves_it_missing(tmp_path, accelerator, monkeypatch):
    from safetensors.torch import load_file

    import training.checkpoints as ck

    param = torch.nn.Parameter(torch.zeros(3))
    named = [("w", param)]
    opt = accelerator.prepare(torch.optim.SGD([param], lr=1.0))
    gen = torch.Generator().manual_seed(0)
    state = ck.TrainState(global_step=2)
    def export(folder):
        return None

    first = ck.save_checkpoint(accelerator, tmp_path, state, gen, named, export, None)
    assert load_file(str(first / "trainable.safetensors"))["w"].tolist() == [0, 0, 0]
    with torch.no_grad():
        param.fill_(1.0)
    # a crash while the new folder takes the old one's name: the old checkpoint survives, renamed aside
    real_replace = ck.os.replace

    def failing(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(accelerator, tmp_path, state, gen, named, export, None)
    aside = tmp_path / "checkpoint-2.replaced"
    assert load_file(str(aside / "trainable.safetensors"))["w"].tolist() == [0, 0, 0]
    assert ck.resolve_resume(tmp_path, "latest") is None  # neither the aside nor the .tmp is "latest"
    monkeypatch.setattr(ck.os, "replace", real_replace)
    again = ck.save_checkpoint(accelerator, tmp_path, state, gen, named, export, None)
    assert load_file(str(again / "trainable.safetensors"))["w"].tolist() == [1, 1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    del opt


# ---- benchmarks/bench_train.py's modes ------------------------------------------------------------


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_train_full_mode_is_sdxl_random_weights_at_1024_bf16():
    bench = _bench()
    full = bench.parse(["--full"])
    assert (full.preset, full.random_weights, full.resolution, full.mixed_precision) == ("sdxl-base", "full", 1024, "bf16")
    assert (full.batch_sizes, full.checkpointing) == ("1,2,4", "off,on")
    assert bench.parse(["--full", "--batch-sizes", "4"]).batch_sizes == "4"  # flags override the mode
    tiny = bench.parse([])
    assert (tiny.preset, tiny.random_weights, tiny.resolution, tiny.mixed_precision) == ("tiny", None, 64, "no")
    assert bench._fits(20.0) == "24 GB, 80 GB" and bench._fits(40.0) == "80 GB" and bench._fits(90.0) == "neither"
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bench.main(["--full"])
