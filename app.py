"""lcmla's web app: identity-preserving few-step SDXL with every knob of FastFace and LCM-Lookahead.

    python app.py                          # the offline `tiny` preset (random weights), 127.0.0.1:7860
    python app.py --preset hyper-sdxl-4step --weights-dir ~/weights --host 0.0.0.0

Four tabs share one set of controls (the Generate tab's): Generate, Lookahead previews, Attention
maps and Compare. The controls are declared once, in ``KNOBS``: each knob names the dotted setting it
sets, its widget and its range, and says how a widget value becomes a setting value and back. Every
handler turns the widget values into ONE ``GenerationSettings`` through ``settings_from_ui`` (a dict
of name → value, zipped with the declared order, then ``replace_dotted``), hands it with the face
photos to the engine and shows what comes back. The UI never imports torch, and importing this
module loads nothing heavy: the engine is loaded by ``main`` (or handed to ``build_demo``).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import queue
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from lcmla import __version__
from lcmla.errors import LcmlaError, MissingWeightsError, SettingsError
from lcmla.methods import METHOD_LABELS, METHODS, method_changes
from lcmla.presets import PRESETS, Preset
from lcmla.settings import (
    AM_MODES,
    AM_TARGETS,
    DCG_VARIANTS,
    REFERENCE_FRAMINGS,
    SCHEDULE_KINDS,
    SCHEDULERS,
    GenerationSettings,
)

PRESET_SCHEDULER = "the preset's"

__all__ = [
    "APP_PRESETS", "COMPARE_METHODS", "GENERATE_INPUTS", "KNOBS", "KNOB_NAMES", "Knob", "build_demo",
    "launch", "main", "parse_args", "settings_from_ui", "settings_to_ui", "ui_defaults",
]

log = logging.getLogger("lcmla.app")

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
MAX_FILE_SIZE = "20mb"  # per upload; face photos are shrunk to 2048 px anyway
QUEUE_SIZE = 32  # requests waiting at most; more get "queue full"
MAX_IMAGES = 8  # images per request in the UI (settings allow 16)
MAX_SEED = 2**53 - 1  # the largest integer a browser's number field holds exactly
OUTPUT_TTL_S = 3600  # PNG downloads are kept this long


# ------------------------------------------------------------------------------------------------
# The knobs: one declaration per setting, in the order the handlers receive them


def _floats_text(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _parse_floats(text: Any, knob: Knob) -> list[float]:
    """'1, 1.5, 1.5, 1' → [1.0, 1.5, 1.5, 1.0] (commas, semicolons or spaces between numbers)."""
    if isinstance(text, (list, tuple)):
        return [float(v) for v in text]
    parts = [p for p in str(text or "").replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise SettingsError(
            f"{knob.label} ({knob.name}): {str(text)!r} is not a list of numbers; write them separated by commas, "
            f"e.g. {knob.placeholder!r}"
        ) from None
    if not values:
        raise SettingsError(f"{knob.label} ({knob.name}) is empty; write numbers separated by commas, e.g. {knob.placeholder!r}")
    return values


def _parse_steps(text: Any, knob: Knob) -> list[int] | None:
    """'' → None (every step); '1, 2' → [1, 2]."""
    if text is None or isinstance(text, str) and not text.strip():
        return None
    values = _parse_floats(text, knob)
    if any(not v.is_integer() for v in values):
        raise SettingsError(f"{knob.label} ({knob.name}): step indices are whole numbers (got {str(text)!r})")
    return [int(v) for v in values]


def _parse_int(value: Any, knob: Knob) -> int:
    if value is None or isinstance(value, str) and not value.strip():
        raise SettingsError(f"{knob.label} ({knob.name}) is empty; enter a whole number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{knob.label} ({knob.name}) must be a whole number (got {value!r})") from None
    if not number.is_integer():
        raise SettingsError(f"{knob.label} ({knob.name}) must be a whole number (got {value!r})")
    return int(number)


def _parse_float(value: Any, knob: Knob) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{knob.label} ({knob.name}) must be a number (got {value!r})") from None


# widget value → setting value, per kind
_PARSE: dict[str, Callable[[Any, Knob], Any]] = {
    "text": lambda v, k: "" if v is None else str(v),
    "int": _parse_int,
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

    def parse(self, value: Any) -> Any:
        """Widget value → setting value (raises SettingsError naming the control)."""
        return _PARSE[self.kind](value, self)

    def show(self, value: Any) -> Any:
        """Setting value → widget value."""
        return _SHOW.get(self.kind, lambda v: v)(value)

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
    Knob("output.seed", "Seed", "int", minimum=0, maximum=MAX_SEED, info="Image i uses seed + i."),
    Knob("output.num_images", "Images", "slider_int", 1, MAX_IMAGES, 1),
    Knob("output.width", "Width", "slider_int", 64, 2048, 8, info="Pixels; a multiple of 8."),
    Knob("output.height", "Height", "slider_int", 64, 2048, 8, info="Pixels; a multiple of 8."),
    Knob("guidance.steps", "Steps", "slider_int", 1, 50, 1, info="Denoising steps (the few-step presets use 4)."),
    Knob("guidance.scheduler", "Sampler", "scheduler", choices=(PRESET_SCHEDULER, *SCHEDULERS),
         info="The preset's own, or another diffusers scheduler over the same noise schedule "
              "(DPM-Solver++ is LCM-Lookahead's released sampler)."),
    Knob("guidance.guidance_scale", "CFG scale w", "slider", 0.0, 20.0, 0.1,
         info="Classic guidance ε = ε∅ + w·(ε_ti − ε∅); 1 = no CFG (one UNet branch). Ignored when DCG is on."),
    # -- identity (FaceID-Plus-v2, SPEC §1) ----------------------------------------------------------
    Knob("identity.ip_adapter_scale", "IP-Adapter scale λ", "slider", 0.0, 2.0, 0.05,
         info="Weight of the identity branch: z = Attn(Q, K, V) + λ·Attn(Q, K′, V′) (FastFace Eq. 3)."),
    Knob("identity.lora_scale", "FaceID LoRA scale", "slider", 0.0, 2.0, 0.05,
         info="Scale of FaceID-Plus-v2's companion LoRA (1.0 as released; 0.5–0.6 is popular)."),
    Knob("guidance.backbone_lora_scale", "Backbone LoRA scale", "slider", 0.0, 2.0, 0.05,
         info="Scale of a backbone kept as a LoRA adapter (the LCM-LoRA of sdxl-lcm-lora); other presets ignore it."),
    Knob("identity.shortcut", "Shortcut (Plus-v2)", "bool",
         info="Add the CLIP face features to the identity tokens directly (FaceID-Plus-v2's shortcut)."),
    Knob("identity.shortcut_scale", "Shortcut scale", "slider", 0.0, 4.0, 0.05,
         info="Weight of the CLIP face features in shortcut mode."),
    Knob("identity.face_index", "Face to use", "face_index", 0, 15, 1,
         info="When a photo shows several faces: 0 = the largest, 1 = the next, …"),
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
    Knob("attention.am1_scale_down", "AM1 s, down", "slider", 0.0, 10.0, 0.05, info="s in down blocks."),
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
         info="Self-attention also sees the reference: K = [K_gen; K_ref], V = [V_gen; V_ref]; four branches."),
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
_KNOB = {k.name: k for k in KNOBS}

#: The inputs of the Generate, Lookahead, Attention and Compare handlers, in order ("app.*" are not settings).
GENERATE_INPUTS: tuple[str, ...] = ("app.faces", *KNOB_NAMES, "app.randomize_seed")
PREVIEW_INPUTS: tuple[str, ...] = (*GENERATE_INPUTS, "app.preview_lcm_scale", "app.preview_steps")
ATTENTION_INPUTS: tuple[str, ...] = (*GENERATE_INPUTS, "app.capture_mode")
#: Settings the UI sets itself rather than through a knob.
# set elsewhere: the preset by the engine, map capture by the Attention tab, the previews' LCM-LoRA
# scale by the Lookahead tab's own slider
NOT_KNOBS = frozenset({"preset", "attention.capture_maps", "lookahead.lcm_lora_scale"})

#: One-click configurations: both papers' named methods (lcmla.methods), label → key.
APP_PRESETS: dict[str, str] = {key: METHOD_LABELS[key] for key in METHODS}
#: The Compare tab's methods (keys of APP_PRESETS) and their labels.
COMPARE_METHODS: tuple[tuple[str, str], ...] = (
    ("baseline", "Baseline"),
    ("am1+dcg", "FastFace AM1 + DCG"),
    ("am2+dcg", "FastFace AM2 + DCG"),
    ("lookahead-kv", "LCM-Lookahead KV"),
)
CAPTURE_MODES = ("as set in Generate", *AM_MODES)
_PREVIEW_SCALE = Knob("app.preview_lcm_scale", "LCM-LoRA scale of the previews", "slider")
_PREVIEW_STEPS = Knob("app.preview_steps", "Steps to preview", "steps", placeholder="every step")


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
    flat = _flatten(settings.to_dict())
    if preset is not None:
        defaults = _flatten(preset_settings(preset).to_dict())
        flat = {k: defaults[k] if v is None and k in _OPEN_FIELDS else v for k, v in flat.items()}
    return {knob.name: knob.show(flat[knob.name]) for knob in KNOBS}


_OPEN_FIELDS = frozenset({"guidance.steps", "guidance.guidance_scale", "output.width", "output.height"})


def ui_defaults(preset: Preset) -> dict[str, Any]:
    """Every input of GENERATE_INPUTS at its starting value (no face photo)."""
    return {"app.faces": None, **settings_to_ui(preset_settings(preset)), "app.randomize_seed": False}


def settings_from_ui(values: Mapping[str, Any], preset: Preset, extra: Mapping[str, Any] | None = None) -> GenerationSettings:
    """Widget values by knob name (others ignored) → one validated GenerationSettings.

    ``extra`` holds dotted settings the handler sets itself (e.g. map capture), applied last.
    """
    changes = {knob.name: knob.parse(values[knob.name]) for knob in KNOBS}
    changes.update(extra or {})
    return GenerationSettings(preset=preset.name).replace_dotted(changes)


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif key != "version":
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------
# Small helpers shared by the handlers


@contextmanager
def user_errors(what: str) -> Iterator[None]:
    """Show the engine's own message for a user mistake; never a traceback, never a dead app."""
    try:
        yield
    except gr.Error:
        raise
    except ValueError as exc:  # LcmlaError and its subclasses are ValueErrors
        raise gr.Error(str(exc), title=f"{what}: please check the input", print_exception=False) from None
    except Exception as exc:  # a bug or a resource problem: log it, tell the user, keep serving
        log.exception("%s failed", what)
        raise gr.Error(f"{what} failed unexpectedly ({type(exc).__name__}: {exc})", title=f"{what} failed") from None


