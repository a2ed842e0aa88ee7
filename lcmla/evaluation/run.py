"""The evaluation grid: methods × identities × prompts × seeds × identity scales, cached and resumable.

Every cell's image is written to ``images/<key>.png`` (atomically) and its row — every setting and
metric — appended to ``results.jsonl``; a killed run started again skips the cells it has rows for
and scores, without regenerating, images written just before the kill.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image

from ..errors import LcmlaError
from .metrics import IdentityScorer, id_score, reference_embedding, style_part

#: FastFace's sweep of the identity strength λ (SPEC §6).
PAPER_SCALES = (0.1, 0.35, 0.5, 0.65, 0.8, 0.95)
ASSETS = Path(__file__).resolve().parents[2] / "assets"
PROMPT_SETS = {"lookahead": "prompts.txt", "realistic": "prompts_realistic.txt", "style": "prompts_style.txt"}


def load_prompts(spec: str, max_prompts: int | None = None) -> list[tuple[str, str]]:
    """(set, prompt) pairs: a named set ("lookahead" = LCM-Lookahead's 18, the default; "realistic",
    "style", "fastface" = both), or a text file with one prompt per line (a ';' marks a style prompt)."""
    names = ("realistic", "style") if spec == "fastface" else (spec,) if spec in PROMPT_SETS else ()
    out: list[tuple[str, str]] = []
    if names:
        for name in names:
            lines = (ASSETS / PROMPT_SETS[name]).read_text().splitlines()
            out += [(name, p.strip()) for p in lines if p.strip()][:max_prompts]
        return out
    path = Path(spec)
    if not path.is_file():
        raise LcmlaError(f"--prompts {spec!r} is neither a prompt set ({', '.join([*PROMPT_SETS, 'fastface'])}) nor a file")
    lines = [p.strip() for p in path.read_text().splitlines() if p.strip()]
    if not lines:
        raise LcmlaError(f"the prompt file {spec} holds no prompts")
    return [("style" if ";" in p else "realistic", p) for p in lines][:max_prompts]


def identity_photos(spec: str) -> tuple[str, tuple[str, ...]]:
    """One identity: a photo, or a folder of photos of the same person → (name, photo paths)."""
    path = Path(spec)
    if path.is_dir():
        photos = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not photos:
            raise LcmlaError(f"--faces {spec}: the folder holds no .png/.jpg/.webp photos")
        return path.name, tuple(photos)
    if not path.is_file():
        raise LcmlaError(f"--faces {spec}: no such photo or folder")
    return path.stem, (str(path),)


@dataclass(frozen=True)
class Cell:
    """One image of the grid."""

    method: str  # a method of lcmla.methods, or "trained:<method>" with the trained weights
    identity: str
    prompt_set: str
    prompt: str
    seed: int
    scale: float  # identity.ip_adapter_scale (λ)

    @property
    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class EvalConfig:
    methods: Sequence[str]
    identities: Sequence[tuple[str, tuple[str, ...]]]
    prompts: Sequence[tuple[str, str]]
    seeds: Sequence[int]
    scales: Sequence[float] = PAPER_SCALES
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted settings for every cell (e.g. steps)

    def cells(self) -> list[Cell]:
        return [Cell(m, name, ps, p, s, float(sc)) for (name, _), m, sc, (ps, p), s in
                itertools.product(self.identities, self.methods, self.scales, self.prompts, self.seeds)]


def read_rows(path: Path) -> list[dict]:
    """The rows of ``results.jsonl`` (a torn last line from a killed run is ignored)."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def drop_torn_tail(path: Path) -> None:
    """Cut a partial last line (a run killed while appending) so the next row starts a line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _append(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _save_png(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


@dataclass
class Evaluation:
    """Runs a grid with one or two engines ("base", and "trained" for ``trained:`` methods)."""

    engines: dict[str, Any]
    scorers: list[IdentityScorer]
    clip: Any = None  # metrics.ClipScorer
    aesthetic: Any = None  # metrics.AestheticScorer
    output_dir: Path = Path("evaluation")

    def _settings(self, engine, cell: Cell, overrides: dict):
        from .. import GenerationSettings
        from ..methods import method_changes

        method = cell.method.split(":", 1)[1] if cell.method.startswith("trained:") else cell.method
        changes = {**method_changes(method, engine.preset.name), "identity.ip_adapter_scale": cell.scale,
                   "output.seed": cell.seed, "output.num_images": 1, **overrides}
        return GenerationSettings(prompt=cell.prompt, preset=engine.preset.name).replace_dotted(changes)

    def run(self, config: EvalConfig, progress: Callable[[int, int, Cell], None] | None = None) -> list[dict]:
        out = Path(self.output_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        results = out / "results.jsonl"
        drop_torn_tail(results)
        done = {row["key"] for row in read_rows(results)}
        cells = config.cells()
        photos = {name: [Image.open(p).convert("RGB") for p in paths] for name, paths in config.identities}
        refs = {(s.name, name): reference_embedding(s, imgs) for s in self.scorers for name, imgs in photos.items()}
        identities: dict[tuple[str, str], Any] = {}
        for i, cell in enumerate(cells):
            if progress is not None:
                progress(i, len(cells), cell)
            if cell.key in done:
                continue
            which = "trained" if cell.method.startswith("trained:") else "base"
            if which not in self.engines:
                raise LcmlaError(f"method {cell.method!r} needs trained weights: pass --trained-adapter and/or --trained-kv-lora")
            engine = self.engines[which]
            settings = self._settings(engine, cell, config.overrides)
            image_path = out / "images" / f"{cell.key}.png"
            seconds = None
            if image_path.is_file():  # written before a kill: score it, do not regenerate
                image = Image.open(image_path).convert("RGB")
            else:
                if (which, cell.identity) not in identities:
                    identities[(which, cell.identity)] = engine.analyze_faces(dict(config.identities)[cell.identity])
                t0 = time.perf_counter()
                image = engine.generate(settings, identities[(which, cell.identity)]).images[0]
                seconds = time.perf_counter() - t0
                _save_png(image, image_path)
            row = {"key": cell.key, **asdict(cell), "image": f"images/{cell.key}.png", "seconds": seconds,
                   "settings": settings.to_dict(), "metrics": self.score(cell, image, refs)}
            _append(results, row)
            done.add(cell.key)
        return read_rows(results)

    def score(self, cell: Cell, image: Image.Image, refs: dict) -> dict[str, Any]:
        metrics: dict[str, Any] = {"id": {}, "face_found": {}}
        box = None
        for scorer in self.scorers:
            value, found = id_score(scorer, refs[(scorer.name, cell.identity)], image)
            metrics["id"][scorer.name] = value
            metrics["face_found"][scorer.name] = found is not None
            box = box or found
        if self.clip is not None:
            metrics["clip_t"] = self.clip.score([image], [cell.prompt])[0]
            style = style_part(cell.prompt)
            if style is not None and box is not None:
                from .metrics import crop_box

                face = crop_box(image, box)
                metrics["face_style"] = None if face is None else self.clip.score([face], [style])[0]
        if self.aesthetic is not None:
            metrics["aesthetic"] = self.aesthetic.score([image])[0]
        return metrics
