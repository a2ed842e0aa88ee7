"""``python -m lcmla evaluate``: build the engines and scorers, run the grid, write the report."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import LcmlaError, check_output_dir


def _numbers(text: str, cast, flag: str) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LcmlaError(f"{flag} must be comma-separated numbers (got {text!r})") from None
    if not values:
        raise LcmlaError(f"{flag} is empty")
    return values


def scorers_for(spec: str, engine, face_models: str | None = None) -> list:
    """The identity recognizers named by ``--id-networks`` (auto: the engine's backend + dlib)."""
    from ..faces import FaceAnalyzer
    from .metrics import AnalyzerScorer, DlibScorer

    names = [n.strip() for n in spec.split(",") if n.strip()]
    auto = names == ["auto"]
    if auto:
        names = [engine.faces.backend, "dlib"]
    out = []
    for name in names:
        if name == engine.faces.backend:
            out.append(AnalyzerScorer(engine.faces))
        elif name == "insightface":
            out.append(AnalyzerScorer(FaceAnalyzer.insightface(name=face_models or "buffalo_l")))
        elif name == "haar":
            out.append(AnalyzerScorer(FaceAnalyzer.haar()))
        elif name == "dlib":
            try:
                from ..recognizers.dlib_pipeline import DlibFaces
            except ImportError as exc:
                if auto:
                    continue
                raise LcmlaError(f"--id-networks dlib: {exc}") from None
            out.append(DlibScorer(DlibFaces.load()))
        else:
            raise LcmlaError(f"unknown identity recognizer {name!r}; choose insightface, dlib, haar or auto")
    return out


def path_digest(path: str | Path) -> str:
    """sha256 of a weight file, or of a folder's files (relative names and bytes)."""
    import hashlib

    from .run import file_digest

    path = Path(path)
    if not path.exists():
        raise LcmlaError(f"trained weights {path}: no such file or folder")
    if path.is_file():
        return file_digest(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}\0{file_digest(f)}\n".encode())
    return h.hexdigest()


def pixel_spec(preset: str, dtype: str, random_weights: bool, trained: dict[str, str | None]) -> dict:
    """What, beyond a cell's own coordinates and the ``--set`` overrides, changes its pixels: the
    preset, the dtype, and the trained weights' contents (not their paths)."""
    return {"preset": preset, "dtype": dtype, "random_weights": random_weights,
            "trained": {k: None if v is None else path_digest(v) for k, v in sorted(trained.items())}}


#: Everything an evaluation writes into its folder; --overwrite removes these (and, in images/, the
#: cells' own PNGs: see IMAGE_NAME).
OUTPUTS = ("results.jsonl", "results.jsonl.tmp", "results.rank-*.jsonl", "summary.csv", "pareto-*.png",
           "pareto-*.json", "grid-*.png", "report.md", "config.json")
#: A cell's image in images/: its 16-hex key (``Cell.key``), or that name + ".tmp" while written.
IMAGE_NAME = re.compile(r"^[0-9a-f]{16}\.png(\.tmp)?$")


def _has_results(out: Path) -> bool:
    return any(out.glob("results*.jsonl")) or any(IMAGE_NAME.match(p.name) for p in (out / "images").glob("*.png"))


def config_conflict(out: Path, pixels: dict) -> str | None:
    """Why the results already in ``out`` cannot join a run with ``pixels`` (``pixel_spec`` plus
    the overrides), or None. A grid with other methods, seeds, scales or prompts is welcome (its
    cells are reused); other pixels are not: the report would mix two configurations."""
    if not _has_results(out):
        return None
    try:
        before = json.loads((out / "config.json").read_text()).get("pixels")
    except (OSError, ValueError):
        before = None
    if before is None:
        return f"{out} holds results without a readable config.json (an interrupted or older run)"
    if before == pixels:
        return None
    keys = sorted(set(before) | set(pixels))
    diff = "; ".join(f"{k}: {json.dumps(before.get(k), default=str)} → {json.dumps(pixels.get(k), default=str)}"
                     for k in keys if before.get(k) != pixels.get(k))
    return f"{out} holds results made with other settings ({diff})"


def clear_outputs(out: Path) -> int:
    """Delete what an evaluation wrote in ``out`` (see OUTPUTS, IMAGE_NAME); returns how many entries."""
    import shutil

    n = 0
    for pattern in OUTPUTS:
        for path in out.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            n += 1
    images = out / "images"
    if images.is_dir():  # only the cells' images: anything else a user put there stays
        for path in images.iterdir():
            if path.is_file() and IMAGE_NAME.match(path.name):
                path.unlink(missing_ok=True)
                n += 1
        if not any(images.iterdir()):
            images.rmdir()
    return n


def _write_json(path: Path, data: dict) -> None:
    """Atomically (several processes write the same config)."""
    import os

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def optional_scorers(args, clip, device: str) -> tuple[Any, Any, list[str]]:
    """(aesthetic scorer or None, ImageReward scorer or None, notes on the metrics not computed)."""
    from .metrics import AestheticScorer, ImageRewardScorer, Unavailable

    notes = []
    aesthetic = imagereward = None
    if args.aesthetic_weights and clip is None:
        notes.append("Aesthetic score: skipped, it needs CLIP (--clip-model is 'none').")
    elif args.aesthetic_weights:
        aesthetic = AestheticScorer(args.aesthetic_weights, clip)
    else:
        notes.append("Aesthetic score: not computed (no --aesthetic-weights: LAION's "
                     "sac+logos+ava1-l14-linearMSE.pth with a ViT-L/14 --clip-model).")
    if getattr(args, "imagereward", None):
        try:
            imagereward = ImageRewardScorer.load(args.imagereward, device)
        except Unavailable as exc:
            notes.append(f"ImageReward: skipped — {exc}.")
    else:
        notes.append("ImageReward: not computed (no --imagereward DIR holding ImageReward.pt and med_config.json).")
    return aesthetic, imagereward, notes


def check_grid_settings(preset: str, overrides: dict, scales) -> None:
    """Every --set value and every --scales value as the grid will apply them, refused with the
    flag's name before anything is loaded or deleted."""
    from ..settings import GenerationSettings

    axes = {"output.seed": "--seeds", "output.num_images": "one image per cell", "identity.ip_adapter_scale": "--scales",
            "prompt": "--prompts", "preset": "--preset"}
    for key in overrides:
        if key in axes:
            raise LcmlaError(f"--set {key}: the grid sets it per cell ({axes[key]}), so an override would give the "
                             "cells another value than their rows record; drop it (use the flag instead)")
    base = GenerationSettings(preset=preset)
    try:
        base = base.replace_dotted(overrides)
    except (ValueError, KeyError, TypeError) as exc:
        raise LcmlaError(f"--set: {exc}") from None
    for scale in scales:
        try:
            base.replace_dotted({"identity.ip_adapter_scale": scale})
        except (ValueError, KeyError, TypeError) as exc:
            raise LcmlaError(f"--scales {scale:g}: {exc}") from None


def evaluate_command(args) -> int:
    import torch

    from .. import Engine
    from ..cli import _parse_value
    from ..engine import _parse_dtype
    from ..methods import METHODS
    from ..presets import get_preset
    from .metrics import ClipScorer
    from .report import write_report
    from .run import EvalConfig, Evaluation, identity_photos, load_prompts, processes, results_lock

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise LcmlaError(f"--methods {args.methods!r} names no method; pass a comma-separated list of "
                         f"{', '.join(METHODS)} (or trained:NAME)")
    for m in methods:
        if m.removeprefix("trained:") not in METHODS:
            raise LcmlaError(f"unknown method {m!r}; choose from {', '.join(METHODS)} (or trained:NAME)")
    if any(m.startswith("trained:") for m in methods) and not (args.trained_adapter or args.trained_kv_lora):
        raise LcmlaError("the trained: methods need trained weights: pass --trained-adapter and/or --trained-kv-lora "
                         "(the files `python -m training train` wrote)")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise LcmlaError(f"--set {item!r} must look like KEY=VALUE")
        overrides[key.strip()] = _parse_value(value)
    procs = processes()
    overwrite = getattr(args, "overwrite", False)
    if overwrite and procs.world > 1 and procs.barrier is None:
        raise LcmlaError("--overwrite with several processes needs a process group (accelerate launch): clear the "
                         "folder once with a one-process run, or remove it, then start the processes")
    device = args.device or procs.device
    preset = get_preset(args.preset)
    dtype = str(_parse_dtype(args.dtype, device or ("cuda" if torch.cuda.is_available() else "cpu"))).removeprefix("torch.")
    trained = {"adapter": args.trained_adapter, "kv_lora": args.trained_kv_lora}
    pixels = {**pixel_spec(preset.name, dtype, preset.random_weights, trained), "overrides": overrides}
    # every setting is checked before the folder is touched: a typo must not cost old results
    config = EvalConfig(methods=methods, identities=[identity_photos(f) for f in args.faces],
                        prompts=load_prompts(args.prompts, args.max_prompts),
                        seeds=_numbers(args.seeds, int, "--seeds"), scales=_numbers(args.scales, float, "--scales"),
                        overrides=overrides, pixels={k: v for k, v in pixels.items() if k != "overrides"})
    check_grid_settings(preset.name, overrides, config.scales)
    out = Path(args.output_dir)
    check_output_dir(out, "--output-dir")
    out.mkdir(parents=True, exist_ok=True)
    conflict = config_conflict(out, pixels)
    if conflict is not None and not overwrite:
        raise LcmlaError(f"{conflict}: its cells would not be reused and the report would mix the two. Use a new "
                         "--output-dir, or pass --overwrite to delete its results, images and report first")
    if conflict is not None and procs.is_main:
        clear_outputs(out)
    if procs.barrier is not None:
        procs.barrier()  # nobody starts before the folder is cleared
    kw = dict(device=device, dtype=args.dtype, weights_dir=args.weights_dir, face_models=args.face_models)
    if args.quiet:  # the loaders' bars too, as generate --quiet
        from ..loading import disable_progress_bars

        disable_progress_bars()
    engine = Engine.load(args.preset, **kw)
    engines = {"base": engine}
    if args.trained_adapter or args.trained_kv_lora:
        engines["trained"] = Engine.load(args.preset, adapter=args.trained_adapter, kv_encoder_lora=args.trained_kv_lora, **kw)
    clip = None
    if (args.clip_model or "").lower() != "none":
        paths = engine.components.paths
        model = Path(args.clip_model) if args.clip_model else paths["image_encoder"]
        tokenizer = None if args.clip_model else paths["base"] / "tokenizer"
        # the preset's own CLIP is random on the tiny preset; a CLIP the user names is taken as real
        meaningful = bool(args.clip_model) or not engine.preset.random_weights
        clip = ClipScorer(model, tokenizer, device=str(engine.device), meaningful=meaningful)
    aesthetic, imagereward, notes = optional_scorers(args, clip, str(engine.device))
    scorers = scorers_for(args.id_networks, engine, args.face_models)
    run_config = {"preset": args.preset, "random_weights": engine.preset.random_weights, "methods": methods,
                  "faces": [n for n, _ in config.identities], "prompts": args.prompts, "n_prompts": len(config.prompts),
                  "seeds": config.seeds, "scales": config.scales, "overrides": overrides,
                  "id_networks": [s.name for s in scorers],
                  "recognizers": {s.name: bool(s.is_recognizer) for s in scorers},
                  "clip": None if clip is None else clip.name,
                  "clip_meaningful": None if clip is None else bool(clip.meaningful),
                  "aesthetic": aesthetic is not None, "imagereward": None if imagereward is None else imagereward.name,
                  "trained": {k: getattr(args, k) for k in ("trained_adapter", "trained_kv_lora")},
                  "processes": procs.world, "pixels": pixels, "notes": notes}
    _write_json(out / "config.json", run_config)
    cells = config.cells()
    share = procs.share(cells)
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        desc = "evaluating" if procs.world == 1 else f"evaluating (process {procs.rank} of {procs.world})"
        bar = tqdm(total=len(share), desc=desc, unit="image")
    progress = (lambda i, n, cell: bar.update(1)) if bar is not None else None  # noqa: E731
    try:
        rows = Evaluation(engines, scorers, clip, aesthetic, out, imagereward).run(config, progress, procs)
    finally:
        if bar is not None:
            bar.close()
    if rows is None:
        if procs.barrier is None:
            print(f"process {procs.rank} of {procs.world}: its {len(share)} cells are done; the grid is not complete "
                  "yet. The process that completes it merges results.jsonl and writes the report (or run the same "
                  "command again with one process once all have finished).", file=sys.stderr)
        return 0
    with results_lock(out):
        report = write_report(out, rows, run_config)
    print(report)
    return 0
