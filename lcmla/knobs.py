"""The knob table: one declaration per setting the app and the CLI expose — its label, kind, range,
help text, and how a value crosses between a widget (or a command-line word) and the setting.

Pure Python (no gradio, no torch): ``app.py`` builds its widgets from :data:`KNOBS` and
``python -m lcmla generate`` builds one flag per knob from the same table (:func:`cli_flag`,
:func:`parse_cli`), so the two never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import SettingsError
from .presets import Preset
from .settings import (
    AM_MODES,
    AM_TARGETS,
    DCG_VARIANTS,
    REFERENCE_FRAMINGS,
    SCHEDULE_KINDS,
    SCHEDULERS,
    GenerationSettings,
)

PRESET_SCHEDULER = "the preset's"
MAX_IMAGES = 8  # images per request in the UI (settings allow 16)
MAX_SEED = 2**53 - 1  # the largest integer a browser's number field holds exactly

def _floats_text(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _parse_floats(text: Any, knob: Knob) -> list[float]:
    """'1, 1.5, 1.5, 1' → [1.0, 1.5, 1.5, 1.0] (commas, semicolons or spaces between numbers)."""
    if isinstance(text, (list, tuple)):
        return [float(v) for v in text]
    parts = [p for p in str(text or "").replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    example = "0, 2" if knob.kind == "steps" else knob.placeholder  # a steps knob's placeholder is 'every step'
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise SettingsError(
            f"{knob.named}: {str(text)!r} is not a list of numbers; write them separated by commas, "
            f"e.g. {example!r}"
        ) from None
    if not values:
        raise SettingsError(f"{knob.named} is empty; write numbers separated by commas, e.g. {example!r}")
    return values


def _parse_steps(text: Any, knob: Knob) -> list[int] | None:
    """'' → None (every step); '1, 2' → [1, 2]."""
    if text is None or isinstance(text, str) and not text.strip():
        return None
    values = _parse_floats(text, knob)
    if any(not v.is_integer() for v in values):
        raise SettingsError(f"{knob.named}: step indices are whole numbers (got {str(text)!r})")
    return [int(v) for v in values]


def _parse_int(value: Any, knob: Knob) -> int:
    if value is None or isinstance(value, str) and not value.strip():
        raise SettingsError(f"{knob.named} is empty; enter a whole number")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value.strip())  # exact: a float would round seeds past 2**53
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{knob.named} must be a whole number (got {value!r})") from None
    if not number.is_integer():
        raise SettingsError(f"{knob.named} must be a whole number (got {value!r})")
    return int(number)


def _parse_number_field(value: Any, knob: Knob) -> int:
    """A whole-number field's value, within the knob's range (the app's number boxes leave the range
    to this message, which names the control, rather than Gradio's generic one)."""
    number = _parse_int(value, knob)
    lo = -math.inf if knob.minimum is None else knob.minimum
    hi = math.inf if knob.maximum is None else knob.maximum
    if not lo <= number <= hi:
        raise SettingsError(f"{knob.named} must be a whole number from {lo:.0f} to {hi:.0f} (got {number})")
    return number


def _parse_float(value: Any, knob: Knob) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{knob.named} must be a number (got {value!r})") from None


# widget value → setting value, per kind
_PARSE: dict[str, Callable[[Any, Knob], Any]] = {
    "text": lambda v, k: "" if v is None else str(v),
    "int": _parse_number_field,
    "slider_int": _parse_int,
    "slider": _parse_float,
    "bool": lambda v, k: bool(v),
    "choice": lambda v, k: v,
    "targets": lambda v, k: list(v or []),
    "tokens": lambda v, k: [_parse_int(t, k) for t in (v or [])],
    "floats": _parse_floats,
    "steps": _parse_steps,
    "face_index": lambda v, k: None if v in (None, "") or _parse_int(v, k) == 0 else _parse_int(v, k),
    "scope": lambda v, k: "image-branches" if v else "sample",
    "scheduler": lambda v, k: None if v in (None, "", PRESET_SCHEDULER) else v,
}

# setting value → widget value, per kind (identity where missing)
_SHOW: dict[str, Callable[[Any], Any]] = {
    "targets": lambda v: list(v),
    "tokens": lambda v: [str(t) for t in v],
    "floats": _floats_text,
    "steps": lambda v: "" if v is None else ", ".join(str(s) for s in v),
    "face_index": lambda v: 0 if v is None else v,
    "scope": lambda v: v == "image-branches",
    "scheduler": lambda v: PRESET_SCHEDULER if v is None else v,
}


@dataclass(frozen=True)
class Knob:
    """One control: the dotted setting it sets, its widget and how values cross between the two."""

    name: str  # dotted GenerationSettings path, e.g. "identity.ip_adapter_scale"
    label: str
    kind: str  # a key of _PARSE
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    info: str = ""
    choices: tuple[Any, ...] = ()
    placeholder: str = ""
    lines: int = 1
    flag: str = ""  # a short command-line alias besides the long flag (e.g. "seed" for --seed)

    def parse(self, value: Any) -> Any:
        """Widget value → setting value (raises SettingsError naming the control)."""
        return _PARSE[self.kind](value, self)

    def show(self, value: Any) -> Any:
        """Setting value → widget value."""
        return _SHOW.get(self.kind, lambda v: v)(value)

    @property
    def named(self) -> str:
        """How messages name the control: 'Width (output.width)'; the app's own inputs (app.*) are
        no setting, so by their label alone."""
        return self.label if self.name.startswith("app.") else f"{self.label} ({self.name})"

    @property
    def elem_id(self) -> str:
        return "knob-" + self.name.replace(".", "-").replace("_", "-")


_EPS_DCG = "ε = ε∅ + a·(ε_i − ε∅) + b·(ε_ti − ε_i)"
_EPS_KV = "ε = ε_u + s_nokv·(ε_nokv − ε_u) + s_full·(ε_full − ε_u) + s_kv·(ε_kv − ε_u)"

KNOBS: tuple[Knob, ...] = (
    # -- the request ------------------------------------------------------------------------------
    Knob("prompt", "Prompt", "text", lines=2, placeholder="a pencil drawing of a face",
         info="What to draw. 'face' stands for the person in the photos."),
    Knob("negative_prompt", "Negative prompt", "text", placeholder="blurry, low quality",
         info="The text of the unconditional branch ε(∅); empty = SDXL's zero text embedding (force_zeros_for_empty_prompt)."),
    Knob("output.seed", "Seed", "int", minimum=0, maximum=MAX_SEED, info="Image i uses seed + i.", flag="seed"),
    Knob("output.num_images", "Images", "slider_int", 1, MAX_IMAGES, 1, flag="num-images"),
    Knob("output.width", "Width", "slider_int", 64, 2048, 8, info="Pixels; a multiple of 8.", flag="width"),
    Knob("output.height", "Height", "slider_int", 64, 2048, 8, info="Pixels; a multiple of 8.", flag="height"),
    Knob("guidance.steps", "Steps", "slider_int", 1, 50, 1, info="Denoising steps (the few-step presets use 4).", flag="steps"),
    Knob("guidance.scheduler", "Sampler", "scheduler", choices=(PRESET_SCHEDULER, *SCHEDULERS),
         info="The preset's own, or another diffusers scheduler over the same noise schedule "
              "(DPM-Solver++ is LCM-Lookahead's released sampler)."),
    Knob("guidance.guidance_scale", "CFG scale w", "slider", 0.0, 20.0, 0.1,
         info="Classic guidance ε = ε∅ + w·(ε_ti − ε∅); 1 = no CFG (one UNet branch). Ignored when DCG is on.", flag="guidance-scale"),
    # -- identity (FaceID-Plus-v2, SPEC §1) ----------------------------------------------------------
    Knob("identity.ip_adapter_scale", "IP-Adapter scale λ", "slider", 0.0, 2.0, 0.05,
         info="Weight of the identity branch: z = Attn(Q, K, V) + λ·Attn(Q, K′, V′) (FastFace Eq. 3).", flag="ip-adapter-scale"),
    Knob("identity.lora_scale", "FaceID LoRA scale", "slider", 0.0, 2.0, 0.05,
         info="Scale of FaceID-Plus-v2's companion LoRA (1.0 as released; 0.5–0.6 is popular).", flag="lora-scale"),
    Knob("guidance.backbone_lora_scale", "Backbone LoRA scale", "slider", 0.0, 2.0, 0.05,
         info="Scale of a backbone kept as a LoRA adapter (the LCM-LoRA of sdxl-lcm-lora); other presets ignore it."),
    Knob("identity.shortcut", "Shortcut (Plus-v2)", "bool",
         info="Add the CLIP face features to the identity tokens directly (FaceID-Plus-v2's shortcut)."),
    Knob("identity.shortcut_scale", "Shortcut scale", "slider", 0.0, 4.0, 0.05,
         info="Weight of the CLIP face features in shortcut mode."),
    Knob("identity.face_index", "Face to use", "face_index", 0, 15, 1,
         info="When a photo shows several faces: 0 = the largest, 1 = the next, …", flag="face-index"),
    # -- decoupled CFG (FastFace §3.2, SPEC §2) --------------------------------------------------------
    Knob("guidance.dcg", "Decoupled CFG (DCG)", "bool",
         info=f"Three branches in one UNet call: {_EPS_DCG} (FastFace Eq. 5)."),
    Knob("guidance.dcg_variant", "DCG variant", "choice", choices=DCG_VARIANTS,
         info="id-first: Eq. 5/17 · text-first: ε∅ + a·(ε_t − ε∅) + b·(ε_ti − ε_t) (Eq. 16) · "
              "independent: ε∅ + a·(ε_t − ε∅) + b·(ε_i − ε∅) (Eq. 18)."),
    Knob("guidance.dcg_schedule", "Schedule kind", "choice", choices=SCHEDULE_KINDS,
         info="list: one value per step (stretched to the step count) · constant: one value · "
              "linear / cosine: start, end."),
    Knob("guidance.dcg_a", "a per step", "floats", placeholder="1, 1.5, 1.5, 1",
         info="Weight of the first guidance direction (identity for id-first)."),
    Knob("guidance.dcg_b", "b per step", "floats", placeholder="1, 3, 3, 1",
         info="Weight of the second direction (text for id-first). Steps where a = b = 1 cost one branch."),
    Knob("guidance.rescale_phi", "Rescale φ", "slider", 0.0, 1.0, 0.05,
         info="ε ← f·ε, f = φ·(σ(ε_i) + σ(ε_ti)) / (2σ(ε)) + (1 − φ) (FastFace Eq. 6); 0 = off."),
    # -- attention manipulation (FastFace §3.3, SPEC §3) --------------------------------------------
    Knob("attention.mode", "Attention manipulation", "choice", choices=AM_MODES,
         info="On the identity-branch probabilities A = softmax(QK′ᵀ/√d): am1 scale-power (Eq. 8), "
              "am2 scheduled softmask (Eq. 9–10)."),
    Knob("attention.targets", "Blocks", "targets", choices=AM_TARGETS,
         info="UNet blocks whose identity attention is changed (the authors: down and up)."),
    Knob("attention.tokens", "Identity tokens", "tokens", choices=("0", "1", "2", "3"),
         info="Which of the 4 identity tokens the transform touches."),
    Knob("attention.steps", "AM at steps", "steps", placeholder="every step",
         info="Step indices (0-based), comma-separated; empty = every step."),
    Knob("attention.am1_power", "AM1 power p", "slider", 0.1, 5.0, 0.05, info="Ã = min(s·Aᵖ, cap) (Eq. 8)."),
    Knob("attention.am1_scale_down", "AM1 s, down", "slider", 0.0, 10.0, 0.05, info="s in down blocks (and in the mid block when it is a target)."),
    Knob("attention.am1_scale_up", "AM1 s, up", "slider", 0.0, 10.0, 0.05, info="s in up blocks."),
    Knob("attention.am2_sharpness", "AM2 sharpness d_k", "floats", placeholder="7.5, 5, 5, 5",
         info="Per step: M = sigmoid(d_k·(norm(A) − q)) (Eq. 9)."),
    Knob("attention.am2_scale", "AM2 scale s_k", "floats", placeholder="1, 1.55, 1.55, 1.55",
         info="Per step: Ã = min(s_k·norm(M), cap) (Eq. 10)."),
    Knob("attention.am2_quantile", "AM2 quantile q", "slider", 0.0, 1.0, 0.01,
         info="q = this quantile of A over the image positions."),
    Knob("attention.am2_adain", "AM2 AdaIN", "bool",
         info="AM2's AdaIN blend on the probabilities (over tokens) and on the branch output (per head)."),
    Knob("attention.adain_weight", "AdaIN weight w", "slider", 0.0, 1.0, 0.05,
         info="x ← w·x + (1 − w)·((x − μ_x)·σ_ref/(σ_x + 1e-6) + μ_ref) (Eq. 10)."),
    Knob("attention.am_norm_scope", "Authors-exact AM2 (pool over the image's branches)", "scope",
         info="Off: AM2's min–max is taken per image and branch (batch-invariant). On: pooled over the three DCG "
              "branches of the same image, which always run, as in the FastFace authors' code; reproduces their tables."),
    Knob("attention.cap", "Cap", "slider", 0.1, 100.0, 0.1, info="Upper clamp of the manipulated map Ã."),
    # -- LCM-Lookahead KV path (SPEC §4) -------------------------------------------------------------
    Knob("lookahead.kv", "KV path (extended self-attention)", "bool",
         info="Self-attention also sees the reference: K = [K_gen; K_ref], V = [V_gen; V_ref]; four branches.", flag="kv"),
    Knob("lookahead.s_nokv", "s_nokv", "slider", 0.0, 30.0, 0.1, info=f"{_EPS_KV} (supplement Eq. 1)."),
    Knob("lookahead.s_full", "s_full", "slider", 0.0, 30.0, 0.1, info="Weight of text + identity + KV."),
    Knob("lookahead.s_kv", "s_kv", "slider", 0.0, 30.0, 0.1, info="Weight of the KV-only branch."),
    Knob("lookahead.kv_prompt", "KV encoder prompt", "text", placeholder="a photo of a face",
         info="The prompt of the KV encoder's pass over the reference (its second row; the first is the null text)."),
    Knob("lookahead.reference_framing", "KV reference", "choice", choices=REFERENCE_FRAMINGS,
         info="photo: the whole reference photo fitted to the output size (the authors' release) · face: a crop of "
              "twice the face box. Both keep the aspect ratio and pad with the photo's own border."),
    Knob("lookahead.kv_lora_scale", "KV encoder LoRA scale", "slider", 0.0, 2.0, 0.05),
    # -- FreeU ------------------------------------------------------------------------------------------
    Knob("freeu.enabled", "FreeU", "bool",
         info="Re-weight the decoder: backbone features × b, low frequencies of skip features × s (Si et al.)."),
    Knob("freeu.b1", "b1", "slider", 0.0, 3.0, 0.05, info="Backbone factor, stage 1."),
    Knob("freeu.b2", "b2", "slider", 0.0, 3.0, 0.05, info="Backbone factor, stage 2."),
    Knob("freeu.s1", "s1", "slider", 0.0, 3.0, 0.05, info="Skip factor, stage 1."),
    Knob("freeu.s2", "s2", "slider", 0.0, 3.0, 0.05, info="Skip factor, stage 2."),
)
KNOB_NAMES: tuple[str, ...] = tuple(k.name for k in KNOBS)
KNOB: dict[str, Knob] = {k.name: k for k in KNOBS}
#: Settings set elsewhere than through a knob: the preset by the engine, map capture by the
#: Attention tab, the previews' LCM-LoRA scale by the Lookahead tab's own slider.
NOT_KNOBS = frozenset({"preset", "attention.capture_maps", "lookahead.lcm_lora_scale"})


def preset_settings(preset: Preset) -> GenerationSettings:
    """Default settings with the preset's own steps, size and guidance filled in (what the UI shows)."""
    return GenerationSettings(preset=preset.name).replace_dotted({
        "guidance.steps": preset.steps,
        "guidance.guidance_scale": preset.guidance_scale,
        "output.width": preset.width,
        "output.height": preset.height,
    })


def settings_to_ui(settings: GenerationSettings, preset: Preset | None = None) -> dict[str, Any]:
    """Knob name → widget value for every knob; open fields (None) show the preset's default."""
    flat = flatten(settings.to_dict())
    if preset is not None:
        defaults = flatten(preset_settings(preset).to_dict())
        flat = {k: defaults[k] if v is None and k in _OPEN_FIELDS else v for k, v in flat.items()}
    return {knob.name: knob.show(flat[knob.name]) for knob in KNOBS}


_OPEN_FIELDS = frozenset({"guidance.steps", "guidance.guidance_scale", "output.width", "output.height"})


def settings_from_ui(values: Mapping[str, Any], preset: Preset, extra: Mapping[str, Any] | None = None) -> GenerationSettings:
    """Widget values by knob name (others ignored) → one validated GenerationSettings.

    ``extra`` holds dotted settings the handler sets itself (e.g. map capture), applied last.
    """
    changes = {knob.name: knob.parse(values[knob.name]) for knob in KNOBS}
    changes.update(extra or {})
    return GenerationSettings(preset=preset.name).replace_dotted(changes)


def flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif key != "version":
            out[key] = value
    return out


# ---- the command line: one flag per knob -------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def cli_flags(knob: Knob) -> list[str]:
    """The command-line flags of a knob: the long one from its setting path (``identity.lora_scale``
    → ``--identity-lora-scale``; ``prompt`` → ``--prompt``) and its short alias, if any."""
    long = "--" + knob.name.replace(".", "-").replace("_", "-")
    return [long] + ([f"--{knob.flag}"] if knob.flag and f"--{knob.flag}" != long else [])


def cli_help(knob: Knob) -> str:
    """``--help`` text of a knob: its label, range or choices and info (the app's own words)."""
    parts = [knob.label]
    if knob.minimum is not None and knob.maximum is not None:
        # the app's slider range; the settings may accept more (a value outside says its own range)
        fmt = lambda v: str(int(v)) if float(v).is_integer() else f"{v:g}"  # noqa: E731
        parts.append(f"{fmt(knob.minimum)}…{fmt(knob.maximum)} in the app")
    if knob.choices:
        parts.append("one of " + ", ".join(str(c[1] if isinstance(c, tuple) else c) for c in knob.choices))
    if knob.kind in ("floats", "targets", "tokens", "steps"):
        parts.append("comma-separated")
    if knob.kind in ("bool", "scope"):
        parts.append("true/false" if knob.kind == "bool" else "sample or image-branches")
    text = " · ".join(parts)
    return f"{text}. {knob.info}" if knob.info else text


def parse_cli(knob: Knob, text: str) -> Any:
    """A command-line word → the setting's value (validated later by GenerationSettings, which
    names the field and its range)."""
    kind = knob.kind
    if kind in ("int", "slider_int", "face_index"):
        return _parse_int(text, knob)
    if kind == "slider":
        return _parse_float(text, knob)
    if kind == "bool":
        word = str(text).strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise SettingsError(f"{cli_flags(knob)[0]} takes true or false (got {text!r})")
    if kind in ("floats", "steps"):
        return _PARSE[kind](text, knob)
    if kind in ("targets", "tokens"):
        items = [t.strip() for t in str(text).replace(";", ",").split(",") if t.strip()]
        return _PARSE[kind](items, knob)
    if kind == "scheduler":
        return None if str(text).strip() in ("", "preset", PRESET_SCHEDULER) else str(text).strip()
    return str(text)  # text, choice, scope: the settings validate the word
