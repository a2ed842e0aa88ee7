"""The Compare tab: the papers' methods (and the trained weights) side by side on the same inputs,
with identity similarity and time; and the evaluation reports found under --reports."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from lcmla.errors import LcmlaError
from lcmla.methods import METHOD_LABELS, method_changes

from .common import (
    COMPARE_METHODS,
    GENERATE_INPUTS,
    Context,
    _face_paths,
    _gpu,
    log,
    named_handler,
    note_failures,
    notes_text,
    user_errors,
    with_context,
    reveal_on_click,
)


def _similarity_text(score: float | None) -> str:
    """An identity similarity as the table shows it."""
    return "no face found" if score is None else f"{score:.3f}"


def layout(ctx: Context) -> SimpleNamespace:
    with gr.Tab("Compare", id="compare"):
        gr.Markdown(
            "The same photos, prompt and seed through the baseline, FastFace (AM1 + DCG, AM2 + DCG) and "
            "LCM-Lookahead (KV path with FreeU), each with the rest of the Generate tab's knobs. Identity "
            "similarity is the cosine of the face embeddings of the reference and the image (SPEC §6)."
        )
        compare_btn = gr.Button("Compare methods", variant="primary", elem_id="compare-btn")
        compare_gallery = gr.Gallery(label="Side by side", columns=len(COMPARE_METHODS) + (ctx.trained is not None), height=360, format="png",
                                     object_fit="contain", interactive=False, elem_id="compare-gallery")
        compare_table = gr.Dataframe(headers=["method", "identity similarity", "time (s)", "UNet branches per step"],
                                     datatype=["str", "str", "number", "str"], interactive=False,
                                     elem_id="compare-table", label="Scores")
        compare_info = gr.Markdown("", label="Notes", elem_id="compare-info")
        with gr.Accordion("Evaluation reports", open=bool(find_reports(ctx.reports)), elem_id="reports"):
            gr.Markdown(
                "Reports written by `python -m lcmla evaluate … --output-dir D`, found in the folders given "
                "with `--reports` (or `$LCMLA_REPORTS`): "
                + (", ".join(f"`{r}`" for r in ctx.reports) if ctx.reports else "_none given_") + ".")
            with gr.Row():
                report_choice = gr.Dropdown(choices=find_reports(ctx.reports), value=None, label="Report",
                                            elem_id="report-choice", scale=4)
                report_refresh = gr.Button("Refresh the list", size="sm", scale=1, elem_id="report-refresh")
            report_plots = gr.Gallery(label="Pareto plots (ID vs CLIP-T over the identity scales) and grids",
                                      columns=2, height=420, format="png", interactive=False,
                                      object_fit="contain", elem_id="report-plots")
            report_table = gr.Dataframe(label="summary.csv (mean and 95 % CI per method and scale)",
                                        interactive=False, elem_id="report-summary", wrap=True,
                                        visible=False)  # shown with a report's table (empty, it shows headers "1 2 3")
            report_md = gr.Markdown("", label="report.md", elem_id="report-md")
    return SimpleNamespace(compare_btn=compare_btn, compare_gallery=compare_gallery, compare_table=compare_table,
                           compare_info=compare_info, report_choice=report_choice, report_refresh=report_refresh,
                           report_plots=report_plots, report_table=report_table, report_md=report_md)


def compare_runs(ctx: Context) -> list[tuple[str, str, Any]]:
    """(method, label, trained weights or None) of each column."""
    runs: list[tuple[str, str, Any]] = [(key, label, None) for key, label in COMPARE_METHODS]
    if ctx.trained is not None:
        runs.append((ctx.trained.method, f"Trained · {METHOD_LABELS[ctx.trained.method]}", ctx.trained))
    return runs


def run_compare(ctx: Context, ui: dict[str, Any], progress: Any):
    """The compared methods on the same face, prompt and seed, with identity similarity and time
    (plus the trained weights when the app was started with them)."""
    from lcmla.evaluate import identity_similarity

    paths = _face_paths(ui["app.faces"])
    shown: list[tuple[Any, str]] = []
    rows: list[list[Any]] = []
    noted: dict[str, list[str]] = {}  # each engine request note: the columns it came from
    with user_errors("Compare"):
        base = ctx.request_settings(ui, {"output.num_images": 1})
        progress(0, desc="finding the face")
        identity = ctx.stock.analyze_faces(paths, base.identity.face_index)
        runs = compare_runs(ctx)
        for i, (key, label, weights) in enumerate(runs):
            progress((i, len(runs)), desc=label)
            runner = ctx.stock if weights is None else weights.engine
            settings = base.replace_dotted(method_changes(key, ctx.preset.name))
            t0 = time.perf_counter()
            result = runner.generate(settings, identity)
            seconds = time.perf_counter() - t0
            score = identity_similarity(ctx.stock.faces, identity, result.images[0])
            shown.append((result.images[0], f"{label}: {_similarity_text(score)}, {seconds:.1f} s"))
            branches = " ".join(str(len(b)) for b in result.branch_calls) or "—"
            rows.append([label, _similarity_text(score), round(seconds, 3), branches])
            for n in result.notes:
                noted.setdefault(n, []).append(label)
            yield shown, rows, f"{i + 1} of {len(runs)} done …"
    note = f"Seed {base.output.seed} · {base.output.width}×{base.output.height} · {base.guidance.steps} steps."
    if not ctx.stock.faces.is_recognizer:
        note += ("  \n_The face backend is the OpenCV stand-in: its embedding is not a face recognizer, so these "
                 "similarities compare pixels, not identities._")
    for n, labels in noted.items():  # once each; named by column unless every column has it
        note += notes_text([n], prefix="" if len(labels) == len(runs) else f"{', '.join(labels)}: ")
    yield shown, rows, note


# ---- evaluation reports --------------------------------------------------------------------------


REPORT_DEPTH = 2  # how far below a --reports root a report folder may lie (find_reports, _under)


def find_reports(roots: Sequence[str | os.PathLike]) -> list[str]:
    """Evaluation report folders (holding ``report.md``) in ``roots``: each root itself, its
    sub-folders and theirs (``REPORT_DEPTH`` levels), sorted."""
    found: set[str] = set()
    for root in roots:
        root = Path(root).expanduser()
        if not root.is_dir():
            continue
        below = [p for depth in range(1, REPORT_DEPTH + 1) for p in root.glob("/".join(["*"] * depth))]
        for candidate in [root, *below]:
            if candidate.is_dir() and (candidate / "report.md").is_file():
                found.add(str(candidate.resolve()))
    return sorted(found)


def _under(folder: str, roots: Sequence[str | os.PathLike]) -> bool:
    """Whether ``folder`` lies where :func:`find_reports` looks (``REPORT_DEPTH`` levels below a root at most)."""
    path = Path(folder).expanduser().resolve()
    for root in roots:
        base = Path(root).expanduser().resolve()
        if path == base or base in path.parents and len(path.relative_to(base).parts) <= REPORT_DEPTH:
            return True
    return False


def read_report(folder: str, roots: Sequence[str | os.PathLike]) -> tuple[list[tuple[Any, str]], Any, str]:
    """(plots and grids as (image, caption), summary.csv as a table, report.md without its image
    lines) of a report folder; only folders :func:`find_reports` lists can be opened."""
    from PIL import Image

    if str(Path(folder).expanduser().resolve()) not in find_reports(roots):
        if not Path(folder).expanduser().exists() and _under(folder, roots):  # listed before, deleted since
            raise LcmlaError(f"the report {folder!r} is no longer there (moved or deleted since the list was made); "
                             "press Refresh the list")
        raise LcmlaError(f"{folder!r} is not an evaluation report in the --reports folders; pick one from the list")
    path = Path(folder)
    images = []
    for png in sorted(path.glob("pareto-*.png")) + sorted(path.glob("grid-*.png")):
        with Image.open(png) as img:
            images.append((img.convert("RGB"), png.stem))
    table = None
    rows = summary_rows(path)
    if rows:
        import pandas as pd

        table = pd.DataFrame(rows[1:], columns=rows[0])
    text = (path / "report.md").read_text(encoding="utf-8", errors="replace")
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("!["))
    return images, table, text


def summary_rows(folder: str | os.PathLike) -> list[list[str]]:
    """A report folder's summary.csv as rows (the header first; blank lines left out), [] without one."""
    import csv

    summary = Path(folder).expanduser() / "summary.csv"
    if not summary.is_file():
        return []
    with summary.open(newline="", encoding="utf-8", errors="replace") as f:
        return [row for row in csv.reader(f) if row]


