"""Consistent-identity data: deterministic identities, filtering, shards, kill -9 resume, two
processes, the reader, the authors' importer and inspect (fake renderer, offline Haar analyzer)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.datagen.identities import draw_identity, image_seed, plan_images, select_templates, templates
from training.datagen.shards import read_manifest, sha256_file

sys.path.insert(0, str(Path(__file__).parent))
import datagen_fake  # noqa: E402

FAKE = Path(__file__).parent / "datagen_fake.py"


def test_identities_and_seeds_are_deterministic():
    a, b = draw_identity(0, 3), draw_identity(0, 3)
    assert a == b and a.description.startswith(("a ", "an "))
    assert draw_identity(0, 4).description != a.description or draw_identity(1, 3).description != a.description
    assert len({draw_identity(5, i).description for i in range(20)}) > 15
    assert draw_identity(0, 1, names=["Ada Lovelace", "Alan Turing"]).description == "Alan Turing"
    s = image_seed(0, 3, "oil-painting", 1)
    assert s == image_seed(0, 3, "oil-painting", 1) and 0 <= s < 2**63
    assert len({image_seed(0, i, t, k) for i in range(3) for t in ("photo", "comic") for k in range(3)}) == 18
    plain, styl = select_templates(["comic", "watercolor"])
    plan = plan_images(a, plain, styl, 7, seed=0)
    assert sum(not t.stylized for t, _, _ in plan) == 4 and len(plan) == 7
    assert {t.slug for t, _, _ in plan if t.stylized} == {"comic", "watercolor"}
    with pytest.raises(ValueError, match="unknown style"):
        select_templates(["nope"])


def test_a_drawn_description_reads_as_the_banks_say_and_goes_together():
    """'<a|an> <age> <ethnicity> <gender> with <skin>, <hair> and <eyes>[, <feature>]', one value per
    bank; the "_" entries are notes and rules, not banks; a value with a rule (a beard: men only,
    grey hair: not the young) is drawn only with the attributes it names."""
    from training.datagen.identities import _banks, _requires, fits

    banks, rules = _banks(), _requires()
    two = {"grey stubble": {"gender": ["man"], "age": ["old"]}}  # every bank a rule names must agree
    assert fits("grey stubble", {"gender": "man", "age": "old"}, two)
    assert not fits("grey stubble", {"gender": "man", "age": "young"}, two)
    assert not fits("grey stubble", {"gender": "man"}, two) and fits("dimples", {}, two)  # age not drawn yet
    assert list(banks) == ["age", "gender", "ethnicity", "skin", "hair", "eyes", "feature"]
    order = list(banks)
    for value, need in rules.items():  # each rule: a value of a later bank, conditioned on earlier banks' values
        (bank,) = [b for b, vs in banks.items() if value in vs]
        assert need and all(order.index(b) < order.index(bank) and set(vs) <= set(banks[b]) for b, vs in need.items())
    ids = [draw_identity(11, i) for i in range(300)]
    for ident in ids:
        a = ident.attributes
        body = f"{a['age']} {a['ethnicity']} {a['gender']} with {a['skin']}, {a['hair']} and {a['eyes']}"
        body += f", {a['feature']}" if a["feature"] else ""
        assert ident.description == ("an " if body[0] in "aeiou" else "a ") + body
        assert all(fits(v, a, rules) for v in a.values())
    assert not any(i.attributes["gender"] == "woman" and i.attributes["feature"] in ("a thick beard", "a moustache")
                   for i in ids)
    assert not any(i.attributes["age"] in ("young", "teenage") and "grey" in i.attributes["hair"] for i in ids)
    assert any(i.attributes["feature"] == "a thick beard" for i in ids)  # the rule narrows, it does not remove
    starts = {i.description.split()[0] for i in ids}
    assert starts == {"a", "an"} and any(i.description.startswith("an elderly ") for i in ids)
    assert any(i.attributes["feature"] == "" for i in ids) and any(i.attributes["feature"] for i in ids)
    assert draw_identity(0, 0).description == ("an elderly Native American woman with freckled skin, straight blond "
                                               "hair and brown eyes")  # a description stays what it was


def test_a_plan_without_styles_is_all_plain_photos():
    plain, _ = select_templates([])
    a = draw_identity(0, 3)
    n = 2 * len(plain) + 1  # past the templates: each comes round again with the next k
    plan = plan_images(a, plain, [], n, seed=0)
    assert len(plan) == n and not any(t.stylized for t, _, _ in plan)
    assert [k for _, k, _ in plan] == [0] * len(plain) + [1] * len(plain) + [2]
    assert len({seed for _, _, seed in plan}) == n  # each image its own seed
    _, styles = select_templates(["comic"])
    mixed = plan_images(a, plain, styles, 6, seed=0)  # 3 photos, then the one style three times
    assert [(t.slug, k) for t, k, _ in mixed[3:]] == [("comic", 0), ("comic", 1), ("comic", 2)]


def test_compressed_prompts():
    t = next(t for t in templates() if t.slug == "forest")
    assert t.prompt("an old Slavic woman") == "a photo of an old Slavic woman in a forest"
    assert t.compressed() == "a photo of a face in a forest"


def _run_inline(out, identities=4, per_shard=2):
    from training.datagen.generate import generate

    cfg, haar = datagen_fake.config(identities, per_shard)
    return generate(cfg, out, datagen_fake.fake_render(), haar.detect, log=lambda m: None)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    totals = _run_inline(out)
    return out, totals


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.glob("shard-*.tar"))}


def test_filtering_and_shards(reference_run):
    from training.datagen.reader import ShardSamples

    out, totals = reference_run
    manifest = read_manifest(out)
    assert sorted(manifest) == ["shard-000000.tar", "shard-000001.tar"]
    for name, entry in manifest.items():
        assert sha256_file(out / name) == entry["sha256"]
        assert set(entry["rejected"]) == {"render_error", "no_face", "low_similarity", "too_few_plain"}
    assert sum(e["rejected"]["no_face"] for e in manifest.values()) > 0  # the grey images
    samples = ShardSamples([out])
    assert len(samples) == sum(e["samples"] for e in manifest.values()) == totals["samples"]
    by_shard = {}
    for ref, rec in zip(samples.samples, samples.records):
        by_shard.setdefault(rec["identity"], set()).add(ref.shard.name)
        assert rec["compressed_prompt"].count("a face") == 1 and len(rec["landmarks"]) == 5
    assert all(len(v) == 1 for v in by_shard.values())  # whole identities per shard
    assert samples.embedding(0).shape == (512,) and samples.image(0, "crop.png").size == (224, 224)


def test_filter_reasons_by_construction(face_path):
    """no face → no_face; a stranger among the photos → low_similarity; < 2 plain photos → the
    identity is dropped (too_few_plain)."""
    from lcmla.faces import FaceAnalyzer
    from training.datagen.generate import Candidate, GenConfig, filter_identity
    from training.datagen.identities import Identity

    from PIL import Image, ImageOps

    haar = FaceAnalyzer.haar()
    plain, styl = select_templates(["comic"])
    me = Image.open(face_path).convert("RGB").resize((256, 256))
    stranger = datagen_fake.portraits()[1].resize((256, 256))
    grey = Image.new("RGB", (200, 200), (100, 100, 100))
    cfg = GenConfig(1, 4, tuple(plain), tuple(styl), tau_plain=0.9, tau_style=0.3)
    ident = Identity(0, "someone", {})
    cands = [Candidate(plain[0], 0, 1, "p", me), Candidate(plain[1], 0, 2, "p", me.rotate(2)),
             Candidate(plain[2], 0, 3, "p", stranger), Candidate(styl[0], 0, 4, "s", grey),
             Candidate(styl[0], 1, 5, "s", None)]
    kept, rej = filter_identity(ident, cands, cfg, haar.detect)
    assert rej == {"no_face": 1, "render_error": 1, "low_similarity": 1} and len(kept) == 2
    one_photo = [cands[0], Candidate(styl[0], 2, 6, "s", ImageOps.posterize(me, 4))]
    kept, rej = filter_identity(ident, one_photo, cfg, haar.detect)
    assert kept == [] and rej == {"too_few_plain": 2}


def _face(embedding, bbox=(10.0, 10.0, 60.0, 60.0)):
    from PIL import Image

    from lcmla.faces import DetectedFace

    return DetectedFace(bbox, np.zeros((5, 2), np.float32), 0.9, np.asarray(embedding, np.float32),
                        Image.new("RGB", (224, 224)))


def test_filter_judges_styles_by_tau_style_against_the_agreeing_photos_and_keeps_the_largest_face():
    """Embeddings set by hand: three agreeing photos and a stranger photo; the centroid is the mean of
    the three (the stranger left out), each stylized image is kept when cos with it ≥ τ_style (not
    τ_plain), the recorded similarity is that cosine, and the first (largest) face of an image is
    the one judged and recorded."""
    import dataclasses

    from training.datagen.generate import Candidate, GenConfig, filter_identity
    from training.datagen.identities import Identity

    rng = np.random.default_rng(1)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    me, stranger = unit(rng.normal(size=512)), unit(rng.normal(size=512))
    photos = [unit(me + 0.2 * unit(rng.normal(size=512))) for _ in range(3)]
    centroid = unit(sum(photos))
    r = rng.normal(size=512)
    other = unit(r - (r @ centroid) * centroid)  # ⟂ centroid
    style_in, style_out = unit(0.6 * centroid + 0.8 * other), unit(0.2 * centroid + 0.98 * other)  # cos 0.6, ≈ 0.2
    plain, styl = select_templates(["comic"])
    cfg = GenConfig(1, 6, tuple(plain), tuple(styl), tau_plain=0.7, tau_style=0.4)
    faces = {"p0": [_face(photos[0], (0, 0, 90, 90)), _face(stranger)], "p1": [_face(photos[1])],
             "p2": [_face(photos[2])], "ps": [_face(stranger)], "s_in": [_face(style_in, (5, 5, 80, 80))],
             "s_out": [_face(style_out)], "s_small": [_face(style_in), _face(stranger)]}
    cands = [Candidate(plain[i % len(plain)], i, i, "p", name) for i, name in enumerate(("p0", "p1", "p2", "ps"))]
    cands += [Candidate(styl[0], i, 10 + i, "s", name) for i, name in enumerate(("s_in", "s_out", "s_small"))]
    kept, rej = filter_identity(Identity(0, "someone", {}), cands, cfg, faces.__getitem__)
    records = {k.image: k.record for k in kept}
    assert set(records) == {"p0", "p1", "p2", "s_in", "s_small"} and rej == {"low_similarity": 2}
    assert records["s_in"]["similarity"] == pytest.approx(0.6, abs=1e-5) and records["s_in"]["stylized"]
    assert records["s_small"]["similarity"] == pytest.approx(0.6, abs=1e-5)  # the first face, not the stranger
    assert records["p0"]["box"] == [0.0, 0.0, 90.0, 90.0] and records["s_in"]["box"] == [5.0, 5.0, 80.0, 80.0]
    assert records["p0"]["similarity"] == pytest.approx(float(photos[0] @ unit(photos[1] + photos[2])), abs=1e-5)
    # τ_style is what judges a style: at 0.65 the 0.6 images go too, while the photos stay
    kept, rej = filter_identity(Identity(0, "someone", {}), cands, dataclasses.replace(cfg, tau_style=0.65),
                                faces.__getitem__)
    assert {k.image for k in kept} == {"p0", "p1", "p2"} and rej == {"low_similarity": 4}


def test_the_manifest_lists_the_identities_that_kept_samples(tmp_path):
    from PIL import Image

    from training.datagen.generate import GenConfig, write_shards
    from training.datagen.shards import Sample

    plain, styl = select_templates(["comic"])
    cfg = GenConfig(5, 2, tuple(plain), tuple(styl), identities_per_shard=5)

    def make_identity(i):
        if i in (1, 4):
            return [], {"too_few_plain": 2}
        record = {"key": f"id{i}", "identity": i, "stylized": i == 2}
        return [Sample(f"id{i}", Image.new("RGB", (8, 8)), record, np.ones(512, np.float32), Image.new("RGB", (8, 8)))], {}

    totals = write_shards(cfg, tmp_path, make_identity, log=lambda m: None)
    (entry,) = read_manifest(tmp_path).values()
    assert entry["identities"] == [0, 1, 2, 3, 4] and entry["kept_identities"] == [0, 2, 3]
    assert (entry["samples"], entry["plain"], entry["stylized"]) == (3, 2, 1) and entry["rejected"]["too_few_plain"] == 4
    assert totals["samples"] == 3 and totals["rejected"] == {"too_few_plain": 4}


def test_agreeing_photos_leave_each_out_and_drop_strangers_first():
    """A photo is judged by the others only: two or three unrelated faces never agree (with itself
    in the mean each would score 1/√2 or 1/√3), and one stranger among a few photos is dropped
    without dragging the matching ones below τ."""
    from training.datagen.generate import agreeing_photos

    rng = np.random.default_rng(0)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    strangers = [unit(v) for v in rng.normal(size=(3, 512))]
    assert agreeing_photos(strangers[:2], 0.5) == {} and agreeing_photos(strangers, 0.5) == {}
    me = unit(rng.normal(size=512))
    photos = [unit(me + 0.3 * unit(rng.normal(size=512))) for _ in range(3)] + [strangers[0]]
    # all four in one mean: the stranger pulls each true photo to ≈ 0.8 < 0.85
    assert min(float(p @ unit(sum(photos) - p)) for p in photos[:3]) < 0.85
    sims = agreeing_photos(photos, 0.85)
    assert sorted(sims) == [0, 1, 2] and min(sims.values()) >= 0.85
    assert sims[0] == pytest.approx(float(photos[0] @ unit(photos[1] + photos[2])))
    assert agreeing_photos(photos[:1], 0.0) == {}
    at_least = agreeing_photos(photos[:3], -1.0)
    assert agreeing_photos(photos[:3], min(at_least.values())) == at_least  # a cosine equal to τ agrees


def test_a_failed_render_or_an_unreadable_image_costs_one_image(face_path):
    """A render that raises leaves that candidate without an image (render_error); an image the
    analyzer refuses (ImageError: e.g. below its minimum size) has no face (no_face)."""
    from PIL import Image

    from lcmla.errors import ImageError
    from training.datagen.generate import GenConfig, filter_identity, render_candidates

    plain, styl = select_templates(["comic"])
    cfg = GenConfig(1, 4, tuple(plain), tuple(styl))
    ident = draw_identity(0, 0)
    planned = plan_images(ident, plain, styl, 4, 0)

    def render(prompt, seed):
        if seed == planned[1][2]:
            raise RuntimeError("CUDA error: out of memory")
        return Image.new("RGB", (8 + seed % 7, 8))

    cands = render_candidates(ident, cfg, render)
    assert [c.image is None for c in cands] == [False, True, False, False]
    assert [c.prompt for c in cands] == [t.prompt(ident.description) for t, _, _ in planned]
    assert [(c.template, c.k, c.seed) for c in cands] == planned

    def analyze(image):
        raise ImageError("the image is smaller than 32 px")

    kept, rej = filter_identity(ident, cands, cfg, analyze)
    assert kept == [] and rej == {"render_error": 1, "no_face": 3}


def _kill_when(out: Path, line_wanted, env) -> list[str]:
    """Run the fake generator, SIGKILL it as soon as it prints a line for which ``line_wanted`` is
    true (a point of its work, not a guessed time); returns what it printed."""
    proc = subprocess.Popen([sys.executable, str(FAKE), str(out), "--delay", "0.05", "--trace"],
                            stdout=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line.strip())
        if line_wanted(line):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    assert seen and line_wanted(seen[-1] + "\n"), f"the run ended before the kill point: {seen}"
    return seen


def test_kill_9_resume_gives_the_same_shards(reference_run, tmp_path):
    out_ref, _ = reference_run
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # killed in the middle of rendering the first shard (its 3rd of 12 images): nothing listed yet
    _kill_when(out, lambda line: line.strip() == "render 3", env)
    assert out.is_dir() and not list(out.glob("shard-*.tar")) and not read_manifest(out)
    # killed again just after the first shard landed and was listed
    _kill_when(out, lambda line: line.startswith("shard-000000.tar:"), env)
    assert set(read_manifest(out)) == {"shard-000000.tar"}
    assert sha256_file(out / "shard-000000.tar") == _snapshot(out_ref)["shard-000000.tar"]
    (out / "shard-000001.tar.tmp-424242").write_bytes(b"half a shard")  # a temporary left by a kill
    subprocess.run([sys.executable, str(FAKE), str(out)], check=True, capture_output=True, env=env)
    assert _snapshot(out) == _snapshot(out_ref)
    assert not list(out.glob("*.tmp-*"))
    assert set(read_manifest(out)) == set(read_manifest(out_ref))
    # a shard renamed but never listed (killed between the rename and the manifest line) is remade
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(l for l in lines if "shard-000001" not in l) + "\n")
    subprocess.run([sys.executable, str(FAKE), str(out)], check=True, capture_output=True, env=env)
    assert _snapshot(out) == _snapshot(out_ref) and set(read_manifest(out)) == set(read_manifest(out_ref))


def test_a_rerun_with_other_settings_is_refused(reference_run, tmp_path):
    """Resuming into a folder made with another seed or threshold kept its shards and reported
    success; now the run names what differs. The same settings resume (nothing is remade)."""
    import dataclasses
    import shutil

    from training.datagen.generate import fingerprint_differences, generate, run_fingerprint
    from training.datagen.identities import prompt_sources_digest

    out_ref, _ = reference_run
    out = tmp_path / "copy"
    shutil.copytree(out_ref, out)
    cfg, haar = datagen_fake.config(4, 2)
    totals = generate(cfg, out, datagen_fake.fake_render(), haar.detect, log=lambda m: None)
    assert totals["shards_reused"] == 2 and totals["shards_written"] == 0
    for change, named in (({"tau_plain": 0.9}, "tau_plain: 0.5 then, 0.9 now"), ({"seed": 3}, "seed: 7 then, 3 now"),
                          ({"tau_style": 0.4}, "tau_style: 0.3 then, 0.4 now")):
        with pytest.raises(ValueError, match="holds shards made with other settings") as exc:
            generate(dataclasses.replace(cfg, **change), out, datagen_fake.fake_render(), haar.detect, log=lambda m: None)
        assert named in str(exc.value) and "new --output-dir" in str(exc.value)
    # what the prompts are made from is part of the run: shards of a version whose banks or
    # templates differ (or that did not record them) are not resumed into
    run = run_fingerprint(cfg)
    assert run["prompt_sources"] == prompt_sources_digest(with_banks=True) != prompt_sources_digest(with_banks=False)
    older = {k: v for k, v in run.items() if k != "prompt_sources"}
    assert fingerprint_differences(older, run) == (f"prompt_sources: not recorded then (an older version), "
                                                   f"{run['prompt_sources']!r} now")
    assert fingerprint_differences({**run, "prompt_sources": "0123"}, run).startswith("prompt_sources: '0123' then")
    named = run_fingerprint(dataclasses.replace(cfg, names=("Ada Lovelace",) * 4))
    assert named["prompt_sources"] == prompt_sources_digest(with_banks=False)  # a names file: the banks play no part


def _listed(folder: Path) -> list[str]:
    """The shard of every manifest line, in order; every line must parse."""
    return [json.loads(line)["shard"] for line in (folder / "manifest.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("tear", ["mid-line", "no-newline"])
def test_a_torn_manifest_line_is_cut_before_the_next_append(reference_run, tmp_path, tear):
    """A run killed while appending leaves a torn last line: the resumed run must not append onto it
    (that would merge two entries into one unparsable line and lose a shard)."""
    import shutil

    out_ref, _ = reference_run
    out = tmp_path / "torn"
    shutil.copytree(out_ref, out)
    data = (out / "manifest.jsonl").read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 2
    last = data.rfind(b"\n", 0, len(data) - 1) + 1
    torn = data[: last + 40] if tear == "mid-line" else data[:-1]  # 40 bytes of it, or all but its newline
    (out / "manifest.jsonl").write_bytes(torn)
    assert set(read_manifest(out)) == {"shard-000000.tar"}  # the torn line lists nothing
    totals = _run_inline(out)
    assert totals["shards_reused"] == 1 and totals["shards_written"] == 1
    assert _listed(out) == ["shard-000000.tar", "shard-000001.tar"]  # every shard once, every line whole
    assert _snapshot(out) == _snapshot(out_ref)


def test_torn_tail_start():
    from training.datagen.shards import manifest_entries, torn_tail_start

    a, b = b'{"shard": "a"}\n', b'{"shard": "b"}\n'
    assert torn_tail_start(b"") == 0 and torn_tail_start(a + b) == len(a + b)
    assert torn_tail_start(a + b[:5]) == len(a)  # unterminated
    assert torn_tail_start(a + b[:-1]) == len(a)  # whole JSON but no newline: still a cut-short write
    assert torn_tail_start(a + b'{"sha' + b) == len(a)  # torn line merged with the next (the old bug)
    assert torn_tail_start(b'{"shard": \n') == 0
    assert torn_tail_start(b"garbage\n" + b[:5]) == len(b"garbage\n")  # only the unterminated tail is cut
    assert [e["shard"] for e in manifest_entries(a + b"garbage\n" + b + b'{"shard": "c"}')] == ["a", "b"]
    # JSON that is not a shard's entry (another object, a list, bytes that are not UTF-8) is skipped too
    other = b'{"note": "x"}\n[1, 2]\n\xff\xfe\n'
    assert [e["shard"] for e in manifest_entries(a + other + b)] == ["a", "b"]
    assert torn_tail_start(a + b'{"note": "x"}\n') == len(a)  # a last line naming no shard is cut as well


def test_counts_text_names_the_nonzero_counts_in_order():
    from collections import Counter

    from training.datagen.reader import counts_text

    assert counts_text(Counter(no_face=1, corrupt=2, incomplete=0)) == "corrupt 2, no_face 1"
    assert counts_text({}) == counts_text({"corrupt": 0}) == "none"


def test_manifest_temporaries_and_members_bookkeeping(tmp_path):
    """The latest manifest line of a shard wins; only this process's shards' temporaries are
    removed; a tar's members are read by base name, the extension after the first dot, and only
    its files count."""
    import io
    import tarfile

    from training.datagen.shards import append_manifest, iter_members, remove_stale_temporaries

    append_manifest(tmp_path, {"shard": "shard-000000.tar", "sha256": "old"})
    append_manifest(tmp_path, {"shard": "shard-000001.tar", "sha256": "other"})
    append_manifest(tmp_path, {"shard": "shard-000000.tar", "sha256": "new"})  # remade: listed again
    assert {k: v["sha256"] for k, v in read_manifest(tmp_path).items()} == {"shard-000000.tar": "new",
                                                                            "shard-000001.tar": "other"}
    for name in ("shard-000001.tar.tmp-11", "shard-000001.tar.tmp-12", "shard-000002.tar.tmp-13"):
        (tmp_path / name).write_bytes(b"half")
    assert remove_stale_temporaries(tmp_path, {"shard-000000.tar", "shard-000001.tar"}) == 2
    assert sorted(p.name for p in tmp_path.glob("*.tmp-*")) == ["shard-000002.tar.tmp-13"]  # another process's
    tar_path = tmp_path / "members.tar"
    with tarfile.open(tar_path, "w") as tar:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, data in (("sub/id000001-photo-00.emb.npy", b"12345"), ("id000001-photo-00.png", b"ab")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = list(iter_members(tar_path))
    assert [(k, e, n) for k, e, _off, n in members] == [("id000001-photo-00", "emb.npy", 5), ("id000001-photo-00", "png", 2)]
    with tar_path.open("rb") as f:
        f.seek(members[0][2])
        assert f.read(5) == b"12345"


def test_two_processes_write_the_same_shards(reference_run, tmp_path):
    out_ref, _ = reference_run
    out = tmp_path / "two"
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "ACCELERATE_USE_CPU": "true"}
        procs.append(subprocess.Popen([sys.executable, str(FAKE), str(out)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    # shard s goes to process s mod 2, and to no other
    assert "shard-000000" in outs[0][0] and "shard-000001" in outs[1][0]
    assert "shard-000001" not in outs[0][0] and "shard-000000" not in outs[1][0]
    assert _snapshot(out) == _snapshot(out_ref)


def test_reader_pairs_and_corrupt_members(reference_run, tmp_path):
    import shutil

    from training.datagen.reader import PairDataset

    out_ref, _ = reference_run
    pairs = PairDataset([out_ref])
    assert len(pairs) > 0
    for j in range(len(pairs)):
        p = pairs[j]
        ref_key, tgt_key = p.key.split(">")
        assert ref_key != tgt_key and ref_key.split("-")[0] == tgt_key.split("-")[0]  # the same identity
        assert p.prompt.count("a face") == 1 and p.reference_embedding.shape == (512,)
        assert "-photo-" in ref_key or "-portrait-" in ref_key or "-headshot-" in ref_key  # a plain reference
    # the reference is picked by a hash of the target's key, so an identity's photos take turns
    # as the reference of its stylized images
    by_identity = {}
    for ref, tgt in pairs.pairs:
        if pairs.samples.records[tgt]["stylized"]:
            by_identity.setdefault(pairs.samples.records[tgt]["identity"], set()).add(ref)
    assert any(len(refs) > 1 for refs in by_identity.values()), by_identity
    # corrupt one image member in a copy: reading skips to the next pair and counts it
    bad = tmp_path / "bad"
    shutil.copytree(out_ref, bad)
    from training.datagen.shards import iter_members

    shard = bad / "shard-000000.tar"
    key, ext, off, size = next(m for m in iter_members(shard) if m[1] == "png")
    with shard.open("r+b") as f:
        f.seek(off)
        f.write(b"\0" * min(size, 64))
    corrupt = PairDataset([bad])
    for j in range(len(corrupt)):
        corrupt[j]
    assert corrupt.skipped["corrupt"] >= 1
    # two folders of the same run hold the same identity numbers: a pair never crosses folders
    both = PairDataset([out_ref, bad])
    assert len(both) == len(pairs) + len(corrupt.pairs)
    assert all(both.samples.samples[i].shard.parent == both.samples.samples[j].shard.parent for i, j in both.pairs)


def test_a_shard_whose_bytes_changed_is_not_complete_and_is_made_again(reference_run, tmp_path):
    import shutil

    from training.datagen.shards import shard_is_complete

    out_ref, _ = reference_run
    out = tmp_path / "copy"
    shutil.copytree(out_ref, out)
    manifest = read_manifest(out)
    assert all(shard_is_complete(out, name, manifest) for name in manifest)
    shard = out / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert not shard_is_complete(out, "shard-000001.tar", manifest) and shard_is_complete(out, "shard-000000.tar", manifest)
    cfg, haar = datagen_fake.config(4, 2)
    from training.datagen.generate import generate

    totals = generate(cfg, out, datagen_fake.fake_render(), haar.detect, log=lambda m: None)
    assert (totals["shards_reused"], totals["shards_written"]) == (1, 1)
    assert sha256_file(shard) == sha256_file(out_ref / "shard-000001.tar")


def test_importer_reads_the_authors_format(tmp_path, face_path):
    from lcmla.faces import FaceAnalyzer
    from training.datagen.importer import import_authors, prompt_of
    from training.datagen.reader import ShardSamples

    assert prompt_of(Path("A_pencil_drawing_of_conceptname_123456.jpg")) == ("A pencil drawing of {subject}", 123456)
    src = tmp_path / "theirs"
    render = datagen_fake.fake_render()
    meta = {}
    for name in ("Ada Lovelace", "Grace Hopper"):
        for kind, prompt in (("vanilla", "A photo of {}"), ("vanilla", "A photo of {}"), ("vanilla", "A photo of {}"),
                             ("stylized", "A pencil drawing of {}")):
            seed = 1000 + len(meta)
            folder = src / name / kind
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{prompt.format('conceptname').replace(' ', '_')}_{seed}.jpg"
            render(prompt.format(name), seed).save(path, quality=95)
            meta[str(path.relative_to(src))] = name
    (src / "metadata.json").write_text(json.dumps(meta))
    haar = FaceAnalyzer.haar()
    totals = import_authors(src, tmp_path / "out", haar.detect, {"identities_per_shard": 8, "backend": "haar",
                                                                  "is_recognizer": False}, log=lambda m: None)
    samples = ShardSamples([tmp_path / "out"])
    assert totals["samples"] == len(samples) > 0
    descr = {r["description"] for r in samples.records}
    assert descr <= {"Ada Lovelace", "Grace Hopper"}
    assert {r["compressed_prompt"] for r in samples.records} <= {"A photo of a face", "A pencil drawing of a face"}
    assert all(r["stylized"] == ("drawing" in r["compressed_prompt"]) for r in samples.records)
    from training.datagen.importer import candidates_of

    paths = sorted((src / "Ada Lovelace").glob("*/*.jpg"))
    assert [c.template.stylized for c in candidates_of("Ada Lovelace", paths)] == [p.parent.name == "stylized" for p in paths]
    # the command line gives the same shards (its filter flags at these thresholds)
    from training.datagen.cli import main

    assert main(["import-authors", str(src), "--output-dir", str(tmp_path / "cli"), "--face-models", "haar",
                 "--tau-plain", "0.5", "--tau-style", "0.3"]) == 0
    assert sorted(r["key"] for r in ShardSamples([tmp_path / "cli"]).records) == sorted(r["key"] for r in samples.records)


def test_the_authors_files_are_found_and_named_as_their_generator_names_them(tmp_path):
    """Their file name is the prompt (spaces as underscores, the subject as conceptname) and the
    seed: only the last part is the seed. Without metadata.json, the images under <name>/vanilla
    and <name>/stylized count, nothing else; with it, the files it lists that exist."""
    from PIL import Image

    from training.datagen.importer import candidates_of, prompt_of, read_authors_folder

    assert prompt_of(Path("a_photo_of_conceptname_in_1920_4711.jpg")) == ("a photo of {subject} in 1920", 4711)
    assert prompt_of(Path("portrait_of_conceptname.jpg")) == ("portrait of {subject}", 0)
    src = tmp_path / "theirs"
    files = {"Zoe/vanilla/a_photo_of_conceptname_1.jpg": True, "Zoe/vanilla/a_photo_of_conceptname_2.JPG": True,
             "Zoe/vanilla/closeup_3.png": True, "Zoe/stylized/a_comic_of_conceptname_4.jpeg": True,
             "Zoe/vanilla/notes.txt": False, "Zoe/extra/a_photo_of_conceptname_5.jpg": False,
             "Adam/vanilla/_6.jpg": True, "Adam/vanilla/broken_7.jpg": True}
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("broken_7.jpg"):
            (src / rel).write_bytes(b"not a jpeg")
        elif rel.endswith(".txt"):
            (src / rel).write_text("x")
        else:
            Image.new("RGB", (8, 8)).save(src / rel, format="PNG")
    groups = read_authors_folder(src)
    assert {n: [str(p.relative_to(src)) for p in ps] for n, ps in groups.items()} == {
        "Adam": ["Adam/vanilla/_6.jpg", "Adam/vanilla/broken_7.jpg"],
        "Zoe": ["Zoe/stylized/a_comic_of_conceptname_4.jpeg", "Zoe/vanilla/a_photo_of_conceptname_1.jpg",
                "Zoe/vanilla/a_photo_of_conceptname_2.JPG", "Zoe/vanilla/closeup_3.png"]}
    zoe = candidates_of("Zoe", groups["Zoe"])
    assert [(c.template.slug, c.k, c.seed, c.template.stylized, c.prompt) for c in zoe] == [
        ("a-comic-of", 0, 4, True, "a comic of Zoe"), ("a-photo-of", 0, 1, False, "a photo of Zoe"),
        ("a-photo-of", 1, 2, False, "a photo of Zoe"), ("closeup", 0, 3, False, "closeup Zoe")]
    adam = candidates_of("Adam", groups["Adam"])
    assert [(c.template.slug, c.prompt, c.image is None) for c in adam] == [("photo", "Adam", False),
                                                                         ("broken", "broken Adam", True)]
    # with metadata.json: what it lists and is on disk, under the name it gives
    (src / "metadata.json").write_text(json.dumps({"Zoe/vanilla/closeup_3.png": "Zoe Z",
                                                   "Zoe/vanilla/gone_9.jpg": "Zoe Z"}))
    assert read_authors_folder(src) == {"Zoe Z": [src / "Zoe/vanilla/closeup_3.png"]}
    # identities are numbered in name order, whatever order metadata.json lists them in
    from types import SimpleNamespace

    from training.datagen.importer import import_authors
    from training.datagen.reader import ShardSamples

    (src / "metadata.json").write_text(json.dumps({rel: rel.split("/")[0] for rel, ok in files.items() if ok}))
    face = SimpleNamespace(bbox=(0, 0, 8, 8), kps=[[1, 1]] * 5, score=0.9, embedding=np.ones(4), crop=Image.new("RGB", (8, 8)))
    totals = import_authors(src, tmp_path / "out", lambda image: [face], {"backend": "fake"}, log=lambda m: None)
    records = ShardSamples([tmp_path / "out"]).records
    assert {r["identity"]: r["description"] for r in records} == {1: "Zoe"} and totals["samples"] == len(records) == 4
    assert totals["rejected"] == {"render_error": 1, "too_few_plain": 1}  # Adam: one photo unreadable, one left


def test_generate_lists_every_missing_model_file_and_honours_face_models(tmp_path, capsys):
    """The face models were loaded first, so a machine without any weights heard only of
    insightface; and --face-models haar was not passed to the engine, whose message still asked
    for buffalo_l."""
    from training.datagen.cli import main

    args = ["generate", "--preset", "sdxl-turbo", "--identities", "1", "--images-per-identity", "2",
            "--output-dir", str(tmp_path / "out"), "--weights-dir", str(tmp_path / "no-weights")]
    assert main([*args, "--face-models", "haar"]) == 2
    err = capsys.readouterr().err
    assert "preset 'sdxl-turbo' needs model files that are not on this machine" in err and "stabilityai/sdxl-turbo" in err
    assert "face models" not in err, err
    assert main([*args, "--face-models", str(tmp_path / "no-pack")]) == 2
    err = capsys.readouterr().err
    assert err.index("needs model files") < err.index("no-pack"), err


def test_import_authors_names_a_bad_source_before_loading_face_models(tmp_path, capsys):
    """A metadata.json of another shape raised AttributeError; bad JSON gave only the parser's
    text; a missing source first complained about the insightface models."""
    from training.datagen.cli import main

    base = ["import-authors", "--output-dir", str(tmp_path / "out")]
    src = tmp_path / "theirs"
    src.mkdir()
    for text, says in (("[1, 2]", "should map each image's relative path to its subject's name"),
                       ('{"a.jpg": 3}', "it holds a dict of other values"),
                       ("{'a.jpg': 'x'}", "metadata.json is not valid JSON (Expecting property name")):
        (src / "metadata.json").write_text(text)
        assert main([*base[:1], str(src), *base[1:], "--face-models", "haar"]) == 2
        err = capsys.readouterr().err
        assert says in err and str(src / "metadata.json") in err and "Traceback" not in err, err
    # no --face-models (insightface's buffalo_l, not on this machine): the source is named first
    assert main([*base[:1], str(tmp_path / "nowhere"), *base[1:]]) == 2
    err = capsys.readouterr().err
    assert "nowhere is not there: pass the authors' data folder" in err and "insightface" not in err, err


def test_unreadable_training_data_is_named_for_what_it_is(reference_run, tmp_path):
    """A missing folder, a file, one shard, a garbled manifest and unreadable shards all said
    "holds no manifest.jsonl" or "every identity needs two plain photos"."""
    import shutil

    from training.datagen.reader import PairDataset

    out_ref, _ = reference_run
    (tmp_path / "notes.txt").write_text("x")
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "manifest.jsonl").write_text("this is not json\n")
    gone = tmp_path / "gone"
    shutil.copytree(out_ref, gone, ignore=shutil.ignore_patterns("*.tar", "contact-sheets"))
    junk = tmp_path / "junk"
    shutil.copytree(out_ref, junk, ignore=shutil.ignore_patterns("contact-sheets"))
    for tar in junk.glob("*.tar"):
        tar.write_bytes(b"\0" * 10)
    for folder, says in ((tmp_path / "nowhere", "nowhere does not exist: pass a folder of training shards"),
                         (tmp_path / "notes.txt", "notes.txt is a file, not a folder"),
                         (out_ref / "shard-000000.tar", "shard-000000.tar is one shard, not a folder"),
                         (garbled, "manifest.jsonl lists no shard (empty, or not lines of JSON written by datagen)"),
                         (gone, "the shards could not be read (missing_shard 2)"),
                         (junk, "the shards could not be read (")):
        with pytest.raises((FileNotFoundError, ValueError), match=re.escape(says)):
            PairDataset([folder])


def _raw_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_the_reader_skips_each_unusable_sample_by_reason_and_pairs_the_rest(tmp_path):
    """Per sample: a member missing (incomplete), a record that is not JSON (corrupt), no box or no
    landmarks (no_face), a plain photo with no other plain photo of its identity (no_reference, as
    a target; it is still the reference of its stylized image). Images come back RGB."""
    import io

    from PIL import Image

    from training.datagen.reader import PairDataset, ShardSamples
    from training.datagen.shards import _npy, append_manifest

    def png(mode):  # not shards._png, which writes RGB: the reader must convert a grey image itself
        buf = io.BytesIO()
        Image.new(mode, (8, 8), 90).save(buf, format="PNG")
        return buf.getvalue()

    def record(key, identity, stylized, **changes):
        rec = {"key": key, "identity": identity, "stylized": stylized, "box": [0, 0, 8, 8],
               "landmarks": [[1, 1]] * 5, "compressed_prompt": f"{key} of a face", "template": "photo"}
        return json.dumps({**rec, **changes}).encode()

    members = []
    for key, identity, stylized, rec, parts in (
            ("id1-photo-00", 1, False, None, "all"), ("id1-comic-00", 1, True, None, "all"),
            ("id2-photo-00", 2, False, None, "all"), ("id2-photo-01", 2, False, None, "all"),
            ("id3-photo-00", 3, False, None, "no crop"), ("id3-photo-01", 3, False, b"{not json", "all"),
            ("id3-photo-02", 3, False, {"landmarks": []}, "all"), ("id3-photo-03", 3, False, {"box": None}, "all")):
        body = rec if isinstance(rec, bytes) else record(key, identity, stylized, **(rec or {}))
        members += [(f"{key}.png", png("L")), (f"{key}.json", body), (f"{key}.emb.npy", _npy(np.ones(4)))]
        if parts == "all":
            members.append((f"{key}.crop.png", png("RGB")))
    _raw_shard(tmp_path / "shard-000000.tar", members)
    append_manifest(tmp_path, {"shard": "shard-000000.tar"})
    samples = ShardSamples([tmp_path])
    assert [r.key for r in samples.samples] == ["id1-photo-00", "id1-comic-00", "id2-photo-00", "id2-photo-01"]
    assert dict(samples.skipped) == {"incomplete": 1, "corrupt": 1, "no_face": 2}
    assert samples.image(0).mode == "RGB" and samples.image(0, "crop.png").size == (8, 8)
    pairs = PairDataset([tmp_path])
    keys = sorted(pairs[j].key for j in range(len(pairs)))
    assert keys == ["id1-photo-00>id1-comic-00", "id2-photo-00>id2-photo-01", "id2-photo-01>id2-photo-00"]
    assert pairs.skipped["no_reference"] == 1  # id1-photo-00 as a target: its identity has no other photo
    sample = next(pairs[j] for j in range(len(pairs)) if pairs[j].key == "id1-photo-00>id1-comic-00")
    assert sample.reference.mode == sample.target.mode == "RGB" and sample.prompt == "id1-comic-00 of a face"
    assert sample.reference_prompt == "id1-photo-00 of a face"
    assert np.asarray(sample.reference)[0, 0].tolist() == [90, 90, 90]  # the image (grey PNG, read as RGB)
    assert np.asarray(sample.reference_crop)[0, 0].tolist() == [90, 0, 0]  # its crop member, not the image
    assert sample.reference_box == (0, 0, 8, 8) and sample.reference_embedding.tolist() == [1.0] * 4
    # samples read but none pairs up, while another shard is gone: the pairs are what is missing
    lone = tmp_path / "lone"
    lone.mkdir()
    _raw_shard(lone / "shard-000000.tar", [(n, d) for n, d in members if n.startswith("id1-photo-00.")])
    append_manifest(lone, {"shard": "shard-000000.tar"})
    append_manifest(lone, {"shard": "shard-000001.tar"})  # listed, not on disk
    with pytest.raises(ValueError, match="every identity needs two plain photos") as exc:
        PairDataset([lone])
    assert "could not be read" not in str(exc.value)


def test_when_every_pair_is_corrupt_the_error_names_three_shards_and_says_there_are_more(tmp_path):
    from training.datagen.reader import PairDataset
    from training.datagen.shards import _npy, append_manifest

    for s in range(4):
        members = []
        for k in range(2):
            key = f"id{s}-photo-0{k}"
            rec = {"key": key, "identity": s, "stylized": False, "box": [0, 0, 8, 8], "landmarks": [[1, 1]] * 5,
                   "compressed_prompt": "a photo of a face"}
            members += [(f"{key}.png", b"not a png"), (f"{key}.json", json.dumps(rec).encode()),
                        (f"{key}.emb.npy", _npy(np.ones(4))), (f"{key}.crop.png", b"nor this")]
        _raw_shard(tmp_path / f"shard-00000{s}.tar", members)
        append_manifest(tmp_path, {"shard": f"shard-00000{s}.tar"})
    pairs = PairDataset([tmp_path])
    with pytest.raises(ValueError, match=r"every training pair is corrupt: no image of .*shard-000000.tar, "
                                         r".*shard-000001.tar, .*shard-000002.tar and more decodes"):
        pairs[0]
    assert pairs.skipped["corrupt"] == len(pairs) == 8


def test_a_folder_of_the_authors_format_is_pointed_to_the_importer(tmp_path):
    from training.datagen.reader import PairDataset

    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="holds no manifest.jsonl of training shards .*import-authors"):
        PairDataset([tmp_path])
    (tmp_path / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="holds no manifest.jsonl of training shards$"):
        PairDataset([tmp_path])


def test_inspect_shows_a_corrupt_image_and_refuses_a_bad_out(reference_run, tmp_path, capsys):
    """A shard whose image member does not decode raised UnidentifiedImageError while drawing the
    contact sheet; an --out that is a file raised FileExistsError."""
    import shutil
    import tarfile

    from PIL import Image

    from training.datagen.cli import main

    out_ref, _ = reference_run
    broken = tmp_path / "broken"
    shutil.copytree(out_ref, broken, ignore=shutil.ignore_patterns("contact-sheets"))
    shard = broken / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    first_png = next(m.name for m, _ in members if m.name.endswith(".png"))
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            data = b"not an image" if member.name == first_png else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    assert main(["inspect", str(broken), "--out", str(tmp_path / "sheets")]) == 0
    err = capsys.readouterr().err
    assert "warning: unreadable images (shown grey on the sheets): shard-000000.tar 1" in err, err
    assert Image.open(tmp_path / "sheets" / "shard-000000.png").size[0] > 0
    (broken / "shard-000001.tar").unlink()  # listed, gone: said, and the rest is still inspected
    assert main(["inspect", str(broken), "--out", str(tmp_path / "sheets")]) == 0
    err = capsys.readouterr().err
    assert "warning: some of the data could not be read and is left out (skipped_on_read): missing_shard 1" in err
    (tmp_path / "file").write_text("x")
    assert main(["inspect", str(broken), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_inspect_prints_statistics_and_contact_sheets(reference_run, tmp_path, capsys):
    from training.datagen.cli import main

    out_ref, _ = reference_run
    assert main(["inspect", str(out_ref), "--out", str(tmp_path / "sheets")]) == 0
    stats = json.loads(capsys.readouterr().out.split("\n" + str(tmp_path))[0])
    assert stats["shards"] == 2 and stats["samples"] > 0 and not stats["real_recognizer"]
    from training.datagen.reader import ShardSamples

    records = ShardSamples([out_ref]).records
    manifest = read_manifest(out_ref)
    assert stats["samples"] == len(records) == stats["plain"] + stats["stylized"] == sum(stats["templates"].values())
    assert stats["identities"] == len({r["identity"] for r in records}) > 1
    assert stats["mean_similarity"] == pytest.approx(np.mean([r["similarity"] for r in records]))
    assert stats["rejected"] == {k: sum(e["rejected"][k] for e in manifest.values()) for k in stats["rejected"]}
    assert sum(stats["rejected"].values()) > 0 and stats["skipped_on_read"] == {}
    sheets = sorted((tmp_path / "sheets").glob("*.png"))
    assert [p.stem for p in sheets] == ["shard-000000", "shard-000001"]
    assert main(["generate", "--identities", "1", "--output-dir", str(tmp_path / "x" / "y" / "z"), "--preset", "tiny"]) == 2
    assert main(["generate", "--identities", "1", "--styles", "nope", "--output-dir", str(tmp_path / "a"), "--preset", "tiny"]) == 2
    capsys.readouterr()
    # a shard size of 0 (a ZeroDivisionError) and thresholds no cosine reaches are refused before loading
    for flag, value, said in (("--identities-per-shard", "0", "--identities-per-shard: must be a whole number ≥ 1 (got 0)"),
                              ("--tau-plain", "5", "--tau-plain: must be a finite number in [-1, 1] (got 5.0)"),
                              ("--tau-style", "nan", "(got nan)"), ("--images-per-identity", "1", "in [2, 1000] (got 1)"),
                              ("--images-per-identity", "99999999999", "in [2, 1000] (got 99999999999)"),
                              ("--identities", "99999999999999999999", "--identities: must be a whole number in [1, 10000000]"),
                              ("--steps", "0", "--steps: must be a whole number in [1, 200]"),
                              ("--size", "100", "--size: must be a whole number, a multiple of 8, in [64, 2048] (got 100)")):
        assert main(["generate", "--identities", "1", "--output-dir", str(tmp_path / "a"), "--preset", "tiny",
                     flag, value]) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "a").exists()


def test_names_must_cover_every_identity(tmp_path):
    from training.datagen.cli import check_names, main

    names = tmp_path / "names.txt"
    names.write_text("Ada Lovelace\n# a comment\nAlan Turing\n")
    check_names(("Ada Lovelace", "Alan Turing"), 2, str(names))
    with pytest.raises(ValueError, match=r"--identities 3 is more than the 2 names in .*names.txt"):
        check_names(("Ada Lovelace", "Alan Turing"), 3, str(names))
    with pytest.raises(ValueError, match="identity 2 has no name"):
        draw_identity(0, 2, names=["Ada Lovelace", "Alan Turing"])
    assert main(["generate", "--identities", "3", "--names", str(names), "--output-dir", str(tmp_path / "o"),
                 "--preset", "tiny"]) == 2
    assert not (tmp_path / "o").exists()  # refused before anything loads or is written


def test_a_names_file_is_read_a_name_a_line_and_an_empty_or_missing_one_is_named(tmp_path):
    from training.datagen.identities import read_names, slugify

    names = tmp_path / "names.txt"
    names.write_text("  Ada Lovelace \n\n# a comment\n   # an indented one\nAlan Turing\n", encoding="utf-8")
    assert read_names(names) == ["Ada Lovelace", "Alan Turing"]
    names.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="the names file .*names.txt holds no names"):
        read_names(names)
    with pytest.raises(ValueError, match="cannot read the names file .*nowhere.txt: No such file"):
        read_names(tmp_path / "nowhere.txt")
    assert slugify(" A pencil drawing of  ") == "a-pencil-drawing-of" and slugify("Oil-Painting #3!") == "oil-painting-3"


def test_each_process_renders_on_its_own_device_unless_device_is_given(monkeypatch):
    from types import SimpleNamespace

    import lcmla.evaluation.run
    from training.datagen import cli

    state = SimpleNamespace(process_index=1, num_processes=2, device="cuda:1")
    monkeypatch.setattr(lcmla.evaluation.run, "accelerate_state", lambda: state)
    assert cli._state() == (1, 2, "cuda:1") and cli._state("cpu") == (1, 2, "cpu")


def test_cli_renders_on_the_process_device_without_the_faceid_lora(engine, tmp_path, monkeypatch, capsys):
    """The accelerate state is read before the engine loads and its device is the engine's; every
    datagen image is a text-only render with the FaceID LoRA off (identity.lora_scale 0) and no
    CFG (guidance 1, SDXL-Turbo's way). A run that keeps nothing says why, for random weights and
    for real ones."""
    import lcmla
    from training.datagen import cli

    loads, settings = [], []
    generate = engine.generate

    def load(preset, **kw):
        loads.append((preset, kw))
        return engine

    def recording(s, faces=None, **kw):
        settings.append((s, faces))
        return generate(s, faces, **kw)

    monkeypatch.setattr(cli, "_state", lambda device=None: (0, 1, device or "cpu:from-the-state"))
    monkeypatch.setattr(lcmla.Engine, "load", staticmethod(load))
    monkeypatch.setattr(engine, "generate", recording)
    out = tmp_path / "d"
    assert cli.main(["generate", "--preset", "tiny", "--identities", "1", "--images-per-identity", "2",
                     "--styles", "comic", "--size", "64", "--output-dir", str(out)]) == 0
    assert [kw["device"] for _, kw in loads] == ["cpu:from-the-state"]
    assert len(settings) == 2 and all(f is None for _, f in settings)
    assert {s.identity.lora_scale for s, _ in settings} == {0.0}
    assert {(s.output.width, s.guidance.steps, s.guidance.guidance_scale) for s, _ in settings} == {(64, 1, 1.0)}
    entry = read_manifest(out)["shard-000000.tar"]
    assert entry["settings"]["lora_scale"] == 0.0 and entry["settings"]["size"] == 64
    assert "the tiny preset's random weights draw patterns, not faces" in capsys.readouterr().err
    # the same with a preset of real weights: the thresholds or the face models are what to look at
    import dataclasses

    import lcmla.presets

    real = dataclasses.replace(lcmla.presets.get_preset("tiny"), random_weights=False)
    monkeypatch.setattr(lcmla.presets, "get_preset", lambda name: real)
    assert cli.main(["generate", "--preset", "tiny", "--identities", "1", "--images-per-identity", "2",
                     "--styles", "comic", "--size", "64", "--output-dir", str(tmp_path / "real")]) == 0
    err = capsys.readouterr().err
    assert "warning: no sample was kept (rejected: no_face 2); lower --tau-plain/--tau-style or check the face models" in err
    assert "random weights" not in err


def test_cli_generate_tiny_to_the_end_and_inspect_an_empty_shard(engine, tiny_cache, tmp_path):
    """``python -m training datagen generate --preset tiny`` end to end in its own process. Random
    weights draw no faces, so every image is rejected (no_face) and the shards are empty: inspect
    still reports them and draws a sheet for each."""
    from PIL import Image

    from training.datagen.cli import main

    out = tmp_path / "tiny"
    env = {**os.environ, "LCMLA_CACHE": str(tiny_cache), "HF_HUB_OFFLINE": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    done = subprocess.run([sys.executable, "-m", "training", "datagen", "generate", "--preset", "tiny",
                           "--identities", "2", "--images-per-identity", "2", "--styles", "comic", "--size", "64",
                           "--identities-per-shard", "1", "--device", "cpu", "--output-dir", str(out)],
                          capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    totals = json.loads(done.stdout.strip().splitlines()[-1])
    assert totals["shards_written"] == 2 and totals["samples"] == 0 and totals["rejected"] == {"no_face": 4}
    assert "warning: no sample was kept (rejected: no_face 4); the tiny preset's random weights" in done.stderr
    suggested = re.search(r"`python -m (training datagen sample --output-dir [^`]+)`", done.stderr).group(1).split()
    tried = subprocess.run([sys.executable, "-m", *suggested], capture_output=True, text=True, env=env, timeout=600,
                           cwd=Path(__file__).resolve().parents[1])
    assert tried.returncode == 0 and read_manifest(Path(suggested[-1])), tried.stderr[-2000:]  # the hint works as given
    manifest = read_manifest(out)
    assert sorted(manifest) == ["shard-000000.tar", "shard-000001.tar"]
    assert all(e["samples"] == 0 and e["settings"]["random_weights"] for e in manifest.values())
    sheets = tmp_path / "sheets"
    assert main(["inspect", str(out), "--out", str(sheets)]) == 0
    pngs = sorted(sheets.glob("*.png"))
    assert [p.stem for p in pngs] == ["shard-000000", "shard-000001"]
    assert all(Image.open(p).size[1] > 0 for p in pngs)
    from training.datagen.inspect_shards import empty_sheet_lines

    assert empty_sheet_lines("shard-000001.tar", manifest["shard-000001.tar"]) == [
        "shard-000001.tar: no sample kept (identities 1-1)", "rejected: no_face 2"]
    assert empty_sheet_lines("shard-000009.tar", {"identities": [8, 9, 10], "rejected": {"no_face": 0, "too_few_plain": 3,
                                                                                       "render_error": 1}}) == [
        "shard-000009.tar: no sample kept (identities 8-10)", "rejected: too_few_plain 3, render_error 1"]
    assert empty_sheet_lines("x.tar", {}) == ["x.tar: no sample kept (no identities)", "rejected: none"]


def test_a_sample_variation_crops_mirrors_turns_and_lights_as_drawn():
    from PIL import ImageOps

    from training.datagen.sample import Variation, apply_variation, portrait, variation, vary

    drawn = [variation(s) for s in range(40)]
    assert 10 < sum(v.mirror for v in drawn) < 30  # half the time
    assert all(0.86 <= v.side <= 1 and max(map(abs, v.shift)) <= 0.04 and abs(v.angle) <= 6
               and 0.85 <= v.brightness <= 1.15 and 0.85 <= v.contrast <= 1.15 for v in drawn)
    assert len({v.angle for v in drawn}) == 40 and variation(5) == variation(5)
    photo = portrait("Grace Hopper")
    plain = Variation(1.0, (0.0, 0.0), False, 0.0, 1.0, 1.0)
    same = np.asarray(apply_variation(photo, plain, 64), np.int16)
    assert same.shape == (64, 64, 3) and np.abs(same - np.asarray(photo.resize((64, 64), 1), np.int16)).mean() < 3
    mirrored = apply_variation(photo, Variation(1.0, (0.0, 0.0), True, 0.0, 1.0, 1.0), 64)
    assert np.array_equal(np.asarray(mirrored), np.asarray(ImageOps.mirror(apply_variation(photo, plain, 64))))
    turned = np.asarray(apply_variation(photo, Variation(1.0, (0.0, 0.0), False, 6.0, 1.0, 1.0), 64), np.int16)
    assert np.abs(turned[0, 0] - 128).max() <= 2 and np.abs(same[0, 0] - 128).max() > 10  # a grey corner
    darker = np.asarray(apply_variation(photo, Variation(1.0, (0.0, 0.0), False, 0.0, 0.85, 1.0), 64), np.int16)
    assert darker.mean() < same.mean() - 5
    tight = apply_variation(photo, Variation(0.86, (0.04, 0.0), False, 0.0, 1.0, 1.0), 64)
    assert not np.array_equal(np.asarray(tight), same.astype(np.uint8))
    assert np.array_equal(np.asarray(vary(photo, 7, 48)), np.asarray(apply_variation(photo, variation(7), 48)))


def test_the_sample_renderer_stylizes_only_the_stylized_prompts_and_names_a_stranger():
    from training.datagen.sample import portrait, sample_renderer, stylize, vary

    comic = "a drawing of Grace Hopper in a comic book"
    render = sample_renderer(frozenset({comic}), 48)
    photo = vary(portrait("Grace Hopper"), 3, 48)
    assert np.array_equal(np.asarray(render("a photo of Grace Hopper in a comic book shop", 3)), np.asarray(photo))
    assert np.array_equal(np.asarray(render(comic, 3)), np.asarray(stylize(photo, comic)))
    assert np.array_equal(np.asarray(render("a photo of Eileen Collins", 3)),
                          np.asarray(vary(portrait("Eileen Collins"), 3, 48)))
    with pytest.raises(ValueError, match="the prompt 'a photo of Ada Lovelace' names no sample identity"):
        render("a photo of Ada Lovelace", 3)
    with pytest.raises(ValueError, match="no sample portrait of 'Ada Lovelace'; the sample identities are Eileen Collins, Grace Hopper"):
        portrait("Ada Lovelace")


def test_each_sample_style_gets_the_filter_its_template_names():
    """The specific word decides, not the generic "drawing" or "painting" before it."""
    from training.datagen import sample
    from training.datagen.identities import select_templates

    photo = sample.vary(sample.portrait("Eileen Collins"), 3, 64)
    expect = {"oil-painting": sample._oil, "pencil-drawing": sample._pencil, "comic": sample._comic,
              "watercolor": sample._watercolor, "graffiti": sample._comic, "wanted-poster": sample._comic,
              "cubism": sample._oil, "pop-art": sample._comic, "charcoal": sample._pencil}
    _, stylized = select_templates(None)
    for t in stylized:
        got = np.asarray(sample.stylize(photo, t.prompt("Eileen Collins")))
        fn = expect.get(t.slug)
        want = np.asarray(fn(photo) if fn else sample.ImageOps.posterize(photo, 4))  # pixar, mosaic, astronaut
        assert np.array_equal(got, want), t.slug
    for prompt, fn in (("a drawing of Eileen Collins", sample._pencil), ("a painting of Eileen Collins", sample._oil),
                       ("a pastel drawing of Eileen Collins", sample._watercolor)):  # the generic words, last
        assert np.array_equal(np.asarray(sample.stylize(photo, prompt)), np.asarray(fn(photo))), prompt
    filters = [sample._pencil, sample._oil, sample._watercolor, sample._comic]
    outs = [np.asarray(f(photo)) for f in filters]
    assert all(not np.array_equal(a, b) for i, a in enumerate(outs) for b in outs[i + 1:])  # four different looks


def test_sample_makes_real_face_pairs_the_trainer_reads(tmp_path, capsys):
    """``datagen sample``: the two public-domain portraits, varied and stylized, through the same
    filter and shards as generate; the trainer's reader finds pairs of one identity in it (a tiny
    preset's render keeps none: its random weights draw no faces)."""
    from training.datagen.cli import main
    from training.datagen.reader import PairDataset
    from training.datagen.sample import portrait, stylize, vary

    out = tmp_path / "sample"
    assert main(["sample", "--output-dir", str(out), "--images-per-identity", "6", "--size", "128"]) == 0
    totals = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert totals["samples"] >= 8 and totals["shards_written"] == 1
    manifest = read_manifest(out)
    (entry,) = manifest.values()
    assert entry["run"]["settings"]["source"] == "sample" and entry["kept_identities"] == [0, 1]
    pairs = PairDataset([out])
    names = {pairs[j].key.split(">")[0].split("-")[0] for j in range(len(pairs))}
    assert len(pairs) >= 6 and len(names) == 2
    # a rerun is the same run (the same shards are kept); other settings are refused by name
    assert main(["sample", "--output-dir", str(out), "--images-per-identity", "6", "--size", "128"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards_reused"] == 1
    assert main(["sample", "--output-dir", str(out), "--images-per-identity", "6", "--size", "96"]) == 2
    assert "size" in capsys.readouterr().err
    # the variations: deterministic per seed, different across seeds; styles change the picture
    photo = portrait("Grace Hopper")
    a, b = np.asarray(vary(photo, 1, 96)), np.asarray(vary(photo, 2, 96))
    assert np.array_equal(a, np.asarray(vary(photo, 1, 96))) and not np.array_equal(a, b)
    pencil = np.asarray(stylize(vary(photo, 1, 96), "a pencil drawing of Grace Hopper"))
    assert pencil.shape == a.shape and np.abs(pencil[..., 0].astype(int) - pencil[..., 2]).max() <= 1  # grey


def test_no_training_pairs_names_the_way_to_real_photos(tmp_path):
    """Shards where no face was kept (what the tiny preset's render gives) name the way out."""
    from PIL import Image

    from training.datagen.generate import generate
    from training.datagen.reader import PairDataset

    cfg, haar = datagen_fake.config(identities=2, per_shard=2, images=2)
    generate(cfg, tmp_path, lambda prompt, seed: Image.new("RGB", (96, 96), (120, 120, 120)), haar.detect,
             log=lambda m: None)
    with pytest.raises(ValueError, match="no training pairs .*`python -m training datagen sample --output-dir D`"):
        PairDataset([tmp_path])