def api_param(name: str) -> str:
    """The HTTP/Python API name of an input: ``identity.ip_adapter_scale`` → ``identity__ip_adapter_scale``
    (the spelling of ``GenerationSettings.replace``), ``app.faces`` → ``faces``."""
    return name.removeprefix("app.").replace(".", "__")


def named_handler(fn: Callable[[dict[str, Any], Any], Any], names: Sequence[str]) -> Callable:
    """``fn(ui, progress)`` as a handler whose signature names every input, so Gradio's API page and
    ``gradio_client`` show ``prompt``, ``identity__ip_adapter_scale``, … instead of ``param_0`` ….
    ``ui`` maps the input names (``names``) to their values. Generators stay generators (streaming)."""
    params = [inspect.Parameter(api_param(n), inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    signature = inspect.Signature(params)

    def bind(args: tuple, kwargs: dict) -> tuple[dict[str, Any], Any]:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise gr.Error(f"{fn.__name__}: {exc}; the parameters are {', '.join(p.name for p in params[:-1])}") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        progress = values.pop("progress")
        return {n: values[api_param(n)] for n in names}, progress

    if inspect.isgeneratorfunction(fn):
        def handler(*args: Any, **kwargs: Any):
            yield from fn(*bind(args, kwargs))
    else:
        def handler(*args: Any, **kwargs: Any):
            return fn(*bind(args, kwargs))
    handler.__signature__ = signature  # type: ignore[attr-defined]
    handler.__name__ = handler.__qualname__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


def _face_paths(files: Any) -> list[str]:
    """gr.File(file_count='multiple') value → list of paths; at least one."""
    if files is None:
        files = []
    elif isinstance(files, (str, os.PathLike)) or hasattr(files, "name"):
        files = [files]
    paths = [f if isinstance(f, str) else getattr(f, "name", None) or os.fspath(f) for f in files]
    if not paths:
        raise gr.Error("Upload at least one photo of the face (JPEG, PNG or WebP) first.", title="No face photo")
    return paths


def _gpu(fn: Callable) -> Callable:
    """Hugging Face ZeroGPU: run ``fn`` on a GPU when the ``spaces`` package is there; else as is."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


class _Outputs:
    """Per-request folders for the PNG downloads, removed after OUTPUT_TTL_S."""

    def __init__(self) -> None:
        self.root = Path(tempfile.gettempdir()) / "lcmla-app"

    def new(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        now = time.time()
        for old in self.root.iterdir():
            try:
                if now - old.stat().st_mtime > OUTPUT_TTL_S:
                    shutil.rmtree(old, ignore_errors=True)
            except OSError:
                pass
        return Path(tempfile.mkdtemp(prefix="req-", dir=self.root))


def _timings_text(timings: Mapping[str, float]) -> str:
    order = ("faces", "conditions", "denoise", "decode", "previews", "total")
    parts = [f"{k} {timings[k]:.2f} s" for k in order if k in timings]
    return " · ".join(parts)


def _block_label(name: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.1.attn2.processor' → 'down 1 · attention 0 · layer 1'."""
    parts = name.split(".")
    try:
        if parts[0] == "mid_block":
            return f"mid · attention {parts[2]} · layer {parts[4]}"
        return f"{parts[0].split('_')[0]} {parts[1]} · attention {parts[3]} · layer {parts[5]}"
    except IndexError:
        return name


_KIND_CHOICES = [("All blocks (mean)", "all"), ("Down blocks (mean)", "down"), ("Mid block (mean)", "mid"), ("Up blocks (mean)", "up")]


def _similarity_text(score: float | None) -> str:
    return "no face found" if score is None else f"{score:.3f}"


# ------------------------------------------------------------------------------------------------
# The app


CSS = """
.lcmla-banner {border-left: 4px solid #d97706; background: #fffbeb; padding: 10px 14px; border-radius: 6px; color: #3f2d0c;}
.lcmla-banner p {margin: 0;}
.lcmla-header h1 {margin-bottom: 0;}
#generate-btn, #previews-btn, #attention-btn, #compare-btn {min-height: 48px; font-size: 1.05em;}
.lcmla-presets button {min-width: 0 !important;}
.lcmla-note {font-size: 0.9em; opacity: 0.85;}
"""


def _theme() -> gr.themes.Base:
    # System fonts only: the app works offline and asks no font server for anything.
    return gr.themes.Soft(
        primary_hue="indigo",
        secondary_hue="amber",
        font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"],
    )


def _header(engine: Any) -> str:
    p = engine.preset
    lines = [
        "# lcmla — your face, any style, in a few steps",
        "Identity-preserving few-step SDXL with IP-Adapter FaceID-Plus-v2: **FastFace** (decoupled guidance, "
        "attention manipulation) and **LCM-Lookahead** (LCM previews, KV path). Upload a face photo, write a "
        "prompt, press Generate. Every knob of both papers is below.",
        f"**Model:** `{p.name}` — {p.title} · {p.steps} steps · {p.width}×{p.height} · face backend: "
        f"{engine.faces.backend}{_providers(engine)} · lcmla {__version__}",
    ]
    return "\n\n".join(lines)


def _providers(engine: Any) -> str:
    """Where the face models run (insightface on onnxruntime): " on CUDA" / " on CPU", or nothing."""
    providers = tuple(getattr(engine.faces, "providers", ()) or ())
    if not providers:
        return ""
    return " on " + ("CUDA" if providers[0].startswith("CUDA") else providers[0].replace("ExecutionProvider", ""))


def _banner(engine: Any, notice: str | None) -> str:
    p = engine.preset
    parts = []
    if notice:
        parts.append(f"⚠️ {notice}")
    if p.random_weights:
        parts.append(
            "⚠️ **Random weights: these images are patterns, not photos.** The app is running the offline `tiny` "
            "preset — an SDXL-architecture model with random weights built on this machine — and an OpenCV "
            "stand-in face detector whose embedding is not a face recognizer (identity scores mean nothing). "
            "Every control, code path and file format is the real one: start `python app.py --preset "
            "hyper-sdxl-4step` on a machine with the weights for real pictures."
        )
    return "\n\n".join(parts)


def build_demo(engine: Any, *, notice: str | None = None) -> gr.Blocks:
    """The whole app around a loaded ``lcmla.Engine`` (queued: one request at a time per engine)."""
    from lcmla.attention.overlay import overlay_heatmap
    from lcmla.evaluate import identity_similarity
    from lcmla.pngmeta import settings_from_png

    preset: Preset = engine.preset
    defaults = ui_defaults(preset)
    outputs_dir = _Outputs()
    gpu = _gpu

    def make(knob: Knob) -> gr.components.Component:
        value = defaults[knob.name]
        common: dict[str, Any] = {"label": knob.label, "value": value, "elem_id": knob.elem_id}
        if knob.info:
            common["info"] = knob.info
        if knob.kind in ("text", "floats", "steps"):
            return gr.Textbox(lines=knob.lines, max_lines=max(knob.lines, 4), placeholder=knob.placeholder or None, **common)
        if knob.kind == "int":
            return gr.Number(precision=0, minimum=knob.minimum, maximum=knob.maximum, **common)
        if knob.kind in ("slider", "slider_int", "face_index"):
            return gr.Slider(knob.minimum, knob.maximum, step=knob.step, **common)
        if knob.kind in ("bool", "scope"):
            return gr.Checkbox(**common)
        if knob.kind == "scheduler":
            return gr.Dropdown(list(knob.choices), **common)
        if knob.kind == "choice":
            return gr.Radio(list(knob.choices), **common)
        if knob.kind in ("targets", "tokens"):
            return gr.CheckboxGroup(list(knob.choices), **common)
        raise AssertionError(f"no widget for knob kind {knob.kind!r}")

    controls: dict[str, gr.components.Component] = {}

    def knob(name: str) -> gr.components.Component:
        controls[name] = component = make(_KNOB[name])
        return component

    with gr.Blocks(title="lcmla — identity-preserving few-step SDXL", analytics_enabled=False,
                   delete_cache=(OUTPUT_TTL_S, OUTPUT_TTL_S)) as demo:
        gr.Markdown(_header(engine), elem_classes="lcmla-header", elem_id="header")
        banner = _banner(engine, notice)
        if banner:
            gr.Markdown(banner, elem_classes="lcmla-banner", elem_id="banner")

        with gr.Tabs():
            # ---------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=6, min_width=380):
                        with gr.Row():
                            faces = gr.File(label="Face photos", file_count="multiple",
                                            file_types=["image"], type="filepath", elem_id="faces", height=150, scale=3)
                            faces_found = gr.Gallery(label="Faces found", columns=3, height=150,
                                                     format="png", interactive=False, elem_id="faces-found", scale=2)
                        controls["app.faces"] = faces
                        knob("prompt")
                        knob("negative_prompt")
                        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                        with gr.Row():
                            knob("output.seed")
                            randomize = gr.Checkbox(label="Randomise seed", value=False, elem_id="randomize-seed",
                                                    info="Draw a new seed per click (the seed field shows it).")
                            controls["app.randomize_seed"] = randomize
                        with gr.Row():
                            knob("output.num_images")
                            knob("guidance.steps")
                            knob("guidance.scheduler")
                        with gr.Row():
                            knob("output.width")
                            knob("output.height")
                        with gr.Row():
                            gr.Textbox(f"{preset.name} — {preset.title}", label="Preset (chosen when the app starts)",
                                       interactive=False, elem_id="preset-name",
                                       info="python app.py --preset NAME; the knobs below override its defaults.")
                            knob("guidance.guidance_scale")
                        gr.Markdown("**The authors' configurations** — one click sets the guidance, AM, KV and FreeU "
                                    "knobs; your photos, prompt and everything else stay.", elem_classes="lcmla-note")
                        preset_buttons: dict[str, gr.Button] = {}
                        keys = list(APP_PRESETS)
                        for row in (keys[:4], keys[4:]):
                            with gr.Row(elem_classes="lcmla-presets"):
                                for key in row:
                                    preset_buttons[key] = gr.Button(APP_PRESETS[key], size="sm", variant="secondary",
                                                                    min_width=0, elem_id="preset-" + key.replace("+", "-"))
                        with gr.Accordion("Identity (FaceID-Plus-v2)", open=True):
                            with gr.Row():
                                knob("identity.ip_adapter_scale")
                                knob("identity.lora_scale")
                            with gr.Row():
                                knob("guidance.backbone_lora_scale")
                                knob("identity.face_index")
                            with gr.Row():
                                knob("identity.shortcut")
                                knob("identity.shortcut_scale")
                        with gr.Accordion("Decoupled classifier-free guidance — FastFace §3.2", open=False):
                            knob("guidance.dcg")
                            knob("guidance.dcg_variant")
                            knob("guidance.dcg_schedule")
                            with gr.Row():
                                knob("guidance.dcg_a")
                                knob("guidance.dcg_b")
                            knob("guidance.rescale_phi")
                        with gr.Accordion("Attention manipulation — FastFace §3.3", open=False):
                            knob("attention.mode")
                            with gr.Row():
                                knob("attention.targets")
                                knob("attention.tokens")
                            knob("attention.steps")
                            with gr.Row():
                                knob("attention.am1_power")
                                knob("attention.am1_scale_down")
                                knob("attention.am1_scale_up")
                            with gr.Row():
                                knob("attention.am2_sharpness")
                                knob("attention.am2_scale")
                            with gr.Row():
                                knob("attention.am2_quantile")
                                knob("attention.am2_adain")
                                knob("attention.adain_weight")
                                knob("attention.cap")
                            knob("attention.am_norm_scope")
                        with gr.Accordion("LCM-Lookahead KV path and FreeU", open=False):
                            knob("lookahead.kv")
                            with gr.Row():
                                knob("lookahead.s_nokv")
                                knob("lookahead.s_full")
                                knob("lookahead.s_kv")
                            with gr.Row():
                                knob("lookahead.kv_prompt")
                                knob("lookahead.kv_lora_scale")
                            knob("lookahead.reference_framing")
                            knob("freeu.enabled")
                            with gr.Row():
                                knob("freeu.b1")
                                knob("freeu.b2")
                                knob("freeu.s1")
                                knob("freeu.s2")
                        with gr.Accordion("Load settings from a PNG", open=False):
                            settings_png = gr.File(label="A PNG made by lcmla: every control is set from it",
                                                   file_types=[".png"], type="filepath", elem_id="settings-png", height=110)
                    with gr.Column(scale=5, min_width=360):
                        gallery = gr.Gallery(label="Images", columns=2, height=560, format="png", object_fit="contain",
                                             interactive=False, elem_id="gallery",
                                             buttons=["download", "fullscreen"])
                        run_info = gr.Markdown("Upload a face photo and press **Generate**.", elem_id="run-info")
                        downloads = gr.File(label="PNG downloads (settings embedded)",
                                            file_count="multiple", interactive=False, elem_id="downloads")
                        with gr.Accordion("Settings of this run (JSON)", open=False):
                            settings_json = gr.Code(language="json", interactive=False, elem_id="settings-json")
                        examples = _examples()
                        if examples:
                            gr.Examples(examples=examples, inputs=[faces, controls["prompt"]], label="Examples",
                                        cache_examples=False, examples_per_page=6)

            # ---------------------------------------------------------------- Lookahead previews
            with gr.Tab("Lookahead previews", id="previews"):
                gr.Markdown(
                    "What the model thinks the final image is at each step, from one noise prediction: the DDIM "
                    "estimate x̂0 = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t and the LCM one-step preview ẑ0 = c_skip·z_t + "
                    "c_out·x̂0 with the LCM-LoRA (LCM-Lookahead Eq. 3), both decoded by the tiny VAE. Uses the photos, "
                    "prompt and knobs of the Generate tab (first image only); frames appear as the steps run."
                )
                lacks = _preview_requirements(engine)
                if lacks:
                    gr.Markdown(f"⚠️ This model was loaded without {lacks}, so previews are not available here; "
                                "the button will say what to fetch.", elem_classes="lcmla-banner")
                with gr.Row():
                    preview_scale = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="LCM-LoRA scale of the previews",
                                              info="0 = the base model's own one-step estimate; 1 = the full LCM-LoRA.",
                                              elem_id="preview-lcm-scale", scale=3)
                    preview_steps = gr.Textbox("", label="Steps to preview", placeholder="every step", scale=2,
                                               info="Step indices (0-based), comma-separated; empty = every step.",
                                               elem_id="preview-steps")
                    previews_btn = gr.Button("Run with previews", variant="primary", elem_id="previews-btn", scale=1)
                strip_x0 = gr.Gallery(label="x̂0 (DDIM) preview per step", columns=8, rows=1, height=230, format="png",
                                      object_fit="contain", interactive=False, elem_id="strip-x0")
                strip_lcm = gr.Gallery(label="LCM preview per step", columns=8, rows=1, height=230, format="png",
                                       object_fit="contain", interactive=False, elem_id="strip-lcm")
                with gr.Row():
                    preview_final = gr.Image(label="Final image", type="pil", format="png", interactive=False,
                                             height=300, elem_id="preview-final")
                    preview_info = gr.Markdown("", elem_id="preview-info")

            # ---------------------------------------------------------------- Attention maps
            with gr.Tab("Attention maps", id="attention"):
                gr.Markdown(
                    "Where each identity token looks: the identity-branch probabilities A = softmax(QK′ᵀ/√d), averaged "
                    "over heads, before and after attention manipulation. Uses the Generate tab's photos, prompt and "
                    "knobs (first image); changing a selector redraws from the stored maps without generating again."
                )
                with gr.Row():
                    capture_mode = gr.Radio(list(CAPTURE_MODES), value="am2", label="Attention manipulation for this capture",
                                            info="'as set in Generate' keeps the Generate tab's choice.",
                                            elem_id="capture-mode", scale=3)
                    attention_btn = gr.Button("Generate and capture maps", variant="primary", elem_id="attention-btn", scale=1)
                with gr.Row():
                    map_block = gr.Dropdown(_KIND_CHOICES, value="all", label="Block", elem_id="map-block",
                                            info="A kind of block (mean of its layers) or one layer.")
                    map_step = gr.Slider(0, max(1, preset.steps - 1), value=0, step=1, label="Step", elem_id="map-step")
                    map_token = gr.Radio(["0", "1", "2", "3"], value="0", label="Identity token", elem_id="map-token")
                    map_shared = gr.Checkbox(value=False, label="Same colour scale for both",
                                             info="Off: each map uses its own range.", elem_id="map-shared")
                with gr.Row():
                    map_before = gr.Image(label="Before AM", type="pil", format="png", interactive=False, elem_id="map-before")
                    map_after = gr.Image(label="After AM", type="pil", format="png", interactive=False, elem_id="map-after")
                map_info = gr.Markdown("", elem_id="map-info")
                maps_state = gr.State(None)

            # ---------------------------------------------------------------- Compare
            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "The same photos, prompt and seed through the baseline, FastFace (AM1 + DCG, AM2 + DCG) and "
                    "LCM-Lookahead (KV path with FreeU), each with the rest of the Generate tab's knobs. Identity "
                    "similarity is the cosine of the face embeddings of the reference and the image (SPEC §6)."
                )
                compare_btn = gr.Button("Compare methods", variant="primary", elem_id="compare-btn")
                compare_gallery = gr.Gallery(label="Side by side", columns=len(COMPARE_METHODS), height=360, format="png",
                                             object_fit="contain", interactive=False, elem_id="compare-gallery")
                compare_table = gr.Dataframe(headers=["method", "identity similarity", "time (s)", "UNet branches per step"],
                                             datatype=["str", "str", "number", "str"], interactive=False,
                                             elem_id="compare-table", label="Scores")
                compare_info = gr.Markdown("", elem_id="compare-info")

        missing = set(KNOB_NAMES) - set(controls)
        assert not missing, f"knobs without a widget: {sorted(missing)}"
        knob_components = [controls[name] for name in KNOB_NAMES]
        generate_inputs = [controls[name] for name in GENERATE_INPUTS]

        def request_settings(ui: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> GenerationSettings:
            settings = settings_from_ui(ui, preset, extra)
            if ui.get("app.randomize_seed"):
                settings = settings.replace(output__seed=secrets.randbelow(2**31))
            return settings

        # ---- Generate ---------------------------------------------------------------------------------

        def step_progress(progress: gr.Progress, settings: GenerationSettings) -> Callable[[Any], None]:
            steps = settings.guidance.steps or preset.steps
            total = steps * settings.output.num_images

            def report(info: Any) -> None:
                done = info.image_index * info.num_steps + info.step + 1
                progress((done, max(total, done)), desc=f"image {info.image_index + 1}/{settings.output.num_images} · "
                                                         f"step {info.step + 1}/{info.num_steps}")

            return report

        def run_generate(ui: dict[str, Any], progress: Any):
            """Generate images: face photos, prompt and every knob by name; returns the gallery, the PNG
            downloads (settings embedded), a summary, the faces used, the seed and the settings JSON."""
            paths = _face_paths(ui["app.faces"])
            with user_errors("Generate"):
                settings = request_settings(ui)
                progress(0, desc="finding the face")
                result = engine.generate(settings, paths, callback=step_progress(progress, settings))
                files = result.save(outputs_dir.new())
                used = [engine.faces.draw_boxes(path, [face], 0) for path, face in zip(paths, result.identity.faces)]
            images = [(img, f"seed {seed}") for img, seed in zip(result.images, result.seeds)]
            s = result.settings
            info = (f"**{len(images)} image{'s' * (len(images) > 1)}** · seeds {', '.join(map(str, result.seeds))} · "
                    f"{s.output.width}×{s.output.height} · {s.guidance.steps} steps · {_timings_text(result.timings)}")
            if result.random_weights:
                info += "  \n_Random weights (tiny preset): the images are patterns, not photos._"
            return (images, [str(f) for f in files], info, [(img, "used face") for img in used],
                    s.output.seed, s.to_json())

        generate_btn.click(
            gpu(named_handler(run_generate, GENERATE_INPUTS)), generate_inputs,
            [gallery, downloads, run_info, faces_found, controls["output.seed"], settings_json],
            api_name="generate", concurrency_id="engine", show_progress_on=[gallery],
        )

        def show_faces(files: Any, face_index: Any):
            """Boxes on every uploaded photo as soon as it arrives (a warning, not an error, when none)."""
            if not files:
                return []
            try:
                chosen = _KNOB["identity.face_index"].parse(face_index) or 0
            except SettingsError:
                chosen = 0
            shown = []
            for path in _face_paths(files):
                name = Path(path).name
                try:
                    found = engine.faces.detect(path)
                except ValueError as exc:
                    gr.Warning(str(exc), title="Unusable photo")
                    continue
                except Exception as exc:
                    log.exception("face preview failed")
                    gr.Warning(f"could not read {name!r}: {exc}", title="Unusable photo")
                    continue
                if not found:
                    gr.Warning(f"no face found in {name!r}; use a clear, frontal, well-lit photo", title="No face")
                shown.append((engine.faces.draw_boxes(path, found, chosen if chosen < len(found) else None),
                              f"{name}: {len(found)} face{'s' * (len(found) != 1)}"))
            return shown

        faces.change(show_faces, [faces, controls["identity.face_index"]], faces_found, api_name="detect_faces",
                     concurrency_limit=4, show_progress="minimal")

        def apply_preset(key: str) -> dict:
            changes = method_changes(key, preset.name)
            return {controls[name]: _KNOB[name].show(value) for name, value in changes.items() if name in controls}

        for key, button in preset_buttons.items():
            button.click(lambda key=key: apply_preset(key), None, knob_components,
                         api_name="preset_" + key.replace("+", "_").replace("-", "_"), concurrency_limit=None,
                         show_progress="hidden")

        def load_settings(path: str | None):
            if not path:
                return {}
            with user_errors("Loading settings"):
                settings = settings_from_png(path)
            if settings.preset != preset.name:
                gr.Warning(f"this PNG was made with the {settings.preset!r} preset; the app runs {preset.name!r}, "
                           "so the same settings give a different picture", title="Another preset")
            else:
                gr.Info("Every control now holds the settings of that PNG.", title="Settings loaded")
            ui = settings_to_ui(settings, preset)
            return {controls[name]: ui[name] for name in KNOB_NAMES}

        settings_png.upload(load_settings, settings_png, knob_components, api_name="load_settings",
                            concurrency_limit=4)

        # ---- Lookahead previews -------------------------------------------------------------------

        def run_previews(ui: dict[str, Any], progress: Any):
            """Stream, per step, the x̂0 estimate and the LCM one-step preview (then the final image)."""
            paths = _face_paths(ui["app.faces"])
            with user_errors("Previews"):
                scale = _PREVIEW_SCALE.parse(ui["app.preview_lcm_scale"])
                wanted = _PREVIEW_STEPS.parse(ui["app.preview_steps"])
                settings = request_settings(ui, {"output.num_images": 1, "lookahead.lcm_lora_scale": scale})
            events: queue.Queue = queue.Queue()

            def work() -> None:
                try:
                    events.put(("done", engine.previews(settings, paths, steps=wanted, callback=lambda f: events.put(("frame", f)))))
                except BaseException as exc:  # noqa: BLE001 - handed to the request's thread
                    events.put(("error", exc))

            stretch = bool(preset.random_weights)
            worker = threading.Thread(target=work, name="lcmla-previews", daemon=True)
            worker.start()
            frames: list[Any] = []
            steps = settings.guidance.steps or preset.steps
            expected = steps if wanted is None else len([k for k in wanted if k < steps])
            progress(0, desc="finding the face")
            while True:
                kind, item = events.get()
                if kind == "frame":
                    frames.append(item)
                    progress((len(frames), max(expected, len(frames))), desc=f"step {item.step + 1}/{steps}")
                    yield (_strip(frames, "x0", stretch), _strip(frames, "lcm", stretch), None,
                           f"Step {item.step + 1} of {steps} (t = {item.timestep}) …")
                elif kind == "error":
                    with user_errors("Previews"):
                        raise item
                else:
                    result = item
                    frames = list(result.frames) or frames
                    info = (f"**{len(frames)} steps previewed** · LCM-LoRA scale {scale:g} · "
                            f"{_timings_text(getattr(result, 'timings', {}) or {})}")
                    if stretch:
                        info += "  \n_Random weights: the previews are shown contrast-stretched._"
                    yield _strip(frames, "x0", stretch), _strip(frames, "lcm", stretch), result.image, info
                    return

        previews_btn.click(gpu(named_handler(run_previews, PREVIEW_INPUTS)), [*generate_inputs, preview_scale, preview_steps],
                           [strip_x0, strip_lcm, preview_final, preview_info],
                           api_name="previews", concurrency_id="engine", show_progress_on=[strip_x0])

        # ---- Attention maps -------------------------------------------------------------------------

        def render_maps(state: Any, block: str, step: Any, token: Any, shared: bool):
            if not state:
                return None, None, "Press **Generate and capture maps** first."
            store, image = state["store"], state["image"]
            try:
                k, j = int(step), int(token)
                if block in ("all", "down", "mid", "up"):
                    before = store.mean_over(block, k, j, after=False)
                    after = store.mean_over(block, k, j, after=True)
                    where = {value: label for label, value in _KIND_CHOICES}[block]
                else:
                    before, after = store.get(block, k, j, after=False), store.get(block, k, j, after=True)
                    where = _block_label(block)
            except (KeyError, IndexError, ValueError, TypeError):
                return None, None, (f"No maps for that choice (block {block!r}, step {step}, token {token}); "
                                    f"steps captured: {', '.join(map(str, store.steps()))}.")
            with user_errors("Drawing the maps"):
                lo = hi = None
                if shared:
                    lo = float(min(before.min(), after.min()))
                    hi = float(max(before.max(), after.max()))
                title = f"{where} · step {k} · token {j}"
                base = _at_least(image, 384)
                img_before = overlay_heatmap(base, before, title=title, vmin=lo, vmax=hi)
                img_after = overlay_heatmap(base, after, title=title, vmin=lo, vmax=hi)
            info = (f"{state['mode'].upper() if state['mode'] != 'none' else 'No AM'} · {len(store.blocks())} layers "
                    f"captured over {len(store.steps())} steps · map {tuple(before.shape)} · "
                    f"before: {float(before.min()):.3g}…{float(before.max()):.3g}, after: {float(after.min()):.3g}…"
                    f"{float(after.max()):.3g}")
            if state["mode"] == "none":
                info += "  \n_AM is off, so before and after are the same map; pick am1 or am2 above._"
            return img_before, img_after, info

        def run_attention(ui: dict[str, Any], progress: Any):
            """Generate one image with the identity-attention maps captured; returns the first view."""
            paths = _face_paths(ui["app.faces"])
            mode = ui["app.capture_mode"]
            with user_errors("Attention capture"):
                extra: dict[str, Any] = {"output.num_images": 1, "attention.capture_maps": True}
                if mode in AM_MODES:
                    extra["attention.mode"] = mode
                settings = request_settings(ui, extra)
                progress(0, desc="finding the face")
                result = engine.generate(settings, paths, callback=step_progress(progress, settings))
                if not result.attention_maps:
                    raise LcmlaError("the engine returned no attention maps for this request")
            store = result.attention_maps[0]
            state = {"store": store, "image": result.images[0], "mode": result.settings.attention.mode}
            steps = store.steps()
            n_tokens = int(next(iter(store.maps.values())).shape[1]) if store.maps else 4
            tokens = [str(t) for t in range(n_tokens)]
            choices = _KIND_CHOICES + [(_block_label(b), b) for b in store.blocks()]
            before, after, info = render_maps(state, "all", steps[0] if steps else 0, "0", False)
            return (state, gr.update(choices=choices, value="all"),
                    gr.update(minimum=min(steps or [0]), maximum=max(max(steps or [0]), 1), value=steps[0] if steps else 0),
                    gr.update(choices=tokens, value="0"), before, after, info)

        attention_btn.click(gpu(named_handler(run_attention, ATTENTION_INPUTS)), [*generate_inputs, capture_mode],
                            [maps_state, map_block, map_step, map_token, map_before, map_after, map_info],
                            api_name="attention_maps", concurrency_id="engine", show_progress_on=[map_after])
        selectors = [maps_state, map_block, map_step, map_token, map_shared]
        for event, name in ((map_block.input, "render_maps"), (map_token.input, None), (map_shared.input, None),
                            (map_step.release, None)):
            event(render_maps, selectors, [map_before, map_after, map_info], api_name=name,
                  api_visibility="public" if name else "undocumented", concurrency_limit=4,
                  trigger_mode="always_last", show_progress="minimal")

        # ---- Compare --------------------------------------------------------------------------------

        def run_compare(ui: dict[str, Any], progress: Any):
            """The compared methods on the same face, prompt and seed, with identity similarity and time."""
            paths = _face_paths(ui["app.faces"])
            shown: list[tuple[Any, str]] = []
            rows: list[list[Any]] = []
            with user_errors("Compare"):
                base = request_settings(ui, {"output.num_images": 1})
                progress(0, desc="finding the face")
                identity = engine.analyze_faces(paths, base.identity.face_index)
                for i, (key, label) in enumerate(COMPARE_METHODS):
                    progress((i, len(COMPARE_METHODS)), desc=label)
                    settings = base.replace_dotted(method_changes(key, preset.name))
                    t0 = time.perf_counter()
                    result = engine.generate(settings, identity)
                    seconds = time.perf_counter() - t0
                    score = identity_similarity(engine.faces, identity, result.images[0])
                    shown.append((result.images[0], f"{label}: {_similarity_text(score)}, {seconds:.1f} s"))
                    branches = " ".join(str(len(b)) for b in result.branch_calls) or "—"
                    rows.append([label, _similarity_text(score), round(seconds, 3), branches])
                    yield shown, rows, f"{i + 1} of {len(COMPARE_METHODS)} done …"
            note = f"Seed {base.output.seed} · {base.output.width}×{base.output.height} · {base.guidance.steps} steps."
            if not engine.faces.is_recognizer:
                note += ("  \n_The face backend is the OpenCV stand-in: its embedding is not a face recognizer, so these "
                         "similarities compare pixels, not identities._")
            yield shown, rows, note

        compare_btn.click(gpu(named_handler(run_compare, GENERATE_INPUTS)), generate_inputs, [compare_gallery, compare_table, compare_info],
                          api_name="compare", concurrency_id="engine", show_progress_on=[compare_gallery])

        # ---- API only: photos + a settings JSON ----------------------------------------------------

        with gr.Group(visible=False):
            api_faces = gr.File(file_count="multiple", file_types=["image"], label="faces")
            api_settings = gr.Textbox(label="settings_json")
            api_images = gr.Gallery(label="images", format="png")
            api_used = gr.Textbox(label="settings_json")
            api_button = gr.Button("generate from settings")

        def generate_from_settings(faces: Any, settings_json: str, progress: gr.Progress = gr.Progress()):
            """Generate from face photos and a settings JSON — the JSON that lcmla's PNGs carry and
            ``python -m lcmla show`` prints. Returns the images and the settings that ran (JSON)."""
            paths = _face_paths(faces)
            with user_errors("Generate from settings"):
                if not (settings_json or "").strip():
                    raise LcmlaError("settings_json is empty: pass the JSON a PNG of lcmla carries "
                                     "(python -m lcmla show image.png prints it)")
                try:
                    settings = GenerationSettings.from_json(settings_json)
                except (ValueError, TypeError, KeyError) as exc:
                    raise LcmlaError(f"settings_json is not lcmla settings: {exc}") from None
                settings = settings.replace(preset=preset.name)  # this app's backbone
                result = engine.generate(settings, paths, callback=step_progress(progress, settings))
            return ([(img, f"seed {seed}") for img, seed in zip(result.images, result.seeds)],
                    result.settings.to_json())

        api_button.click(gpu(generate_from_settings), [api_faces, api_settings], [api_images, api_used],
                         api_name="generate_from_settings", concurrency_id="engine")

    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return demo


def _preview_requirements(engine: Any) -> str:
    """What ``Engine.previews`` needs and this engine lacks ('' when nothing)."""
    lacks = []
    if "lcm" not in tuple(getattr(engine, "adapters", ()) or ()):
        lacks.append("the LCM-LoRA")
    if getattr(getattr(engine, "components", None), "taesd", None) is None:
        lacks.append("TAESD")
    return " and ".join(lacks)


def _strip(frames: Sequence[Any], which: str, stretch: bool = False) -> list[tuple[Any, str]]:
    """Gallery items of one preview kind; ``stretch``: auto-contrast (the tiny preset's random TAESD
    decodes to near-black pictures that would otherwise show nothing)."""
    from PIL import ImageOps

    def shown(image: Any) -> Any:
        return ImageOps.autocontrast(image.convert("RGB"), cutoff=1) if stretch else image

    return [(shown(getattr(f, which)), f"step {f.step + 1} · t={f.timestep}") for f in frames]


def _at_least(image: Any, side: int) -> Any:
    """``image`` scaled up (whole factor, nearest) until its longer side is at least ``side``."""
    factor = -(-side // max(image.size))
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), 0)