def report_table_shown(folder: str | None) -> Any:
    """The summary table is shown when the chosen report has one (empty, Gradio draws headers "1 2 3")."""
    return gr.update(visible=bool(folder) and len(summary_rows(folder)) > 1)  # a header and at least one row


def show_report(ctx: Context, folder: str | None):
    """A finished evaluation report: its plots and grids, summary table and report.md. A report
    that cannot be opened clears the view (an earlier report's content would read as this one's)."""
    if not folder:
        return [], None, "Pick a report."
    try:
        plots, table, text = read_report(folder, ctx.reports)
    except LcmlaError as exc:
        gr.Warning(str(exc), title="Opening the report")
        return [], None, f"_{exc}_"
    except Exception as exc:  # noqa: BLE001 - a broken report folder must not take the view down
        log.exception("opening a report failed")
        gr.Warning(f"the report {folder!r} could not be read ({type(exc).__name__}: {exc})", title="Opening the report")
        return [], None, f"_the report could not be read ({type(exc).__name__}: {exc})_"
    return plots, table, text


def wire(ctx: Context, tab: SimpleNamespace, controls: dict[str, Any]) -> None:
    """Connect Compare (API name: compare) and the report view (open_report, list_reports)."""
    reveal_on_click(tab.compare_btn, 'compare-gallery')
    compare = tab.compare_btn.click(_gpu(named_handler(partial(run_compare, ctx), GENERATE_INPUTS)),
                                    [controls[n] for n in GENERATE_INPUTS], [tab.compare_gallery, tab.compare_table, tab.compare_info],
                                    api_name="compare", concurrency_id="engine", show_progress_on=[tab.compare_gallery])
    note_failures(compare, tab.compare_info, [tab.compare_gallery])
    tab.report_choice.change(with_context(show_report, ctx), tab.report_choice,
                             [tab.report_plots, tab.report_table, tab.report_md], api_name="open_report",
                             concurrency_limit=4).then(
        report_table_shown, tab.report_choice, tab.report_table, api_name="report_table_shown", api_visibility="private",
        show_progress="hidden")

    tab.report_refresh.click(list_reports_of(ctx), None, tab.report_choice, api_name="list_reports", concurrency_limit=4)


def list_reports_of(ctx: Context):
    """The handler listing the evaluation reports in the --reports folders again (the refresh
    button, and every page load: a run may have finished since the app started)."""

    def list_reports():
        """The evaluation reports in the --reports folders, found again (a new run may have finished)."""
        return gr.update(choices=find_reports(ctx.reports))

    return list_reports
