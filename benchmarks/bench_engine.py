"""Engine overhead: ``Engine.generate`` vs a plain diffusers ``StableDiffusionXLPipeline`` call.

Both sides use the identical loaded components (the engine's own pipeline object), the same
identity, prompt, seed, steps and size; runs are interleaved (A, B, A, B, …) so machine noise hits
both alike. The pipeline side does what a diffusers user does per request: CLIP-encode the face
crop, set the FaceID-Plus projection's CLIP features, call the pipeline with
``ip_adapter_image_embeds``. Prints medians and the ratio engine / diffusers (goal ≤ 1.05).

    python benchmarks/bench_engine.py [--rounds 20] [--preset tiny] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lcmla import Engine, GenerationSettings

ASSETS = Path(__file__).resolve().parents[1] / "assets"


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
    pipe = engine.pipe
    comps = engine.components
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
    main()
