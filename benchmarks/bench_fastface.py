"""FastFace per-step cost: baseline vs AM1, AM2, DCG and DCG at a = b = 1, interleaved in one run.

Per-step time is the engine's measured denoising time divided by the step count (face analysis,
text/CLIP encoding and VAE decode are excluded). Prints medians and ratios to the baseline.
Goals: AM1/AM2 ≤ 1.15. DCG at a = b = 1 runs the two conditional branches when φ > 0 (the rescale
of Eq. 6 reads σ(ε_i) at every step, SPEC §2), so its goal is ≤ 2.1 with φ = 0.75; with φ = 0 it
runs one branch, goal ≤ 1.05. "authors am2+dcg" is the authors-exact scope (three branches every
step, AM2 min–max pooled over them).

    python benchmarks/bench_fastface.py [--rounds 15] [--preset tiny] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lcmla import Engine, GenerationSettings  # noqa: E402
from lcmla.fastface import apply_fastface_preset  # noqa: E402


def variants(base: GenerationSettings) -> dict[str, GenerationSettings]:
    return {
        "baseline": apply_fastface_preset(base, "baseline"),
        "am1": apply_fastface_preset(base, "am1"),
        "am2": apply_fastface_preset(base, "am2"),
        "dcg": apply_fastface_preset(base, "dcg"),
        "dcg a=b=1": apply_fastface_preset(base, "dcg").replace_dotted(
            {"guidance.dcg_schedule": "constant", "guidance.dcg_a": [1.0], "guidance.dcg_b": [1.0]}),
        "dcg a=b=1 φ=0": apply_fastface_preset(base, "dcg").replace_dotted(
            {"guidance.dcg_schedule": "constant", "guidance.dcg_a": [1.0], "guidance.dcg_b": [1.0],
             "guidance.rescale_phi": 0.0}),
        "am2+dcg": apply_fastface_preset(base, "am2+dcg"),
        "authors am2+dcg": apply_fastface_preset(base, "am2+dcg").replace(attention__am_norm_scope="image-branches"),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--face", default=str(ROOT / "assets" / "face.png"))
    args = ap.parse_args(argv)

    engine = Engine.load(args.preset, device=args.device)
    identity = engine.analyze_faces([args.face])
    cases = variants(GenerationSettings(prompt="a pencil drawing of a face", preset=args.preset))
    per_step: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no case always runs first
        for name in order:
            s = cases[name]
            res = engine.generate(s, identity)
            if r >= args.warmup:
                per_step[name].append(res.timings["denoise"] / res.settings.guidance.steps)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    best = {k: min(v) for k, v in per_step.items()}
    p = engine.preset
    print(f"preset={p.name} device={engine.device} steps={p.steps} size={p.width}x{p.height} rounds={args.rounds}")
    for k, v in med.items():
        print(f"  {k:16s} median {v * 1000:7.1f} ms/step  ratio {v / med['baseline']:.3f}   "
              f"min {best[k] * 1000:7.1f} ms/step  ratio {best[k] / best['baseline']:.3f}")
    print("goals: am1, am2 <= 1.15; dcg a=b=1 <= 2.1 (two branches, φ > 0); dcg a=b=1 φ=0 <= 1.05 (one branch); "
          "dcg runs 3 branches on its middle steps")


if __name__ == "__main__":
    from lcmla.loading import quiet_console

    quiet_console()
    main()