def _examples() -> list[list[Any]]:
    face, prompts = ASSETS / "face.png", ASSETS / "prompts.txt"
    if not face.is_file() or not prompts.is_file():
        return []
    lines = [line.strip() for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[[str(face)], line] for line in lines[:12]]


# ------------------------------------------------------------------------------------------------
# Command line


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve ``demo`` with the app's limits, theme and styles (used by ``main`` and the tests)."""
    return demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock, quiet=quiet,
        max_file_size=MAX_FILE_SIZE, show_error=True, allowed_paths=[str(ASSETS)], theme=_theme(), css=CSS,
        footer_links=["api"],
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="app.py", description="lcmla's web app: identity-preserving few-step SDXL (FastFace + LCM-Lookahead).")
    parser.add_argument("--preset", default=os.environ.get("LCMLA_PRESET") or "tiny", choices=sorted(PRESETS),
                        help="backbone to load (default: $LCMLA_PRESET or tiny, the offline random-weights preset)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for everyone)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
                        help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--weights-dir", default=None,
                        help="folder with <org>/<name> weight folders (default: $LCMLA_WEIGHTS, then the HF cache)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, … (default: CUDA when present)")
    parser.add_argument("--face-models", default=None, help="insightface model folder (default: buffalo_l)")
    parser.add_argument("--download", action="store_true", help="download missing weights from the Hugging Face Hub")
    parser.add_argument("--no-fallback", action="store_true",
                        help="exit when the preset's weights are missing instead of running the tiny preset")
    return parser.parse_args(argv)


def load_engine(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The engine for ``args`` and a notice for the page; falls back to `tiny` when weights are missing."""
    from lcmla import Engine  # imports torch: only here, never at import time

    kwargs = {"device": args.device, "weights_dir": args.weights_dir or os.environ.get("LCMLA_WEIGHTS"),
              "allow_download": args.download, "face_models": args.face_models}
    try:
        return Engine.load(args.preset, **kwargs), None
    except MissingWeightsError as exc:
        if args.preset == "tiny" or args.no_fallback:
            raise
        log.warning("%s", exc)
        notice = (f"The weights of the `{args.preset}` preset are not on this machine, so the app runs the offline "
                  f"`tiny` preset instead. {exc}")
        return Engine.load("tiny", device=args.device), notice


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    _gpu(lambda: None)  # on ZeroGPU Spaces, `spaces` must be imported before torch
    try:
        engine, notice = load_engine(args)
    except LcmlaError as exc:
        print(f"error: {exc}")
        return 2
    if engine.preset.random_weights:
        print("NOTE: the tiny preset has random weights — its images are patterns, not photos.", flush=True)
    demo = build_demo(engine, notice=notice)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
