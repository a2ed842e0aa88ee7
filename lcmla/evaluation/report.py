"""The evaluation report: ``summary.csv``, Pareto plots (ID vs CLIP-T over the identity scales, one
curve per method), an image grid per prompt set, and ``report.md`` tying them together."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw

from .metrics import mean_ci

ALL = "all"
#: The metrics besides ID that a row may carry, summarised when any row of a group has them.
OPTIONAL_METRICS = ("clip_t", "face_style", "aesthetic", "imagereward")
#: The metrics whose columns the report always has (blank where not computed).
ALWAYS_SHOWN = ("clip_t", "face_style")
#: What each summary.csv column holds, and its unit (report.md lists them under the table).
COLUMNS = {
    "method, scale, prompt_set, n": "the cell group: method, identity scale λ, prompt set (all = every set), images",
    "id_<net>, id_<net>_ci": "ID: cosine (−1…1, higher is closer) of the recognizer's embeddings of the "
                            "reference and the image's largest face; mean and 95 % CI half-width",
    "ffc_<net>": "face-fail count: images in which the recognizer finds no face (SPEC §6)",
    "noref_<net>": "images with a face that are not scored: the recognizer finds no face in the identity's "
                   "reference photos (not the method's failure, not in the FFC)",
    "clip_t, clip_t_ci": "CLIP-T: 100 × cosine of the CLIP image and prompt embeddings (text alignment)",
    "face_style, face_style_ci": "face-style: 100 × CLIP cosine of the face crop and the style part of the prompt",
    "aesthetic, imagereward": "LAION's aesthetic predictor and ImageReward, as their models score (when computed)",
    "seconds_per_image": "generation time per image on the machine that ran the grid, seconds",
}


def _groups(rows: Sequence[dict]) -> dict[tuple[str, float, str], list[dict]]:
    """(method, scale, prompt set) → rows; each row also counts in the set "all"."""
    out: dict[tuple[str, float, str], list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["method"], r["scale"], ALL)].append(r)
        out[(r["method"], r["scale"], r["prompt_set"])].append(r)
    return out


def scorer_names(rows: Sequence[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for name in r["metrics"].get("id", {}):
            if name not in names:
                names.append(name)
    return names


def summarize(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """One record per (method, scale, prompt set): n images, and for every metric the mean and the
    half-width of its 95 % confidence interval; the face-fail count (FFC) per recognizer."""
    out = []
    scorers = scorer_names(rows)
    for (method, scale, pset), group in sorted(_groups(rows).items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != ALL, kv[0][2])):
        rec: dict[str, Any] = {"method": method, "scale": scale, "prompt_set": pset, "n": len(group)}
        for s in scorers:
            m, ci, _ = mean_ci([r["metrics"]["id"].get(s) for r in group])
            rec[f"id_{s}"], rec[f"id_{s}_ci"] = m, ci
            rec[f"ffc_{s}"], rec[f"noref_{s}"] = face_fail_counts(group, s)
        for metric in OPTIONAL_METRICS:
            values = [r["metrics"].get(metric) for r in group]
            if any(v is not None for v in values):
                rec[metric], rec[f"{metric}_ci"], _ = mean_ci(values)
            elif metric in ALWAYS_SHOWN:  # the report's table has their columns: summary.csv too (blank)
                rec[metric], rec[f"{metric}_ci"] = float("nan"), float("nan")
        seconds = [r["seconds"] for r in group if r.get("seconds") is not None]
        rec["seconds_per_image"] = sum(seconds) / len(seconds) if seconds else float("nan")
        out.append(rec)
    return out


def face_fail_counts(rows: Sequence[dict], scorer: str) -> tuple[int, int]:
    """(FFC, unscored): the images where ``scorer`` finds no face (SPEC §6's face-fail count), and
    the images with a face but no ID because it found none in the identity's reference photos
    (not the method's failure, so not in the FFC)."""
    ffc = unscored = 0
    for r in rows:
        found = r["metrics"].get("face_found", {}).get(scorer)
        scored = r["metrics"]["id"].get(scorer) is not None
        if found is None:  # a row written before face_found existed: no ID meant no face
            found = scored
        ffc += not found
        unscored += bool(found) and not scored
    return ffc, unscored


def write_summary(records: Sequence[dict], path: Path) -> Path:
    fields: list[str] = []
    for r in records:
        fields += [k for k in r if k not in fields]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in records:
            # a number not computed is a blank cell (it was the literal "nan")
            w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else f"{v:.6g}" if isinstance(v, float) else v)
                        for k, v in r.items()})
    return path


