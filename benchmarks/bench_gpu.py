"""Speed and memory at full size: SDXL's architecture with random weights, against the FLOP floor
and against the authors' way, in one run.

Speed does not depend on weight values, so the full-size UNet, VAE, TAESD, text encoders, CLIP-H
and FaceID-Plus-v2 are built from their real configurations with random weights (``--arch full``,
``lcmla.tiny.ensure_random_weights``: written once per machine, about 9 GB, then loaded through the
engine's own loading path). The same script runs at the tiny architecture on the CPU
(``--arch tiny``, what CI runs) so it stays alive.

Per configuration (plain 4-step, DCG, AM2+DCG, the KV path, previews, and the authors' way of
AM2+DCG: three branches at every step with AM2's min–max pooled over them, SPEC §3) it prints:
UNet ms per step (every UNet call of the step, the KV-encoder pass included), end-to-end ms per
image (faces excluded: conditions + denoise + decode) with the full VAE and with TAESD, images/s
at each ``--batches`` size, and peak device memory (``torch.cuda.max_memory_allocated``) with one
image per request and at the largest batch. The configurations alternate round by round (each
round starting one further along), so a drift of the machine's speed falls on all alike. Then the
ratios, measured in this run on this device:

- to the FLOP floor: the FLOPs of our own graph (``torch.utils.flop_counter`` over one UNet
  forward, one VAE decode and one TAESD decode at the size) divided by the dense matmul rate this
  device reaches in this run (bf16/fp16 on CUDA, float32 on the CPU); the published figures at
  1024² (UNet 6.76 TFLOP per forward, VAE decode 10.5, TAESD 0.57) are printed beside ours;
- to the authors' way, for AM2+DCG: their pipeline's schedule (three branches at every step, AM2's
  min–max pooled over them) with their kernels in every targeted layer (``authors_way.py``:
  explicit softmax, a sort-based float32 quantile, full-tensor AdaINs, two host synchronisations
  per layer).

    python benchmarks/bench_gpu.py                       # CUDA: full size, 1024², float16
    python benchmarks/bench_gpu.py --arch tiny --size 128 --batches 1,2 --rounds 1   # CPU smoke run
    python benchmarks/bench_gpu.py --memory low          # the low-VRAM mode's figures (or balanced)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # authors_way

import torch  # noqa: E402

from lcmla import Engine, GenerationSettings  # noqa: E402
from lcmla.acceleration import COMPILE_MODES  # noqa: E402
from lcmla.memory import MEMORY_MODES  # noqa: E402
from lcmla.denoiser import UNetBatch, unet_forward  # noqa: E402
from lcmla.methods import method_changes  # noqa: E402

PUBLISHED_TFLOP_1024 = {"unet": 6.76, "vae_decode": 10.5, "taesd_decode": 0.57}
CONFIGS = ("plain", "dcg", "am2+dcg", "authors am2+dcg", "kv", "previews")


class AuthorsKernels:
    """While active, every identity layer computes its transformed branch the authors' way
    (``authors_way.authors_identity_attention``, through the processors' ``am_attention`` hook)."""

    def __init__(self, unet):
        from lcmla.attention.processors import IdentityAttnProcessor

        self.procs = [p for p in unet.attn_processors.values() if isinstance(p, IdentityAttnProcessor)]

    def __enter__(self):
        from authors_way import authors_identity_attention

        self.saved = [p.am_attention for p in self.procs]
        for p in self.procs:
            p.am_attention = authors_identity_attention
        return self

    def __exit__(self, *exc):
        for p, fn in zip(self.procs, self.saved):
            p.am_attention = fn


def config_settings(name: str, base: GenerationSettings, preset: str) -> GenerationSettings:
    """The request of a benchmark configuration."""
    method = {"plain": "baseline", "dcg": "dcg", "am2+dcg": "am2+dcg", "authors am2+dcg": "am2+dcg",
              "kv": "lookahead-kv", "previews": "baseline"}[name]
    s = base.replace_dotted(method_changes(method, preset))
    if name == "authors am2+dcg":  # the authors' pipeline: all three branches every step, pooled min–max
        s = s.replace(attention__am_norm_scope="image-branches")
    return s


class UNetTimer:
    """Wall time of every UNet forward (device-synchronised), via forward hooks."""

    def __init__(self, unet, device: torch.device):
        self.device, self.total, self.calls, self._t0 = device, 0.0, 0, 0.0
        # opaque to dynamo, so that no compiled region ever traces the timer
        self._handles = [unet.register_forward_pre_hook(torch.compiler.disable(self._pre)),
                         unet.register_forward_hook(torch.compiler.disable(self._post))]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.total += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self) -> None:
        self.total, self.calls = 0.0, 0

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Dense matmul FLOP/s that this device reaches now (n×n by n×n, 2n³ FLOPs each)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    # eager even when the engine is compiled: dynamo, meeting a compiled block under the counter's
    # dispatch mode, would mark its code skipped for good and the timed requests would run eagerly
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def graph_flops(engine: Engine, width: int, height: int) -> dict[str, int]:
    """FLOPs of one plain UNet forward (batch 1), one VAE decode and one TAESD decode at the size."""
    pipe, dev, dt = engine.pipe, engine.device, engine.dtype
    lh, lw = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    z = torch.randn(1, 4, lh, lw, device=dev, dtype=dt)
    s = GenerationSettings(prompt="a photo of a face").replace(output__width=width, output__height=height)
    text = engine._text_conditions(s.prompt)
    ident = engine._identity_conditions(None)
    row = UNetBatch(text["text"][0], text["text"][1], engine._time_ids(s), *ident["null"])
    t = pipe.scheduler.timesteps[0] if len(pipe.scheduler.timesteps) else torch.tensor(999)
    out = {"unet": count_flops(lambda: unet_forward(pipe.unet, z, t, row, None))}
    vae = pipe.vae
    out["vae_decode"] = count_flops(lambda: vae.decode(z.to(vae.dtype) / vae.config.scaling_factor))
    if engine.components.taesd is not None:
        taesd = engine.components.taesd
        out["taesd_decode"] = count_flops(lambda: taesd.decode(z.to(taesd.dtype)))
    return out


