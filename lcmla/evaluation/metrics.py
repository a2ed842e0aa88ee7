"""The metrics of both papers (SPEC §6), one small function or class each.

- ID: cosine of face-recognition embeddings, reference vs generated (largest face); an image with
  no face has no score and counts in the face-fail count (FFC). Several recognizers can score the
  same images: insightface ``buffalo_l`` (FastFace's; the network FaceID conditions on), dlib's
  ResNet (offline, independent of the conditioning network), the Haar stand-in (tiny preset:
  meaningless, labelled so).
- CLIP-T: CLIP text–image cosine ×100 (LCM-Lookahead: ViT-B/16; FastFace: ViT-L/14; any CLIP the
  user has, default the preset's ViT-H/14).
- Face-style (FastFace): CLIP cosine ×100 between the face crop (the detected box) and the style
  part of a style prompt (the text before its ';').
- Aesthetic score (LAION's improved aesthetic predictor, an MLP on CLIP ViT-L/14 image embeddings)
  when its weights are given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from ..errors import ImageError, LcmlaError


class IdentityScorer(Protocol):
    """A face recognizer as the harness uses it."""

    name: str
    is_recognizer: bool

    def face(self, image: Image.Image) -> tuple[tuple[float, float, float, float], np.ndarray] | None:
        """(box, unit embedding) of the largest face, or None."""


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """cos(a, b) of two vectors (zero vectors give 0)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 0.0 if na == 0 or nb == 0 else float(np.clip(a @ b / (na * nb), -1.0, 1.0))


def mean_embedding(embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """The identity of several reference photos: the normalised mean of their unit embeddings."""
    m = np.mean([np.asarray(e, np.float64) / max(np.linalg.norm(e), 1e-12) for e in embeddings], axis=0)
    return m / max(np.linalg.norm(m), 1e-12)


@dataclass
class AnalyzerScorer:
    """An lcmla ``FaceAnalyzer`` (insightface, or the Haar stand-in) as a scorer."""

    analyzer: Any
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.analyzer.backend
        self.is_recognizer = bool(self.analyzer.is_recognizer)

    def face(self, image):
        try:
            faces = self.analyzer.detect(image)
        except ImageError:
            return None
        return None if not faces else (faces[0].bbox, faces[0].embedding)


@dataclass
class DlibScorer:
    """dlib's face recognition ResNet rebuilt in torch (``lcmla.recognizers``): offline, real."""

    faces: Any  # lcmla.recognizers.dlib_pipeline.DlibFaces
    name: str = "dlib"
    is_recognizer: bool = True

    def face(self, image):
        arr = np.asarray(image.convert("RGB"))
        found = self.faces.detect(arr)
        if not found:
            return None
        return tuple(found[0].box), np.asarray(self.faces.embed(arr, found[0]))


def reference_embedding(scorer: IdentityScorer, photos: Sequence[Image.Image]) -> np.ndarray | None:
    """The identity's embedding for ``scorer``: the mean over the photos where it finds a face."""
    found = [f[1] for f in (scorer.face(p) for p in photos) if f is not None]
    return mean_embedding(found) if found else None


def id_score(scorer: IdentityScorer, reference: np.ndarray | None, image: Image.Image):
    """(ID cosine or None when no face, the face box or None)."""
    face = scorer.face(image)
    if face is None or reference is None:
        return None, None if face is None else face[0]
    return cosine(reference, face[1]), face[0]


def style_part(prompt: str) -> str | None:
    """FastFace's style prompts hold the style description before a ';' ("a watercolor painting;
    a portrait of a face"); None for a realistic prompt."""
    return prompt.split(";", 1)[0].strip() if ";" in prompt else None


def crop_box(image: Image.Image, box) -> Image.Image | None:
    """The face box's pixels (clipped to the image); None when empty."""
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    x1, y1 = max(0, x1), max(0, y1)
    x2, y2 = min(image.width, x2), min(image.height, y2)
    return None if x2 <= x1 or y2 <= y1 else image.crop((x1, y1, x2, y2))


class ClipScorer:
    """CLIP text–image similarity (×100) with a transformers ``CLIPModel``."""

    def __init__(self, model_dir: str | Path, tokenizer_dir: str | Path | None = None, device: str = "cpu",
                 meaningful: bool = True):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        from ..loading import make_clip_processor

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise LcmlaError(f"CLIP model folder {model_dir} has no config.json; pass --clip-model with a CLIPModel "
                             "folder (e.g. openai/clip-vit-large-patch14)")
        self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
        tok = tokenizer_dir if tokenizer_dir is not None else model_dir
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(str(tok), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a folder without tokenizer files
            raise LcmlaError(f"no CLIP tokenizer in {tok} ({type(exc).__name__}); pass a folder that has one") from None
        self.processor = make_clip_processor()
        self.device = device
        self.name = model_dir.name
        self.meaningful = meaningful
        self._torch = torch

    def _image(self, images: Sequence[Image.Image]):
        pixels = self.processor(images=[i.convert("RGB") for i in images], return_tensors="pt").pixel_values
        feats = self.model.get_image_features(pixel_values=pixels.to(self.device))
        feats = getattr(feats, "pooler_output", feats)
        return feats / feats.norm(dim=-1, keepdim=True)

    def _text(self, texts: Sequence[str]):
        tok = self.tokenizer(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        feats = self.model.get_text_features(input_ids=tok.input_ids.to(self.device))
        feats = getattr(feats, "pooler_output", feats)
        return feats / feats.norm(dim=-1, keepdim=True)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """100·cos(CLIP(image_i), CLIP(text_i)) for each pair."""
        with self._torch.no_grad():
            return (100 * (self._image(images) * self._text(texts)).sum(-1)).float().cpu().tolist()


class AestheticScorer:
    """LAION's improved aesthetic predictor: an MLP (768 → 1024 → 128 → 64 → 16 → 1) on the unit
    CLIP ViT-L/14 image embedding; weights ``sac+logos+ava1-l14-linearMSE.pth`` (read with
    ``weights_only=True``) and a CLIP ViT-L/14 model folder."""

    def __init__(self, weights: str | Path, clip: ClipScorer):
        import torch
        from torch import nn

        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k.removeprefix("layers."): v for k, v in state.items()}
        self.mlp = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                 nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()
        try:
            self.mlp.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise LcmlaError(f"{weights} is not LAION's aesthetic predictor MLP ({exc})") from None
        self.clip = clip
        self._torch = torch

    def score(self, images: Sequence[Image.Image]) -> list[float]:
        with self._torch.no_grad():
            emb = self.clip._image(images).float().cpu()
            return self.mlp(emb).squeeze(-1).tolist()


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95 % confidence interval (Student t), n) of the non-None values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(xs) / n
    if n == 1:
        return mean, float("nan"), 1
    from scipy import stats

    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)), n
