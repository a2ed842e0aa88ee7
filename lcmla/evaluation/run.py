"""The evaluation grid: methods × identities × prompts × seeds × identity scales, cached and resumable,
split over processes.

Every cell's image is written to ``images/<key>.png`` (atomically) and its row — every setting and
metric — appended to this process's ``results.rank-K.jsonl``; when the grid is complete the rows of
every process are merged into ``results.jsonl`` (grid order, one row per cell) and the rank files
removed. A killed run started again skips the cells any file has rows for and scores, without
regenerating, images written just before the kill.

A cell's key hashes its own coordinates and a *context*: everything else that changes its pixels
(preset, dtype, ``--set`` overrides, trained weights, the identity's photo files; see
:func:`fingerprint`), so a run with other settings never reuses a cell of another.

Processes (:func:`processes`): under ``accelerate launch`` (or torchrun) accelerate's
``PartialState`` gives the rank, the number of processes and a barrier; the main process merges
after everyone has finished. With only ``RANK``/``WORLD_SIZE`` set (separate jobs, no process
group) each process does its share and the one that finds the grid complete merges (under a lock);
a single-process run on a complete grid only merges and reports.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from PIL import Image

from ..errors import LcmlaError
from ..images import load_image
from .metrics import IdentityScorer, id_score, reference_embedding, style_part

#: FastFace's sweep of the identity strength λ (SPEC §6).
PAPER_SCALES = (0.1, 0.35, 0.5, 0.65, 0.8, 0.95)
ASSETS = Path(__file__).resolve().parents[2] / "assets"
PROMPT_SETS = {"lookahead": "prompts.txt", "realistic": "prompts_realistic.txt", "style": "prompts_style.txt"}


def load_prompts(spec: str, max_prompts: int | None = None) -> list[tuple[str, str]]:
    """(set, prompt) pairs: a named set ("lookahead" = LCM-Lookahead's 18, the default; "realistic",
    "style", "fastface" = both), or a text file with one prompt per line (a ';' marks a style prompt)."""
    if max_prompts is not None and max_prompts < 1:
        raise LcmlaError(f"--max-prompts must be at least 1 (got {max_prompts}), or left out for every prompt")
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


def fingerprint(spec: Any) -> str:
    """A short stable hash of a JSON-able value (dict keys sorted)."""
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (a photo's or a weight file's identity, whatever its name)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Cell:
    """One image of the grid."""

    method: str  # a method of lcmla.methods, or "trained:<method>" with the trained weights
    identity: str
    prompt_set: str
    prompt: str
    seed: int
    scale: float  # identity.ip_adapter_scale (λ)
    context: str = ""  # fingerprint of the rest of what makes its pixels (EvalConfig.context)

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
    pixels: dict[str, Any] = field(default_factory=dict)  # what else changes pixels: preset, dtype, weights…

    def context(self, identity: str) -> str:
        """The cells' context for one identity: ``pixels``, the overrides and its photos' bytes."""
        photos = dict(self.identities)[identity]
        return fingerprint({"pixels": self.pixels, "overrides": self.overrides,
                            "photos": [file_digest(p) for p in photos]})

    def cells(self) -> list[Cell]:
        contexts = {name: self.context(name) for name, _ in self.identities}
        return [Cell(m, name, ps, p, s, float(sc), contexts[name]) for (name, _), m, sc, (ps, p), s in
                itertools.product(self.identities, self.methods, self.scales, self.prompts, self.seeds)]


@dataclass(frozen=True)
class Processes:
    """This process's place in a run spread over several: cell i belongs to process i mod world.
    ``barrier`` waits for every process (accelerate's ``wait_for_everyone``) when there is a
    process group; without one (None) nobody waits."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] | None = None
    device: str | None = None  # this process's device (cuda:K under a launcher), None: the default

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise LcmlaError(f"process {self.rank} of {self.world}: RANK must be in [0, WORLD_SIZE)")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, cells: Sequence[Cell]) -> list[Cell]:
        return [c for i, c in enumerate(cells) if i % self.world == self.rank]


def accelerate_state():
    """accelerate's ``PartialState``, on the CPU (gloo) when ``accelerate launch --cpu`` asked for it
    (``ACCELERATE_USE_CPU``) or when there is no CUDA: ``PartialState()`` alone reads neither and,
    on a CPU-only machine, would give every process rank 0 of 1."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def processes(env: Mapping[str, str] | None = None) -> Processes:
    """Where this process stands: under a launcher that set up a process group (``accelerate
    launch``, torchrun: ``WORLD_SIZE`` > 1 and ``MASTER_ADDR``), accelerate's ``PartialState`` —
    rank, size, device, barrier; else ``RANK``/``WORLD_SIZE`` from the environment (no barrier,
    device ``cuda:LOCAL_RANK`` when CUDA is there); else one process."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise LcmlaError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world <= 1:
        return Processes()
    import torch

    if env.get("MASTER_ADDR"):
        state = accelerate_state()
        return Processes(state.process_index, state.num_processes, state.wait_for_everyone, str(state.device))

    return Processes(rank, world, None, f"cuda:{local}" if torch.cuda.is_available() else None)


RESULTS = "results.jsonl"


def rank_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"results.rank-{rank}.jsonl"


