"""Training step cost: ms/step and peak memory of diffusion-only, + lookahead, + KV (the full recipe),
measured side by side in one run with the trainer's own objective, trainables and optimizer.

    python benchmarks/bench_train.py [--preset tiny] [--resolution 64] [--batch-sizes 1,2]
                                     [--checkpointing off,on] [--rounds 5] [--device cpu|cuda]
                                     [--mixed-precision no|bf16|fp16] [--random-weights tiny|full]
    python benchmarks/bench_train.py --full [--rounds 3]     # on a GPU

``--full``: SDXL's real architecture with RANDOM weights (``--preset sdxl-base --random-weights
full``, built once per machine by ``lcmla.tiny``, ~9 GB) at 1024², bf16, batch 1/2/4, gradient
checkpointing off and on, on CUDA: the memory question of the authors' recipe (batch 4 per GPU in
80 GB; what fits in 24 GB). Random weights change no shape and no FLOP, so time and memory are
those of the real model; no face is found on their previews, so the identity loss is 0, but its
graph (TAESD decode, alignment, recognizer) runs forward and backward as with real weights.

Timing: every configuration runs ``--rounds`` times, interleaved (round-robin, the order rotated
each round) so drift hits all alike, after one warm-up step each; one step = forward, backward and
the AdamW update of the trainable parts (projection, identity K/V, KV-encoder LoRA). Ratios are to
diffusion-only at the same batch and checkpointing. A configuration that runs out of memory is
reported as OOM and left out of the rounds.

Memory:
- CUDA: ``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` during that configuration's
  warm-up step (peaks reset before it; weights, optimizer state and activations included). "fits"
  compares the reserved peak plus ~0.6 GiB of CUDA context with a 24 GB card (23.4 GiB usable) and
  an 80 GB one: an estimate from a larger card, where the caching allocator is never under pressure.
- CPU: a fresh child process per configuration loads the model, builds the batch, then resets its
  peak resident set (Linux: ``/proc/self/clear_refs``) and runs two steps; reported are the RSS
  with everything loaded and the peak RSS during the steps (``VmHWM``): the step's own cost is
  their difference. (tracemalloc and torch's CPU allocator statistics miss most of torch's
  allocations.) ``--no-memory`` skips the children.
The identity loss uses dlib's recognizer (offline) with landmarks found on each preview, as the
trainer does.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FACE = ROOT / "assets" / "face.png"
CONFIGS = {  # name → (lookahead weight λ, KV path)
    "diffusion-only": (0.0, False),
    "+lookahead": (1e-3, False),
    "+lookahead +KV": (1e-3, True),
}
FULL = {"preset": "sdxl-base", "random_weights": "full", "resolution": 1024, "mixed_precision": "bf16",
        "batch_sizes": "1,2,4", "checkpointing": "off,on"}
CONTEXT_GIB = 0.6  # CUDA context and library workspaces outside the caching allocator
CARDS_GIB = {"24 GB": 24e9 / 2**30, "80 GB": 80e9 / 2**30}


class Kit:
    """Everything one process needs to time steps: the trainer's model, objectives and optimizer."""

    def __init__(self, preset: str, device: str | None, mixed_precision: str, random_weights: str | None):
        import torch

        from lcmla.attention.processors import install_processors
        from lcmla.faces import FaceAnalyzer
        from PIL import Image
        from training.data import PairSample
        from training.model import setup_trainables
        from training.objective import Objective, ObjectiveConfig
        from training.passes import PassSwitcher
        from training.train import _identity_loss, _lcm_boundary, _load, build_parser

        self.dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
        argv = ["--preset", preset, "--data", ".", "--output-dir", tempfile.gettempdir(), "--max-train-steps", "1",
                "--id-network", "dlib"]
        args = build_parser().parse_args(argv + (["--random-weights", random_weights] if random_weights else []))
        self.preset, self.comps = _load(args, str(self.dev), self.dtype)
        pipe = self.comps.pipe
        install_processors(pipe.unet)
        pipe.unet.encoder_hid_proj.image_projection_layers[0].shortcut = True
        torch.manual_seed(0)
        self.trainables = setup_trainables(pipe, ("proj", "ip-kv", "kv-lora"))  # float32, as the trainer's
        self.switcher = PassSwitcher(pipe, trainable=self.trainables.params())
        pipe.unet.train()
        self.id_loss, _ = _identity_loss(args, self.preset, self.dev)
        boundary = _lcm_boundary(pipe)
        self.objectives = {name: Objective(pipe, self.comps.image_encoder, self.comps.taesd, self.switcher,
                                           ObjectiveConfig(lambda_lookahead=lam, kv=kv), self.id_loss,
                                           lcm_boundary=boundary)
                           for name, (lam, kv) in CONFIGS.items()}
        self.optimizer = torch.optim.AdamW(self.trainables.groups(1e-5, 5e-6), weight_decay=0.01)
        photo = Image.open(FACE).convert("RGB")
        face = FaceAnalyzer.haar().identity([photo])
        self.sample = PairSample(photo, face.boxes[0], face.crops[0], face.embedding, photo, "a pencil drawing of a face")

    def checkpointing(self, on: bool) -> None:
        unet = self.comps.pipe.unet
        if on:
            unet.enable_gradient_checkpointing(gradient_checkpointing_func=self.switcher.checkpoint_function())
        else:
            unet.disable_gradient_checkpointing()

    def batch(self, resolution: int, n: int):
        from training.data import Collate

        batch = Collate(resolution, self.comps.clip_processor, device=self.dev)([self.sample] * n)
        batch.reference_id, batch.reference_found = self.id_loss.reference(batch.reference)
        return batch

    def step(self, name: str, batch, generator) -> float:
        """One optimizer step of configuration ``name``; seconds (synchronised on CUDA)."""
        import torch

        start = time.perf_counter()
        try:
            with torch.autocast(self.dev.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                loss, _ = self.objectives[name](batch, generator)
            loss.backward()
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _child(args) -> None:
    """One configuration in a fresh process: load, build the batch, reset the peak, two steps; prints
    {"loaded_mib", "peak_mib", "how"} as JSON."""
    import torch

    kit = Kit(args.preset, args.device, args.mixed_precision, args.random_weights)
    kit.checkpointing(args.child_ckpt)
    batch = kit.batch(args.resolution, args.child_batch)
    gen = torch.Generator().manual_seed(0)
    loaded = _status_kib("VmRSS")
    if _reset_peak_rss():
        how = "VmHWM after a reset"
    else:  # no /proc: the lifetime peak (loading included)
        how, loaded = "ru_maxrss (lifetime, loading included)", None
    for _ in range(2):
        kit.step(args.child_config, batch, gen)
    peak = _status_kib("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"loaded_mib": None if loaded is None else loaded / 1024, "peak_mib": peak / 1024, "how": how}))


def _rss_child(args, config: str, batch: int, ckpt: bool) -> dict:
    cmd = [sys.executable, __file__, "--child-config", config, "--child-batch", str(batch), "--preset", args.preset,
           "--resolution", str(args.resolution), "--mixed-precision", args.mixed_precision]
    cmd += ["--child-ckpt"] if ckpt else []
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--random-weights", args.random_weights] if args.random_weights else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)


def _fits(reserved_gib: float | None) -> str:
    if reserved_gib is None:
        return "-"
    return ", ".join(card for card, cap in CARDS_GIB.items() if reserved_gib + CONTEXT_GIB <= cap) or "neither"


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true",
                    help="SDXL's full architecture, random weights, 1024², bf16, batch 1/2/4, checkpointing off/on "
                         "(needs a GPU; the other flags override)")
    ap.add_argument("--preset", default=None, help="default tiny (--full: sdxl-base)")
    ap.add_argument("--random-weights", default=None, choices=("tiny", "full"),
                    help="the preset's recipe on a random-weights build (--full: full)")
    ap.add_argument("--resolution", type=int, default=None, help="default 64 (--full: 1024)")
    ap.add_argument("--batch-sizes", default=None, help="default 1,2 (--full: 1,2,4)")
    ap.add_argument("--checkpointing", default=None, help="default off,on")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--mixed-precision", default=None, choices=("no", "bf16", "fp16"), help="default no (--full: bf16)")
    ap.add_argument("--no-memory", action="store_true", help="skip the CPU memory children")
    ap.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child-ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    defaults = FULL if args.full else {"preset": "tiny", "random_weights": None, "resolution": 64,
                                       "mixed_precision": "no", "batch_sizes": "1,2", "checkpointing": "off,on"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.child_config:
        return _child(args)

    import torch

    if args.full and (args.device or "cuda") == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train --full needs a CUDA GPU (SDXL at 1024² on a CPU takes minutes a step); "
                 "pass --device cpu to run it anyway")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ckpts = [c.strip() == "on" for c in args.checkpointing.split(",")]
    kit = Kit(args.preset, args.device, args.mixed_precision, args.random_weights)
    dev = kit.dev
    rows = []
    for ckpt in ckpts:
        kit.checkpointing(ckpt)
        for b in batches:
            gen = torch.Generator().manual_seed(0)
            times: dict[str, list[float]] = {name: [] for name in kit.objectives}
            mem: dict[str, tuple[float | None, float | None]] = {}
            oom: set[str] = set()
            batch = kit.batch(args.resolution, b)
            for name in kit.objectives:  # warm-up, and the CUDA peaks of each configuration
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    kit.step(name, batch, gen)
                except torch.cuda.OutOfMemoryError:
                    oom.add(name)
                    torch.cuda.empty_cache()
                    continue
                if dev.type == "cuda":
                    mem[name] = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30)
            for r in range(args.rounds):
                names = [n for n in kit.objectives if n not in oom]
                names = names[r % max(1, len(names)):] + names[:r % max(1, len(names))]  # rotate the order
                for name in names:
                    times[name].append(kit.step(name, batch, gen))
            base = statistics.median(times["diffusion-only"]) if times["diffusion-only"] else None
            for name in kit.objectives:
                if name in oom:
                    rows.append((name, b, ckpt, None, None, "OOM", "OOM", "neither"))
                    continue
                med = statistics.median(times[name]) if times[name] else None
                ratio = None if (med is None or base is None) else med / base
                if dev.type == "cuda":
                    alloc, reserved = mem[name]
                    rows.append((name, b, ckpt, med, ratio, f"{alloc:.1f}", f"{reserved:.1f}", _fits(reserved)))
                elif args.no_memory:
                    rows.append((name, b, ckpt, med, ratio, "-", "-", None))
                else:
                    m = _rss_child(args, name, b, ckpt)
                    loaded = "-" if m["loaded_mib"] is None else f"{m['loaded_mib']:.0f}"
                    rows.append((name, b, ckpt, med, ratio, loaded, f"{m['peak_mib']:.0f}", None))
            del batch

    where = f"{dev.type}" + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else f" ({torch.get_num_threads()} threads)")
    weights = f"RANDOM WEIGHTS ({args.random_weights or 'tiny'} architecture)" if kit.preset.random_weights else "real weights"
    print(f"bench_train: preset {args.preset}, {weights}, {args.resolution}², {args.mixed_precision}, {where}, "
          f"median of {args.rounds} interleaved rounds")
    if dev.type == "cuda":
        print("| config | batch | checkpointing | ms/step | ratio to diffusion-only | peak allocated GiB "
              "| peak reserved GiB | fits |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print("| config | batch | checkpointing | ms/step | ratio to diffusion-only | RSS loaded MiB "
              "| peak RSS in steps MiB |")
        print("|---|---|---|---|---|---|---|")
    for name, b, ck, med, ratio, m1, m2, fits in rows:
        ms = "-" if med is None else f"{med * 1e3:.0f}"
        rt = "-" if ratio is None else f"{ratio:.2f}"
        cells = [name, str(b), "on" if ck else "off", ms, rt, m1, m2] + ([fits] if dev.type == "cuda" else [])
        print("| " + " | ".join(cells) + " |")
    if dev.type == "cuda":
        print(f"fits: reserved peak + {CONTEXT_GIB} GiB CUDA context within the card "
              "(an estimate measured on a larger card)")
    else:
        print("RSS loaded: a fresh process per row, model and batch in memory; peak RSS in steps: the highest "
              "resident set over two training steps after that (activations, gradients, AdamW state): the step's "
              "cost is the difference")


if __name__ == "__main__":
    from lcmla.loading import quiet_console

    quiet_console()
    main()
