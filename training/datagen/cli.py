"""``python -m training datagen generate | sample | inspect | import-authors`` (also under ``accelerate launch``).

    python -m training datagen generate --preset sdxl-turbo --identities 1000 --images-per-identity 16 \\
        --output-dir data/faces
    accelerate launch -m training datagen generate ...      # the shards split over the processes
    python -m training datagen sample --output-dir data/sample   # two public-domain portraits: try it on a CPU
    python -m training datagen inspect data/faces
    python -m training datagen import-authors their_data/ --output-dir data/imported
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from lcmla.argtypes import DefaultsHelp, Number, OneLineParser, add_flag
from lcmla.errors import check_output_dir

EXIT_USER_ERROR = 2
TAU = Number(float, -1, 1)  # the agreement thresholds are cosine similarities


def _plan_flags(parser: argparse.ArgumentParser, images_per_identity: int) -> None:
    """The flags that plan each identity's images (generate and sample)."""
    add_flag(parser, "--images-per-identity", type=Number(int, 2, 1000), default=images_per_identity,
             help="half plain photos (at least 2), half styles")
    parser.add_argument("--styles", default=None, help="comma-separated stylized templates (default: all)")
    add_flag(parser, "--seed", type=Number(int, 0, 2**63 - 1), default=0)


def _filter_flags(parser: argparse.ArgumentParser) -> None:
    """The agreement thresholds that keep or drop an image (generate, sample, import-authors)."""
    add_flag(parser, "--tau-plain", type=TAU, default=0.5,
             help="min cosine of a plain photo to the mean of the identity's other photos")
    add_flag(parser, "--tau-style", type=TAU, default=0.3, help="min cosine of a stylized image to the mean of the kept photos")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m training datagen", description="consistent-identity training data")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    g = sub.add_parser("generate", help="render identities with SDXL-Turbo, filter, write shards",
                       formatter_class=DefaultsHelp)
    g.add_argument("--preset", default="sdxl-turbo", help="lcmla preset that renders (tiny: offline, random weights)")
    add_flag(g, "--identities", type=Number(int, 1, 10_000_000), required=True)
    _plan_flags(g, images_per_identity=16)
    g.add_argument("--names", default=None, help="a file of subject names, one per line, instead of drawn "
                   "descriptions (identity i renders name i: at least --identities names)")
    g.add_argument("--output-dir", required=True)
    add_flag(g, "--identities-per-shard", type=Number(int, 1), default=8)
    _filter_flags(g)
    add_flag(g, "--steps", type=Number(int, 1, 200), default=1, help="sampling steps (SDXL-Turbo: 1)")
    add_flag(g, "--size", type=Number(int, 64, 2048, multiple=8), default=None, help="image side (default: the preset's)")
    g.add_argument("--face-models", default=None, help="insightface pack (default buffalo_l; tiny: the Haar stand-in)")
    g.add_argument("--weights-dir", default=None)
    g.add_argument("--device", default=None)
    sm = sub.add_parser("sample", help="a small set from the two public-domain portraits (real faces; try the "
                        "trainer on a CPU)", formatter_class=DefaultsHelp)
    sm.add_argument("--output-dir", required=True)
    _plan_flags(sm, images_per_identity=8)
    add_flag(sm, "--size", type=Number(int, 64, 1024, multiple=8), default=160, help="image side")
    _filter_flags(sm)
    sm.add_argument("--face-models", default="haar", help="'haar' (the offline stand-in) or an insightface pack (buffalo_l)")
    i = sub.add_parser("inspect", help="statistics and a contact sheet per shard")
    i.add_argument("folder")
    i.add_argument("--out", default=None, help="where the contact sheets go (default DIR/contact-sheets)")
    a = sub.add_parser("import-authors", help="the LCM-Lookahead authors' data folder (metadata.json) → shards")
    a.add_argument("source")
    a.add_argument("--output-dir", required=True)
    add_flag(a, "--identities-per-shard", type=Number(int, 1), default=8)
    _filter_flags(a)
    a.add_argument("--face-models", default=None, help="insightface pack (default buffalo_l); 'haar' for the stand-in")
    return p


def _analyzer(face_models: str | None, preset=None):
    from lcmla.faces import FaceAnalyzer

    return FaceAnalyzer.chosen(face_models, preset.face_backend if preset is not None else "insightface")


def _state(device: str | None = None) -> tuple[int, int, str | None]:
    """(process index, number of processes, device) from accelerate's state: each process renders
    on its own device (``cuda:K`` under ``accelerate launch``); ``device`` (--device) wins."""
    from lcmla.evaluation.run import accelerate_state

    state = accelerate_state()
    return state.process_index, state.num_processes, device or str(state.device)


def check_names(names: Sequence[str] | None, identities: int, path: str | None) -> None:
    """Each identity renders one name: more identities than names would repeat people as
    different identities, which the filtering and the training pairs cannot tell apart."""
    if names is not None and identities > len(names):
        raise ValueError(f"--identities {identities} is more than the {len(names)} names in {path}: "
                         f"pass --identities {len(names)} or fewer, or add names to the file")


def render_settings(preset_name: str, steps: int, size: int):
    """The settings of every datagen image: text only, so the FaceID LoRA is off (``identity.lora_scale``
    0; at its default 1 it would be active in every layer with no identity) — plain SDXL-Turbo renders,
    1 step with guidance 1 (no CFG; SDXL-Turbo's guidance 0 in diffusers' terms)."""
    from lcmla import GenerationSettings

    return GenerationSettings(prompt="a photo of a face", preset=preset_name).replace(
        guidance__steps=steps, guidance__guidance_scale=1.0, output__width=size, output__height=size,
        identity__lora_scale=0.0)


