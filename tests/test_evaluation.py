"""The evaluation harness on the tiny preset: grid, resume, metrics by hand, summary and plots."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lcmla.errors import LcmlaError
from lcmla.evaluation.metrics import AnalyzerScorer, cosine, id_score, mean_ci, reference_embedding, style_part
from lcmla.evaluation.report import pareto_points, summarize, write_report
from lcmla.evaluation.run import Cell, EvalConfig, Evaluation, Processes, load_prompts, read_rows


class AlwaysAFace:
    """A scorer that finds a face in every image (the centre square) and embeds its 8×8 grey pixels:
    on random-weight images, where no real detector finds a face, it still gives ID numbers, so
    the summary, the plots and face-style have data."""

    name = "stub"
    is_recognizer = False

    def face(self, image):
        w, h = image.size
        side = min(w, h) // 2
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        grey = np.asarray(image.convert("L").crop(tuple(int(v) for v in box)).resize((8, 8)), np.float64).ravel()
        return box, grey - grey.mean() + 1e-3


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
    # a NaN (a metric that failed on one image) is left out like a missing value, not propagated
    m, ci, n = mean_ci([1.0, float("nan"), 3.0])
    assert (m, n) == (2.0, 2) and ci == pytest.approx(12.706205 * math.sqrt(2) / math.sqrt(2), rel=1e-5)  # t₁·sd/√n


def test_cosine_of_vectors_of_any_length():
    """cos = a·b/(|a||b|) for vectors that are not unit length and not parallel (3-4-5: 24/25),
    the same in the app's ``cosine_similarity``."""
    from lcmla.evaluate import cosine_similarity

    for f in (cosine, cosine_similarity):
        assert f([3.0, 4.0], [8.0, 6.0]) == pytest.approx(0.96, abs=1e-6)
        assert f([3.0, 4.0], [-4.0, 3.0]) == pytest.approx(0.0, abs=1e-6)
        assert f([2.0, 0.0], [-5.0, 0.0]) == pytest.approx(-1.0, abs=1e-6)


def test_a_face_found_for_an_identity_without_a_reference_keeps_its_box(face_path):
    """An identity whose reference photos have no face for this recognizer has no ID score, but
    the generated image's face is still found: its box feeds face-style and face_found."""
    from lcmla.faces import FaceAnalyzer

    haar = AnalyzerScorer(FaceAnalyzer.haar())
    photo = Image.open(face_path).convert("RGB")
    score, box = id_score(haar, None, photo)
    assert score is None and box == haar.face(photo)[0] and box is not None


def test_face_crops_are_clipped_to_the_image_and_empty_boxes_give_none():
    from lcmla.evaluation.metrics import crop_box

    image = Image.new("RGB", (100, 80))
    assert crop_box(image, (-20.4, -10, 30, 40)).size == (30, 40)  # not padded with black outside
    assert crop_box(image, (90, 70, 130, 95)).size == (10, 10)
    assert crop_box(image, (40, 10, 40, 50)) is None and crop_box(image, (10, 30, 50, 30)) is None
    assert crop_box(image, (120, 10, 150, 50)) is None


def _two_faces(big: str):
    """One canvas holding both portraits, ``big`` at full size and the other at 256 px wide."""
    from faceutils import portraits

    photos = portraits()
    large, small = photos.pop(big), next(iter(photos.values()))
    canvas = Image.new("RGB", (large.width + 300, large.height), (128, 128, 128))
    canvas.paste(large, (0, 0))
    canvas.paste(small.resize((256, round(256 * small.height / small.width))), (large.width + 22, 60))
    return canvas


def test_the_haar_scorer_scores_the_largest_face():
    from lcmla.faces import FaceAnalyzer

    analyzer = FaceAnalyzer.haar()
    canvas = _two_faces("hopper")
    faces = analyzer.detect(canvas)
    assert len(faces) >= 2
    largest = max(faces, key=lambda f: f.area)
    box, embedding = AnalyzerScorer(analyzer).face(canvas)
    assert box == largest.bbox and np.array_equal(embedding, largest.embedding)


def test_the_dlib_scorer_scores_the_largest_face_with_its_identity():
    """DlibScorer (dlib's detector, landmarks and ResNet in torch) on a canvas with both portraits:
    it scores the larger face, and that face's ID against each portrait alone says whose it is."""
    from lcmla.evaluation.metrics import DlibScorer
    from lcmla.recognizers.dlib_pipeline import DlibFaces

    faces = DlibFaces.load()
    scorer = DlibScorer(faces)
    canvas = _two_faces("astronaut")
    found = faces.detect(np.asarray(canvas))
    assert len(found) == 2 and found[0].area > found[1].area
    box, embedding = scorer.face(canvas)
    assert box == found[0].box
    np.testing.assert_allclose(embedding, faces.embed(np.asarray(canvas), found[0]), atol=1e-6)
    from faceutils import portraits

    refs = {name: reference_embedding(scorer, [photo]) for name, photo in portraits().items()}
    same, other = (id_score(scorer, refs[n], canvas)[0] for n in ("astronaut", "hopper"))
    assert same > 0.99 and other < same - 0.1  # dlib puts different people at cosines near 0.85
    assert scorer.face(Image.new("RGB", (200, 200), (128, 128, 128))) is None



