"""Finding faces in reference photos and turning them into an identity for the generator.

Two backends sit behind one :class:`FaceAnalyzer`:

``insightface`` (:meth:`FaceAnalyzer.insightface`)
    The real thing: ``insightface.app.FaceAnalysis`` with a model pack such as ``buffalo_l``
    (SCRFD detector + ArcFace recogniser, ONNX on onnxruntime). Its 512-d ArcFace embedding and a
    224x224 crop aligned on the five keypoints are exactly what IP-Adapter FaceID-Plus-v2 expects.
    The models are never downloaded: a missing pack raises
    :class:`~lcmla.errors.MissingWeightsError` saying where to put it.

``haar`` (:meth:`FaceAnalyzer.haar`)
    An offline stand-in for the tiny preset and for machines without the insightface models:
    OpenCV's bundled frontal-face Haar cascade finds faces, keypoints are placed at canonical face
    proportions inside the box, and the "embedding" is a fixed random projection of a small
    grey-level aligned crop. **It is not a face recogniser** (``is_recognizer`` is ``False``): the
    same photo always gives the same vector and different photos give different vectors, but two
    photos of one person are not closer than photos of two people.

The analyzer keeps no per-call state, so one instance may serve concurrent requests.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .errors import ImageError, MissingWeightsError, NoFaceError
from .images import ImageSource, as_photo_list, describe_source, load_image

__all__ = [
    "CROP_SIZE",
    "DetectedFace",
    "FaceAnalyzer",
    "FaceIdentity",
    "align_face",
    "canonical_keypoints",
    "choose_face",
    "default_insightface_root",
    "l2_normalize",
    "mean_embedding",
    "resolve_model_dir",
    "stand_in_embedding",
]

#: Side of the aligned face crop handed to the CLIP image encoder of FaceID-Plus-v2.
CROP_SIZE = 224
#: Length of the identity embedding (ArcFace / the Haar stand-in).
EMBEDDING_DIM = 512

BUFFALO_HELP = (
    "download buffalo_l.zip from the insightface model zoo releases "
    "(https://github.com/deepinsight/insightface/releases) and unzip it into "
    "~/.insightface/models/buffalo_l (or $INSIGHTFACE_HOME/models/buffalo_l), "
    "or pass --face-models DIR pointing at a folder that holds the .onnx files"
)

HAAR_NOTE = (
    "OpenCV Haar-cascade stand-in: finds frontal faces, but its embedding is a fixed random "
    "projection of the face pixels, NOT a face recognizer, so the identity is not preserved; "
    "install the insightface buffalo_l models for real identity embeddings"
)

# Canonical keypoints inside a Haar face box, as fractions of its width/height (insightface order:
# image-left eye, image-right eye, nose tip, image-left mouth corner, image-right mouth corner).
_HAAR_KPS = np.asarray(
    [[0.31, 0.38], [0.69, 0.38], [0.50, 0.60], [0.34, 0.80], [0.66, 0.80]], dtype=np.float32
)
_HAAR_CASCADE = "haarcascade_frontalface_default.xml"
_HAAR_DETECT_SIDE = 1024  # Haar runs on a copy shrunk to this longest side (speed)
_HAAR_MIN_NEIGHBORS = 5
_STAND_IN_SIDE = 32  # grey crop side fed to the stand-in projection
_STAND_IN_SEED = 20240607

Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One face found in one photo.

    Attributes:
        bbox: ``(x1, y1, x2, y2)`` in pixels of the loaded (possibly downscaled) image.
        kps: ``(5, 2)`` float32 keypoints: left eye, right eye, nose, left and right mouth corner
            (insightface order; "left" means the image's left).
        score: detector confidence in ``[0, 1]``.
        embedding: ``(512,)`` float32 L2-normalised identity embedding.
        crop: ``224x224`` RGB crop aligned on ``kps`` (ArcFace template), for the CLIP branch.
    """

    bbox: Box
    kps: np.ndarray
    score: float
    embedding: np.ndarray
    crop: Image.Image

    @property
    def width(self) -> float:
        """Box width in pixels."""
        return max(0.0, self.bbox[2] - self.bbox[0])

    @property
    def height(self) -> float:
        """Box height in pixels."""
        return max(0.0, self.bbox[3] - self.bbox[1])

    @property
    def area(self) -> float:
        """Box area in square pixels."""
        return self.width * self.height


