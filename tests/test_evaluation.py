"""The evaluation harness on the tiny preset: grid, resume, metrics by hand, summary and plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from lcmla.evaluation.metrics import AnalyzerScorer, cosine, id_score, mean_ci, reference_embedding, style_part
from lcmla.evaluation.report import pareto_points, summarize, write_report
from lcmla.evaluation.run import Cell, EvalConfig, Evaluation, load_prompts, read_rows


def test_metrics_by_hand(face_path):
    from lcmla.faces import FaceAnalyzer

    haar = AnalyzerScorer(FaceAnalyzer.haar())
    photo = Image.open(face_path).convert("RGB")
    ref = reference_embedding(haar, [photo])
    score, box = id_score(haar, ref, photo)
    assert score == pytest.approx(1.0, abs=1e-6) and box is not None  # identical images: ID 1
    grey = Image.new("RGB", (256, 256), (128, 128, 128))
    assert id_score(haar, ref, grey) == (None, None)  # no face: no score, counts in FFC
    assert cosine([1, 0], [0, 2]) == 0.0 and cosine([1, 1], [2, 2]) == pytest.approx(1.0)
    assert style_part("a watercolor painting; a portrait of a face") == "a watercolor painting"
    assert style_part("a photo of a face") is None
    m, ci, n = mean_ci([1.0, 2.0, 3.0, None])
    assert (m, n) == (2.0, 3) and ci == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # t(0.975, 2)


def test_prompt_sets():
    lh = load_prompts("lookahead")
    assert len(lh) == 18 and lh[0] == ("lookahead", "A photo of a face")
    ff = load_prompts("fastface", max_prompts=2)
    assert [s for s, _ in ff] == ["realistic", "realistic", "style", "style"] and ";" in ff[-1][1]


def _clip(engine):
    from lcmla.evaluation.metrics import ClipScorer

    paths = engine.components.paths
    return ClipScorer(paths["image_encoder"], paths["base"] / "tokenizer", meaningful=False)


def test_grid_is_complete_resumes_and_reports(engine, face_path, tmp_path):
    from lcmla.faces import FaceAnalyzer

    config = EvalConfig(methods=["baseline", "am2+dcg"], identities=[("astronaut", (str(face_path),))],
                        prompts=[("realistic", "a photo of a face"), ("style", "a pencil sketch; a portrait of a face")],
                        seeds=[0], scales=[0.5, 0.8])
    calls = []
    generate = engine.generate

    def counting(*a, **k):
        calls.append(1)
        return generate(*a, **k)

    engine.generate = counting
    try:
        ev = Evaluation({"base": engine}, [AnalyzerScorer(FaceAnalyzer.haar())], _clip(engine), None, tmp_path)
        rows = ev.run(config)
        assert len(rows) == 8 and len(calls) == 8 and len({r["key"] for r in rows}) == 8
        r0 = rows[0]
        assert set(r0["metrics"]) >= {"id", "face_found", "clip_t"} and r0["settings"]["identity"]["ip_adapter_scale"] in (0.5, 0.8)
        assert r0["settings"]["guidance"]["dcg"] == (r0["method"] == "am2+dcg")
        # a kill: the last two rows were never written, one of their images was
        lines = (tmp_path / "results.jsonl").read_text().splitlines()
        (tmp_path / "results.jsonl").write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:20])  # torn last line
        (tmp_path / rows[-1]["image"]).unlink()
        calls.clear()
        again = ev.run(config)
        assert len(calls) == 1  # only the missing image is generated; the other one is re-scored
        assert sorted(r["key"] for r in again) == sorted(r["key"] for r in rows)
        assert ev.run(config) and len(calls) == 1  # complete: nothing more
    finally:
        engine.generate = generate
    report = write_report(tmp_path, again, {"random_weights": True})
    text = report.read_text()
    assert "mean nothing" in text and "| am2+dcg | 0.8 |" in text
    records = summarize(again)
    plotted = json.loads((tmp_path / "pareto-haar.json").read_text())
    assert (tmp_path / "pareto-haar.png").stat().st_size > 1000
    assert plotted == {m: [list(p) for p in v] for m, v in pareto_points(records, "haar").items()}
    for rec in records:
        if rec["prompt_set"] == "all":
            pts = {p[0]: p for p in plotted.get(rec["method"], [])}
            if math.isnan(rec["id_haar"]):  # no face in any image of the cell (random weights): not plotted
                assert rec["scale"] not in pts and rec["ffc_haar"] == rec["n"]
                continue
            assert pts[rec["scale"]][1] == pytest.approx(rec["clip_t"]) and pts[rec["scale"]][2] == pytest.approx(rec["id_haar"])
    assert (tmp_path / "grid-style.png").is_file() and (tmp_path / "summary.csv").read_text().startswith("method,")


def test_face_fail_count_in_the_summary():
    rows = [{"method": "m", "scale": 0.5, "prompt_set": "s", "prompt": "p", "seed": s, "identity": "a",
             "seconds": 1.0, "metrics": {"id": {"x": v}, "clip_t": 20.0}} for s, v in enumerate([0.5, None, 0.7])]
    rec = next(r for r in summarize(rows) if r["prompt_set"] == "all")
    assert rec["ffc_x"] == 1 and rec["id_x"] == pytest.approx(0.6) and rec["n"] == 3


def test_cli_evaluate(tmp_path, face_path):
    from lcmla.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--faces", str(face_path), "--methods", "baseline", "--seeds", "0", "--scales", "0.8",
                 "--max-prompts", "1", "--output-dir", str(out), "--quiet", "--set", "guidance.steps=2"]) == 0
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 1 and rows[0]["settings"]["guidance"]["steps"] == 2
    assert (out / "report.md").is_file() and json.loads((out / "config.json").read_text())["random_weights"]
    assert main(["evaluate", "--faces", str(face_path), "--methods", "nope", "--output-dir", str(out)]) == 2
