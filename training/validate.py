"""Validation during training: fixed faces × prompts × seeds through ``lcmla.Engine``, saved as a PNG
grid with each image's identity score (the identity-loss recognizer's cosine to the reference)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_PROMPTS = ("A pencil drawing of a face", "An oil painting of a face")


def training_overrides(args) -> dict[str, Any]:
    """The generation settings that make validation see what training sees: the reference framing
    of the KV encoder and, when given, the training resolution (square, as the training crops)."""
    out: dict[str, Any] = {"lookahead__reference_framing": args.reference_framing}
    if args.resolution:
        out.update(output__width=args.resolution, output__height=args.resolution)
    return out


@dataclass
class Validator:
    """Generates the validation grid from the trainer's own modules (no copy)."""

    engine: Any
    identities: list[tuple[str, Any]]  # (name, FaceIdentity)
    prompts: list[str]
    seeds: list[int]
    id_loss: Any = None
    kv: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)  # settings the run trained with (``a__b`` paths)
    history: list[dict] = field(default_factory=list)

    @classmethod
    def build(cls, args, preset, comps, id_loss) -> "Validator":
        from lcmla import Engine
        from lcmla.faces import FaceAnalyzer

        faces = FaceAnalyzer.haar() if preset.face_backend == "haar" else FaceAnalyzer.insightface(
            name=str(args.face_models or "buffalo_l"))
        weight = comps.pipe.unet.conv_in.weight  # (peft wrappers make unet.dtype/device slow and ambiguous)
        engine = Engine(preset, comps, faces, device=str(weight.device), dtype=weight.dtype)
        paths = args.validation_faces or [str(ASSETS / "face.png")]
        from lcmla.errors import LcmlaError

        try:
            identities = [(Path(p).stem, engine.analyze_faces([p])) for p in paths]
        except LcmlaError as exc:
            raise type(exc)(f"--validation-faces: {exc}") from None
        return cls(engine, identities, list(args.validation_prompts or DEFAULT_PROMPTS), list(args.validation_seeds),
                   id_loss, kv=not args.no_kv, overrides=training_overrides(args))

    def _score(self, reference, image) -> float | None:
        """Cosine between the recognizer embeddings of the reference photo and the image."""
        if self.id_loss is None or not reference.images:
            return None
        import numpy as np
        import torch
        import torch.nn.functional as F

        def tensor(img):
            arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float()
            return (arr / 127.5 - 1)[None].to(self.engine.device)

        ref, ref_found = self.id_loss.reference(tensor(reference.images[0]))
        got, found = self.id_loss.reference(tensor(image))
        if not (bool(ref_found[0]) and bool(found[0])):
            return None
        return float(F.cosine_similarity(ref, got).item())

    def run(self, step: int, folder: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from lcmla import GenerationSettings

        folder.mkdir(parents=True, exist_ok=True)
        cells = []
        for name, identity in self.identities:
            for prompt in self.prompts:
                for seed in self.seeds:
                    s = GenerationSettings(prompt=prompt, preset=self.engine.preset.name).replace(
                        output__seed=seed, lookahead__kv=self.kv, **self.overrides)
                    result = self.engine.generate(s, identity)
                    image, ran = result.images[0], result.settings
                    cells.append((name, prompt, seed, image, self._score(identity, image)))
        cols = len(self.prompts) * len(self.seeds)
        rows = len(self.identities)
        fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
        for i, (name, prompt, seed, image, score) in enumerate(cells):
            ax = axes[i // cols][i % cols]
            ax.imshow(image)
            ax.set_axis_off()
            sc = "no face" if score is None else f"ID {score:.3f}"
            ax.set_title(f"{name} · seed {seed}\n{prompt[:28]}\n{sc}", fontsize=7)
        fig.suptitle(f"validation, step {step}", fontsize=9)
        fig.tight_layout()
        path = folder / f"step-{step:06d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        ran_with = {"width": image.width, "height": image.height, "reference_framing": ran.lookahead.reference_framing,
                    "kv": ran.lookahead.kv}  # what the last image ran with (all share the settings)
        record = {"step": step, "settings": ran_with, "scores": [{"face": n, "prompt": p, "seed": s, "id": sc} for n, p, s, _, sc in cells]}
        self.history.append(record)
        with (folder / "scores.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
        return path
