"""``python -m training datagen inspect DIR``: statistics of a folder of shards and a contact sheet
PNG per shard (one row per identity, its images labelled by template)."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .reader import ShardSamples, counts_text
from .shards import read_manifest


def statistics(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    manifest = read_manifest(folder)
    samples = ShardSamples([folder])
    recs = samples.records
    sims = [r["similarity"] for r in recs if r.get("similarity") is not None]
    rejected: Counter = Counter()
    for entry in manifest.values():
        rejected.update(entry.get("rejected", {}))
    return {
        "shards": len(manifest), "identities": len({r["identity"] for r in recs}), "samples": len(recs),
        "plain": sum(not r["stylized"] for r in recs), "stylized": sum(r["stylized"] for r in recs),
        "templates": dict(Counter(r["template"] for r in recs)),
        "mean_similarity": sum(sims) / len(sims) if sims else float("nan"),
        "rejected": dict(rejected), "skipped_on_read": dict(samples.skipped),
        "backends": sorted({e.get("backend", "") for e in manifest.values()}),
        "real_recognizer": all(e.get("is_recognizer", False) for e in manifest.values()),
    }


def contact_sheets(folder: str | Path, out: str | Path | None = None, thumb: int = 128, per_row: int = 12,
                   warn=None) -> list[Path]:
    """One PNG per shard of the manifest: a row per identity (up to ``per_row`` images), each
    labelled; a shard that kept no sample gets a sheet saying so, with its rejections by reason.
    An image member that does not decode is a grey "unreadable image" tile; ``warn(text)``, when
    given, is told how many per shard."""
    folder = Path(folder)
    out = Path(out) if out else folder / "contact-sheets"
    out.mkdir(parents=True, exist_ok=True)
    samples = ShardSamples([folder])
    manifest = read_manifest(folder)
    by_shard: dict[str, dict[int, list[int]]] = {name: defaultdict(list) for name in manifest}
    for i, (ref, rec) in enumerate(zip(samples.samples, samples.records)):
        by_shard.setdefault(ref.shard.name, defaultdict(list))[rec["identity"]].append(i)
    paths = []
    label = 18
    unreadable: dict[str, int] = {}
    for name, identities in sorted(by_shard.items()):
        rows = sorted(identities.items())
        if not rows:
            sheet = _empty_sheet(name, manifest.get(name, {}), per_row * thumb, thumb + label)
        else:
            sheet = Image.new("RGB", (per_row * thumb, len(rows) * (thumb + label)), "white")
            draw = ImageDraw.Draw(sheet)
            for r, (identity, idx) in enumerate(rows):
                for c, i in enumerate(idx[:per_row]):
                    x, y = c * thumb, r * (thumb + label)
                    rec = samples.records[i]
                    try:
                        img = samples.image(i).resize((thumb, thumb))
                    except Exception:  # noqa: BLE001 - a corrupt image member: shown as such, the sheet goes on
                        img = Image.new("RGB", (thumb, thumb), (200, 200, 200))
                        ImageDraw.Draw(img).text((6, thumb // 2 - 6), "unreadable image", fill="black")
                        unreadable[name] = unreadable.get(name, 0) + 1
                    sheet.paste(img, (x, y + label))
                    draw.text((x + 2, y + 2), f"{identity}:{rec['template'][:14]}", fill="black")
        path = out / f"{Path(name).stem}.png"
        sheet.save(path)
        paths.append(path)
    if unreadable and warn is not None:
        warn(f"unreadable images (shown grey on the sheets): {counts_text(unreadable)}")
    return paths


def empty_sheet_lines(name: str, entry: dict) -> list[str]:
    """What the sheet of a shard without samples says: its name and identities, and its rejections
    by reason (the nonzero ones, in the manifest's order)."""
    rejected = {k: v for k, v in entry.get("rejected", {}).items() if v}
    ids = entry.get("identities", [])
    span = f"identities {ids[0]}-{ids[-1]}" if ids else "no identities"
    return [f"{name}: no sample kept ({span})",
            "rejected: " + (", ".join(f"{k} {v}" for k, v in rejected.items()) or "none")]


def _empty_sheet(name: str, entry: dict, width: int, height: int) -> Image.Image:
    """The sheet of a shard without samples (:func:`empty_sheet_lines`)."""
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for row, line in enumerate(empty_sheet_lines(name, entry)):
        draw.text((6, 6 + 20 * row), line, fill="black")
    return sheet
