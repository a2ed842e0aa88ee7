"""lcmla: identity-preserving image generation with few-step diffusion models.

Importing ``lcmla`` is cheap: it loads no torch, no model and no weights. The engine and friends are
imported on first use (``lcmla.Engine`` triggers the import of ``lcmla.engine``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ImageError, LcmlaError, MissingWeightsError, NoFaceError, SettingsError
from .presets import DEFAULT_PRESET, PRESETS, Preset, get_preset
from .settings import (
    AttentionSettings,
    FreeUSettings,
    GenerationSettings,
    GuidanceSettings,
    IdentitySettings,
    LookaheadSettings,
    OutputSettings,
)

__version__ = "0.1.0"

_LAZY = {
    "Engine": "engine",
    "Result": "engine",
    "StepInfo": "engine",
    "FaceAnalyzer": "faces",
    "FaceIdentity": "faces",
    "load_image": "images",
    "settings_from_png": "pngmeta",
    "save_png": "pngmeta",
}

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine, Result, StepInfo
    from .faces import FaceAnalyzer, FaceIdentity
    from .images import load_image
    from .pngmeta import save_png, settings_from_png


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'lcmla' has no attribute {name!r}")


__all__ = [
    "AttentionSettings", "DEFAULT_PRESET", "Engine", "FaceAnalyzer", "FaceIdentity", "FreeUSettings",
    "GenerationSettings", "GuidanceSettings", "IdentitySettings", "ImageError", "LcmlaError",
    "LookaheadSettings", "MissingWeightsError", "NoFaceError", "OutputSettings", "PRESETS", "Preset",
    "Result", "SettingsError", "StepInfo", "get_preset", "load_image", "save_png", "settings_from_png",
    "__version__",
]