@dataclass(frozen=True, eq=False)
class FaceIdentity:
    """The identity extracted from one or more reference photos.

    Attributes:
        embedding: ``(512,)`` float32 mean of the chosen faces' embeddings, re-normalised.
        crops: one aligned 224x224 RGB crop per reference photo.
        faces: the chosen face of each photo.
        boxes: the chosen face's box in each photo.
        backend: ``"insightface"`` or ``"haar"``.
        is_recognizer: ``False`` for the Haar stand-in, whose embedding is not an identity.
        images: the reference photos as loaded (upright RGB, at most ``MAX_SIDE``); ``boxes`` and
            the faces' keypoints are in their pixels. Empty for an identity built by hand.
    """

    embedding: np.ndarray
    crops: tuple[Image.Image, ...]
    faces: tuple[DetectedFace, ...]
    boxes: tuple[Box, ...]
    backend: str
    is_recognizer: bool
    images: tuple[Image.Image, ...] = ()


# --------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------


def l2_normalize(vector: np.ndarray) -> np.ndarray:
    """Return ``vector`` (flattened, float32) scaled to unit L2 length (zeros stay zeros)."""
    flat = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(flat))
    return flat / norm if norm > 0 else flat.copy()


def mean_embedding(embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """Average several embeddings and re-normalise the mean to unit length."""
    if not embeddings:
        raise ValueError("mean_embedding needs at least one embedding")
    stacked = np.stack([np.asarray(e, dtype=np.float32).reshape(-1) for e in embeddings])
    return l2_normalize(stacked.mean(axis=0))


def canonical_keypoints(bbox: Box) -> np.ndarray:
    """Five keypoints placed at typical frontal-face proportions inside ``bbox`` (Haar backend)."""
    x1, y1, x2, y2 = bbox
    scale = np.asarray([x2 - x1, y2 - y1], dtype=np.float32)
    return (_HAAR_KPS * scale + np.asarray([x1, y1], dtype=np.float32)).astype(np.float32)


_ESTIMATE_WARNING = r".*`estimate` is deprecated"


def _quiet_insightface() -> None:
    """Silence scikit-image's ``estimate`` deprecation warning raised inside insightface's aligner.

    The filter is (re-)installed only when it is missing from ``warnings.filters`` (test runners
    reset the filters between tests), so the common path only reads the list.
    """
    for action, message, category, _module, _lineno in warnings.filters:
        if action == "ignore" and category is FutureWarning and getattr(message, "pattern", None) == _ESTIMATE_WARNING:
            return
    warnings.filterwarnings("ignore", message=_ESTIMATE_WARNING, category=FutureWarning)


def align_face(image_rgb: np.ndarray, kps: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """Warp a face onto insightface's ArcFace template (``face_align.norm_crop``).

    Args:
        image_rgb: ``HxWx3`` uint8 image (any channel order; the crop keeps it).
        kps: ``(5, 2)`` keypoints in ``image_rgb`` pixels.
        size: crop side; a multiple of 112 or 128 (224 for FaceID-Plus, 112 for ArcFace).
    """
    from insightface.utils import face_align

    _quiet_insightface()
    landmarks = np.asarray(kps, dtype=np.float32).reshape(5, 2)
    return face_align.norm_crop(np.ascontiguousarray(image_rgb), landmark=landmarks, image_size=size)


def _bgr(image_rgb: np.ndarray) -> np.ndarray:
    """RGB -> BGR (contiguous), the channel order insightface and OpenCV expect."""
    return np.ascontiguousarray(image_rgb[:, :, ::-1])


def _box(values: Any) -> Box:
    """Four numbers as a float tuple."""
    x1, y1, x2, y2 = (float(v) for v in list(values)[:4])
    return (x1, y1, x2, y2)


def _sorted_faces(faces: list[DetectedFace]) -> list[DetectedFace]:
    """Largest box first; equal sizes by higher score, then detector order."""
    return sorted(faces, key=lambda face: (-face.area, -face.score))


def _size_text(face: DetectedFace) -> str:
    return f"{round(face.width)}x{round(face.height)} px"


# --------------------------------------------------------------------------------------------------
# insightface backend
# --------------------------------------------------------------------------------------------------


def default_insightface_root() -> Path:
    """``$INSIGHTFACE_HOME`` if set, else ``~/.insightface``."""
    return Path(os.environ.get("INSIGHTFACE_HOME") or "~/.insightface").expanduser()


def _looks_like_path(name: str) -> bool:
    return any(sep in name for sep in ("/", "\\", os.sep)) or name.startswith((".", "~"))


def resolve_model_dir(name: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Where the ONNX files of model pack ``name`` must be (an absolute path; no existence check).

    ``name`` is either a folder path (absolute, ``~``-prefixed or containing a path separator) or a
    pack name, looked up as ``root/models/name`` first and then as a folder of that name in the
    current directory. When neither exists, ``root/models/name`` is returned (for error messages).
    """
    text = os.fspath(name)
    direct = Path(os.path.abspath(Path(text).expanduser()))
    if _looks_like_path(text) or Path(text).is_absolute():
        return direct
    base = Path(root).expanduser() if root is not None else default_insightface_root()
    candidate = Path(os.path.abspath(base / "models" / text))
    if candidate.is_dir() or not direct.is_dir():
        return candidate
    return direct


def _check_model_dir(folder: Path) -> None:
    """Raise :class:`MissingWeightsError` unless ``folder`` holds ONNX files (or a manifest)."""
    if folder.exists() and not folder.is_dir():
        raise MissingWeightsError(
            f"insightface face models not found: '{folder}' is a file, not a folder; pass the folder that "
            f"holds the pack's .onnx files (or its name); {BUFFALO_HELP}",
            missing=[str(folder)],
        )
    if not folder.is_dir():
        raise MissingWeightsError(
            f"insightface face models not found: the folder '{folder}' does not exist; {BUFFALO_HELP}",
            missing=[str(folder)],
        )
    if not any(folder.glob("*.onnx")) and not (folder / "manifest.json").is_file():
        raise MissingWeightsError(
            f"insightface face models not found: the folder '{folder}' holds no .onnx files "
            f"(a detector such as det_10g.onnx and a recognizer such as w600k_r50.onnx are needed); "
            f"{BUFFALO_HELP}",
            missing=[str(folder)],
        )


def onnx_providers(device: str | None) -> list:
    """onnxruntime execution providers for the engine's device: CUDA (that GPU) then CPU when the
    engine runs on CUDA and onnxruntime was built with CUDA (``onnxruntime-gpu``), else CPU only."""
    import onnxruntime

    dev = str(device or "cpu")
    if dev.startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        index = int(dev.split(":", 1)[1]) if ":" in dev else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session_providers(app: Any) -> tuple[str, ...]:
    """The providers the loaded ONNX sessions actually run on (first = preferred)."""
    names: list[str] = []
    for model in getattr(app, "models", {}).values():
        session = getattr(model, "session", None)
        for name in session.get_providers() if session is not None else ():
            if name not in names:
                names.append(name)
    return tuple(names)


def _load_face_analysis(folder: Path, root: Path, providers: list, det_size: tuple[int, int]) -> Any:
    """Build and prepare ``FaceAnalysis`` on an existing local folder (never downloads)."""
    from insightface.app import FaceAnalysis

    _quiet_insightface()
    try:
        app = FaceAnalysis(
            name=str(folder),
            root=str(root),
            allowed_modules=["detection", "recognition"],
            providers=providers,
        )
    except AssertionError as error:  # FaceAnalysis asserts that a detector was found
        raise MissingWeightsError(
            f"insightface could not find a face detector among the .onnx files in '{folder}'; {BUFFALO_HELP}",
            missing=[str(folder)],
        ) from error
    except Exception as error:  # corrupt / incompatible ONNX files
        raise MissingWeightsError(
            f"insightface could not load the face models in '{folder}': {error}; {BUFFALO_HELP}",
            missing=[str(folder)],
        ) from error
    if "recognition" not in app.models:
        raise MissingWeightsError(
            f"insightface found no face recognizer (e.g. w600k_r50.onnx) in '{folder}'; {BUFFALO_HELP}",
            missing=[str(folder)],
        )
    cpu_only = all(str(p[0] if isinstance(p, (tuple, list)) else p) == "CPUExecutionProvider" for p in providers)
    # ctx_id < 0 makes insightface force CPUExecutionProvider; keep GPU providers when asked for.
    app.prepare(ctx_id=-1 if cpu_only else 0, det_size=tuple(det_size))
    return app


def _insightface_detector(app: Any) -> Callable[[np.ndarray], list[DetectedFace]]:
    """A detect function (RGB uint8 array -> faces) over a prepared ``FaceAnalysis``."""

    def detect(image_rgb: np.ndarray) -> list[DetectedFace]:
        _quiet_insightface()
        found = app.get(_bgr(image_rgb))
        faces = []
        for face in found:
            kps = np.asarray(face.kps, dtype=np.float32).reshape(5, 2)
            if face.embedding is None:  # pragma: no cover - recognition always runs without addons
                continue
            crop = align_face(image_rgb, kps, CROP_SIZE)
            faces.append(
                DetectedFace(
                    bbox=_box(face.bbox),
                    kps=kps,
                    score=float(face.det_score),
                    embedding=l2_normalize(face.embedding),
                    crop=Image.fromarray(crop),
                )
            )
        return faces

    return detect


# --------------------------------------------------------------------------------------------------
# Haar backend
# --------------------------------------------------------------------------------------------------


def _load_cascade() -> Any:
    """OpenCV's bundled frontal-face cascade."""
    import cv2

    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = Path(folder or "") / _HAAR_CASCADE
    if not folder or not path.is_file():
        raise MissingWeightsError(
            f"OpenCV's {_HAAR_CASCADE} was not found (looked in '{path.parent}'); "
            "install opencv-python (or opencv-python-headless) 4.x, which ships it in cv2.data.haarcascades",
            missing=[str(path)],
        )
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise MissingWeightsError(f"OpenCV could not load the Haar cascade '{path}'", missing=[str(path)])
    return cascade


@lru_cache(maxsize=1)
def _stand_in_projection() -> np.ndarray:
    """The fixed ``(32*32, 512)`` random projection of the Haar stand-in embedding."""
    rng = np.random.default_rng(_STAND_IN_SEED)
    features = _STAND_IN_SIDE * _STAND_IN_SIDE
    return (rng.standard_normal((features, EMBEDDING_DIM)) / np.sqrt(features)).astype(np.float32)


def stand_in_embedding(image_rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """Deterministic 512-d vector of a face's pixels; NOT a face-recognition embedding.

    The face is aligned (112 px ArcFace template), turned grey, shrunk to 32x32, standardised and
    multiplied by a fixed seeded random matrix, then L2-normalised.
    """
    import cv2

    aligned = align_face(image_rgb, kps, 112)
    grey = cv2.cvtColor(aligned, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (_STAND_IN_SIDE, _STAND_IN_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    small = (small - small.mean()) / (small.std() + 1e-6)
    return l2_normalize(small.reshape(-1) @ _stand_in_projection())


def _haar_detector(cascade: Any) -> Callable[[np.ndarray], list[DetectedFace]]:
    """A detect function (RGB uint8 array -> faces) over a Haar cascade."""
    import cv2

    lock = threading.Lock()  # CascadeClassifier.detectMultiScale is not documented as thread-safe

    def detect(image_rgb: np.ndarray) -> list[DetectedFace]:
        grey = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
        height, width = grey.shape
        scale = min(1.0, _HAAR_DETECT_SIDE / max(height, width))
        if scale < 1.0:
            grey = cv2.resize(grey, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
        with lock:
            rects, neighbours = cascade.detectMultiScale2(
                grey, scaleFactor=1.1, minNeighbors=_HAAR_MIN_NEIGHBORS, minSize=(24, 24)
            )
        faces = []
        for (x, y, w, h), n in zip(np.asarray(rects).reshape(-1, 4), np.asarray(neighbours).reshape(-1)):
            bbox = (x / scale, y / scale, (x + w) / scale, (y + h) / scale)
            kps = canonical_keypoints(bbox)
            faces.append(
                DetectedFace(
                    bbox=_box(bbox),
                    kps=kps,
                    score=float(n) / (float(n) + _HAAR_MIN_NEIGHBORS),
                    embedding=stand_in_embedding(image_rgb, kps),
                    crop=Image.fromarray(align_face(image_rgb, kps, CROP_SIZE)),
                )
            )
        return faces

    return detect


# --------------------------------------------------------------------------------------------------
# The analyzer
# --------------------------------------------------------------------------------------------------


class FaceAnalyzer:
    """Detects faces and builds a :class:`FaceIdentity` from reference photos.

    Build one with :meth:`insightface` or :meth:`haar`. Instances hold only immutable settings and
    thread-safe models, so they can be shared between threads.

    Attributes:
        backend: ``"insightface"`` or ``"haar"``.
        is_recognizer: whether :attr:`DetectedFace.embedding` identifies a person.
        backend_note: one line describing the backend (for logs and the UI).
        model_dir: the insightface model folder (``None`` for Haar).
        tasks: the model tasks loaded, e.g. ``("detection", "recognition")``.
        providers: the onnxruntime providers the models run on (insightface; empty for Haar).
    """

    def __init__(
        self,
        detect_rgb: Callable[[np.ndarray], list[DetectedFace]],
        *,
        backend: str,
        is_recognizer: bool,
        backend_note: str,
        model_dir: Path | None = None,
        tasks: tuple[str, ...] = (),
        engine: Any = None,
        providers: tuple[str, ...] = (),
    ):
        self._detect_rgb = detect_rgb
        self.backend = backend
        self.is_recognizer = is_recognizer
        self.backend_note = backend_note
        self.model_dir = model_dir
        self.tasks = tasks
        self.engine = engine  # the underlying FaceAnalysis / CascadeClassifier, for inspection
        self.providers = providers  # onnxruntime providers the models run on (insightface), e.g. ("CPUExecutionProvider",)

    def __repr__(self) -> str:
        where = f", model_dir='{self.model_dir}'" if self.model_dir else ""
        return f"FaceAnalyzer(backend={self.backend!r}{where})"

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def insightface(
        cls,
        name: str | os.PathLike = "buffalo_l",
        root: str | os.PathLike | None = None,
        providers: Sequence[Any] | None = None,
        det_size: tuple[int, int] = (640, 640),
    ) -> "FaceAnalyzer":
        """Load an insightface model pack from disk (never downloads).

        Args:
            name: pack name under ``root/models/`` (e.g. ``"buffalo_l"``) or a folder path.
            root: insightface home; default ``$INSIGHTFACE_HOME`` or ``~/.insightface``.
            providers: onnxruntime execution providers; default ``["CPUExecutionProvider"]``
                (:func:`onnx_providers` picks CUDA for an engine on a GPU).
            det_size: detector input size ``(width, height)``.

        Raises:
            MissingWeightsError: the folder is missing, holds no ONNX files, or lacks a detector
                or a recognizer.
        """
        folder = resolve_model_dir(name, root)
        _check_model_dir(folder)
        home = Path(root).expanduser() if root is not None else default_insightface_root()
        provider_list = list(providers or ["CPUExecutionProvider"])
        app = _load_face_analysis(folder, home, provider_list, det_size)
        return cls(
            _insightface_detector(app),
            backend="insightface",
            is_recognizer=True,
            backend_note=f"insightface {', '.join(sorted(app.models))} models from '{folder}'",
            model_dir=folder,
            tasks=tuple(sorted(app.models)),
            engine=app,
            providers=_session_providers(app),
        )

    @classmethod
    def haar(cls) -> "FaceAnalyzer":
        """The offline OpenCV Haar-cascade stand-in (see the module docstring: not a recognizer)."""
        cascade = _load_cascade()
        return cls(
            _haar_detector(cascade),
            backend="haar",
            is_recognizer=False,
            backend_note=HAAR_NOTE,
            tasks=("detection",),
            engine=cascade,
        )

    @classmethod
    def chosen(cls, face_models: str | os.PathLike | None, default: str = "insightface",
               device: str | None = None) -> "FaceAnalyzer":
        """The analyzer a ``--face-models`` value names: "haar" the offline stand-in, another value
        an insightface pack; None the ``default`` backend ("haar", or "insightface": buffalo_l).
        ``device``: the engine's, for onnxruntime's providers (:func:`onnx_providers`)."""
        if str(face_models) == "haar" or face_models is None and default == "haar":
            return cls.haar()
        providers = onnx_providers(device) if device is not None else None
        return cls.insightface(name=str(face_models or "buffalo_l"), providers=providers)

    # -- detection ---------------------------------------------------------------------------------

    def detect(self, image: ImageSource) -> list[DetectedFace]:
        """All faces in ``image`` (anything :func:`~lcmla.images.load_image` takes), largest first.

        Coordinates refer to the loaded image (upright, at most ``MAX_SIDE`` pixels).
        """
        return self._detect_loaded(load_image(image))

    def _detect_loaded(self, image: Image.Image) -> list[DetectedFace]:
        return _sorted_faces(self._detect_rgb(np.asarray(image.convert("RGB"))))

    def identity(
        self,
        images: Sequence[ImageSource],
        face_index: int | Sequence[int | None] | None = None,
        min_face_px: int = 32,
    ) -> FaceIdentity:
        """Build the identity of the person in ``images`` (one face per photo).

        Args:
            images: one or more reference photos (a single photo on its own is accepted too).
            face_index: which face to use when a photo shows several, counted largest first
                (``0`` = largest, the default). An ``int`` applies to every photo; a sequence gives
                one index (or ``None`` = largest) per photo.
            min_face_px: the chosen face's box must be at least this many pixels on both sides.

        Raises:
            ImageError: no photos, an unreadable photo, or ``face_index`` out of range.
            NoFaceError: a photo shows no face, or only a too small one.
        """
        images = as_photo_list(images)
        if len(images) == 0:
            raise ImageError("no face photo was given; upload at least one clear photo of the face")
        indices = _per_photo_indices(face_index, len(images))
        chosen: list[DetectedFace] = []
        loaded: list[Image.Image] = []
        for position, source in enumerate(images):
            name = describe_source(source, position)
            image = load_image(source, name=name)
            faces = self._detect_loaded(image)
            chosen.append(choose_face(faces, name, indices[position], min_face_px))
            loaded.append(image)
        return FaceIdentity(
            embedding=mean_embedding([face.embedding for face in chosen]),
            crops=tuple(face.crop for face in chosen),
            faces=tuple(chosen),
            boxes=tuple(face.bbox for face in chosen),
            backend=self.backend,
            is_recognizer=self.is_recognizer,
            images=tuple(loaded),
        )

    # -- UI ----------------------------------------------------------------------------------------

    @staticmethod
    def draw_boxes(image: ImageSource, faces: Sequence[DetectedFace], chosen: int | None = 0) -> Image.Image:
        """A copy of ``image`` with every face box drawn and numbered; face ``chosen`` highlighted.

        ``faces`` must come from :meth:`detect` on the same image (coordinates of the loaded
        image). The chosen face is green and thick, the others orange; keypoints are dots.
        """
        canvas = load_image(image).copy()
        draw = ImageDraw.Draw(canvas)
        line = max(2, round(max(canvas.size) / 300))
        for number, face in enumerate(faces):
            highlight = number == chosen
            colour = (40, 220, 80) if highlight else (255, 150, 0)
            width = line * 2 if highlight else line
            x1, y1, x2, y2 = face.bbox
            draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
            radius = max(2, line)
            for x, y in np.asarray(face.kps).reshape(-1, 2):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
            label = f"{number}" + (" (used)" if highlight else "")
            draw.text((x1 + width + 2, max(0, y1 - 12 - width)), label, fill=colour)
        return canvas


def _per_photo_indices(face_index: int | Sequence[int | None] | None, count: int) -> list[int | None]:
    """Expand ``face_index`` to one entry per photo."""
    if face_index is None or isinstance(face_index, (int, np.integer)):
        return [None if face_index is None else int(face_index)] * count
    indices = list(face_index)
    if len(indices) != count:
        raise ImageError(
            f"face_index lists {len(indices)} indices for {count} photos; give one per photo or a single number"
        )
    return [None if index is None else int(index) for index in indices]


def choose_face(faces: Sequence[DetectedFace], name: str, face_index: int | None, min_face_px: int) -> DetectedFace:
    """Pick face ``face_index`` (largest first; ``None`` = largest) of one photo, or explain why not."""
    if not faces:
        raise NoFaceError(
            f"no face found in face photo {name!r}; use a clear, frontal, well-lit photo where the face "
            "is not covered (no sunglasses or mask) and fills a good part of the picture"
        )
    index = 0 if face_index is None else face_index
    if index < 0 or index >= len(faces):
        found = f"{len(faces)} face" + ("s" if len(faces) != 1 else "")
        raise ImageError(
            f"face_index {index} is out of range for face photo {name!r}: {found} found "
            f"(valid indices 0..{len(faces) - 1}, largest first)"
        )
    face = faces[index]
    if min(face.width, face.height) < min_face_px:
        raise NoFaceError(
            f"the face in face photo {name!r} is too small ({_size_text(face)}, at least {min_face_px} px "
            "needed); use a closer photo where the face is larger"
        )
    return face