def _folder_and_templates(args):
    """(output folder, plain templates, stylized templates) of generate and sample, the folder
    refused before any work when it cannot be made or written."""
    from .identities import select_templates

    out = Path(args.output_dir)
    if not out.parent.exists():
        raise ValueError(f"the parent folder of --output-dir {out} does not exist")
    check_output_dir(out, "--output-dir")
    plain, stylized = select_templates(args.styles.split(",") if args.styles else None)
    return out, plain, stylized


def _generate(args) -> int:
    from lcmla import Engine
    from lcmla.presets import get_preset

    from .generate import GenConfig, generate
    from .identities import read_names

    out, plain, stylized = _folder_and_templates(args)
    names = tuple(read_names(args.names)) if args.names else None
    check_names(names, args.identities, args.names)
    preset = get_preset(args.preset)
    rank, world, device = _state(args.device)  # before loading: every process loads onto its own device
    # the engine first: its message lists every missing model file at once (the face models' come with it);
    # its analyzer is the one _analyzer would build (FaceAnalyzer.chosen), so the face models load once
    engine = Engine.load(preset.name, device=device, weights_dir=args.weights_dir, face_models=args.face_models)
    analyzer = engine.faces
    size = args.size or preset.width
    base = render_settings(preset.name, args.steps, size)

    def render(prompt: str, seed: int):
        return engine.generate(base.replace(prompt=prompt, output__seed=seed), None).images[0]

    cfg = GenConfig(identities=args.identities, images_per_identity=args.images_per_identity, plain=tuple(plain),
                    stylized=tuple(stylized), seed=args.seed, identities_per_shard=args.identities_per_shard,
                    tau_plain=args.tau_plain, tau_style=args.tau_style, names=names, backend=analyzer.backend,
                    is_recognizer=analyzer.is_recognizer,
                    settings={"preset": preset.name, "steps": args.steps, "size": size, "seed": args.seed,
                              "styles": [t.slug for t in stylized], "random_weights": preset.random_weights,
                              "lora_scale": 0.0})
    totals = generate(cfg, out, render, lambda image: analyzer.detect(image), rank, world)
    print(json.dumps({"process": rank, **totals}))
    if totals["shards_written"] and not totals["samples"]:
        why = ", ".join(f"{k} {v}" for k, v in sorted(totals["rejected"].items()) if v) or "nothing rendered"
        hint = ("the tiny preset's random weights draw patterns, not faces, so this is expected there; to try the "
                f"trainer on a CPU, make real-photo data in a folder of its own (this one holds these shards): "
                f"`python -m training datagen sample --output-dir {out.parent / (out.name + '-photos')}`"
                if preset.random_weights else "lower --tau-plain/--tau-style or check the face models")
        print(f"warning: no sample was kept (rejected: {why}); {hint}", file=sys.stderr)
    return 0


def _sample(args) -> int:
    from .generate import GenConfig, generate
    from .sample import PORTRAITS, sample_renderer

    out, plain, stylized = _folder_and_templates(args)
    names = tuple(name for name, _ in PORTRAITS)
    analyzer = _analyzer(args.face_models)
    rank, world, _ = _state()
    styled = frozenset(t.prompt(name) for t in stylized for name in names)
    cfg = GenConfig(identities=len(names), images_per_identity=args.images_per_identity, plain=tuple(plain),
                    stylized=tuple(stylized), seed=args.seed, identities_per_shard=len(names),
                    tau_plain=args.tau_plain, tau_style=args.tau_style, names=names, backend=analyzer.backend,
                    is_recognizer=analyzer.is_recognizer,
                    settings={"source": "sample", "portraits": [src for _, src in PORTRAITS], "size": args.size,
                              "seed": args.seed, "styles": [t.slug for t in stylized]})
    totals = generate(cfg, out, sample_renderer(styled, args.size), lambda image: analyzer.detect(image), rank, world)
    print(json.dumps({"process": rank, **totals}))
    return 0


def _inspect(args) -> int:
    from .inspect_shards import contact_sheets, statistics
    from .reader import counts_text

    check_output_dir(args.out or Path(args.folder) / "contact-sheets", "--out")
    stats = statistics(args.folder)
    print(json.dumps(stats, indent=2))
    warn = lambda text: print(f"warning: {text}", file=sys.stderr)  # noqa: E731
    if stats["skipped_on_read"]:
        warn(f"some of the data could not be read and is left out (skipped_on_read): {counts_text(stats['skipped_on_read'])}")
    for path in contact_sheets(args.folder, args.out, warn=warn):
        print(path)
    return 0


def _import(args) -> int:
    from .importer import import_authors, read_authors_folder

    check_output_dir(args.output_dir, "--output-dir")
    groups = read_authors_folder(args.source)  # the source's problems before the face models'
    analyzer = _analyzer(args.face_models)
    rank, world, _ = _state()
    totals = import_authors(args.source, args.output_dir, lambda image: analyzer.detect(image),
                            {"identities_per_shard": args.identities_per_shard, "tau_plain": args.tau_plain,
                             "tau_style": args.tau_style, "backend": analyzer.backend,
                             "is_recognizer": analyzer.is_recognizer}, rank, world, groups=groups)
    print(json.dumps({"process": rank, **totals}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from lcmla.errors import LcmlaError

    try:
        args = build_parser().parse_args(argv)  # flag ranges are checked here (lcmla.argtypes)
    except SystemExit as exc:  # a bad flag (argparse printed it) or --help
        return int(exc.code or 0)
    try:
        return {"generate": _generate, "sample": _sample, "inspect": _inspect,
                "import-authors": _import}[args.command](args)
    except (LcmlaError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
