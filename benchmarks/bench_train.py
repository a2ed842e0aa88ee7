"""Training step cost: ms/step and peak memory of diffusion-only, + lookahead, + KV (the full recipe),
measured side by side in one run with the trainer's own objective, trainables and optimizer.

    python benchmarks/bench_train.py [--preset tiny] [--resolution 64] [--batch-sizes 1,2]
                                     [--checkpointing off,on] [--rounds 5] [--device cpu|cuda]
                                     [--mixed-precision no|bf16|fp16]

Timing: every configuration runs ``--rounds`` times, interleaved (round-robin) so drift hits all
alike; one step = forward, backward and the AdamW update of the trainable parts (projection,
identity K/V, KV-encoder LoRA). Ratios are to diffusion-only at the same batch and checkpointing.
Memory: on CUDA, ``torch.cuda.max_memory_allocated`` per configuration (peak reset before each);
on CPU, peak RSS of a fresh child process per configuration (``--no-memory`` skips it).
The identity loss uses dlib's recognizer (offline) with landmarks found on each preview, as the
trainer does; on random weights no face is found, so the loss is 0 but its graph (TAESD decode,
alignment, recognizer) still runs forward and backward.
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


def _setup(preset: str, device: str | None, mixed_precision: str, checkpointing: bool):
    import torch

    from lcmla.attention.processors import install_processors
    from training.data import Collate, PairSample
    from training.model import setup_trainables
    from training.objective import Objective, ObjectiveConfig
    from training.passes import PassSwitcher
    from training.train import _identity_loss, _lcm_boundary, _load, build_parser

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    args = build_parser().parse_args(["--preset", preset, "--data", ".", "--output-dir", tempfile.gettempdir(),
                                      "--max-train-steps", "1", "--id-network", "dlib"])
    preset_obj, comps = _load(args, str(dev), dtype)
    pipe = comps.pipe
    install_processors(pipe.unet)
    pipe.unet.encoder_hid_proj.image_projection_layers[0].shortcut = True
    torch.manual_seed(0)
    trainables = setup_trainables(pipe, ("proj", "ip-kv", "kv-lora"))
    for p in trainables.params():  # trainable weights in fp32 under mixed precision (accelerate's rule)
        p.data = p.data.float()
    switcher = PassSwitcher(pipe, trainable=trainables.params())
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing(gradient_checkpointing_func=switcher.checkpoint_function())
    pipe.unet.train()
    id_loss, _ = _identity_loss(args, preset_obj, dev)
    boundary = _lcm_boundary(pipe)
    objectives = {name: Objective(pipe, comps.image_encoder, comps.taesd, switcher,
                                  ObjectiveConfig(lambda_lookahead=lam, kv=kv), id_loss, lcm_boundary=boundary)
                  for name, (lam, kv) in CONFIGS.items()}
    optimizer = torch.optim.AdamW(trainables.groups(1e-5, 5e-6), weight_decay=0.01)

    from lcmla.faces import FaceAnalyzer
    from PIL import Image

    photo = Image.open(FACE).convert("RGB")
    face = FaceAnalyzer.haar().identity([photo])
    sample = PairSample(photo, face.boxes[0], face.crops[0], face.embedding, photo, "a pencil drawing of a face")
    return dev, dtype, objectives, optimizer, comps, id_loss, sample


def _step(objective, optimizer, batch, generator, dev, dtype):
    import torch

    start = time.perf_counter()
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = objective(batch, generator)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _batch(collate, sample, n, id_loss):
    batch = collate([sample] * n)
    batch.reference_id, batch.reference_found = id_loss.reference(batch.reference)
    return batch


def _child(args) -> None:
    """One configuration in a fresh process: two steps, then the peak memory as JSON."""
    import torch

    from training.data import Collate

    dev, dtype, objectives, optimizer, comps, id_loss, sample = _setup(args.preset, args.device, args.mixed_precision,
                                                                       args.child_ckpt)
    collate = Collate(args.resolution, comps.clip_processor, device=dev)
    batch = _batch(collate, sample, args.child_batch, id_loss)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        _step(objectives[args.child_config], optimizer, batch, gen, dev, dtype)
    print(json.dumps({"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _rss_child(args, config: str, batch: int, ckpt: bool) -> float:
    cmd = [sys.executable, __file__, "--child-config", config, "--child-batch", str(batch), "--preset", args.preset,
           "--resolution", str(args.resolution), "--mixed-precision", args.mixed_precision]
    cmd += ["--child-ckpt"] if ckpt else []
    cmd += ["--device", args.device] if args.device else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["rss_mib"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,2")
    ap.add_argument("--checkpointing", default="off,on")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    ap.add_argument("--child-config", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child-ckpt", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_config:
        return _child(args)

    import torch

    from training.data import Collate

    batches = [int(b) for b in args.batch_sizes.split(",")]
    ckpts = [c.strip() == "on" for c in args.checkpointing.split(",")]
    rows = []
    for ckpt in ckpts:
        dev, dtype, objectives, optimizer, comps, id_loss, sample = _setup(args.preset, args.device,
                                                                           args.mixed_precision, ckpt)
        collate = Collate(args.resolution, comps.clip_processor, device=dev)
        for b in batches:
            batch = _batch(collate, sample, b, id_loss)
            gen = torch.Generator().manual_seed(0)
            times: dict[str, list[float]] = {name: [] for name in objectives}
            peaks: dict[str, float] = {}
            for name, objective in objectives.items():  # warm-up, and the CUDA peak of each configuration
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                _step(objective, optimizer, batch, gen, dev, dtype)
                if dev.type == "cuda":
                    peaks[name] = torch.cuda.max_memory_allocated() / 2**20
            for r in range(args.rounds):
                names = list(objectives)
                names = names[r % len(names):] + names[:r % len(names)]  # rotate the order
                for name in names:
                    times[name].append(_step(objectives[name], optimizer, batch, gen, dev, dtype))
            base = statistics.median(times["diffusion-only"])
            for name in objectives:
                med = statistics.median(times[name])
                mem = peaks.get(name)
                if mem is None and dev.type == "cpu" and not args.no_memory:
                    mem = _rss_child(args, name, b, ckpt)
                rows.append((name, b, "on" if ckpt else "off", med * 1e3, med / base, mem))
        del objectives, optimizer, comps

    where = f"{dev.type}" + (f" ({torch.cuda.get_device_name()})" if dev.type == "cuda" else f" ({torch.get_num_threads()} threads)")
    mem_kind = "peak CUDA MiB" if dev.type == "cuda" else "peak RSS MiB (child process)"
    print(f"bench_train: preset {args.preset}, {args.resolution}², {args.mixed_precision}, {where}, "
          f"median of {args.rounds} interleaved rounds")
    print(f"| config | batch | checkpointing | ms/step | ratio to diffusion-only | {mem_kind} |")
    print("|---|---|---|---|---|---|")
    for name, b, ck, ms, ratio, mem in rows:
        print(f"| {name} | {b} | {ck} | {ms:.0f} | {ratio:.2f} | {'-' if mem is None else f'{mem:.0f}'} |")


if __name__ == "__main__":
    main()
