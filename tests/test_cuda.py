"""Checks that need a CUDA device (skipped elsewhere; `benchmarks/gpu_session.sh` runs them on a lent
GPU): a real out-of-memory error is a user error and the next request runs; the compiled AM
branch, channels-last and bfloat16 on the GPU give the eager float32 images; the low-VRAM mode
holds less device memory than the balanced one, which holds less than the full one, and parks
the KV path's reference K/V in pinned host memory without changing an image; the CPU's memory
prediction (benchmarks/predict_memory.py) matches the allocator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from util import make_settings, px

from lcmla import Engine
from lcmla.memory import OutOfMemoryError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = dict(output__width=64, output__height=64)


@pytest.fixture(scope="module")
def cuda_engine(tiny_cache):
    return Engine.load("tiny", device="cuda", dtype="float32")


def test_a_real_out_of_memory_is_a_user_error_and_the_next_request_runs(cuda_engine, face_path):
    """The allocator is capped at 1.5 GiB for this process; 8 images at 2048² then run out of it
    for real (no simulation): the request fails with the message, the cache is emptied, and the
    next, small request gives the image it gave before."""
    settings = make_settings(**SMALL)
    before = cuda_engine.generate(settings, face_path).images[0]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.5 * 2**30 / total)
    try:
        with pytest.raises(OutOfMemoryError) as info:
            cuda_engine.generate(make_settings(output__width=2048, output__height=2048, output__num_images=8),
                                 face_path)
        assert "8 image(s) at 2048×2048" in str(info.value) and "low-VRAM mode" in str(info.value)
        assert torch.cuda.memory_reserved() < 1.5 * 2**30
        after = cuda_engine.generate(settings, face_path).images[0]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert np.array_equal(px(before), px(after))


def test_compiled_am_channels_last_and_bf16_on_the_gpu(cuda_engine, face_path):
    settings = make_settings(**SMALL, attention__mode="am2", guidance__dcg=True)
    eager = cuda_engine.generate(settings, face_path).images[0]
    compiled = Engine.load("tiny", device="cuda", dtype="float32", compile="am")
    assert compiled.channels_last  # the CUDA default
    assert np.abs(px(compiled.generate(settings, face_path).images[0]) - px(eager)).max() <= 1
    bf16 = Engine.load("tiny", device="cuda", dtype="bfloat16")
    diff = np.abs(px(bf16.generate(settings, face_path).images[0]) - px(eager)).astype(float)
    assert diff.mean() < 8, diff.mean()  # bfloat16 end to end, the VAE kept exact: close to float32


def test_the_low_vram_mode_holds_less_device_memory(tiny_cache, face_path):
    """Peak device memory above what was allocated before the engine loaded (other tests' engines
    stay resident): the full mode holds every model, the low one only the model that runs."""
    import gc

    settings = make_settings(**SMALL)
    peaks = {}
    for mode in ("full", "balanced", "low"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        eng = Engine.load("tiny", device="cuda", dtype="float32", memory=mode)
        assert eng.memory_mode == mode
        eng.generate(settings, face_path)
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        del eng
    assert peaks["low"] < peaks["balanced"] < peaks["full"], peaks


def test_the_low_mode_parks_the_kv_cache_in_host_memory(tiny_cache, face_path):
    """HostParking on CUDA: a parked tensor is a pinned host copy, back on the device equal; the
    low-VRAM KV path (parking, the cache released layer by layer) gives the full mode's image to
    within a grey level."""
    from lcmla.attention.context import HostParking

    parking = HostParking("cuda")
    t = torch.randn(2, 1000, 64, device="cuda", dtype=torch.float16)
    host = parking.park(t)
    assert host.device.type == "cpu" and host.is_pinned()
    back = parking.unpark(host)
    assert back.device.type == "cuda" and torch.equal(back, t)
    settings = make_settings(**SMALL, lookahead__kv=True)
    low = Engine.load("tiny", device="cuda", dtype="float32", memory="low")
    full = Engine.load("tiny", device="cuda", dtype="float32", memory="full")
    a, b = (eng.generate(settings, face_path).images[0] for eng in (low, full))
    assert np.abs(px(a) - px(b)).max() <= 1


@pytest.mark.parametrize("name", ["plain", "am2+dcg", "kv"])
def test_the_cpu_memory_prediction_matches_the_allocator(cuda_engine, face_path, name):
    """benchmarks/predict_memory.py's count on this GPU: a request's peak above the memory held
    before it (weights, caches) as torch.cuda.max_memory_allocated measures it, against the live
    bytes the tracker counted (computed, and allocated only). The tracker cannot see kernel
    workspaces, so it may fall short by those: at most 10 % + 64 MiB, never above the allocator."""
    import gc
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import predict_memory as pm
    from bench_gpu import config_settings

    from lcmla import GenerationSettings

    identity = cuda_engine.analyze_faces([face_path])
    s = config_settings(name, GenerationSettings(prompt="a pencil drawing of a face", preset="tiny").replace(
        output__width=512, output__height=512), "tiny")
    cuda_engine.generate(s, identity)  # warm-up: cuBLAS's workspace and other one-time allocations
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    computed = pm.predict_request(cuda_engine, s, identity, allocate_only=False)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    allocated = pm.predict_request(cuda_engine, s, identity, allocate_only=True)
    transient = computed["peak"] - computed["resident"]
    assert allocated["peak"] == computed["peak"]
    assert transient <= measured <= 1.10 * transient + 64 * 2**20, (transient, measured)
