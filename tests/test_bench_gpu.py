"""The GPU benchmark stays alive on the CPU, and its FLOP floor is SDXL's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_full_size_flops_are_the_published_ones():
    """torch's FLOP counter over SDXL's full-size UNet, VAE decoder and TAESD decoder at 1024²
    (built on the meta device: no memory, no weights) gives the published 6.76, 10.5 and 0.57
    TFLOP: the floor bench_gpu divides by the measured matmul rate is the real one."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from lcmla.tiny import architecture

    a = architecture("full")

    def tflop(fn) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops() / 1e12

    with torch.device("meta"):
        z = torch.randn(1, 4, 128, 128)
        unet = UNet2DConditionModel(**a.unet)
        cond = {"encoder_hidden_states": torch.randn(1, 77, 2048),
                "added_cond_kwargs": {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}}
        assert tflop(lambda: unet(z, torch.tensor(999), **cond)) == pytest.approx(6.76, rel=0.01)
        assert tflop(lambda: AutoencoderKL(**a.vae).decode(z)) == pytest.approx(10.5, rel=0.01)
        assert tflop(lambda: AutoencoderTiny(**a.taesd).decode(z)) == pytest.approx(0.57, rel=0.01)


def test_counting_flops_leaves_a_compiled_module_compiled():
    """bench_gpu counts FLOPs on the engine it then times: a compiled block first met under the
    FLOP counter must still compile at its next call (dynamo would otherwise skip its code for good,
    and --compile unet would time the eager UNet)."""
    import torch._dynamo.utils as dyn

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_gpu import count_flops

    class Block(torch.nn.Module):  # a module of our own: dynamo does not trace torch.nn's containers at top level
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.nn.functional.silu(self.linear(x))

    torch._dynamo.reset()
    dyn.counters.clear()
    block, x = Block(), torch.randn(2, 8)
    block.compile(backend="eager")
    assert count_flops(lambda: block(x)) == 2 * 2 * 8 * 8
    with torch.no_grad():
        block(x)
    assert dyn.counters["stats"]["unique_graphs"] == 1, "the block was not compiled after the FLOP count"


def test_bench_gpu_runs_on_the_cpu_at_tiny_size(tiny_cache, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "figures.json"
    code = bench_gpu.main(["--arch", "tiny", "--size", "64", "--rounds", "1", "--batches", "1,2", "--matmul-n", "128",
                           "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    for name in bench_gpu.CONFIGS:
        assert f"\n{name} " in text
    assert "authors' way / ours for AM2+DCG" in text and "RANDOM WEIGHTS" in text
    figures = json.loads(out.read_text())
    results = figures["results"]
    assert set(results) == set(bench_gpu.CONFIGS) and figures["flops"]["unet"] > 0
    assert figures["graphs_compiled"] == 0  # the eager engine compiles nothing
    # the authors' way runs three branches at every step; ours two at the a = b = 1 steps (φ > 0)
    assert results["authors am2+dcg"]["branches_per_step"] == 3
    assert results["am2+dcg"]["branches_per_step"] < 3
    assert results["kv"]["branches_per_step"] == 4
    for r in results.values():
        assert r["unet_ms_per_step"] > 0 and r["e2e_ms_vae"] > 0
    assert results["plain"]["images_per_s_x2"] > 0


def test_the_authors_kernels_compute_our_am2():
    """bench_gpu's "authors' way" runs their operations (authors_way.py), not different
    mathematics: on one image's three branches it equals our AM2 + output AdaIN with the min–max
    pooled over the branches, to the float16 rounding of their quantile."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from authors_way import authors_identity_attention
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from lcmla.attention.transforms import identity_attention, quantile_positions

    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 4, 256, 16, generator=g), torch.randn(3, 4, 4, 16, generator=g), torch.randn(3, 4, 4, 16, generator=g)
    am = dict(mode="am2", chosen=(True,) * 4, sharpness=7.5, quantile=0.65, am2_scale=1.55, adain=True,
              adain_weight=0.7, cap=10.0, group=3, quantile_at=quantile_positions(256, 0.65))
    ours = identity_attention(q, k, v, 0.25, **am)
    theirs = authors_identity_attention(q, k, v, 0.25, **am)
    assert torch.allclose(theirs, ours, atol=5e-3)
    assert not torch.allclose(theirs, identity_attention(q, k, v, 0.25, **{**am, "group": 1}), atol=5e-3)
    with pytest.raises(ValueError, match="AM2 on every identity token"):
        authors_identity_attention(q, k, v, 0.25, **{**am, "chosen": (True, False, True, True)})
