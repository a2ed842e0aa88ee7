"""benchmarks/predict_memory.py: live bytes counted right, and allocating without computing keeps
the allocation pattern of a computed request (so its full-size prediction on the CPU holds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import predict_memory as pm  # noqa: E402


def test_live_bytes_follow_what_is_alive():
    """Known sizes: new storages add, frees subtract, views and in-place results add nothing,
    and a weight made before the mode is not counted when an operator views it."""
    weight = torch.ones(1000, 1000)  # 4 MB, made before: not the tracker's
    with pm.LiveBytes() as tracker:
        a = torch.ones(1000)  # 4000 B
        b = a * 2  # 4000 B: 8000 live
        view = b[10:]  # a view: nothing new
        b.add_(1)  # in place: nothing new
        wt = weight.t()  # a view of a weight made before the mode: nothing
        del a  # 4000 live
        c = b + view[:1]  # 4000 more: 8000 live
        assert tracker.live == 8000
        del b, view, c
        assert tracker.live == 0
        y = torch.ones(1, 1000) @ wt  # the input (4000) and the output (4000); the weight is not counted
        assert tracker.live == 4000
    assert tracker.peak == 8000
    del y


def test_resident_bytes_and_phases_count_towards_the_peak():
    with pm.LiveBytes(resident=1000) as tracker:
        tracker.set_phase("one")
        x = torch.ones(250)  # 1000 B: 2000 with the resident
        tracker.set_resident(5000)  # 6000
        tracker.set_phase("two")
        del x  # 5000
    assert tracker.peak == 6000 and tracker.peak_phase == "one"
    assert tracker.phase_peaks == {"one": 6000, "two": 6000}


def test_module_bytes_count_each_storage_once():
    lin = torch.nn.Linear(10, 20)
    tied = torch.nn.Linear(10, 20)
    tied.weight = lin.weight
    assert pm.module_bytes(lin) == (200 + 20) * 4
    assert pm.module_bytes(lin, tied) == (200 + 20 + 20) * 4


@pytest.fixture(scope="module")
def engines():
    from lcmla import Engine

    out = {mode: Engine.load("tiny", device="cpu", memory=mode, batch_images=True, channels_last=False)
           for mode in ("full", "balanced", "low")}
    identity = out["full"].analyze_faces([str(ROOT / "assets" / "face.png")])
    return out, identity


@pytest.mark.parametrize("name", ["plain", "am2+dcg", "kv", "previews"])
def test_allocating_without_computing_gives_the_computed_peak(engines, name):
    """Two images batched, every operator allocating instead of computing wherever it can
    (``compute_below`` 1 byte): the peak, and the peak of every model's phase, equal a computed
    request's to the byte; the engine's own tensors drive the scheduler, the AM quantiles and
    the KV cache either way."""
    from bench_gpu import config_settings

    from lcmla import GenerationSettings

    (by_mode, identity) = engines
    engine = by_mode["full"]
    base = GenerationSettings(prompt="a pencil drawing of a face", preset="tiny").replace(
        output__width=96, output__height=64)
    s = config_settings(name, base, "tiny")
    if name != "previews":
        s = s.replace(output__num_images=2)
    computed = pm.predict_request(engine, s, identity, allocate_only=False, previews=name == "previews")
    allocated = pm.predict_request(engine, s, identity, allocate_only=True, compute_below=1,
                                   previews=name == "previews")
    assert allocated["allocated_only"] > 1000  # nearly every operator allocated only
    assert allocated["peak"] == computed["peak"]
    assert allocated["phase_peaks"] == computed["phase_peaks"]
    assert set(computed["phase_peaks"]) >= {"text_encoder", "unet", "vae"}
    weights = pm.module_bytes(*pm.engine_models(engine).values())
    assert computed["resident"] == weights and computed["peak"] > weights


def test_allocating_without_computing_holds_in_balanced_mode(engines):
    """The full architecture's balanced-mode prediction allocates only: there the encoders move
    on and off the device around their phases, and the allocated peaks still equal the computed
    ones to the byte, phase by phase."""
    from lcmla import GenerationSettings

    (by_mode, identity) = engines
    s = GenerationSettings(prompt="a pencil drawing of a face", preset="tiny").replace(
        output__width=96, output__height=64, output__num_images=2)
    computed = pm.predict_request(by_mode["balanced"], s, identity, allocate_only=False)
    allocated = pm.predict_request(by_mode["balanced"], s, identity, allocate_only=True, compute_below=1)
    assert allocated["allocated_only"] > 1000
    assert allocated["resident"] == computed["resident"] < pm.module_bytes(
        *pm.engine_models(by_mode["balanced"]).values())
    assert allocated["phase_peaks"] == computed["phase_peaks"]
    assert allocated["peak"] == computed["peak"]


def test_the_offloading_modes_count_only_the_models_on_the_device(engines):
    """Low-VRAM: while the UNet runs only its weights are resident (the encoders went back), while
    the VAE decodes only the VAE's. Balanced: the UNet, VAE and TAESD always, an encoder only while
    it runs. So low < balanced < full, each by the weights it leaves in CPU memory."""
    from lcmla import GenerationSettings

    (by_mode, identity) = engines
    s = GenerationSettings(prompt="a pencil drawing of a face", preset="tiny").replace(
        output__width=96, output__height=64)
    # computed (at this size faster than allocating; the two give the same peaks: the test above)
    r = {mode: pm.predict_request(eng, s, identity, allocate_only=False) for mode, eng in by_mode.items()}
    w = {k: pm.module_bytes(m) for k, m in pm.engine_models(by_mode["low"]).items()}
    full_acts = {phase: peak - r["full"]["resident"] for phase, peak in r["full"]["phase_peaks"].items()}
    assert r["full"]["resident"] == sum(w.values())
    assert r["balanced"]["resident"] == w["unet"] + w["vae"] + w["taesd"]
    assert r["low"]["resident"] == 0
    # the same activations in every mode; only the resident weights differ
    for phase in ("unet", "vae"):
        assert r["balanced"]["phase_peaks"][phase] == r["balanced"]["resident"] + full_acts[phase]
    assert r["low"]["phase_peaks"]["unet"] == w["unet"] + full_acts["unet"]
    assert r["low"]["phase_peaks"]["vae"] == w["vae"] + full_acts["vae"]
    assert r["balanced"]["phase_peaks"]["text_encoder_2"] <= r["balanced"]["resident"] + w["text_encoder_2"] \
        + full_acts["text_encoder_2"]
    assert r["low"]["phase_peaks"]["text_encoder"] < w["unet"]
    assert r["low"]["peak"] < r["balanced"]["peak"] < r["full"]["peak"]


def test_the_low_modes_parked_kv_cache_is_off_the_device(engines, monkeypatch):
    """The low-VRAM KV path parks the encoder pass's K/V in host memory: the prediction follows
    that (a parked tensor is not counted, an unparked one is), so the UNet's peak drops by about
    the cache; allocating only still gives the computed peak to the byte."""
    from bench_gpu import config_settings

    from lcmla import GenerationSettings

    (by_mode, identity) = engines
    low = by_mode["low"]
    assert low.kv_parking is not None and by_mode["full"].kv_parking is None
    s = config_settings("kv", GenerationSettings(prompt="a pencil drawing of a face", preset="tiny").replace(
        output__width=96, output__height=64), "tiny")
    parked = pm.predict_request(low, s, identity, allocate_only=False)
    assert pm.predict_request(low, s, identity, allocate_only=True, compute_below=1)["peak"] == parked["peak"]
    sizes = []
    encode = low._encode_reference

    def spy(*args, **kwargs):  # the whole cache's bytes, before the denoiser reads (and releases) it
        cache = encode(*args, **kwargs)
        sizes.append(sum(t.untyped_storage().nbytes() for kv in cache.store.values() for t in kv))
        return cache

    monkeypatch.setattr(low, "_encode_reference", spy)
    monkeypatch.setattr(low, "kv_parking", None)
    whole = pm.predict_request(low, s, identity, allocate_only=False)
    assert sizes and sizes[0] > 0
    saved = whole["phase_peaks"]["unet"] - parked["phase_peaks"]["unet"]
    assert 0.5 * sizes[0] < saved <= sizes[0], (saved, sizes[0])


def test_the_command_prints_a_row_per_mode_and_config(capsys):
    assert pm.main(["--arch", "tiny", "--size", "64", "--configs", "plain", "--memory", "full,balanced,low",
                    "--images", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "weights (MiB): text_encoder " in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("full ", "balanced ", "low "))]
    assert [(r[0], r[1], r[2]) for r in rows] == [(m, "plain", n) for m in ("full", "balanced", "low") for n in "12"]
    peaks = {(r[0], r[2]): float(r[4]) for r in rows}
    assert peaks[("low", "1")] < peaks[("balanced", "1")] < peaks[("full", "1")] <= peaks[("full", "2")]