class ConfigRun:
    """One configuration's requests and figures. ``run_configs`` calls ``once`` round by round,
    alternating the configurations, so that a drift of the machine's speed during the run falls
    on all of them alike."""

    def __init__(self, engine: Engine, name: str, settings: GenerationSettings, identity, timer: UNetTimer):
        self.engine, self.name, self.settings, self.identity, self.timer = engine, name, settings, identity, timer
        self.unet_ms, self.e2e_ms, self.decode_ms, self.taesd_ms, self.branches = [], [], [], [], []
        self.per_batch: dict[int, list[float]] = {}
        self.peaks: dict[int, float] = {}  # images per request → peak device memory (GiB)
        self.first_ms = float("nan")
        self.steps = 0

    def _kernels(self):
        return AuthorsKernels(self.engine.pipe.unet) if self.name == "authors am2+dcg" else contextlib.nullcontext()

    def _sync(self) -> None:
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)

    def _peak(self, images: int) -> None:
        dev = self.engine.device
        if dev.type == "cuda":
            self.peaks[images] = max(self.peaks.get(images, 0.0), torch.cuda.max_memory_allocated(dev) / 2**30)
            torch.cuda.reset_peak_memory_stats(dev)

    def once(self, record: bool) -> None:
        """One single-image request (the first one, ``record`` False, is the warm-up)."""
        engine, final = self.engine, {}
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(engine.device)
        self.timer.reset()
        t0 = time.perf_counter()
        with self._kernels():
            if self.name == "previews":
                res = engine.previews(self.settings, self.identity)
            else:
                res = engine.generate(self.settings, self.identity,
                                      callback=lambda info: final.__setitem__("latents", info.latents))
        wall = (time.perf_counter() - t0 - res.timings.get("faces", 0.0)) * 1000
        self._peak(1)
        self.steps = res.settings.guidance.steps
        if not record:
            self.first_ms = wall  # compiles, when compiled
            return
        if self.name != "previews":
            self.branches.append(sum(len(b) for b in res.branch_calls) / max(1, len(res.branch_calls)))
        self.unet_ms.append(self.timer.total / self.steps * 1000)
        self.e2e_ms.append(wall)
        self.decode_ms.append(res.timings["decode"] * 1000)
        if self.name != "previews" and engine.components.taesd is not None and "latents" in final:
            self._sync()
            t1 = time.perf_counter()
            engine._decode_tiny(final["latents"])
            self._sync()
            self.taesd_ms.append((time.perf_counter() - t1) * 1000)

    def batch_once(self, images: int, record: bool) -> None:
        """One request of ``images`` images (images/s)."""
        if self.name == "previews":
            return
        many = self.settings.replace(output__num_images=images)
        t0 = time.perf_counter()
        with self._kernels():
            res = self.engine.generate(many, self.identity)
        self._peak(images)
        if record:
            self.per_batch.setdefault(images, []).append(
                images / (time.perf_counter() - t0 - res.timings.get("faces", 0.0)))

    def summary(self) -> dict[str, float]:
        med = statistics.median
        out = {"unet_ms_per_step": med(self.unet_ms), "e2e_ms_vae": med(self.e2e_ms), "steps": self.steps,
               "first_ms": self.first_ms, "branches_per_step": med(self.branches) if self.branches else float("nan")}
        if self.taesd_ms:
            out["e2e_ms_taesd"] = med(self.e2e_ms) - med(self.decode_ms) + med(self.taesd_ms)
        for n, v in self.per_batch.items():
            out[f"images_per_s_x{n}"] = med(v)
        if self.peaks:
            out["peak_gib"] = self.peaks.get(1, float("nan"))  # one image per request
            out["peak_gib_max"] = max(self.peaks.values())  # the largest batch
        return out


