"""Engine overhead: ``Engine.generate`` vs a plain diffusers ``StableDiffusionXLPipeline`` call.

Both sides load the identical weights through the same loader (the diffusers side keeps diffusers'
stock attention processors; the engine installs its own), with the same identity, prompt, seed,
steps and size; runs are interleaved (A, B, A, B, …) so machine noise hits
both alike. The pipeline side does what a diffusers user does per request: CLIP-encode the face
crop, set the FaceID-Plus projection's CLIP features, call the pipeline with
``ip_adapter_image_embeds``. Prints medians and the ratio engine / diffusers (goal ≤ 1.05).

    python benchmarks/bench_engine.py [--rounds 20] [--preset tiny] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lcmla import Engine, GenerationSettings  # noqa: E402

ASSETS = ROOT / "assets"


def _stock_components(engine, args):
    """A second, stock diffusers copy of the engine's preset (same files, same loader)."""
    from lcmla.loading import load_components

    if engine.preset.random_weights:
        from lcmla.tiny import ensure_tiny_weights, tiny_paths

        paths, variant = tiny_paths(ensure_tiny_weights()), None
    else:
        from lcmla.weights import resolve_preset

        variant = "fp16" if engine.dtype in (torch.float16, torch.bfloat16) else None
        paths = resolve_preset(engine.preset, variant=variant)
    return load_components(engine.preset, paths, device=str(engine.device), dtype=engine.dtype, variant=variant)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--face", default=str(ASSETS / "face.png"))
    args = ap.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine = Engine.load(args.preset, device=args.device)
    identity = engine.analyze_faces([args.face])
    settings = GenerationSettings(prompt="a pencil drawing of a face", preset=args.preset)
    p = engine.preset
    comps = _stock_components(engine, args)
    pipe = comps.pipe
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    device, dtype = engine.device, engine.dtype

    def run_engine():
        return engine.generate(settings, identity).images[0]

    @torch.no_grad()
    def run_diffusers():
        pixels = comps.clip_processor(images=list(identity.crops), return_tensors="pt").pixel_values
        pixels = pixels.to(device, dtype=comps.image_encoder.dtype)
        clip = comps.image_encoder(pixels, output_hidden_states=True).hidden_states[-2].mean(0, keepdim=True)[:, None]
        proj.clip_embeds = clip.to(dtype)
        proj.shortcut = True
        id_embeds = torch.as_tensor(identity.embedding, dtype=dtype, device=device).reshape(1, 1, -1)
        generator = torch.Generator("cpu").manual_seed(settings.output.seed)
        return pipe(
            prompt=settings.prompt,
            ip_adapter_image_embeds=[id_embeds],
            num_inference_steps=p.steps,
            guidance_scale=p.guidance_scale,
            width=p.width,
            height=p.height,
            generator=generator,
        ).images[0]

    pipe.set_progress_bar_config(disable=True)
    pipe.set_ip_adapter_scale(settings.identity.ip_adapter_scale)  # engine default λ = 0.8; LoRA at 1.0 on both
    for _ in range(args.warmup):
        run_engine()
        run_diffusers()
    times = {"engine": [], "diffusers": []}
    for _ in range(args.rounds):
        for name, fn in (("engine", run_engine), ("diffusers", run_diffusers)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"preset={p.name} device={device} dtype={dtype} steps={p.steps} size={p.width}x{p.height} "
          f"rounds={args.rounds} threads={torch.get_num_threads()}")
    for k, v in med.items():
        print(f"  {k:10s} median {v * 1000:8.1f} ms  (min {min(times[k]) * 1000:.1f} ms)")
    print(f"ratio engine/diffusers = {med['engine'] / med['diffusers']:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    from lcmla.loading import quiet_console

    quiet_console()
    main()
