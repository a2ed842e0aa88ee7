"""``python -m lcmla evaluate``: build the engines and scorers, run the grid, write the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import LcmlaError


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


def evaluate_command(args) -> int:
    from .. import Engine
    from ..cli import _parse_value
    from ..methods import METHODS
    from .metrics import AestheticScorer, ClipScorer
    from .report import write_report
    from .run import EvalConfig, Evaluation, identity_photos, load_prompts

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m.removeprefix("trained:") not in METHODS:
            raise LcmlaError(f"unknown method {m!r}; choose from {', '.join(METHODS)} (or trained:NAME)")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise LcmlaError(f"--set {item!r} must look like KEY=VALUE")
        overrides[key.strip()] = _parse_value(value)
    config = EvalConfig(methods=methods, identities=[identity_photos(f) for f in args.faces],
                        prompts=load_prompts(args.prompts, args.max_prompts),
                        seeds=_numbers(args.seeds, int, "--seeds"), scales=_numbers(args.scales, float, "--scales"),
                        overrides=overrides)
    kw = dict(device=args.device, dtype=args.dtype, weights_dir=args.weights_dir, face_models=args.face_models)
    engine = Engine.load(args.preset, **kw)
    engines = {"base": engine}
    if args.trained_adapter or args.trained_kv_lora:
        engines["trained"] = Engine.load(args.preset, adapter=args.trained_adapter, kv_encoder_lora=args.trained_kv_lora, **kw)
    clip = aesthetic = None
    if (args.clip_model or "").lower() != "none":
        paths = engine.components.paths
        model = Path(args.clip_model) if args.clip_model else paths["image_encoder"]
        tokenizer = None if args.clip_model else paths["base"] / "tokenizer"
        clip = ClipScorer(model, tokenizer, device=str(engine.device), meaningful=not engine.preset.random_weights)
        if args.aesthetic_weights:
            aesthetic = AestheticScorer(args.aesthetic_weights, clip)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_config = {"preset": args.preset, "random_weights": engine.preset.random_weights, "methods": methods,
                  "faces": [n for n, _ in config.identities], "prompts": args.prompts, "n_prompts": len(config.prompts),
                  "seeds": config.seeds, "scales": config.scales, "overrides": overrides,
                  "id_networks": None, "clip": None if clip is None else clip.name,
                  "trained": {k: getattr(args, k) for k in ("trained_adapter", "trained_kv_lora")}}
    scorers = scorers_for(args.id_networks, engine, args.face_models)
    run_config["id_networks"] = [s.name for s in scorers]
    (out / "config.json").write_text(json.dumps(run_config, indent=2, default=str) + "\n")
    total = len(config.cells())
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="evaluating", unit="image")
    progress = (lambda i, n, cell: bar.update(1)) if bar is not None else None  # noqa: E731
    try:
        rows = Evaluation(engines, scorers, clip, aesthetic, out).run(config, progress)
    finally:
        if bar is not None:
            bar.close()
    report = write_report(out, rows, run_config)
    print(report)
    return 0
