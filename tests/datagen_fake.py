"""A data-generation run with a fake renderer (the two public-domain portraits, varied per seed) and
the offline Haar analyzer: what the datagen tests run in-process and in killable subprocesses.

    python tests/datagen_fake.py OUT [--identities N] [--per-shard P] [--delay S] [--trace]

``--trace`` prints ``render <n>`` before the n-th render (from 1), so a test can kill the run at a
known point of its work instead of after a guessed time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def portraits() -> list[Image.Image]:
    from faceutils import face_image
    from faceutils import portraits as public_domain

    return [face_image(), public_domain()["hopper"]]


def fake_render(delay: float = 0.0, trace: bool = False):
    """render(prompt, seed): identity by the prompt's subject, framing and brightness by the seed;
    styles posterised; one seed in nine a face-less grey image."""
    people = portraits()
    count = [0]

    def render(prompt: str, seed: int) -> Image.Image:
        count[0] += 1
        if trace:
            print(f"render {count[0]}", flush=True)
        if delay:
            time.sleep(delay)
        if seed % 9 == 0:
            return Image.new("RGB", (160, 160), (120, 120, 120))
        person = people[sum(map(ord, prompt.split(" of ")[-1])) % 2]
        rng = np.random.default_rng(seed)
        w, h = person.size
        dx, dy = (int(v) for v in rng.integers(0, w // 16, size=2))
        img = person.crop((dx, dy, w - w // 16 + dx, h - h // 16 + dy))
        img = ImageEnhance.Brightness(img).enhance(0.85 + 0.3 * float(rng.random()))
        if any(s in prompt for s in ("painting", "drawing", "graffiti", "comic", "poster")):
            img = ImageOps.posterize(img, 3)
        return img.resize((160, 160))

    return render


def config(identities: int = 4, per_shard: int = 2, images: int = 6):
    from lcmla.faces import FaceAnalyzer
    from training.datagen.generate import GenConfig
    from training.datagen.identities import select_templates

    plain, stylized = select_templates(["pencil-drawing", "oil-painting"])
    haar = FaceAnalyzer.haar()
    cfg = GenConfig(identities=identities, images_per_identity=images, plain=tuple(plain[:3]), stylized=tuple(stylized),
                    seed=7, identities_per_shard=per_shard, tau_plain=0.5, tau_style=0.3, backend="haar",
                    is_recognizer=False, settings={"fake": True})
    return cfg, haar


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--identities", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=2)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--trace", action="store_true")
    args = ap.parse_args()
    from lcmla.evaluation.run import accelerate_state
    from training.datagen.generate import generate

    cfg, haar = config(args.identities, args.per_shard)
    state = accelerate_state()
    generate(cfg, Path(args.out), fake_render(args.delay, args.trace), haar.detect, state.process_index, state.num_processes,
             log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    main()