def test_an_identity_of_several_photos_is_the_normalised_mean_of_unit_embeddings():
    """reference_embedding over several photos, with a scorer of known embeddings: photos without a
    face are left out, and each embedding is scaled to unit length before the mean (a photo whose
    raw embedding is longer does not weigh more), the mean then normalised."""
    embeddings = {"a": np.array([3.0, 0.0, 0.0]), "b": np.array([0.0, 0.5, 0.0]), "none": None}

    class Known:
        name, is_recognizer = "known", True

        def face(self, photo):
            e = embeddings[photo]
            return None if e is None else ((0, 0, 1, 1), e)

    got = reference_embedding(Known(), ["a", "none", "b"])
    np.testing.assert_allclose(got, np.array([1.0, 1.0, 0.0]) / math.sqrt(2), atol=1e-12)
    np.testing.assert_allclose(reference_embedding(Known(), ["b"]), [0.0, 1.0, 0.0], atol=1e-12)
    assert reference_embedding(Known(), ["none"]) is None

def test_prompt_files_and_identity_folders(tmp_path):
    """A prompt file: one prompt a line, blank lines skipped, a ';' marks a style prompt; an
    identity folder: its photos of any case of extension, sorted, other files left out."""
    from lcmla.evaluation.run import identity_photos

    path = tmp_path / "prompts.txt"
    path.write_text("a photo of a face\n\n  a watercolor painting; a portrait of a face  \n")
    assert load_prompts(str(path)) == [("realistic", "a photo of a face"),
                                       ("style", "a watercolor painting; a portrait of a face")]
    assert load_prompts(str(path), max_prompts=1) == [("realistic", "a photo of a face")]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(LcmlaError, match="holds no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(LcmlaError, match="neither a prompt set"):
        load_prompts(str(tmp_path / "nope.txt"))
    folder = tmp_path / "ada"
    folder.mkdir()
    for name in ("b.JPG", "a.png", "c.WebP", "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert identity_photos(str(folder)) == ("ada", tuple(str(folder / n) for n in ("a.png", "b.JPG", "c.WebP")))
    assert identity_photos(str(folder / "a.png")) == ("a", (str(folder / "a.png"),))
    (tmp_path / "none").mkdir()
    with pytest.raises(LcmlaError, match="holds no .png/.jpg/.webp photos"):
        identity_photos(str(tmp_path / "none"))
    with pytest.raises(LcmlaError, match="no such photo or folder"):
        identity_photos(str(tmp_path / "missing"))


def test_prompt_sets():
    lh = load_prompts("lookahead")
    assert len(lh) == 18 and lh[0] == ("lookahead", "A photo of a face")
    ff = load_prompts("fastface", max_prompts=2)
    assert [s for s, _ in ff] == ["realistic", "realistic", "style", "style"] and ";" in ff[-1][1]
    with pytest.raises(LcmlaError, match="--max-prompts must be at least 1"):  # it wrote an empty report, rc 0
        load_prompts("lookahead", max_prompts=0)


def _clip(engine):
    from lcmla.evaluation.metrics import ClipScorer

    paths = engine.components.paths
    return ClipScorer(paths["image_encoder"], paths["base"] / "tokenizer", meaningful=False)


def test_grid_is_complete_resumes_and_reports(engine, face_path, tmp_path):
    from lcmla.faces import FaceAnalyzer, FaceIdentity

    config = EvalConfig(methods=["baseline", "am2+dcg"], identities=[("astronaut", (str(face_path),))],
                        prompts=[("realistic", "a photo of a face"), ("style", "a pencil sketch; a portrait of a face")],
                        seeds=[0], scales=[0.5, 0.8])
    calls, analyses = [], []
    generate, analyze = engine.generate, engine.analyze_faces

    def counting(*a, **k):
        calls.append(1)
        return generate(*a, **k)

    def analyzing(faces, *a, **k):
        analyses.append(not isinstance(faces, FaceIdentity))  # generate passes the analysed identity through
        return analyze(faces, *a, **k)

    engine.generate, engine.analyze_faces = counting, analyzing
    try:
        ev = Evaluation({"base": engine}, [AnalyzerScorer(FaceAnalyzer.haar()), AlwaysAFace()], _clip(engine), None,
                        tmp_path)
        rows = ev.run(config)
        assert len(rows) == 8 and len(calls) == 8 and len({r["key"] for r in rows}) == 8
        assert sum(analyses) == 1  # the identity's photos are analysed once for all its cells
        r0 = rows[0]
        assert set(r0["metrics"]) >= {"id", "face_found", "clip_t"} and r0["settings"]["identity"]["ip_adapter_scale"] in (0.5, 0.8)
        assert r0["settings"]["guidance"]["dcg"] == (r0["method"] == "am2+dcg")
        # a kill before the merge: the rank file ends in a torn row, the last row was never written,
        # and one of the two images was
        lines = (tmp_path / "results.jsonl").read_text().splitlines()
        (tmp_path / "results.jsonl").unlink()
        (tmp_path / "results.rank-0.jsonl").write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:20])
        (tmp_path / rows[-1]["image"]).unlink()
        calls.clear()
        again = ev.run(config)
        assert len(calls) == 1  # only the missing image is generated; the other one is re-scored
        assert sorted(r["key"] for r in again) == sorted(r["key"] for r in rows)
        assert ev.run(config) and len(calls) == 1  # complete: nothing more
    finally:
        engine.generate, engine.analyze_faces = generate, analyze
    assert not list(tmp_path.glob("results.rank-*.jsonl"))  # merged into results.jsonl
    assert [r["key"] for r in read_rows(tmp_path / "results.jsonl")] == [c.key for c in config.cells()]
    report = write_report(tmp_path, again, {"random_weights": True})
    text = report.read_text()
    assert "mean nothing" in text and "| am2+dcg | 0.8 |" in text
    records = summarize(again)
    for scorer in ("haar", "stub"):
        plotted = json.loads((tmp_path / f"pareto-{scorer}.json").read_text())
        assert (tmp_path / f"pareto-{scorer}.png").stat().st_size > 1000
        assert plotted == {m: [list(p) for p in v] for m, v in pareto_points(records, scorer).items()}
        for rec in records:
            if rec["prompt_set"] != "all":
                continue
            pts = {p[0]: p for p in plotted.get(rec["method"], [])}
            if math.isnan(rec[f"id_{scorer}"]):  # no face in any image of the cell: not plotted
                assert scorer == "haar" and rec["scale"] not in pts and rec["ffc_haar"] == rec["n"]
                continue
            assert pts[rec["scale"]][1] == pytest.approx(rec["clip_t"])
            assert pts[rec["scale"]][2] == pytest.approx(rec[f"id_{scorer}"])
    # the stub finds a face everywhere: its plot has every method at every scale, and face-style is scored
    stub = json.loads((tmp_path / "pareto-stub.json").read_text())
    assert sorted(stub) == ["am2+dcg", "baseline"] and all([p[0] for p in v] == [0.5, 0.8] for v in stub.values())
    assert all(r["metrics"]["face_style"] is not None for r in again if r["prompt_set"] == "style")
    assert (tmp_path / "grid-style.png").is_file() and (tmp_path / "summary.csv").read_text().startswith("method,")


