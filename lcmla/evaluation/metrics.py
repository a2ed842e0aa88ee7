"""The metrics of both papers (SPEC §6), one small function or class each.

- ID: cosine of face-recognition embeddings, reference vs generated (largest face); an image with
  no face has no score and counts in the face-fail count (FFC); one whose identity's reference
  photos have no face for that recognizer has no score either, reported apart. Several recognizers can score the
  same images: insightface ``buffalo_l`` (FastFace's; the network FaceID conditions on), dlib's
  ResNet (offline, independent of the conditioning network), the Haar stand-in (tiny preset:
  meaningless, labelled so).
- CLIP-T: CLIP text–image cosine ×100 (LCM-Lookahead: ViT-B/16; FastFace: ViT-L/14; any CLIP the
  user has, default the preset's ViT-H/14).
- Face-style (FastFace): CLIP cosine ×100 between the face crop (the detected box) and the style
  part of a style prompt (the text before its ';').
- Aesthetic score (LAION's improved aesthetic predictor, an MLP on CLIP ViT-L/14 image embeddings)
  when its weights are given.
- ImageReward (FastFace) through the ``image-reward`` package when it imports and its local
  checkpoint is given; otherwise skipped, and the report says why.
"""

from __future__ import annotations

import math
import pickle
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


#: The layer widths of LAION's improved aesthetic predictor after its input (the CLIP embedding).
AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)
#: Its ``nn.Sequential`` indices of those linear layers (dropouts between them hold no weights).
AESTHETIC_LINEAR = (0, 2, 4, 6, 7)


def aesthetic_mlp(input_size: int):
    """LAION's improved aesthetic predictor MLP (no activations, as released): Linear(D, 1024),
    Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1)."""
    from torch import nn

    return nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


class AestheticScorer:
    """LAION's improved aesthetic predictor: the MLP of :func:`aesthetic_mlp` on the unit CLIP
    image embedding (ViT-L/14: 768-d); weights ``sac+logos+ava1-l14-linearMSE.pth`` (a state dict
    ``layers.{0,2,4,6,7}.{weight,bias}``, read with ``weights_only=True``)."""

    def __init__(self, weights: str | Path, clip: ClipScorer):
        import torch

        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise LcmlaError(f"cannot read the aesthetic predictor {weights}: {exc}") from None
        if not isinstance(state, dict):
            raise LcmlaError(f"{weights} is not a state dict (LAION's aesthetic predictor MLP)")
        state = {k.removeprefix("layers."): v for k, v in state.items()}
        first = state.get("0.weight")
        if first is None or first.ndim != 2:
            raise LcmlaError(f"{weights} is not LAION's aesthetic predictor MLP (no layers.0.weight)")
        self.input_size = int(first.shape[1])
        clip_dim = int(clip.model.config.projection_dim)
        if clip_dim != self.input_size:
            raise LcmlaError(f"the aesthetic predictor {weights} reads {self.input_size}-d CLIP embeddings, but the "
                             f"CLIP model {clip.name} gives {clip_dim}-d ones: pass --clip-model with the CLIP it was "
                             "trained on (ViT-L/14, openai/clip-vit-large-patch14, for LAION's)")
        self.mlp = aesthetic_mlp(self.input_size).eval()
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


IMAGEREWARD_FILES = ("ImageReward.pt", "med_config.json")
IMAGEREWARD_FETCH = "hf download THUDM/ImageReward ImageReward.pt med_config.json --local-dir DIR"


class Unavailable(Exception):
    """An optional metric that cannot run here; the message says why and what would make it run."""


def imagereward_files(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint, med_config.json) of a local ImageReward release: a folder holding
    ``ImageReward.pt`` and ``med_config.json`` (the files of THUDM/ImageReward), or the ``.pt``
    itself with ``med_config.json`` beside it. Raises :class:`Unavailable` naming what is missing."""
    path = Path(path).expanduser()
    fetch = f"fetch them with `{IMAGEREWARD_FETCH}` and pass --imagereward DIR"
    if not path.exists():
        raise Unavailable(f"no ImageReward weights: {path} does not exist ({fetch})")
    if path.is_file() and path.suffix.lower() != ".pt":
        raise Unavailable(f"no ImageReward weights: {path} is a file, not {IMAGEREWARD_FILES[0]} or a folder "
                          f"holding it ({fetch})")
    ckpt, config = (path / IMAGEREWARD_FILES[0], path / IMAGEREWARD_FILES[1]) if path.is_dir() else \
        (path, path.with_name(IMAGEREWARD_FILES[1]))
    missing = [str(p) for p in (ckpt, config) if not p.is_file()]
    if missing:
        raise Unavailable(f"no ImageReward weights: {', '.join(missing)} not found ({fetch})")
    return ckpt, config


def _bert_tokenizer_cached() -> bool:
    """ImageReward's BLIP builds its tokenizer with ``BertTokenizer.from_pretrained("bert-base-uncased")``:
    is that tokenizer in the local Hugging Face cache (so loading downloads nothing)?"""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache("bert-base-uncased", "vocab.txt"), str)


class ImageRewardScorer:
    """ImageReward (Xu et al., NeurIPS 2023; FastFace's human-preference metric): BLIP ViT-L with a
    BERT cross-attention text encoder and an MLP head, run through the ``image-reward`` package
    (``import ImageReward``) on a local checkpoint. lcmla does not rebuild the model: it loads the
    package's own, from files the user has, and never downloads (see :meth:`load`)."""

    def __init__(self, model: Any, name: str = "ImageReward"):
        self.model = model
        self.name = name

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> "ImageRewardScorer":
        """The scorer of the checkpoint at ``path`` (:func:`imagereward_files`). Raises
        :class:`Unavailable` when the weights are absent, the package does not import (it pins
        timm 0.6.13 and fairscale, and its BLIP code imports helpers transformers 5 removed), or
        the bert-base-uncased tokenizer it builds is not in the Hugging Face cache."""
        ckpt, med_config = imagereward_files(path)
        try:
            import ImageReward as reward  # noqa: N813 - the package's module name
        except Exception as exc:  # noqa: BLE001 - ImportError, or its imports of removed transformers helpers
            raise Unavailable(f"the image-reward package does not import here ({type(exc).__name__}: {exc}); "
                              "install it (`pip install image-reward`; it needs timm==0.6.13, fairscale and "
                              "a transformers 4.x) to score ImageReward") from None
        if not _bert_tokenizer_cached():
            raise Unavailable("ImageReward builds the bert-base-uncased tokenizer, which is not in the Hugging Face "
                              "cache (fetch it with `hf download bert-base-uncased vocab.txt tokenizer_config.json "
                              "config.json`)")
        try:
            model = reward.load(str(ckpt), device=device, med_config=str(med_config))
        except Exception as exc:  # noqa: BLE001 - a wrong or truncated checkpoint
            raise Unavailable(f"cannot load the ImageReward checkpoint {ckpt}: {type(exc).__name__}: {exc}") from None
        return cls(model, f"ImageReward ({ckpt.name})")

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """The reward of each (image, prompt): the package's normalised score (mean 0, sd 1 over
        its human-preference training data; higher is preferred)."""
        import torch

        with torch.no_grad():
            return [float(self.model.score(p, i.convert("RGB"))) for i, p in zip(images, prompts)]


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
