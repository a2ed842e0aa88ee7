"""LCM-Lookahead KV path: time per image and peak memory vs the baseline, measured side by side.

Time: interleaved generations in one process (baseline, KV path with 4 branches + the encoder
pass, and the preview strip). Memory: peak resident set size (RSS) of two fresh child processes
that load the same preset and generate once, one plain and one on the KV path; the KV path reuses
the denoiser's UNet, so the goal is a memory ratio ≤ 1.2 (no second UNet).

    python benchmarks/bench_lookahead.py [--rounds 10] [--preset tiny] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lcmla import Engine, GenerationSettings  # noqa: E402

FACE = str(ROOT / "assets" / "face.png")


def _child(preset: str, kv: bool, device: str | None) -> None:
    """Child process: load, generate once, print peak RSS in MiB as JSON."""
    engine = Engine.load(preset, device=device)
    engine.generate(GenerationSettings(prompt="a pencil drawing of a face", preset=preset).replace(lookahead__kv=kv), [FACE])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    gpu = 0.0
    if engine.device.type == "cuda":
        import torch

        gpu = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({"rss_mib": peak, "gpu_mib": gpu}))


def _peak(preset: str, kv: bool, device: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", "--preset", preset] + (["--kv"] if kv else []) + (["--device", device] if device else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kv", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args.preset, args.kv, args.device)

    engine = Engine.load(args.preset, device=args.device)
    identity_sources = [FACE]
    base = GenerationSettings(prompt="a pencil drawing of a face", preset=args.preset)
    cases = {
        "baseline": lambda: engine.generate(base, identity_sources),
        "kv path": lambda: engine.generate(base.replace(lookahead__kv=True), identity_sources),
        "previews": lambda: engine.previews(base, identity_sources),
    }
    times = {k: [] for k in cases}
    names = list(cases)
    for r in range(args.rounds + 1):
        for name in names[r % 3:] + names[: r % 3]:
            t0 = time.perf_counter()
            cases[name]()
            if r:  # round 0 is warm-up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"preset={engine.preset.name} device={engine.device} rounds={args.rounds}")
    for k, v in med.items():
        print(f"  {k:9s} {v * 1000:8.1f} ms/image   ratio to baseline {v / med['baseline']:.2f}")
    plain, kv = _peak(args.preset, False, args.device), _peak(args.preset, True, args.device)
    print(f"  peak RSS baseline {plain['rss_mib']:.0f} MiB, KV path {kv['rss_mib']:.0f} MiB, "
          f"ratio {kv['rss_mib'] / plain['rss_mib']:.3f} (goal <= 1.2)")
    if plain["gpu_mib"]:
        print(f"  peak GPU memory baseline {plain['gpu_mib']:.0f} MiB, KV path {kv['gpu_mib']:.0f} MiB, "
              f"ratio {kv['gpu_mib'] / plain['gpu_mib']:.3f}")


if __name__ == "__main__":
    from lcmla.loading import quiet_console

    quiet_console()
    main()