def _row(method, scale, seed, ident, clip_t, pset="realistic"):
    return {"key": f"{method}-{scale}-{seed}", "method": method, "scale": scale, "prompt_set": pset, "prompt": "p",
            "seed": seed, "identity": "a", "seconds": 0.5, "image": "x.png",
            "metrics": {"id": {"net": ident}, "clip_t": clip_t}}


def test_pareto_plot_data_equal_the_summary_by_hand(tmp_path):
    """Hand-built rows (two methods, two scales, two seeds; one face-less image): the plot's JSON
    holds exactly the per-(method, λ) means, computed here by hand."""
    rows = [_row("baseline", 0.5, 0, 0.2, 30.0), _row("baseline", 0.5, 1, 0.4, 32.0),
            _row("baseline", 0.8, 0, 0.5, 28.0), _row("baseline", 0.8, 1, None, 26.0),
            _row("am2+dcg", 0.5, 0, 0.3, 31.0), _row("am2+dcg", 0.5, 1, 0.5, 31.0),
            _row("am2+dcg", 0.8, 0, 0.6, 29.0), _row("am2+dcg", 0.8, 1, 0.7, 27.0, pset="style")]
    from lcmla.evaluation.report import pareto_plot

    records = summarize(rows)
    path = pareto_plot(records, "net", tmp_path / "pareto-net.png")
    plotted = json.loads(path.with_suffix(".json").read_text())
    expected = {"am2+dcg": [pytest.approx([0.5, 31.0, 0.4]), pytest.approx([0.8, 28.0, 0.65])],
                "baseline": [pytest.approx([0.5, 31.0, 0.3]), pytest.approx([0.8, 27.0, 0.5])]}  # face-less: no ID
    assert plotted and plotted == expected
    style_only = pareto_points(records, "net", "style")
    assert style_only == {"am2+dcg": [(0.8, 27.0, 0.7)]}
    base = next(r for r in records if (r["method"], r["scale"], r["prompt_set"]) == ("baseline", 0.8, "all"))
    assert base["ffc_net"] == 1 and base["n"] == 2


def test_pareto_points_run_in_scale_order_and_time_counts_generated_images_only():
    """Records in any order give points sorted by λ; an image scored after a kill (no generation
    time: ``seconds`` None) leaves the mean time per image to the images that were timed."""
    rows = [_row("m", 0.8, 0, 0.6, 29.0), _row("m", 0.35, 0, 0.4, 31.0), _row("m", 0.1, 0, 0.2, 33.0),
            {**_row("m", 0.1, 1, 0.3, 32.0), "seconds": None}, {**_row("m", 0.1, 2, 0.3, 32.0), "seconds": 1.5}]
    records = summarize(rows)
    assert [p[0] for p in pareto_points(list(reversed(records)), "net")["m"]] == [0.1, 0.35, 0.8]
    low = next(r for r in records if (r["scale"], r["prompt_set"]) == (0.1, "all"))
    assert low["n"] == 3 and low["seconds_per_image"] == pytest.approx((0.5 + 1.5) / 2)


def test_the_image_grid_shows_the_scale_nearest_08_and_the_first_seed(tmp_path):
    """One grid per prompt set: rows = methods, columns = prompts, at the λ nearest 0.8 and the
    smallest seed of the first identity (each image here is a flat colour naming its cell)."""
    from lcmla.evaluation.report import image_grid

    rows = []
    for i, (scale, seed) in enumerate([(0.1, 3), (0.7, 1), (0.95, 1), (0.7, 3), (0.95, 3)]):
        colour = (40 * i, 255 - 40 * i, 100)
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{i}.png")
        rows.append({**_row("m", scale, seed, 0.5, 30.0), "image": f"{i}.png", "colour": colour})
    path = image_grid(rows, tmp_path, "realistic", tmp_path / "grid.png", cell=32)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    want = next(r["colour"] for r in rows if (r["scale"], r["seed"]) == (0.7, 1))  # |0.7−0.8| < |0.95−0.8|
    assert tuple(sheet[18 + 48 + 16, 150 + 16]) == want  # the one cell: below the title and head, right of the labels
    assert image_grid(rows, tmp_path, "style", tmp_path / "none.png") is None