def all_rows(folder: Path) -> dict[str, dict]:
    """key → row over ``results.jsonl`` and every process's rank file (the first row of a key wins)."""
    folder = Path(folder)
    out: dict[str, dict] = {}
    for path in [folder / RESULTS, *sorted(folder.glob("results.rank-*.jsonl"))]:
        for row in read_rows(path):
            out.setdefault(row.get("key"), row)
    out.pop(None, None)
    return out


@contextlib.contextmanager
def results_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder's results (merging, writing the report)."""
    with (Path(folder) / ".results.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge_results(folder: Path, cells: Sequence[Cell]) -> list[dict]:
    """Merge every rank file into ``results.jsonl`` and return the rows of ``cells`` (grid order).

    Under :func:`results_lock`: ``results.jsonl`` is rewritten (temporary file, fsync, rename) with
    the grid's rows in grid order, then the rows of cells outside this grid (other methods, seeds…
    of an earlier run with the same pixels); only then are the rank files removed."""
    folder = Path(folder)
    with results_lock(folder):
        rows = all_rows(folder)
        wanted = [c.key for c in cells]
        missing = [k for k in wanted if k not in rows]
        if missing:
            raise LcmlaError(f"cannot merge: {len(missing)} of {len(wanted)} cells have no row yet")
        ordered = [rows[k] for k in wanted] + [r for k, r in rows.items() if k not in set(wanted)]
        tmp = folder / (RESULTS + ".tmp")
        with tmp.open("w") as f:
            for row in ordered:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / RESULTS)
        for path in folder.glob("results.rank-*.jsonl"):
            path.unlink(missing_ok=True)
        return ordered[: len(wanted)]


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


def load_reference_photos(identities: Sequence[tuple[str, Sequence[str]]]) -> dict[str, list[Image.Image]]:
    """Each identity's reference photos as the engine reads them: upright by their EXIF orientation
    (a phone photo stored on its side would otherwise give the recognizers a sideways face)."""
    return {name: [load_image(p) for p in paths] for name, paths in identities}


@dataclass
class Evaluation:
    """Runs a grid with one or two engines ("base", and "trained" for ``trained:`` methods)."""

    engines: dict[str, Any]
    scorers: list[IdentityScorer]
    clip: Any = None  # metrics.ClipScorer
    aesthetic: Any = None  # metrics.AestheticScorer
    output_dir: Path = Path("evaluation")
    imagereward: Any = None  # metrics.ImageRewardScorer

    def _settings(self, engine, cell: Cell, overrides: dict):
        from .. import GenerationSettings
        from ..methods import method_changes

        method = cell.method.split(":", 1)[1] if cell.method.startswith("trained:") else cell.method
        changes = {**method_changes(method, engine.preset.name), "identity.ip_adapter_scale": cell.scale,
                   "output.seed": cell.seed, "output.num_images": 1, **overrides}
        return GenerationSettings(prompt=cell.prompt, preset=engine.preset.name).replace_dotted(changes)

    def run(self, config: EvalConfig, progress: Callable[[int, int, Cell], None] | None = None,
            procs: Processes = Processes()) -> list[dict] | None:
        """Generate and score this process's share of the grid, then merge (see the module
        docstring). Returns the grid's rows once merged here; None when this process's share is
        done but the grid is not (another process merges), or on a non-main process of a group."""
        out = Path(self.output_dir)
        (out / "images").mkdir(parents=True, exist_ok=True)
        mine = rank_file(out, procs.rank)
        drop_torn_tail(mine)
        done = set(all_rows(out))
        cells = config.cells()
        share = procs.share(cells)
        todo = [c for c in share if c.key not in done]
        photos = load_reference_photos(config.identities)
        refs = ({(s.name, name): reference_embedding(s, imgs) for s in self.scorers for name, imgs in photos.items()}
                if todo else {})
        identities: dict[tuple[str, str], Any] = {}
        for i, cell in enumerate(share):
            if progress is not None:
                progress(i, len(share), cell)
            if cell.key in done:
                continue
            which = "trained" if cell.method.startswith("trained:") else "base"
            if which not in self.engines:
                raise LcmlaError(f"method {cell.method!r} needs trained weights: pass --trained-adapter and/or --trained-kv-lora")
            engine = self.engines[which]
            settings = self._settings(engine, cell, config.overrides)
            image_path = out / "images" / f"{cell.key}.png"
            seconds, notes = None, None  # notes None: not known (the image was made before a kill)
            if image_path.is_file():  # written before a kill: score it, do not regenerate
                image = Image.open(image_path).convert("RGB")
            else:
                if (which, cell.identity) not in identities:
                    identities[(which, cell.identity)] = engine.analyze_faces(dict(config.identities)[cell.identity])
                t0 = time.perf_counter()
                result = engine.generate(settings, identities[(which, cell.identity)])
                image, notes = result.images[0], list(result.notes)
                seconds = time.perf_counter() - t0
                _save_png(image, image_path)
            row = {"key": cell.key, **asdict(cell), "image": f"images/{cell.key}.png", "seconds": seconds,
                   "process": [procs.rank, procs.world], "settings": settings.to_dict(), "notes": notes,
                   "metrics": self.score(cell, image, refs)}
            _append(mine, row)
            done.add(cell.key)
        if procs.barrier is not None:
            procs.barrier()
            if not procs.is_main:
                return None
        elif procs.world > 1:
            have = all_rows(out)
            if any(c.key not in have for c in cells):
                return None
        return merge_results(out, cells)

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
        if self.imagereward is not None:
            metrics["imagereward"] = self.imagereward.score([image], [cell.prompt])[0]
        return metrics
