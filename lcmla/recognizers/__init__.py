"""Differentiable face-recognition networks in torch, for the identity loss and for evaluation.

Two real recognizers, each a :class:`~lcmla.recognizers.base.Recognizer`:

- dlib's face recognition ResNet (``face-recognition-models`` on PyPI, CC0), parsed from its
  ``.dat`` file and rebuilt in torch: available offline everywhere, 128-d descriptors;
- insightface's ArcFace (``w600k_r50.onnx`` of ``buffalo_l``), converted from ONNX to torch when the
  user has the pack: 512-d embeddings, the network FaceID-Plus-v2 itself is conditioned on.

Importing this package is cheap: torch and the model files are touched only when a recognizer is
built.
"""

from __future__ import annotations

#: public name → submodule; imported on first use (``from lcmla.recognizers import DlibFaces``)
_EXPORTS = {
    "Recognizer": "base",
    "DlibFaces": "dlib_pipeline",
    "DlibRecognizer": "dlib_resnet",
    "ArcFaceRecognizer": "arcface",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
