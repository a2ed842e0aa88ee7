"""Named FastFace configurations, as the authors released them (SPEC §2–3).

Each preset is a set of dotted setting changes applied on top of a user's settings, so the UI and
the CLI load "the authors' configuration" in one click while every other knob stays the user's.
They match the authors' released files name by name (``ControlGenAI/FastFace``, ``configs/``):

| preset    | released config                       | AM                         | guidance                          |
|-----------|---------------------------------------|----------------------------|-----------------------------------|
| baseline  | (no file: ``patch_pipe`` off)         | none                       | the backbone's plain guidance     |
| am1       | ``am_only/scalepow.json``             | AM1 p 1.3, s 1.55↓ 1.45↑   | the backbone's plain guidance     |
| am2       | ``am_only/softmask_scheduled.json``   | AM2, AdaIN **off**         | the backbone's plain guidance     |
| dcg       | ``dcg_only/dcg2_style.json``          | none                       | DCG id-first, a/b lists, φ 0.75   |
| am1+dcg   | ``fastface/am1_and_dcg.json``         | AM1 (AdaIN off)            | DCG id-first, a/b lists, φ 0.75   |
| am2+dcg   | ``fastface/am2_and_dcg.json``         | AM2, AdaIN on (w 0.7)      | DCG id-first, a/b lists, φ 0.75   |

"The backbone's plain guidance" is the authors' ``reset_gs_to_default``: a = b = 1.5 with the LCM
backbone, 5 with base SDXL, 1 otherwise, without rescale, which is classic CFG at that scale
(ε∅ + s(ε_i − ε∅) + s(ε_ti − ε_i) = ε∅ + s(ε_ti − ε∅)); :func:`fastface_changes` sets it for the
backbone in use.

Where ours differs from the released code, and why:
- AM1 scales: the paper's appendix lists s = 1.45 in down blocks and 1.55 in up blocks; the
  released code (``custom_dca.scales_map``) uses 1.55 down / 1.45 up. We follow the code.
- AM2's min–max normalisation is per sample by default, so an image never depends on which
  guidance branches or images share its batch; the authors pool over their whole batch (the three
  DCG branches of one image). ``attention.am_norm_scope = "image-branches"`` reproduces theirs.
- Branches: the authors always run three; we run the branches a step needs (two at a = b = 1 with
  φ > 0, one with φ = 0; classic CFG at scale 1 one). The results agree to float rounding; the
  authors-exact scope above runs their three at every step.
- λ (``identity.ip_adapter_scale``) and the FaceID LoRA scale stay the user's: the released configs
  fix 0.8 and 1.0, which are our defaults (``simple_inference.py`` overrides the LoRA scale to 0.6
  unless told otherwise).
"""

from __future__ import annotations

from typing import Any

from .errors import SettingsError
from .settings import GenerationSettings

_OFF = {"guidance.dcg": False, "attention.mode": "none"}
_DCG = {
    "guidance.dcg": True,
    "guidance.dcg_variant": "id-first",  # dcg_type 3
    "guidance.dcg_schedule": "list",  # a_scheduler = b_scheduler = "custom"
    "guidance.dcg_a": [1.0, 1.5, 1.5, 1.0],
    "guidance.dcg_b": [1.0, 3.0, 3.0, 1.0],
    "guidance.rescale_phi": 0.75,  # term_postproc "rescale", rescale 0.75
}
_AM_TARGETS = {
    "attention.targets": ["down", "up"],  # target_parts
    "attention.tokens": [0, 1, 2, 3],  # target_tokens
    "attention.steps": None,  # target_tsteps [0, 1, 2, 3]: every step of 4
}
_AM1 = {
    **_AM_TARGETS,
    "attention.mode": "am1",  # am_transforms ["pow", "scale"]
    "attention.am1_power": 1.3,
    "attention.am1_scale_down": 1.55,
    "attention.am1_scale_up": 1.45,
}
_AM2 = {
    **_AM_TARGETS,
    "attention.mode": "am2",  # ["adaptive_softmask", "scale"], inverse_neg_transforms, apply_schedule
    "attention.am2_sharpness": [7.5, 5.0, 5.0, 5.0],
    "attention.am2_scale": [1.0, 1.55, 1.55, 1.55],
    "attention.am2_quantile": 0.65,
    "attention.adain_weight": 0.7,
}

FASTFACE_PRESETS: dict[str, dict[str, Any]] = {
    "baseline": dict(_OFF),
    "am1": {**_OFF, **_AM1},
    "am2": {**_OFF, **_AM2, "attention.am2_adain": False},  # softmask_scheduled.json has no apply_adain
    "dcg": {**_OFF, **_DCG},
    "am1+dcg": {**_OFF, **_AM1, **_DCG},
    "am2+dcg": {**_OFF, **_AM2, "attention.am2_adain": True, **_DCG},
}

# the authors' reset_gs_to_default (simple_inference.py, diff_eval_idadapter.py) per backbone
_PLAIN_GUIDANCE = {"sdxl-lcm-lora": 1.5, "sdxl-base": 5.0}


def plain_guidance_scale(backbone: str) -> float:
    """The guidance scale the authors' AM-only and baseline runs use with ``backbone``."""
    return _PLAIN_GUIDANCE.get(backbone, 1.0)


def fastface_changes(name: str, backbone: str) -> dict[str, Any]:
    """The dotted setting changes of FastFace configuration ``name`` for the ``backbone`` preset."""
    try:
        changes = dict(FASTFACE_PRESETS[name])
    except KeyError:
        raise SettingsError(f"unknown FastFace preset {name!r}; choose one of {', '.join(FASTFACE_PRESETS)}") from None
    if not changes["guidance.dcg"]:
        changes["guidance.guidance_scale"] = plain_guidance_scale(backbone)
    return changes


def apply_fastface_preset(settings: GenerationSettings, name: str) -> GenerationSettings:
    """``settings`` with FastFace configuration ``name`` applied for ``settings.preset`` (other
    knobs untouched)."""
    return settings.replace_dotted(fastface_changes(name, settings.preset))
