"""Named FastFace configurations, as the authors ran them (FastFace §4 and appendix; SPEC §2–3).

Each preset is a set of dotted setting changes applied on top of a user's settings, so the UI and
the CLI load "the authors' configuration" in one click while every other knob stays the user's.
"""

from __future__ import annotations

from typing import Any

from .errors import SettingsError
from .settings import GenerationSettings

_OFF = {"guidance.dcg": False, "attention.mode": "none"}
_DCG = {
    "guidance.dcg": True,
    "guidance.dcg_variant": "id-first",
    "guidance.dcg_schedule": "list",
    "guidance.dcg_a": [1.0, 1.5, 1.5, 1.0],
    "guidance.dcg_b": [1.0, 3.0, 3.0, 1.0],
    "guidance.rescale_phi": 0.75,
}
_AM1 = {
    "attention.mode": "am1",
    "attention.targets": ["down", "up"],
    "attention.tokens": [0, 1, 2, 3],
    "attention.steps": None,
    "attention.am1_power": 1.3,
    "attention.am1_scale_down": 1.55,
    "attention.am1_scale_up": 1.45,
}
_AM2 = {
    "attention.mode": "am2",
    "attention.targets": ["down", "up"],
    "attention.tokens": [0, 1, 2, 3],
    "attention.steps": None,
    "attention.am2_sharpness": [7.5, 5.0, 5.0, 5.0],
    "attention.am2_scale": [1.0, 1.55, 1.55, 1.55],
    "attention.am2_quantile": 0.65,
    "attention.adain_weight": 0.7,
}

FASTFACE_PRESETS: dict[str, dict[str, Any]] = {
    "baseline": dict(_OFF),
    "am1": {**_OFF, **_AM1},
    "am2": {**_OFF, **_AM2},
    "dcg": {**_OFF, **_DCG},
    "am1+dcg": {**_OFF, **_AM1, **_DCG},
    "am2+dcg": {**_OFF, **_AM2, **_DCG},
}


def apply_fastface_preset(settings: GenerationSettings, name: str) -> GenerationSettings:
    """``settings`` with FastFace configuration ``name`` applied (other knobs untouched)."""
    try:
        changes = FASTFACE_PRESETS[name]
    except KeyError:
        raise SettingsError(f"unknown FastFace preset {name!r}; choose one of {', '.join(FASTFACE_PRESETS)}") from None
    return settings.replace_dotted(changes)
