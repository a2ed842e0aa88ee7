"""Command-line interface.

    python -m lcmla generate --face a.jpg --prompt "a pencil drawing of a face" --preset tiny --seed 7 --out outdir
    python -m lcmla generate --settings-from outdir/lcmla-7.png --face a.jpg --out again
    python -m lcmla presets
    python -m lcmla show outdir/lcmla-7.png

User mistakes (bad settings, unreadable photos, no face, missing weights) print one clear message
and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .argtypes import EXIT_USER_ERROR, Number, OneLineParser, add_flag
from .errors import LcmlaError
from .fastface import FASTFACE_PRESETS
from .methods import METHODS, method_changes
from .knobs import KNOB, KNOBS, cli_flags, cli_help, parse_cli
from .acceleration import COMPILE_MODES
from .memory import MEMORY_MODES, MEMORY_NOTES
from .presets import DEFAULT_PRESET, PRESETS, RANDOM_ARCHITECTURES
from .settings import GenerationSettings


def _dest(knob) -> str:
    return "knob__" + knob.name.replace(".", "__")


_Parser = OneLineParser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m lcmla", description="Identity-preserving few-step SDXL generation.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate images of the face in one or more photos")
    gen.add_argument("--face", action="append", metavar="PHOTO",
                     help="reference photo (repeat for several); without one, the image is made from the text alone")
    gen.add_argument("--preset", default=None, choices=sorted(PRESETS), help=f"backbone (default {DEFAULT_PRESET})")
    gen.add_argument("--fastface", choices=list(FASTFACE_PRESETS),
                     help="apply one of the FastFace authors' configurations (before any --set)")
    gen.add_argument("--method", choices=list(METHODS),
                     help="apply a named method of either paper, e.g. lookahead-released (before any --set)")
    knobs = gen.add_argument_group("settings", "every knob of the app, by its setting path (the app's table, "
                                    "lcmla.knobs); flags left out keep the defaults (or the --settings-from PNG's)")
    for knob in KNOBS:
        bool_like = knob.kind == "bool"
        knobs.add_argument(*cli_flags(knob), dest=_dest(knob), default=None, metavar="VALUE" if not bool_like else "BOOL",
                           nargs="?" if bool_like else None, const="true" if bool_like else None,
                           help=cli_help(knob).replace("%", "%%"))
    gen.add_argument("--kv-lora", help="a KV-encoder LoRA checkpoint (.safetensors written by lcmla training)")
    gen.add_argument("--adapter", help="an IP-Adapter checkpoint instead of the preset's FaceID-Plus-v2 "
                                       "(trained by lcmla, or IP-Adapter Plus-Face)")
    gen.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any setting by dotted name, value as JSON, e.g. --set attention.mode=am2 --set 'guidance.dcg_a=[1,2,2,1]'")
    gen.add_argument("--settings-from", metavar="PNG|JSON", help="start from the settings embedded in a PNG made by "
                     "lcmla, or a .json of them (what `python -m lcmla show PNG` prints)")
    gen.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    gen.add_argument("--overwrite", action="store_true",
                     help="replace images of the same seeds already in --out (by default a new image whose "
                     "name is taken gets the next free one, lcmla-SEED-1.png, …)")
    gen.add_argument("--weights-dir", help="folder with model repos as <org>/<name> (or env LCMLA_WEIGHTS)")
    gen.add_argument("--face-models", help="insightface model pack folder (default buffalo_l in ~/.insightface), "
                     "or haar for the offline OpenCV stand-in")
    gen.add_argument("--download", action="store_true", help="download missing weights from the Hugging Face Hub")
    gen.add_argument("--device", help="cpu, cuda, cuda:1, … (default: cuda when present)")
    gen.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float16 on CUDA)")
    gen.add_argument("--memory", choices=MEMORY_MODES, default="auto",
                     help="full: every model on the device; balanced: the text and image encoders offloaded to CPU "
                          "memory between requests, for 12-16 GB cards; low: every model offloaded + VAE tiling, for "
                          "8-12 GB cards; auto (default): by the GPU's free memory (full from 14 GiB, balanced from "
                          "11.2 GiB, else low)")
    gen.add_argument("--compile", choices=COMPILE_MODES, default="none",
                     help="torch.compile: am (FastFace's identity branch fused) or unet (that and the UNet); the "
                          "first image compiles (seconds to minutes; other sizes and image counts reuse its graphs), "
                          "later ones are faster on a GPU")
    gen.add_argument("--random-weights", choices=RANDOM_ARCHITECTURES, default=None,
                     help="run the preset on a random-weights build of SDXL's full (or tiny) architecture, built once "
                          "on this machine: for speed and memory measurements only, the images are patterns")
    gen.add_argument("--quiet", action="store_true", help="no progress bars")

    conv = sub.add_parser("convert-lookahead", help="convert the LCM-Lookahead authors' model_ckpt.pt into an "
                          "IP-Adapter Plus-Face file and a KV-encoder LoRA that lcmla loads")
    conv.add_argument("checkpoint", help="model_ckpt.pt saved by their train_encoder.py")
    conv.add_argument("--out", required=True, help="output folder")
    conv.add_argument("--unet-config", default="sdxl", choices=("sdxl", "tiny"),
                      help="the UNet the checkpoint belongs to (sdxl; tiny for tests)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace the two files an earlier conversion left in --out (refused otherwise)")

    ev = sub.add_parser("evaluate", help="the papers' evaluation grid: methods × faces × prompts × seeds × λ, "
                        "with ID / FFC / CLIP-T / face-style metrics, a summary and Pareto plots")
    ev.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    ev.add_argument("--faces", nargs="+", required=True, metavar="PHOTO_OR_FOLDER",
                    help="one identity per entry: a photo, or a folder of photos of the same person")
    ev.add_argument("--methods", default="baseline,am1+dcg,am2+dcg,lookahead-kv",
                    help=f"comma-separated, from {', '.join(METHODS)}; 'trained:NAME' runs NAME with --trained-* weights")
    ev.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    ev.add_argument("--scales", default="0.1,0.35,0.5,0.65,0.8,0.95", help="identity scales λ, comma-separated")
    ev.add_argument("--prompts", default="lookahead",
                    help="lookahead (LCM-Lookahead's 18, default), realistic, style, fastface (both), or a file")
    add_flag(ev, "--max-prompts", type=Number(int, 1), default=None, help="first N prompts of each set")
    ev.add_argument("--output-dir", required=True)
    ev.add_argument("--id-networks", default="auto",
                    help="identity recognizers: insightface, dlib, haar (stand-in), comma-separated; auto = "
                         "the engine's face backend plus dlib")
    ev.add_argument("--clip-model", default=None,
                    help="a CLIPModel folder for CLIP-T / face-style (default: the preset's CLIP ViT-H/14); 'none' skips")
    ev.add_argument("--aesthetic-weights", default=None, help="LAION aesthetic predictor .pth (needs a ViT-L/14 --clip-model)")
    ev.add_argument("--imagereward", default=None, metavar="DIR",
                    help="a local ImageReward release (ImageReward.pt + med_config.json) scored through the "
                         "image-reward package; skipped, with a note in report.md, when either is missing")
    ev.add_argument("--overwrite", action="store_true",
                    help="delete the results of another configuration (preset, dtype, --set, trained weights) "
                         "in --output-dir instead of refusing to mix them")
    ev.add_argument("--trained-adapter", default=None, help="adapter file written by `python -m training train`")
    ev.add_argument("--trained-kv-lora", default=None, help="KV-encoder LoRA written by the trainer")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every image, e.g. guidance.steps=4")
    ev.add_argument("--weights-dir")
    ev.add_argument("--face-models")
    ev.add_argument("--device")
    ev.add_argument("--dtype")
    ev.add_argument("--quiet", action="store_true")

    sub.add_parser("presets", help="list the presets")
    show = sub.add_parser("show", help="print the settings embedded in a PNG made by lcmla")
    show.add_argument("png")
    return parser


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings: --set attention.mode=am2


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """Start from defaults (or a PNG), then apply the flags that were given."""
    if args.settings_from:
        from .pngmeta import settings_from_png

        src = Path(args.settings_from).expanduser()
        if src.suffix.lower() == ".json":  # what `python -m lcmla show PNG > s.json` wrote
            try:
                text = src.read_text(encoding="utf-8")
            except OSError as exc:
                raise LcmlaError(f"--settings-from {src}: cannot read it ({exc.strerror or exc})") from None
            try:
                base = GenerationSettings.from_json(text)
            except ValueError as exc:
                raise LcmlaError(f"--settings-from {src}: {exc}") from None
        else:
            base = settings_from_png(args.settings_from)
    else:
        prompt = getattr(args, _dest(KNOB["prompt"]))
        if not prompt:  # --set prompt=… counts as giving it
            prompt = next((v for k, _, v in (i.partition("=") for i in args.set) if k.strip() == "prompt"), None)
        if not prompt:
            raise LcmlaError("--prompt is required (or --settings-from PNG)")
        base = GenerationSettings(prompt=prompt)
    changes: dict[str, Any] = {}
    if args.preset is not None:
        changes["preset"] = args.preset
    if args.fastface and args.method and args.fastface != args.method:  # the later one silently won
        raise LcmlaError(f"--fastface {args.fastface} and --method {args.method} both name a whole configuration; "
                         "pass one of them (and change single knobs with their flags or --set)")
    for name in (args.fastface, args.method):  # named configurations first, then the knobs given
        if name:
            changes.update(method_changes(name, args.preset or base.preset))
    for knob in KNOBS:
        value = getattr(args, _dest(knob), None)
        if value is not None:
            changes[knob.name] = parse_cli(knob, value)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise LcmlaError(f"--set {item!r} must look like KEY=VALUE, e.g. --set identity.lora_scale=0.6")
        changes[key.strip()] = _parse_value(value)
    return base.replace_dotted(changes) if changes else base


def _generate(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)  # validate before loading anything heavy
    from .engine import Engine
    from .errors import check_output_dir

    if not str(args.out).strip():  # "" wrote into the current folder
        raise LcmlaError("--out is empty: pass a folder (it is created if missing), e.g. --out out")
    check_output_dir(args.out, "--out")  # refused now, not after the images are made
    for face in args.face or ():  # a missing photo, before minutes of loading (its contents are read later)
        if not Path(face).expanduser().exists():
            raise LcmlaError(f"--face {face}: no such file; pass the path of a photo of the face")
    if args.quiet:  # this process's own loading bars too (diffusers' and transformers')
        from .loading import disable_progress_bars

        disable_progress_bars()

    engine = Engine.load(
        settings.preset,
        device=args.device,
        dtype=args.dtype,
        weights_dir=args.weights_dir,
        allow_download=args.download,
        face_models=args.face_models,
        kv_encoder_lora=args.kv_lora,
        adapter=args.adapter,
        memory=args.memory,
        random_weights=args.random_weights,
        compile=args.compile,
    )
    if engine.preset.random_weights:
        print(f"note: {engine.preset.title}: random weights, so the images are patterns, not photos.", file=sys.stderr)
    if engine.memory_mode in MEMORY_NOTES:
        on_cpu = str(engine.device).startswith("cpu")
        print(f"note: {MEMORY_NOTES[engine.memory_mode]}"
              + ("; on the CPU the models are in CPU memory anyway, so this only runs the offloading path" if on_cpu
                 else ""), file=sys.stderr)
    if engine.compiled:
        print(f"note: compiled with torch.compile ({', '.join(engine.compiled)}): the first image "
              "compiles first (seconds to minutes)", file=sys.stderr)
    bar = None
    callback = None
    if not args.quiet:
        from tqdm.auto import tqdm

        from .presets import resolve_settings

        resolved = resolve_settings(settings, engine.preset)
        bar = tqdm(total=resolved.guidance.steps * resolved.output.num_images, desc="denoising", unit="step")

        def callback(info) -> None:  # noqa: ANN001
            bar.update(1)

    try:
        result = engine.generate(settings, args.face or None, callback=callback)
    finally:
        if bar is not None:
            bar.close()
    try:
        inputs = [*(args.face or ()), *([args.settings_from] if args.settings_from else [])]
        saved = result.save(args.out, overwrite=args.overwrite, keep=inputs)  # never over its own inputs
    except OSError as exc:  # the folder went away or filled up while generating
        raise LcmlaError(f"--out {args.out}: the images could not be written ({exc.strerror or exc}); "
                         "pass another folder") from None
    for path in saved:
        print(path)
    if not args.face:
        print("note: no --face given, so the image is made from the text alone (no identity)", file=sys.stderr)
    if settings.attention.capture_maps:
        print("note: attention.capture_maps records the identity-attention maps for the app's Attention maps tab "
              "and the Python API (Result.attention_maps); the command line writes only the images", file=sys.stderr)
    for note in result.notes:  # what the request did that its settings may not show
        print(f"note: {note}", file=sys.stderr)
    t = result.timings
    print(f"done in {t['total']:.2f}s (faces {t['faces']:.2f}s, denoise {t['denoise']:.2f}s, decode {t['decode']:.2f}s) "
          f"on {engine.device}, memory mode {engine.memory_mode}", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_lookahead_checkpoint

    config = None
    if args.unet_config == "tiny":
        from .tiny import TINY_UNET as config
    paths = convert_lookahead_checkpoint(args.checkpoint, args.out, unet_config=config, overwrite=args.overwrite)
    for role, path in paths.items():
        print(f"{role}: {path}")
    print(f"use: python -m lcmla generate --preset sdxl-base --adapter {paths['adapter']} "
          f"--kv-lora {paths['kv_lora']} --method lookahead-released ...", file=sys.stderr)
    return 0


def _presets() -> int:
    for p in PRESETS.values():
        print(f"{p.name:22s} {p.title} — {p.steps} steps, {p.width}x{p.height}, guidance {p.guidance_scale}")
        if p.notes:
            print(f"{'':22s} {p.notes}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from .pngmeta import settings_from_png

    print(json.dumps(settings_from_png(args.png).to_dict(), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .loading import quiet_torchvision_notice

    quiet_torchvision_notice()
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "presets":
            return _presets()
        if args.command == "convert-lookahead":
            return _convert(args)
        if args.command == "evaluate":
            from .evaluation.cli import evaluate_command

            return evaluate_command(args)
        return _show(args)
    except LcmlaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