def test_the_report_labels_stand_ins_and_prints_no_interval_for_one_image(tmp_path):
    """A stand-in recognizer's ID is labelled as such (a real one is not); a group of one image has
    a mean and no ± interval; a metric not computed is a dash."""
    from lcmla.evaluation.report import _pm, labels

    assert labels({"recognizers": {"haar": False, "dlib": True}}) == {"id_haar": " — stand-in, not a recognizer"}
    assert labels({"clip_meaningful": True, "recognizers": {"dlib": True}}) == {}
    assert (_pm(0.5, float("nan")), _pm(0.5, 0.1), _pm(None, None), _pm(float("nan"), 0.1)) == ("0.500", "0.500 ± 0.100", "—", "—")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    text = write_report(tmp_path, [_row("m", 0.5, 0, 0.25, 30.0)], {"recognizers": {"net": False}}).read_text()
    assert "**ID net: a stand-in, not a face recognizer**" in text
    assert "| m | 0.5 | 1 | 0.250 | 0 | 30.000 | — |" in text
    # a metric that only some groups have (an --aesthetic run resumed over older rows) keeps its column
    scored = _row("n", 0.5, 0, 0.25, 30.0)
    scored["metrics"]["aesthetic"] = 6.0
    text = write_report(tmp_path, [_row("m", 0.5, 0, 0.25, 30.0), scored]).read_text()
    assert "| aesthetic |" in text and "| m | 0.5 | 1 | 0.250 | 0 | 30.000 | — | — |" in text and "| 6.000 |" in text


