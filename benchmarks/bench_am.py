"""FastFace's transformed identity branch at SDXL's full-size shapes: eager, compiled, and the fused
SDPA it replaces, side by side in one run.

At 1024² the identity cross-attention that AM targets (down and up blocks, the default) runs in
10 layers at the 64² level (10 heads, 4096 queries) and 50 at the 32² level (20 heads, 1024
queries), head_dim 64, over FaceID-Plus-v2's 4 identity tokens, with every guidance branch of the
step in the batch. Per configuration it prints ms per layer at each level, ms per step over the
60 targeted layers, and the ratios: eager / SDPA, compiled / SDPA, eager / compiled, and for AM2
the authors' kernels (``authors_way.py``, min–max pooled over the batch as theirs) / ours. The
compiled branch is ``lcmla.acceleration.compiled_identity_attention`` (what ``--compile am``
installs), called with the arguments the processors resolve.

    python benchmarks/bench_am.py                  # CUDA (bf16) when present, else the CPU (float32)
    python benchmarks/bench_am.py --branches 3 --device cpu --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # authors_way

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from authors_way import authors_identity_attention  # noqa: E402
from lcmla import GenerationSettings  # noqa: E402
from lcmla.acceleration import compiled_identity_attention  # noqa: E402
from lcmla.attention.context import AMPlan, AttentionContext  # noqa: E402
from lcmla.attention.processors import IdentityAttnProcessor  # noqa: E402
from lcmla.attention.transforms import identity_attention  # noqa: E402
from lcmla.methods import method_changes  # noqa: E402

#: (name, layers targeted at 1024² with targets down + up, heads, queries)
LEVELS = (("64²", 10, 10, 4096), ("32²", 50, 20, 1024))
TOKENS, HEAD_DIM = 4, 64


def am_arguments(mode: str, queries: int, step: int = 1) -> dict:
    """What the processors pass at this step for the FastFace preset of ``mode`` (am1+dcg or
    am2+dcg on hyper-sdxl-4step): its settings resolved by ``IdentityAttnProcessor.am_arguments``."""
    preset = "hyper-sdxl-4step"
    settings = GenerationSettings(prompt="a face", preset=preset).replace_dotted(method_changes(f"{mode}+dcg", preset))
    plan = AMPlan.from_settings(settings.attention, 4)
    layer = IdentityAttnProcessor("down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor",
                                  nn.ModuleList(), nn.ModuleList())
    return layer.am_arguments(AttentionContext(ip_scale=1.0, am=plan, step=step), queries=queries, tokens=TOKENS)


def timed_together(fns: dict, device: torch.device, repeats: int) -> dict:
    """Median ms of each ``fns[name]()`` over ``repeats`` rounds, the variants interleaved within each
    round (in an order that rotates from round to round) so that a slow spell of a shared machine
    weighs on all of them alike and the ratios stay fair; device-synchronised."""
    names = list(fns)
    times: dict = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    ap.add_argument("--branches", type=int, default=3, help="samples in the UNet batch (DCG: 2 or 3 per image)")
    ap.add_argument("--modes", default="am2,am1")
    ap.add_argument("--repeats", type=int, default=20 if cuda else 5)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    print(f"identity branch at SDXL 1024² shapes; batch {args.branches}, {TOKENS} tokens, head_dim {HEAD_DIM}; "
          f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {dtype}")
    print(f"{'mode':5s} {'level':5s} {'layers':>6s} {'SDPA ms':>8s} {'eager ms':>9s} {'compiled ms':>11s} "
          f"{'authors ms':>10s} {'first call s':>12s} {'max |diff|':>10s}")
    with torch.no_grad():
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            per_step = {"sdpa": 0.0, "eager": 0.0, "compiled": 0.0, "authors": 0.0}
            for level, layers, heads, queries in LEVELS:
                shape = (args.branches, heads, queries, HEAD_DIM)
                q = torch.randn(shape, generator=g).to(device, dtype)
                k = torch.randn(args.branches, heads, TOKENS, HEAD_DIM, generator=g).to(device, dtype)
                v = torch.randn(args.branches, heads, TOKENS, HEAD_DIM, generator=g).to(device, dtype)
                am = am_arguments(mode, queries)
                scale = HEAD_DIM ** -0.5
                t0 = time.perf_counter()
                got = compiled_identity_attention(q, k, v, scale, **am)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                first = time.perf_counter() - t0
                diff = (got.float() - identity_attention(q, k, v, scale, **am).float()).abs().max().item()
                fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                       "eager": lambda: identity_attention(q, k, v, scale, **am),
                       "compiled": lambda: compiled_identity_attention(q, k, v, scale, **am)}
                if mode == "am2":  # theirs pools the min–max over the batch: ours with group = batch
                    pooled = {**am, "group": args.branches}
                    fns["authors"] = lambda: authors_identity_attention(q, k, v, scale, **pooled)
                for fn in fns.values():  # one warm-up call each (the compiled one has had its first)
                    fn()
                ms = {"authors": float("nan"), **timed_together(fns, device, args.repeats)}
                for key in per_step:
                    per_step[key] += layers * ms[key]
                print(f"{mode:5s} {level:5s} {layers:6d} {ms['sdpa']:8.3f} {ms['eager']:9.3f} {ms['compiled']:11.3f} "
                      f"{ms['authors']:10.3f} {first:12.1f} {diff:10.2e}")
            sd, ea, co = per_step["sdpa"], per_step["eager"], per_step["compiled"]
            print(f"{mode:5s} per step over {sum(lv[1] for lv in LEVELS)} layers: SDPA {sd:.1f} ms, eager {ea:.1f} ms, "
                  f"compiled {co:.1f} ms; eager/SDPA {ea / sd:.2f}×, compiled/SDPA {co / sd:.2f}×, "
                  f"eager/compiled {ea / co:.2f}×"
                  + (f"; authors' kernels {per_step['authors']:.1f} ms, authors'/ours {per_step['authors'] / min(ea, co):.2f}×"
                     if mode == "am2" else ""))
    return 0


if __name__ == "__main__":
    from lcmla.loading import quiet_console

    quiet_console()
    raise SystemExit(main())