def run_configs(runs: list[ConfigRun], rounds: int, batches: list[int]) -> dict[str, dict[str, float]]:
    """Every configuration's warm-up, then ``rounds`` rounds that alternate the configurations
    (each round starting one further along), then the same per batch size."""

    def rotated(r: int) -> list[ConfigRun]:
        k = r % len(runs)
        return runs[k:] + runs[:k]

    for run in runs:
        run.once(record=False)
    for r in range(rounds):
        for run in rotated(r):
            run.once(record=True)
    for n in batches:
        for run in runs:
            run.batch_once(n, record=False)  # warm-up at this batch size
        for r in range(rounds):
            for run in rotated(r):
                run.batch_once(n, record=True)
    return {run.name: run.summary() for run in runs}


def run_mode(args, mode: str, size: int, batches: list[int], configs: list[str]) -> dict:
    """Load the engine with compile ``mode``, run the configurations, print their table."""
    t0 = time.perf_counter()
    engine = Engine.load(args.preset, device=args.device, dtype=args.dtype, memory=args.memory,
                         random_weights=args.arch, compile=mode, channels_last=args.channels_last)
    load_s = time.perf_counter() - t0
    dev = engine.device
    identity = engine.analyze_faces([args.face])
    base = GenerationSettings(prompt="a pencil drawing of a face", preset=args.preset).replace(
        output__width=size, output__height=size)
    rate = matmul_rate(dev, engine.dtype, args.matmul_n)
    flops = graph_flops(engine, size, size)
    timer = UNetTimer(engine.pipe.unet, dev)
    graphs_before = _graphs_compiled()
    try:
        runs = [ConfigRun(engine, name, config_settings(name, base, args.preset), identity, timer) for name in configs]
        results = run_configs(runs, args.rounds, batches)
    finally:
        timer.close()
    graphs = _graphs_compiled() - graphs_before  # graphs this mode's engine added (none when eager)

    env = (f"torch {torch.__version__}, device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, "
           f"dtype {engine.dtype}, memory mode {engine.memory_mode}, compile {mode}"
           f"{' (' + ', '.join(engine.compiled) + ')' if engine.compiled else ''}, "
           f"channels_last {engine.channels_last}")
    print(f"{engine.preset.title}: {size}×{size}, {args.rounds} rounds; {env}; load {load_s:.1f} s")
    print(f"dense matmul rate: {rate / 1e12:.2f} TFLOP/s ({args.matmul_n}³, {engine.dtype})")
    scale = (size / 1024) ** 2
    for key, value in flops.items():
        print(f"FLOPs of one {key:12s}: {value / 1e12:8.3f} TFLOP  (published at 1024²: "
              f"{PUBLISHED_TFLOP_1024[key]:.2f}, × (size/1024)² = {PUBLISHED_TFLOP_1024[key] * scale:.3f})")
    head = f"{'config':16s} {'br/step':>7s} {'first s':>7s} {'UNet ms/step':>12s} {'UNet ms/img':>11s} {'×floor':>7s} {'e2e ms VAE':>10s} " \
           f"{'e2e ms TAESD':>12s} {'×floor':>7s} " + " ".join(f"{'img/s x' + str(n):>9s}" for n in batches) + \
           f" {'peak GiB':>8s} {'peak max':>8s}"
    print(head)
    for name, r in results.items():
        br = r["branches_per_step"] if name != "previews" else 1.0
        unet_floor = br * flops["unet"] / rate * 1000
        taesd_floor = unet_floor * r["steps"] + flops.get("taesd_decode", 0) / rate * 1000
        row = (f"{name:16s} {br:7.2f} {r['first_ms'] / 1000:7.1f} {r['unet_ms_per_step']:12.1f} {r['unet_ms_per_step'] * r['steps']:11.1f} "
               f"{r['unet_ms_per_step'] / unet_floor:7.2f} "
               f"{r['e2e_ms_vae']:10.1f} {r.get('e2e_ms_taesd', float('nan')):12.1f} "
               f"{r.get('e2e_ms_taesd', float('nan')) / taesd_floor:7.2f} "
               + " ".join(f"{r.get(f'images_per_s_x{n}', float('nan')):9.2f}" for n in batches)
               + f" {r.get('peak_gib', float('nan')):8.2f} {r.get('peak_gib_max', float('nan')):8.2f}")
        print(row)
    print("peak GiB: one image per request; peak max: the largest --batches size")
    if engine.compiled:
        print(f"dynamo graphs compiled by this engine's requests: {graphs} (the warm-up the 'first s' column pays)")
    if "am2+dcg" in results and "authors am2+dcg" in results:
        ours, theirs = results["am2+dcg"], results["authors am2+dcg"]
        print(f"authors' way / ours for AM2+DCG: UNet {theirs['unet_ms_per_step'] / ours['unet_ms_per_step']:.2f}×, "
              f"end to end (VAE) {theirs['e2e_ms_vae'] / ours['e2e_ms_vae']:.2f}× (goal ≥ 1.5 on a GPU)")
    print("goals (full size, 1024², 4 steps, H100): plain ≤ 60 ms UNet/image, AM2+DCG ≤ 180 ms; end to end with TAESD "
          "≤ 1.6× the floor; peak ≤ 10 GB for AM2+DCG in fp16; low-VRAM mode ≤ 8 GB")
    del engine, timer
    return {"env": env, "matmul_flops_per_s": rate, "flops": flops, "results": results, "graphs_compiled": graphs}


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    import torch._dynamo.utils

    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("full", "tiny"), default="full" if cuda else "tiny")
    ap.add_argument("--preset", default="hyper-sdxl-4step", help="scheduler, steps and guidance of this preset")
    ap.add_argument("--size", type=int, default=None, help="square output size (default: 1024 full, 256 tiny)")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", default="float16" if cuda else "float32",
                    help="default: the engine's (float16 on CUDA, its VAE decoding in float32; float32 on the CPU)")
    ap.add_argument("--memory", choices=MEMORY_MODES, default="full")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,4,8" if cuda else "1,2", help="images per request for images/s")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--matmul-n", type=int, default=8192 if cuda else 1024)
    ap.add_argument("--compile", default="none",
                    help="comma-separated compile modes, each a run with its own engine (none, am, unet; "
                         "lcmla.acceleration); the ratios to the first are printed")
    ap.add_argument("--channels-last", dest="channels_last", default=None, action=argparse.BooleanOptionalAction,
                    help="convolutions in NHWC (default: on CUDA only)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--face", default=str(ROOT / "assets" / "face.png"))
    args = ap.parse_args(argv)
    size = args.size or (1024 if args.arch == "full" else 256)
    batches = [int(b) for b in args.batches.split(",") if b]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    compile_modes = [m.strip() for m in args.compile.split(",") if m.strip()]
    if not compile_modes or set(compile_modes) - set(COMPILE_MODES):
        ap.error(f"--compile takes modes from {', '.join(COMPILE_MODES)}")

    if not cuda:  # said first: the run takes minutes before its first row
        print(f"no CUDA GPU here: the {args.arch} architecture at {size}² on the CPU ({args.dtype}), "
              f"{len(configs)} configurations × {args.rounds} rounds; pass --arch/--size/--rounds/--configs to "
              "change that", flush=True)
    runs = {}
    for mode in compile_modes:
        runs[mode] = run_mode(args, mode, size, batches, configs)
        if len(compile_modes) > 1:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if len(runs) > 1:
        eager = compile_modes[0]
        print(f"compiled vs {eager}: UNet ms/step ratio (< 1 is faster), first request (compile warm-up) in s")
        for mode in compile_modes[1:]:
            for name in configs:
                ours, base = runs[mode]["results"][name], runs[eager]["results"][name]
                print(f"  {mode:5s} {name:16s} UNet {ours['unet_ms_per_step'] / base['unet_ms_per_step']:5.2f}×  "
                      f"end to end {ours['e2e_ms_vae'] / base['e2e_ms_vae']:5.2f}×  "
                      f"first request {ours['first_ms'] / 1000:7.1f} s (vs {base['first_ms'] / 1000:.1f} s)")
    if args.json:
        first = runs[compile_modes[0]]
        Path(args.json).write_text(json.dumps({**first, "size": size, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    from lcmla.loading import quiet_console

    quiet_console()
    raise SystemExit(main())