def pareto_points(records: Sequence[dict], scorer: str, prompt_set: str = ALL) -> dict[str, list[tuple[float, float, float]]]:
    """method → [(scale, CLIP-T, ID)] sorted by scale: the points a Pareto plot draws."""
    out: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for r in records:
        if (r["prompt_set"] == prompt_set and not math.isnan(r.get("clip_t", float("nan")))
                and not math.isnan(r.get(f"id_{scorer}", float("nan")))):
            out[r["method"]].append((r["scale"], r["clip_t"], r[f"id_{scorer}"]))
    return {m: sorted(v) for m, v in out.items()}


def pareto_plot(records: Sequence[dict], scorer: str, path: Path, note: str = "", prompt_set: str = ALL,
                x_note: str = "", y_note: str = "") -> Path:
    """ID (``scorer``) against CLIP-T, one curve per method over the identity scales λ; the plotted
    points are also written beside the PNG as JSON. ``x_note``/``y_note`` qualify the axes (e.g. a
    random CLIP, a stand-in recognizer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = pareto_points(records, scorer, prompt_set)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for method, pts in points.items():
        xs, ys = [p[1] for p in pts], [p[2] for p in pts]
        ax.plot(xs, ys, marker="o", label=method)
        for scale, x, y in pts:
            ax.annotate(f"{scale:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel(f"CLIP-T (text alignment, ×100){x_note}")
    ax.set_ylabel(f"ID (cosine, {scorer}){y_note}")
    ax.set_title(f"ID vs CLIP-T over λ ({prompt_set} prompts){note}", fontsize=10)
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no points: no cell has both an ID ({scorer}) and a CLIP-T score\n"
                "(the recognizer found no face in any image, or CLIP-T was not computed)",
                ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.3")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps({m: [list(p) for p in v] for m, v in points.items()}, indent=1))
    return path


def image_grid(rows: Sequence[dict], folder: Path, prompt_set: str, path: Path, scale: float | None = None,
               cell: int = 192) -> Path | None:
    """Rows = methods, columns = prompts, for the first identity and seed at the scale nearest 0.8."""
    rows = [r for r in rows if r["prompt_set"] == prompt_set]
    if not rows:
        return None
    scales = sorted({r["scale"] for r in rows})
    scale = scale if scale is not None else min(scales, key=lambda s: abs(s - 0.8))
    identity, seed = rows[0]["identity"], min(r["seed"] for r in rows)
    pick = [r for r in rows if r["scale"] == scale and r["identity"] == identity and r["seed"] == seed]
    methods = list(dict.fromkeys(r["method"] for r in pick))
    prompts = list(dict.fromkeys(r["prompt"] for r in pick))
    import textwrap

    label_w, title, head = 150, 18, 48
    sheet = Image.new("RGB", (label_w + cell * len(prompts), title + head + cell * len(methods)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 3), f"identity {identity} · seed {seed} · λ = {scale:g} · {prompt_set} prompts", fill="black")
    for j, p in enumerate(prompts):
        for k, line in enumerate(textwrap.wrap(p, width=max(8, cell // 7))[:3]):  # whole words, three lines
            draw.text((label_w + j * cell + 4, title + 2 + 14 * k), line, fill="black")
    head += title
    for i, m in enumerate(methods):
        draw.text((4, head + i * cell + cell // 2), m, fill="black")
        for j, p in enumerate(prompts):
            hit = next((r for r in pick if r["method"] == m and r["prompt"] == p), None)
            if hit is not None:
                img = Image.open(folder / hit["image"]).convert("RGB").resize((cell, cell))
                sheet.paste(img, (label_w + j * cell, head + i * cell))
    sheet.save(path)
    return path


def labels(config: dict | None) -> dict[str, str]:
    """What the report says about numbers that do not measure what their name says: a random CLIP
    (``clip_meaningful`` False), a stand-in recognizer (``recognizers[name]`` False)."""
    config = config or {}
    out = {}
    if config.get("clip_meaningful") is False:
        out["clip_t"] = " — random CLIP: meaningless"
    for name, real in (config.get("recognizers") or {}).items():
        if not real:
            out[f"id_{name}"] = " — stand-in, not a recognizer"
    return out


def request_notes_by_method(rows: Sequence[dict]) -> dict[str, tuple[list[str], int]]:
    """Each distinct engine note of the rows (``Result.notes``, stored per image): the methods
    whose images it came with, and how many images; in the order first seen."""
    found: dict[str, tuple[list[str], int]] = {}
    for row in rows:
        for n in row.get("notes") or ():
            methods, count = found.get(n, ([], 0))
            if row["method"] not in methods:
                methods = [*methods, row["method"]]
            found[n] = (methods, count + 1)
    return found


def write_report(folder: str | Path, rows: Sequence[dict] | None = None, config: dict | None = None) -> Path:
    """summary.csv, pareto-<recognizer>.png (+ .json), grid-<set>.png and report.md in ``folder``."""
    from .run import read_rows

    folder = Path(folder)
    rows = read_rows(folder / "results.jsonl") if rows is None else list(rows)
    records = summarize(rows)
    write_summary(records, folder / "summary.csv")
    scorers = scorer_names(rows)
    meaningless = (config or {}).get("random_weights", False)
    marks = labels(config)
    note = " — random weights: meaningless numbers" if meaningless else ""
    plots = [pareto_plot(records, s, folder / f"pareto-{s}.png", note, x_note=marks.get("clip_t", ""),
                         y_note=marks.get(f"id_{s}", ""))
             for s in scorers if any(not math.isnan(r.get("clip_t", float("nan"))) for r in records)]
    grids = [g for g in (image_grid(rows, folder, ps, folder / f"grid-{ps}.png")
                         for ps in dict.fromkeys(r["prompt_set"] for r in rows)) if g is not None]
    seconds = [r["seconds"] for r in rows if r.get("seconds") is not None]
    lines = ["# lcmla evaluation report", ""]
    if meaningless:
        lines += ["> **The tiny preset's weights are random**: these numbers exercise the harness and mean nothing "
                  "about the methods.", ""]
    if "clip_t" in marks:
        lines += ["> **CLIP-T and face-style come from a random CLIP** (the tiny preset's image encoder): "
                  "meaningless; pass --clip-model with a real CLIP.", ""]
    stand_ins = [k.removeprefix("id_") for k in marks if k.startswith("id_")]
    if stand_ins:
        lines += [f"> **ID {', '.join(stand_ins)}: a stand-in, not a face recognizer** (pixel similarity of the "
                  "face crops, not identity).", ""]
    if config:
        lines += ["## Configuration", "", "```json", json.dumps(config, indent=2, default=str), "```", ""]
    lines += [f"{len(rows)} images; generation {sum(seconds):.1f} s in all, "
              f"{(sum(seconds) / len(seconds)) if seconds else float('nan'):.3f} s per image on this machine.", ""]
    extra = [m for m in ("aesthetic", "imagereward") if any(m in r for r in records)]
    lines += ["## Summary (all prompts; mean ± 95 % CI)", ""]
    head = (["method", "λ", "n"] + [f"ID {s}" for s in scorers] + [f"FFC {s}" for s in scorers]
            + ["CLIP-T", "face-style"] + [{"aesthetic": "aesthetic", "imagereward": "ImageReward"}[m] for m in extra])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r["prompt_set"] != ALL:
            continue
        cells = [r["method"], f"{r['scale']:g}", str(r["n"])]
        cells += [_pm(r[f"id_{s}"], r[f"id_{s}_ci"]) for s in scorers] + [str(r[f"ffc_{s}"]) for s in scorers]
        cells += [_pm(r.get(m), r.get(f"{m}_ci")) for m in ("clip_t", "face_style", *extra)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Columns of `summary.csv` (one row per method, λ and prompt set; a blank cell: not computed):", ""]
    lines += [f"- `{k}`: {v}" for k, v in COLUMNS.items()]
    notes = list((config or {}).get("notes") or [])
    for s in scorers:
        unscored = sum(r.get(f"noref_{s}", 0) for r in records if r["prompt_set"] == ALL)
        if unscored:
            notes.append(f"ID {s}: {unscored} images with a face are not scored because {s} finds no face in "
                         "their identity's reference photos (not counted in FFC); give photos where it finds one.")
    if notes:
        lines += ["", "## Metrics not computed", ""] + [f"- {n}" for n in notes]
    engine_notes = request_notes_by_method(rows)
    if engine_notes:
        lines += ["", "## What the engine noted", "",
                  "What some requests did that their settings do not show (`notes` in results.jsonl):", ""]
        lines += [f"- {', '.join(methods)} ({count} image{'s' * (count != 1)}): {n}"
                  for n, (methods, count) in engine_notes.items()]
    lines += ["", "## Pareto fronts", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Images", ""] + [f"![{g.stem}]({g.name})" for g in grids]
    lines += ["", "Files: `results.jsonl` (one row per image: every setting and metric), `summary.csv`.", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path


def _pm(mean, ci) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{mean:.3f}" if ci is None or math.isnan(ci) else f"{mean:.3f} ± {ci:.3f}"
