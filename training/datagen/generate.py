"""Render, filter and store consistent identities (LCM-Lookahead §4.4, SPEC §5).

For each identity: render its plain photos (the references) and stylized images with SDXL-Turbo
(1 step, no guidance; a detailed subject description keeps one identity across seeds), detect the
face in each, and keep the images whose identity embedding agrees with the identity's other
images: a plain photo needs cos ≥ τ_plain with the mean of the other agreeing photos
(:func:`agreeing_photos`), a stylized image cos ≥ τ_style (lower) with the mean of the agreeing
photos. Identities left with fewer than two agreeing plain photos are dropped. Rejections are
counted per reason: ``render_error``, ``no_face``, ``low_similarity``, ``too_few_plain``.

Rendering and face analysis are injected (``render(prompt, seed) -> PIL``,
``analyze(image) -> [DetectedFace, …]`` largest first), so the pipeline runs with any model.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lcmla.errors import ImageError

from .identities import Identity, Template, draw_identity, plan_images, prompt_sources_digest
from .shards import (
    Sample,
    append_manifest,
    n_shards,
    read_manifest,
    remove_stale_temporaries,
    shard_identities,
    shard_is_complete,
    shard_name,
    write_shard,
)

REASONS = ("render_error", "no_face", "low_similarity", "too_few_plain")
Render = Callable[[str, int], Any]
Analyze = Callable[[Any], Sequence[Any]]


@dataclass(frozen=True)
class GenConfig:
    identities: int
    images_per_identity: int
    plain: tuple[Template, ...]
    stylized: tuple[Template, ...]
    seed: int = 0
    identities_per_shard: int = 8
    tau_plain: float = 0.5
    tau_style: float = 0.3
    names: tuple[str, ...] | None = None
    backend: str = ""
    is_recognizer: bool = True
    settings: dict = field(default_factory=dict)  # recorded in the manifest (preset, steps, size…)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64).ravel()
    return v / max(np.linalg.norm(v), 1e-12)


@dataclass(frozen=True)
class Candidate:
    """One image of an identity before filtering (rendered, or read by an importer)."""

    template: Template
    k: int
    seed: int
    prompt: str
    image: Any  # PIL image, or None when it could not be made


def render_candidates(identity: Identity, cfg: GenConfig, render: Render) -> list[Candidate]:
    """Render every planned image of an identity; a failed render leaves ``image=None``."""
    out = []
    for template, k, seed in plan_images(identity, cfg.plain, cfg.stylized, cfg.images_per_identity, cfg.seed):
        prompt = template.prompt(identity.description)
        try:
            image = render(prompt, seed)
        except Exception:  # noqa: BLE001 - one failed render costs one image, not the run
            image = None
        out.append(Candidate(template, k, seed, prompt, image))
    return out


def agreeing_photos(units: Sequence[np.ndarray], tau: float) -> dict[int, float]:
    """The photos that agree with the identity's other photos (SPEC §5), as {index: cosine}.

    A photo's agreement is the cosine of its unit embedding with the mean of the OTHER photos'
    (leave-one-out: with itself in the mean a photo would score ≥ 1/√n for free, and two photos
    would always agree). While the least agreeing photo scores below ``tau`` it is dropped and the
    rest are judged again, so a stranger among a few photos does not drag the others down with it.
    Empty when fewer than two photos agree. ``units``: (D,) each, unit norm.
    """
    idx = list(range(len(units)))
    while len(idx) >= 2:
        total = np.sum([units[i] for i in idx], axis=0)  # (D,)
        sims = {i: float(units[i] @ _unit(total - units[i])) for i in idx}
        worst = min(idx, key=sims.__getitem__)
        if sims[worst] >= tau:
            return sims
        idx.remove(worst)
    return {}


def filter_identity(identity: Identity, candidates: Sequence[Candidate], cfg: GenConfig,
                    analyze: Analyze) -> tuple[list[Sample], Counter]:
    """Detect, compare with the other plain photos' centroid and keep (see the module docstring)."""
    rejected: Counter = Counter()
    found = []
    for c in candidates:
        if c.image is None:
            rejected["render_error"] += 1
            continue
        try:
            faces = list(analyze(c.image))
        except ImageError:  # an image the analyzer cannot read (e.g. below its minimum size): no face
            faces = []
        if not faces:
            rejected["no_face"] += 1
            continue
        found.append((c, faces[0]))
    units = [_unit(face.embedding) for _, face in found]  # (D,) each
    plain_at = [i for i, (c, _) in enumerate(found) if not c.template.stylized]
    agreeing = agreeing_photos([units[i] for i in plain_at], cfg.tau_plain)  # {position in plain_at: cos}
    photo_sim = {plain_at[j]: sim for j, sim in agreeing.items()}
    centroid = _unit(np.sum([units[i] for i in photo_sim], axis=0)) if len(photo_sim) >= 2 else None  # (D,)
    kept: list[Sample] = []
    for i, ((c, face), u) in enumerate(zip(found, units)):
        if centroid is None:  # fewer than two agreeing photos: nothing to judge by, identity dropped
            rejected["too_few_plain"] += 1
            continue
        sim = float(u @ centroid) if c.template.stylized else photo_sim.get(i)
        if sim is None or (c.template.stylized and sim < cfg.tau_style):
            rejected["low_similarity"] += 1
            continue
        key = f"{identity.key}-{c.template.slug}-{c.k:02d}"
        record = {
            "key": key, "identity": identity.index, "description": identity.description,
            "prompt": c.prompt, "compressed_prompt": c.template.compressed(), "template": c.template.slug,
            "stylized": c.template.stylized, "seed": c.seed, "box": [float(v) for v in face.bbox],
            "landmarks": np.asarray(face.kps, float).round(3).tolist(), "score": round(float(face.score), 5),
            "similarity": round(sim, 6), "backend": cfg.backend, "is_recognizer": cfg.is_recognizer,
        }
        kept.append(Sample(key, c.image, record, np.asarray(face.embedding, np.float32), face.crop))
    return kept, rejected