def test_face_style_and_clip_t_by_hand(engine, face_path):
    """Face-style = 100·cos(CLIP image embedding of the face box's pixels, CLIP text embedding of
    the style part before ';'); CLIP-T the same for the whole image and the whole prompt. Computed
    here from the tiny CLIP's towers with preprocessing done by hand."""
    import torch

    from lcmla.evaluation.metrics import crop_box
    from lcmla.faces import FaceAnalyzer
    from lcmla.loading import CLIP_MEAN, CLIP_STD

    clip = _clip(engine)
    haar = AnalyzerScorer(FaceAnalyzer.haar())
    photo = Image.open(face_path).convert("RGB")
    prompt = "a watercolor painting; a close-up photo of a face in a dark forest at night, rain"
    cell = Cell("baseline", "me", "style", prompt, 0, 0.8)
    metrics = Evaluation({}, [haar], clip).score(cell, photo, {("haar", "me"): reference_embedding(haar, [photo])})
    box, _ = haar.face(photo)
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    face = photo.crop((x1, y1, x2, y2))
    assert face.size == crop_box(photo, box).size and face.width == face.height  # Haar boxes are square

    def image_embedding(img):
        w, h = img.size
        short = min(w, h)
        img = img.crop(((w - short) // 2, (h - short) // 2, (w - short) // 2 + short, (h - short) // 2 + short))
        x = np.asarray(img.resize((224, 224), Image.BICUBIC), np.float32) / 255.0
        x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
        pixels = torch.from_numpy(x.transpose(2, 0, 1)[None].copy())
        with torch.no_grad():
            e = clip.model.visual_projection(clip.model.vision_model(pixel_values=pixels).pooler_output)[0]
        return (e / e.norm()).numpy()

    def text_embedding(text):
        ids = clip.tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            e = clip.model.text_projection(clip.model.text_model(input_ids=ids).pooler_output)[0]
        return (e / e.norm()).numpy()

    style = 100 * float(image_embedding(face) @ text_embedding("a watercolor painting"))
    whole = 100 * float(image_embedding(photo) @ text_embedding(prompt))
    assert metrics["face_style"] == pytest.approx(style, abs=0.01)
    assert metrics["clip_t"] == pytest.approx(whole, abs=0.01)
    # what a wrong implementation would give is far from it: the whole prompt, or the whole image
    assert abs(style - 100 * float(image_embedding(face) @ text_embedding(prompt))) > 1
    assert abs(style - 100 * float(image_embedding(photo) @ text_embedding("a watercolor painting"))) > 0.1
    assert "face_style" not in Evaluation({}, [haar], clip).score(
        Cell("baseline", "me", "realistic", "a photo of a face", 0, 0.8), photo, {("haar", "me"): None})
    # the face box is the first recognizer's that found one: a later one that finds none, or finds
    # another box, changes nothing
    class Blind:
        name, is_recognizer = "blind", False

        def face(self, image):
            return None

    refs = {("haar", "me"): reference_embedding(haar, [photo]), ("blind", "me"): None, ("stub", "me"): None}
    for scorers in ([haar, Blind()], [Blind(), haar], [haar, AlwaysAFace()]):
        again = Evaluation({}, scorers, clip).score(cell, photo, refs)
        assert again["face_style"] == pytest.approx(style, abs=0.01), [s.name for s in scorers]


def _aesthetic_state(input_size: int, seed: int = 0) -> dict:
    """A random state dict in the layout of LAION's sac+logos+ava1-l14-linearMSE.pth."""
    import torch

    from lcmla.evaluation.metrics import AESTHETIC_LINEAR, AESTHETIC_WIDTHS

    g = torch.Generator().manual_seed(seed)
    state, fan_in = {}, input_size
    for index, width in zip(AESTHETIC_LINEAR, AESTHETIC_WIDTHS):
        state[f"layers.{index}.weight"] = torch.randn(width, fan_in, generator=g) / fan_in ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(width, generator=g) * 0.1
        fan_in = width
    return state


def test_aesthetic_scorer_by_hand(engine, face_path, tmp_path):
    """The MLP on the unit CLIP image embedding, as affine maps by hand (the released predictor has
    no activations), from a random state dict in the released file's layout."""
    import torch

    from lcmla.errors import LcmlaError
    from lcmla.evaluation.metrics import AestheticScorer

    clip = _clip(engine)
    dim = clip.model.config.projection_dim
    state = _aesthetic_state(dim)
    torch.save(state, tmp_path / "aesthetic.pth")
    scorer = AestheticScorer(tmp_path / "aesthetic.pth", clip)
    images = [Image.open(face_path).convert("RGB"), Image.new("RGB", (300, 200), (30, 160, 90))]
    got = scorer.score(images)
    with torch.no_grad():
        emb = clip._image(images).float().numpy().astype(np.float64)
    x = emb
    for index in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{index}.weight"].double().numpy().T + state[f"layers.{index}.bias"].double().numpy()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert got == pytest.approx(x[:, 0].tolist(), rel=1e-4, abs=1e-5) and got[0] != pytest.approx(got[1])
    torch.save(_aesthetic_state(768), tmp_path / "l14.pth")
    with pytest.raises(LcmlaError, match="reads 768-d CLIP embeddings.*ViT-L/14"):
        AestheticScorer(tmp_path / "l14.pth", clip)
    torch.save({"fc.weight": torch.zeros(1, dim)}, tmp_path / "other.pth")
    with pytest.raises(LcmlaError, match="not LAION's aesthetic predictor"):
        AestheticScorer(tmp_path / "other.pth", clip)
    del state["layers.7.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(LcmlaError, match="not LAION's aesthetic predictor"):
        AestheticScorer(tmp_path / "partial.pth", clip)


def test_imagereward_is_skipped_with_the_reason(tmp_path, monkeypatch):
    from lcmla.evaluation.metrics import IMAGEREWARD_FETCH, ImageRewardScorer, Unavailable

    with pytest.raises(Unavailable, match=r"no ImageReward weights: .*nowhere does not exist.*" + re.escape(IMAGEREWARD_FETCH)):
        ImageRewardScorer.load(tmp_path / "nowhere")
    with pytest.raises(Unavailable, match="ImageReward.pt, .*med_config.json not found"):
        ImageRewardScorer.load(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(Unavailable, match=r"notes.txt is a file, not ImageReward.pt or a folder holding it"):
        ImageRewardScorer.load(tmp_path / "notes.txt")
    (tmp_path / "ImageReward.pt").write_bytes(b"not really")
    with pytest.raises(Unavailable, match="med_config.json not found"):
        ImageRewardScorer.load(tmp_path)
    (tmp_path / "med_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # as where the package is not installed
    with pytest.raises(Unavailable, match="image-reward package does not import here"):
        ImageRewardScorer.load(tmp_path / "ImageReward.pt")


def test_imagereward_goes_through_the_package_api(tmp_path, monkeypatch, engine, face_path):
    """The wiring only (the real model cannot run here: the package does not import with this
    transformers): a stand-in module with the package's documented API, ``ImageReward.load(path,
    device=, med_config=)`` and ``model.score(prompt, pil_image) -> float``, gets the local files and
    each (prompt, image); its numbers reach the row and the report."""
    import types

    from lcmla.evaluation import metrics
    from lcmla.evaluation.metrics import ImageRewardScorer

    calls = {}

    class Model:
        def score(self, prompt, image):
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            return len(prompt) / 10 + image.getpixel((0, 0))[0] / 255

    def load(name, device="cpu", download_root=None, med_config=None):
        calls.update(name=name, device=device, med_config=med_config)
        return Model()

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    monkeypatch.setattr(metrics, "_bert_tokenizer_cached", lambda: True)
    (tmp_path / "ImageReward.pt").write_bytes(b"weights")
    (tmp_path / "med_config.json").write_text("{}")
    scorer = ImageRewardScorer.load(tmp_path, device="cpu")
    assert calls == {"name": str(tmp_path / "ImageReward.pt"), "device": "cpu",
                     "med_config": str(tmp_path / "med_config.json")}
    red = Image.new("RGB", (64, 64), (255, 0, 0))
    assert scorer.score([red, red.convert("L")], ["abcd", "ab"]) == pytest.approx([1.4, 0.2 + 76 / 255])
    metrics_row = Evaluation({}, [], None, imagereward=scorer).score(Cell("baseline", "a", "s", "abcd", 0, 0.5), red, {})
    assert metrics_row["imagereward"] == pytest.approx(1.4)
    rows = [{**_row("baseline", 0.5, s, 0.5, 30.0), "metrics": {"id": {"net": 0.5}, "clip_t": 30.0, "imagereward": v}}
            for s, v in enumerate([1.0, 2.0])]
    red.save(tmp_path / "x.png")  # the rows' image, for the grid
    text = write_report(tmp_path, rows, {}).read_text()
    assert "| ImageReward |" in text and "1.500 ± " in text


def test_face_fail_count_in_the_summary():
    rows = [{"method": "m", "scale": 0.5, "prompt_set": "s", "prompt": "p", "seed": s, "identity": "a",
             "seconds": 1.0, "metrics": {"id": {"x": v}, "clip_t": 20.0}} for s, v in enumerate([0.5, None, 0.7])]
    rec = next(r for r in summarize(rows) if r["prompt_set"] == "all")
    assert rec["ffc_x"] == 1 and rec["id_x"] == pytest.approx(0.6) and rec["n"] == 3


def test_summary_confidence_intervals_by_hand():
    """Half-width = t(0.975, n−1)·sd/√n: ids 0.2, 0.4, 0.6 (sd 0.2, t₂ = 4.3027) give 0.4969; per
    prompt set and over all; clip_t the same way."""
    rows = [{"method": "m", "scale": 0.5, "prompt_set": ps, "prompt": "p", "seed": i, "identity": "a", "seconds": 1.0,
             "metrics": {"id": {"x": v}, "clip_t": 10.0 * v}}
            for i, (ps, v) in enumerate([("s", 0.2), ("s", 0.4), ("s", 0.6), ("t", 0.9)])]
    recs = {r["prompt_set"]: r for r in summarize(rows)}
    assert recs["s"]["id_x"] == pytest.approx(0.4) and recs["s"]["id_x_ci"] == pytest.approx(4.302653 * 0.2 / 3 ** 0.5)
    assert recs["s"]["clip_t_ci"] == pytest.approx(10 * 4.302653 * 0.2 / 3 ** 0.5)
    sd_all = float(np.std([0.2, 0.4, 0.6, 0.9], ddof=1))
    assert recs["all"]["id_x_ci"] == pytest.approx(3.182446 * sd_all / 2) and recs["t"]["n"] == 1
    assert np.isnan(recs["t"]["id_x_ci"])  # one image: no interval


def test_a_torn_rank_file_line_is_cut_and_a_merge_keeps_the_rows_of_other_grids(tmp_path):
    from types import SimpleNamespace

    from lcmla.evaluation.run import RESULTS, all_rows, drop_torn_tail, merge_results

    rank = tmp_path / "results.rank-0.jsonl"
    rank.write_text(json.dumps({"key": "b", "v": 2}) + "\n" + '{"key": "c", "v"')
    drop_torn_tail(rank)
    assert rank.read_text() == json.dumps({"key": "b", "v": 2}) + "\n"
    (tmp_path / "results.rank-1.jsonl").write_text(json.dumps({"key": "a", "v": 1}) + "\n")
    (tmp_path / RESULTS).write_text(json.dumps({"key": "old", "v": 0}) + "\n" + json.dumps({"key": "b", "v": -2}) + "\n")
    rows = merge_results(tmp_path, [SimpleNamespace(key="a"), SimpleNamespace(key="b")])
    assert [r["key"] for r in rows] == ["a", "b"] and rows[1]["v"] == -2  # results.jsonl's row comes first
    lines = [json.loads(line)["key"] for line in (tmp_path / RESULTS).read_text().splitlines()]
    assert lines == ["a", "b", "old"] and not list(tmp_path.glob("results.rank-*"))
    assert set(all_rows(tmp_path)) == {"a", "b", "old"}


def test_a_reference_without_a_face_is_not_a_face_failure(tmp_path):
    """FFC counts generated images without a face; an image with a face whose identity's reference
    photos have none for that recognizer is unscored, reported apart, not blamed on the method."""
    def row(seed, ident, value, found):
        return {"method": "m", "scale": 0.5, "prompt_set": "s", "prompt": "p", "seed": seed, "identity": ident,
                "seconds": 1.0, "image": "x.png",
                "metrics": {"id": {"x": value}, "face_found": {"x": found}, "clip_t": 20.0}}

    rows = [row(0, "a", 0.5, True), row(1, "a", None, False), row(0, "b", None, True), row(1, "b", None, True)]
    rec = next(r for r in summarize(rows) if r["prompt_set"] == "all")
    assert (rec["ffc_x"], rec["noref_x"], rec["n"]) == (1, 2, 4) and rec["id_x"] == pytest.approx(0.5)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    text = write_report(tmp_path, rows, {}).read_text()
    assert "ID x: 2 images with a face are not scored" in text


def test_reference_photos_are_read_upright(tmp_path, face_path):
    """A phone photo stored sideways with an EXIF orientation is scored upright, as the engine reads it."""
    from lcmla.evaluation.run import load_reference_photos

    upright = Image.open(face_path).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    upright.rotate(90, expand=True).save(tmp_path / "side.jpg", exif=exif, quality=95)
    photo = load_reference_photos([("a", (str(tmp_path / "side.jpg"),))])["a"][0]
    assert photo.size == upright.size
    diff = np.abs(np.asarray(photo, np.float32) - np.asarray(upright, np.float32)).mean()
    assert diff < 8, diff


def test_cli_evaluate(tmp_path, face_path, capsys):
    from lcmla.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--faces", str(face_path), "--methods", "dcg", "--seeds", "0", "--scales", "0.8",
                 "--max-prompts", "1", "--output-dir", str(out), "--quiet", "--set", "guidance.steps=2",
                 "--imagereward", str(tmp_path / "no-imagereward")]) == 0
    assert "Loading pipeline components" not in capsys.readouterr().err  # --quiet: the loaders' bars too
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 1 and rows[0]["settings"]["guidance"]["steps"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["random_weights"] and config["clip_meaningful"] is False and config["recognizers"]["haar"] is False
    report = (out / "report.md").read_text()
    assert "random CLIP" in report and "stand-in, not a face recognizer" in report
    assert "ImageReward: skipped — no ImageReward weights" in report and "Aesthetic score: not computed" in report
    assert "imagereward" not in rows[0]["metrics"]
    # DCG's schedule stretched to 2 steps is a = b = 1 throughout: the engine's note is kept per image
    # and the report says which methods' images it came with
    assert len(rows[0]["notes"]) == 1 and rows[0]["notes"][0].startswith("DCG: the a/b schedule stretched to 2")
    assert "## What the engine noted" in report and "- dcg (1 image): DCG: the a/b schedule stretched to 2" in report
    assert main(["evaluate", "--faces", str(face_path), "--methods", "nope", "--output-dir", str(out)]) == 2
    for empty in ("", ","):  # ran to rc 0 with an empty grid
        assert main(["evaluate", "--faces", str(face_path), "--methods", empty, "--output-dir", str(tmp_path / "none")]) == 2
        assert "names no method" in capsys.readouterr().err and not (tmp_path / "none").exists()
    # trained: methods without trained weights: refused before anything loads or is written
    assert main(["evaluate", "--faces", str(face_path), "--methods", "trained:baseline",
                 "--output-dir", str(tmp_path / "never")]) == 2 and not (tmp_path / "never").exists()


@pytest.fixture
def cli_engine(engine, monkeypatch):
    """``python -m lcmla evaluate`` in-process on the session's tiny engine (no reload per run),
    counting its generations."""
    import lcmla

    calls = []
    generate = engine.generate

    def counting(*a, **k):
        calls.append(a[0])
        return generate(*a, **k)

    monkeypatch.setattr(lcmla.Engine, "load", staticmethod(lambda preset, **kw: engine))
    monkeypatch.setattr(engine, "generate", counting)
    return calls


def _evaluate(out, face, *extra):
    from lcmla.cli import main

    return main(["evaluate", "--faces", str(face), "--methods", "baseline", "--seeds", "0", "--scales", "0.8",
                 "--max-prompts", "1", "--output-dir", str(out), "--quiet", "--clip-model", "none",
                 "--id-networks", "haar", "--set", "output.width=64", "--set", "output.height=64", *extra])


def test_other_pixels_are_never_served_from_the_cache(cli_engine, face_path, tmp_path, capsys):
    """A rerun with other --set overrides (or preset, dtype, trained weights) in the same folder is
    refused with what differs and how to proceed; --overwrite starts afresh; a wider grid with the
    same pixels reuses the cells it has."""
    out = tmp_path / "eval"
    assert _evaluate(out, face_path, "--set", "guidance.steps=1") == 0 and len(cli_engine) == 1
    first = read_rows(out / "results.jsonl")
    capsys.readouterr()
    assert _evaluate(out, face_path, "--set", "guidance.steps=2") == 2
    err = capsys.readouterr().err
    assert "holds results made with other settings" in err and '"guidance.steps": 1' in err and "--overwrite" in err
    assert "new --output-dir" in err and len(cli_engine) == 1 and read_rows(out / "results.jsonl") == first
    (out / "images" / "my-own.png").write_bytes(b"mine")  # what the user put there stays (it was deleted)
    (out / "images" / "notes.txt").write_text("mine")
    assert _evaluate(out, face_path, "--set", "guidance.steps=2", "--overwrite") == 0 and len(cli_engine) == 2
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 1 and rows[0]["settings"]["guidance"]["steps"] == 2 and rows[0]["key"] != first[0]["key"]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted([f"{rows[0]['key']}.png", "my-own.png", "notes.txt"])
    # a typo with --overwrite is refused before the folder is touched: nothing is deleted
    for bad, named in ((("--set", "guidance.steps=-1"), "--set: guidance.steps"), (("--scales", "nan"), "--scales nan")):
        assert _evaluate(out, face_path, "--set", "guidance.steps=2", "--overwrite", *bad) == 2
        assert named in capsys.readouterr().err and read_rows(out / "results.jsonl") == rows
    # the same pixels, one more seed: the cell it has is reused, one image is generated
    assert _evaluate(out, face_path, "--set", "guidance.steps=2", "--seeds", "0,1") == 0 and len(cli_engine) == 3
    again = read_rows(out / "results.jsonl")
    assert [r["seed"] for r in again] == [0, 1] and again[0] == rows[0]
    # trained weights count by their contents: a missing file is refused before anything loads
    assert _evaluate(out, face_path, "--set", "guidance.steps=2", "--trained-adapter", str(tmp_path / "none.bin")) == 2
    assert "trained weights" in capsys.readouterr().err


def test_cell_keys_hash_what_changes_pixels(face_path, tmp_path):
    import shutil

    a = tmp_path / "a"
    a.mkdir()
    shutil.copy(face_path, a / "me.png")  # the same bytes under another path: the same cells
    other = tmp_path / "b"
    other.mkdir()
    Image.open(face_path).convert("RGB").rotate(5).save(other / "me.png")  # the same name, another photo

    def keys(photo, **kw):
        config = EvalConfig(methods=["baseline"], identities=[("me", (str(photo),))], prompts=[("realistic", "p")],
                            seeds=[0], scales=[0.8], **kw)
        return [c.key for c in config.cells()]

    base = keys(face_path, pixels={"preset": "tiny"})
    assert keys(a / "me.png", pixels={"preset": "tiny"}) == base
    assert keys(other / "me.png", pixels={"preset": "tiny"}) != base
    assert keys(face_path, pixels={"preset": "sdxl-turbo"}) != base
    assert keys(face_path, pixels={"preset": "tiny", "trained": {"adapter": "ab12"}}) != base
    assert keys(face_path, pixels={"preset": "tiny"}, overrides={"guidance.steps": 2}) != base


def _small_grid(face_path):
    return EvalConfig(methods=["baseline", "am1"], identities=[("astronaut", (str(face_path),))],
                      prompts=[("realistic", "a photo of a face"), ("style", "a pencil sketch; a portrait of a face")],
                      seeds=[0], scales=[0.5, 0.8], overrides={"output.width": 64, "output.height": 64})


def test_two_processes_without_a_process_group(engine, face_path, tmp_path):
    """RANK/WORLD_SIZE only (separate jobs): cell i goes to process i mod 2, each writes its rank
    file; the process that completes the grid merges results.jsonl (grid order, no duplicates) and
    removes the rank files; a one-process run on the complete grid generates nothing, only merges."""
    config = _small_grid(face_path)
    cells = config.cells()
    calls = []
    generate = engine.generate
    engine.generate = lambda *a, **k: calls.append(a[0]) or generate(*a, **k)
    try:
        ev = Evaluation({"base": engine}, [AlwaysAFace()], None, None, tmp_path)
        assert ev.run(config, procs=Processes(0, 2)) is None  # its half done, the grid not
        half = read_rows(tmp_path / "results.rank-0.jsonl")
        assert [r["key"] for r in half] == [c.key for c in cells[0::2]] and not (tmp_path / "results.jsonl").exists()
        rows = ev.run(config, procs=Processes(1, 2))
        assert len(calls) == len(cells) == 8
        assert [r["key"] for r in rows] == [c.key for c in cells]
        assert [r["process"] for r in rows] == [[i % 2, 2] for i in range(8)]
        assert read_rows(tmp_path / "results.jsonl") == rows and not list(tmp_path.glob("results.rank-*"))
        calls.clear()
        assert ev.run(config) == rows and calls == []
    finally:
        engine.generate = generate
    with pytest.raises(Exception, match="RANK must be in"):
        Processes(2, 2)


def test_two_processes_under_accelerate(engine, tiny_cache, face_path, tmp_path):
    """``python -m lcmla evaluate`` in two CPU processes with a gloo process group (the environment
    ``accelerate launch --num_processes 2 --cpu`` sets up): together the complete grid, no
    duplicate cell, merged by the main process after both finished, one report."""
    import os
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "lcmla", "evaluate", "--faces", str(face_path), "--methods", "baseline,am1",
           "--seeds", "0", "--scales", "0.5,0.8", "--prompts", "fastface", "--max-prompts", "1", "--quiet",
           "--id-networks", "haar", "--set", "output.width=64", "--set", "output.height=64", "--set",
           "guidance.steps=1", "--output-dir", str(out)]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "true",
               "LCMLA_CACHE": str(tiny_cache), "HF_HUB_OFFLINE": "1"}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      cwd=Path(__file__).resolve().parents[1]))
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 8 and len({r["key"] for r in rows}) == 8
    assert {(r["method"], r["scale"], r["prompt_set"]) for r in rows} == {
        (m, s, ps) for m in ("baseline", "am1") for s in (0.5, 0.8) for ps in ("realistic", "style")}
    assert sorted(r["process"][0] for r in rows) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert not list(out.glob("results.rank-*")) and (out / "report.md").is_file()
    assert "report.md" in outs[0][0] and outs[1][0].strip() == ""  # only the main process reports
    assert json.loads((out / "config.json").read_text())["processes"] == 2


