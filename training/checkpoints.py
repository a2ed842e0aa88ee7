"""Checkpoints: atomic, resumable, and holding only what was trained.

A checkpoint ``<output>/checkpoint-<step>/`` holds
- accelerate's state: optimizer, LR scheduler and the RNG states of every process;
- ``trainable.safetensors``: every trainable tensor by name (exact resume);
- ``train_state-<rank>.pt``: the step, the data cursor and each process's training generator;
- the trained weights in the formats the engine loads (``training.model.export_weights``).
It is written to ``checkpoint-<step>.tmp`` and renamed when complete, so a run killed during a
save leaves the previous checkpoint intact; ``latest`` never picks a temporary folder. Saving a
step that exists already renames the old folder aside (``.replaced``) first and deletes it last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .model import ADAPTER_FILE, FACEID_LORA_FILE, KV_LORA_FILE

_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainState:
    """Where a run is: the optimizer step and the position in the data order."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this process already consumed in ``epoch``
    nan_streak: int = 0


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    out = []
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir():
                out.append((int(m[1]), p))
    return sorted(out)


ARGS_FILE = "training_args.json"  # the run's settings (also in each checkpoint: the ones that trained it)
RUN_FILES = (ARGS_FILE, "run_summary.json", ADAPTER_FILE, FACEID_LORA_FILE, KV_LORA_FILE)


def earlier_run(output_dir: str | Path) -> list[str]:
    """What an earlier run left in ``output_dir`` (its checkpoint folders, then the files of
    :data:`RUN_FILES`), by name; [] for a new or unrelated folder."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return [p.name for _, p in list_checkpoints(root)] + [n for n in RUN_FILES if (root / n).is_file()]


def resolve_resume(output_dir: str | Path, value: str | None) -> Path | None:
    """``--resume-from-checkpoint``: "latest" (None when there is none yet: a fresh start), or a
    checkpoint folder (a clear error when it is not one)."""
    if not value:
        return None
    if value == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(value)
    if not path.is_dir() and (Path(output_dir) / value).is_dir():
        path = Path(output_dir) / value
    if not path.is_dir() or not (path / "trainable.safetensors").is_file():
        raise ValueError(f"--resume-from-checkpoint {value!r} is not a complete checkpoint folder "
                         f"(checkpoint-N with trainable.safetensors); use 'latest' or a path under {output_dir}")
    return path


#: training_args.json entries a resumed run must share with the run that wrote its checkpoint: they
#: decide which tensors are trained and their shapes (another model's weights do not fit)
RESUME_FIXED = ("preset", "random_weights", "parts", "kv_rank")
#: entries that change nothing a step computes (bookkeeping, or tested to give the same numbers):
#: a change of any other entry is reported, since the run then differs from an uninterrupted one
RESUME_FREE = frozenset({
    "output_dir", "resume_from_checkpoint", "overwrite", "max_train_steps", "checkpointing_steps",
    "checkpoints_total_limit", "report_to", "gradient_checkpointing", "dataloader_num_workers", "weights_dir",
    "face_models", "adapter", "kv_lora", "train", "validation_steps", "validation_faces", "validation_prompts",
    "validation_seeds", "max_nan_steps", "pairs", "skipped", "init_params_sha256",
})


def resume_differences(before: dict, now: dict) -> tuple[list[str], list[str]]:
    """(refused, changed): the entries of :data:`RESUME_FIXED` whose values differ between the
    ``training_args.json`` of the run that wrote a checkpoint (``before``) and the resuming run's
    (``now``), and the other differing entries outside :data:`RESUME_FREE`, each as
    "name was X, now Y". An entry missing from ``before`` (an older file) is not compared."""
    def shown(value) -> str:
        return json.dumps(value, default=str)

    refused, changed = [], []
    for key in sorted(set(before) & set(now)):
        a, b = json.loads(shown(before[key])), json.loads(shown(now[key]))  # both as the file stores them
        if a == b or key in RESUME_FREE:
            continue
        (refused if key in RESUME_FIXED else changed).append(f"{key} was {shown(a)}, now {shown(b)}")
    return refused, changed


def checkpoint_args(folder: Path) -> dict:
    """The training_args.json of the run that wrote checkpoint ``folder``: its own copy, else the
    one in its run folder (checkpoints written before the copy existed); {} when neither reads."""
    for path in (Path(folder) / ARGS_FILE, Path(folder).parent / ARGS_FILE):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            return data
    return {}


def params_digest(named_params: list[tuple[str, torch.nn.Parameter]]) -> str:
    """sha256 of the trainable tensors (every process writes its own: equal ranks, equal digests)."""
    import hashlib

    h = hashlib.sha256()
    for name, p in named_params:
        h.update(name.encode())
        h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(accelerator, output_dir: str | Path, state: TrainState, generator: torch.Generator,
                    named_params: list[tuple[str, torch.nn.Parameter]], export, limit: int | None) -> Path:
    """Write ``checkpoint-<step>`` atomically on every process (see the module docstring).

    ``export(folder)`` writes the loadable weight files (main process). ``limit``: keep at most
    that many checkpoints (the oldest go first, after the new one is complete).
    """
    from safetensors.torch import save_file

    root = Path(output_dir)
    final = root / f"checkpoint-{state.global_step}"
    tmp = root / f"checkpoint-{state.global_step}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save({"state": asdict(state), "generator": generator.get_state(), "params_sha256": params_digest(named_params)},
               tmp / f"train_state-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_file({n: p.detach().float().contiguous().cpu() for n, p in named_params}, str(tmp / "trainable.safetensors"))
        export(tmp)
        if (root / ARGS_FILE).is_file():  # the settings that trained it, for a later resume to compare
            shutil.copyfile(root / ARGS_FILE, tmp / ARGS_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        aside = root / f"checkpoint-{state.global_step}.replaced"
        if final.exists():  # the same step saved again (a run resumed from an older checkpoint):
            # renamed aside, not deleted, before the new one takes its name, so a complete checkpoint
            # of this step exists at every instant (``latest`` never reads the aside folder)
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)
        os.replace(tmp, final)
        if aside.exists():  # this save's, or one left by a save that died between the renames
            shutil.rmtree(aside, ignore_errors=True)
        if limit:
            for _, old in list_checkpoints(root)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, folder: Path, generator: torch.Generator,
                    named_params: list[tuple[str, torch.nn.Parameter]]) -> TrainState:
    """Restore a checkpoint written by :func:`save_checkpoint` (weights, optimizer, scheduler, RNG,
    generator, data cursor)."""
    from safetensors.torch import load_file

    accelerator.load_state(str(folder))
    tensors = load_file(str(folder / "trainable.safetensors"))
    missing = [n for n, _ in named_params if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint {folder} does not hold {missing[0]} (and {len(missing) - 1} more): it was "
                         "written for other --train parts; resume with the same --train")
    with torch.no_grad():
        for name, p in named_params:
            p.copy_(tensors[name].to(p.device, p.dtype))
    saved = torch.load(folder / f"train_state-{accelerator.process_index}.pt", weights_only=True)
    generator.set_state(saved["generator"])
    return TrainState(**saved["state"])