def render_identity(identity: Identity, cfg: GenConfig, render: Render, analyze: Analyze) -> tuple[list[Sample], Counter]:
    """The kept samples of one identity and the rejected counts per reason."""
    return filter_identity(identity, render_candidates(identity, cfg, render), cfg, analyze)


def write_shards(cfg: GenConfig, out: Path, make_identity: Callable[[int], tuple[list[Sample], Counter]],
                 rank: int = 0, world: int = 1, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write this process's shards of ``cfg.identities`` identities into ``out``; ``make_identity(i)``
    gives identity i's kept samples and rejections. Resuming: complete shards are kept; missing,
    temporary or unlisted ones are (re)made — deterministic, so with the same content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mine = my_shards(n_shards(cfg.identities, cfg.identities_per_shard), rank, world)
    remove_stale_temporaries(out, {shard_name(s) for s in mine})
    manifest = read_manifest(out)
    run = run_fingerprint(cfg)
    for entry in manifest.values():
        differs = fingerprint_differences(entry.get("run"), run)
        if differs:
            raise ValueError(f"{out} holds shards made with other settings ({differs}): a resumed run would mix "
                             "the two. Use a new --output-dir, or delete this one to start again")
    # shards_reused: complete from an earlier run of the same settings, left as they are; samples and
    # rejected count this run's written shards only
    totals = {"shards_written": 0, "shards_reused": 0, "samples": 0, "rejected": Counter()}
    for s in mine:
        name = shard_name(s)
        if shard_is_complete(out, name, manifest):
            totals["shards_reused"] += 1
            continue
        samples: list[Sample] = []
        rejected: Counter = Counter()
        kept_ids = []
        ids = list(shard_identities(s, cfg.identities_per_shard, cfg.identities))
        for i in ids:
            kept, rej = make_identity(i)
            samples += kept
            rejected += rej
            if kept:
                kept_ids.append(i)
        digest = write_shard(out / name, samples)
        entry = {"shard": name, "sha256": digest, "identities": ids, "kept_identities": kept_ids,
                 "samples": len(samples), "plain": sum(not x.record["stylized"] for x in samples),
                 "stylized": sum(x.record["stylized"] for x in samples),
                 "rejected": {r: rejected.get(r, 0) for r in REASONS}, "backend": cfg.backend,
                 "is_recognizer": cfg.is_recognizer, "settings": cfg.settings, "run": run}
        append_manifest(out, entry)
        totals["shards_written"] += 1
        totals["samples"] += len(samples)
        totals["rejected"] += rejected
        log(f"{name}: {len(samples)} samples from {len(kept_ids)} identities; rejected {dict(rejected)}")
    totals["rejected"] = dict(totals["rejected"])
    return totals


def run_fingerprint(cfg: GenConfig) -> dict[str, Any]:
    """What decides a shard's contents, recorded with it so that a resumed run can tell whether
    it is the same run: the counts, seed, thresholds, templates, names, what the prompts are made
    from (the template texts and attribute banks of this version), face backend and settings."""
    return {"identities": cfg.identities, "images_per_identity": cfg.images_per_identity,
            "identities_per_shard": cfg.identities_per_shard, "seed": cfg.seed, "tau_plain": cfg.tau_plain,
            "tau_style": cfg.tau_style, "plain": [t.slug for t in cfg.plain], "stylized": [t.slug for t in cfg.stylized],
            "names": hashlib.sha256("\n".join(cfg.names or ()).encode()).hexdigest()[:16],
            "prompt_sources": prompt_sources_digest(with_banks=not cfg.names),
            "backend": cfg.backend, "settings": json.loads(json.dumps(cfg.settings, default=str))}


def fingerprint_differences(recorded: dict | None, now: dict) -> str:
    """'key: then → now' for each difference (empty when the same, or when nothing was recorded)."""
    if not recorded:
        return ""
    keys = [k for k in now if recorded.get(k) != now[k]]
    return "; ".join(f"{k}: {recorded[k]!r} then, {now[k]!r} now" if k in recorded else f"{k}: not recorded then "
                     f"(an older version), {now[k]!r} now" for k in keys)


def my_shards(total: int, rank: int, world: int) -> list[int]:
    """Shard s belongs to process s mod world."""
    return [s for s in range(total) if s % world == rank]


def generate(cfg: GenConfig, out: Path, render: Render, analyze: Analyze, rank: int = 0, world: int = 1,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Render, filter and write this process's shards (see :func:`write_shards`)."""
    make = lambda i: render_identity(draw_identity(cfg.seed, i, cfg.names), cfg, render, analyze)  # noqa: E731
    return write_shards(cfg, out, make, rank, world, log)