def test_request_notes_are_grouped_by_note():
    from lcmla.evaluation.report import request_notes_by_method

    rows = [{"method": "dcg", "notes": ["a", "b"]}, {"method": "am2+dcg", "notes": ["a"]},
            {"method": "dcg", "notes": ["a"]}, {"method": "baseline", "notes": None}, {"method": "am1", "notes": []},
            {"method": "baseline"}]  # None: scored from a PNG written before a kill; no key: an older results.jsonl
    assert request_notes_by_method(rows) == {"a": (["dcg", "am2+dcg"], 3), "b": (["dcg"], 1)}


def test_set_cannot_override_the_grids_own_axes():
    """--set output.seed=3 ran every cell at seed 3 while its row said seed 0 (and made the seeds'
    cells identical, so their confidence intervals were wrong)."""
    from lcmla.errors import LcmlaError
    from lcmla.evaluation.cli import check_grid_settings

    for key, flag in (("output.seed", "--seeds"), ("identity.ip_adapter_scale", "--scales"), ("prompt", "--prompts"),
                      ("output.num_images", "one image per cell")):
        with pytest.raises(LcmlaError, match=f"--set {key}: the grid sets it per cell \\({flag}\\)"):
            check_grid_settings("tiny", {key: 3}, [0.5])
    check_grid_settings("tiny", {"guidance.steps": 2}, [0.5])


