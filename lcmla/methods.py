"""Named method configurations of both papers, in one table (no torch: the UI imports it).

- FastFace: ``baseline``, ``am1``, ``am2``, ``dcg``, ``am1+dcg``, ``am2+dcg`` (see
  :mod:`lcmla.fastface`, each equal to the authors' released config of that name);
- LCM-Lookahead:
  ``lookahead-kv`` — the paper's inference: the KV path (supplement Eq. 1, s = 3/2/2) with FreeU
  b1 = b2 = 1.1, s1 = 0.9, s2 = 0.2 on the denoiser, the whole reference photo as the KV reference,
  on the backbone's own sampler;
  ``lookahead-released`` — the authors' released ``infer.py`` defaults: the same KV guidance,
  DPM-Solver++ with 50 steps, adapter scale 1.0, encoder prompt "A photo of a face", FreeU off (their
  ``use_freeu`` default), the whole photo as the reference. Their adapter is IP-Adapter Plus-Face
  with their trained KV encoder; lcmla runs this configuration with whichever identity adapter and
  KV-encoder LoRA are loaded (``lcmla.convert`` turns their checkpoint into ours).

Every configuration states the switches that define it (the other method's off), so applying one
always gives that method; every other knob stays the user's.
"""

from __future__ import annotations

from typing import Any

from .errors import SettingsError
from .fastface import FASTFACE_PRESETS, fastface_changes

_LOOKAHEAD_BASE = {
    "guidance.dcg": False,
    "attention.mode": "none",
    "attention.am_norm_scope": "sample",
    "lookahead.kv": True,
    "lookahead.s_nokv": 3.0,
    "lookahead.s_full": 2.0,
    "lookahead.s_kv": 2.0,
    "lookahead.reference_framing": "photo",
}
LOOKAHEAD_CONFIGS: dict[str, dict[str, Any]] = {
    "lookahead-kv": {
        **_LOOKAHEAD_BASE,
        "lookahead.kv_prompt": "a photo of a face",
        "freeu.enabled": True,
        "freeu.b1": 1.1,
        "freeu.b2": 1.1,
        "freeu.s1": 0.9,
        "freeu.s2": 0.2,
    },
    "lookahead-released": {
        **_LOOKAHEAD_BASE,
        "lookahead.kv_prompt": "A photo of a face",
        "guidance.scheduler": "DPMSolverMultistepScheduler",
        "guidance.steps": 50,
        "identity.ip_adapter_scale": 1.0,
        "freeu.enabled": False,
    },
}
METHODS: tuple[str, ...] = (*FASTFACE_PRESETS, *LOOKAHEAD_CONFIGS)
#: The knobs of the sampler a configuration runs on. Only ``lookahead-released`` sets them (the
#: authors' DPM-Solver++, 50 steps, adapter scale 1.0); every other configuration runs on the
#: backbone's own sampler and leaves them as they are. The app puts back the preset's own values
#: of those the previous configuration set when the next one does not (see ``lcmla.ui.generate``).
SAMPLER_KNOBS: tuple[str, ...] = ("guidance.scheduler", "guidance.steps", "identity.ip_adapter_scale")
#: Short labels for buttons and plots.
METHOD_LABELS: dict[str, str] = {
    "baseline": "Baseline", "am1": "AM1", "am2": "AM2", "dcg": "DCG", "am1+dcg": "AM1 + DCG",
    "am2+dcg": "AM2 + DCG", "lookahead-kv": "LCM-Lookahead KV", "lookahead-released": "LCM-Lookahead (as released)",
}


def method_changes(name: str, backbone: str) -> dict[str, Any]:
    """The dotted setting changes of method ``name`` for the ``backbone`` preset."""
    if name in LOOKAHEAD_CONFIGS:
        return dict(LOOKAHEAD_CONFIGS[name])
    if name in FASTFACE_PRESETS:
        # a FastFace method is not on the KV path and leaves FreeU off, as the authors ran it; the
        # authors-exact scope (attention.am_norm_scope) stays the user's choice
        return {**fastface_changes(name, backbone), "lookahead.kv": False, "freeu.enabled": False}
    raise SettingsError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