def test_a_report_with_nothing_scored_is_blank_labelled_and_says_why(tmp_path):
    """No face in any image: summary.csv has blank cells (it wrote the literal "nan") and the
    face-style column the report's table shows; the Pareto plot says why it has no points; the
    report lists every column with its unit; the grid states identity, seed and λ."""
    import csv

    from lcmla.evaluation.report import COLUMNS

    rows = [_row("baseline", 0.8, s, None, 25.0 + s) for s in range(2)]
    for r in rows:
        Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / r["image"])
    report = write_report(tmp_path, rows).read_text()
    with (tmp_path / "summary.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert table and all(rec["id_net"] == "" and rec["face_style"] == "" for rec in table)
    assert "nan" not in (tmp_path / "summary.csv").read_text()
    assert json.loads((tmp_path / "pareto-net.json").read_text()) == {}
    plot = np.asarray(Image.open(tmp_path / "pareto-net.png").convert("L"))
    h, w = plot.shape
    assert (plot[h // 2 - 15: h // 2 + 15, w // 2 - 40: w // 2 + 40] < 150).any()  # the "no points" text
    for column in COLUMNS:
        assert f"- `{column}`:" in report
    assert "cosine (−1…1" in report and "100 × cosine of the CLIP image and prompt" in report
    grid = np.asarray(Image.open(tmp_path / "grid-realistic.png").convert("L"))
    assert (grid[:16] < 128).any()  # the title line: identity · seed · λ
