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
from lcmla.knobs import (  # noqa: F401 - re-exported: the app's knob table is lcmla.knobs'
    KNOB,
    KNOB_NAMES,
    KNOBS,
    MAX_IMAGES,
    MAX_SEED,
    NOT_KNOBS,
    PRESET_SCHEDULER,
    Knob,
    flatten,
    preset_settings,
    settings_from_ui,
    settings_to_ui,
)
from lcmla.settings import AM_MODES, GenerationSettings

__all__ = [
    "APP_PRESETS", "COMPARE_METHODS", "GENERATE_INPUTS", "KNOBS", "KNOB_NAMES", "Knob", "build_demo",
    "launch", "main", "parse_args", "settings_from_ui", "settings_to_ui", "ui_defaults",
]

log = logging.getLogger("lcmla.app")

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"
MAX_FILE_SIZE = "20mb"  # per upload; face photos are shrunk to 2048 px anyway
QUEUE_SIZE = 32  # requests waiting at most; more get "queue full"
OUTPUT_TTL_S = 3600  # PNG downloads are kept this long


_KNOB = KNOB  # the knob table lives in lcmla.knobs (shared with the CLI)
_flatten = flatten

#: The inputs of the Generate, Lookahead, Attention and Compare handlers, in order ("app.*" are not settings).
GENERATE_INPUTS: tuple[str, ...] = ("app.faces", *KNOB_NAMES, "app.randomize_seed", "app.weights")
#: The Weights choice of Generate: the preset's own adapter, or the weights given with --adapter/--kv-lora.
WEIGHTS_CHOICES = ("stock", "trained")
PREVIEW_INPUTS: tuple[str, ...] = (*GENERATE_INPUTS, "app.preview_lcm_scale", "app.preview_steps")
ATTENTION_INPUTS: tuple[str, ...] = (*GENERATE_INPUTS, "app.capture_mode")

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


def ui_defaults(preset: Preset) -> dict[str, Any]:
    """Every input of GENERATE_INPUTS at its starting value (no face photo)."""
    return {"app.faces": None, **settings_to_ui(preset_settings(preset)), "app.randomize_seed": False,
            "app.weights": "stock"}


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


class _Cancelled(Exception):
    """Raised inside a worker's callback to stop a request whose client has left."""


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


@dataclass(frozen=True)
class Trained:
    """A second engine on the same preset with the training package's outputs loaded."""

    engine: Any
    adapter: str | None = None  # ip-adapter-faceid-plusv2_sdxl.safetensors (h94 layout) or another adapter
    kv_lora: str | None = None  # kv_encoder_lora.safetensors

    @property
    def method(self) -> str:
        """The method Compare runs them with: the KV path when a KV-encoder LoRA is loaded."""
        return "lookahead-kv" if self.kv_lora else "baseline"


def _trained_text(trained: Trained | None) -> str:
    """Which trained files are loaded, for the header and the Weights info."""
    if trained is None:
        return "none loaded (start with --adapter / --kv-lora)"
    parts = [f"adapter `{Path(trained.adapter).name}`"] if trained.adapter else []
    parts += [f"KV-encoder LoRA `{Path(trained.kv_lora).name}`"] if trained.kv_lora else []
    return " · ".join(parts)


def _header(engine: Any, trained: Trained | None = None) -> str:
    p = engine.preset
    lines = [
        "# lcmla — your face, any style, in a few steps",
        "Identity-preserving few-step SDXL with IP-Adapter FaceID-Plus-v2: **FastFace** (decoupled guidance, "
        "attention manipulation) and **LCM-Lookahead** (LCM previews, KV path). Upload a face photo, write a "
        "prompt, press Generate. Every knob of both papers is below.",
        f"**Model:** `{p.name}` — {p.title} · {p.steps} steps · {p.width}×{p.height} · face backend: "
        f"{engine.faces.backend}{_providers(engine)} · lcmla {__version__}",
    ]
    if trained is not None:
        lines.append(f"**Trained weights:** {_trained_text(trained)} — pick them with *Weights* in Generate; "
                     "Compare adds a column for them.")
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


def find_reports(roots: Sequence[str | os.PathLike]) -> list[str]:
    """Evaluation report folders (holding ``report.md``) in ``roots``: each root itself, its
    sub-folders and theirs (two levels), sorted."""
    found: set[str] = set()
    for root in roots:
        root = Path(root).expanduser()
        if not root.is_dir():
            continue
        for candidate in [root, *root.glob("*"), *root.glob("*/*")]:
            if candidate.is_dir() and (candidate / "report.md").is_file():
                found.add(str(candidate.resolve()))
    return sorted(found)


def read_report(folder: str, roots: Sequence[str | os.PathLike]) -> tuple[list[tuple[Any, str]], Any, str]:
    """(plots and grids as (image, caption), summary.csv as a table, report.md without its image
    lines) of a report folder; only folders :func:`find_reports` lists can be opened."""
    import csv

    from PIL import Image

    if str(Path(folder).expanduser().resolve()) not in find_reports(roots):
        raise LcmlaError(f"{folder!r} is not an evaluation report in the --reports folders; pick one from the list")
    path = Path(folder)
    images = []
    for png in sorted(path.glob("pareto-*.png")) + sorted(path.glob("grid-*.png")):
        with Image.open(png) as img:
            images.append((img.convert("RGB"), png.stem))
    table = None
    if (path / "summary.csv").is_file():
        with (path / "summary.csv").open(newline="") as f:
            rows = list(csv.reader(f))
        if rows:
            import pandas as pd

            table = pd.DataFrame(rows[1:], columns=rows[0])
    text = (path / "report.md").read_text(encoding="utf-8", errors="replace")
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("!["))
    return images, table, text


def build_demo(engine: Any, *, notice: str | None = None, trained: Trained | None = None,
               reports: Sequence[str | os.PathLike] = ()) -> gr.Blocks:
    """The whole app around a loaded ``lcmla.Engine`` (queued: one request at a time per engine)."""
    from lcmla.attention.overlay import overlay_heatmap
    from lcmla.evaluate import identity_similarity
    from lcmla.pngmeta import settings_from_png

    preset: Preset = engine.preset
    stock = engine
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
        gr.Markdown(_header(engine, trained), elem_classes="lcmla-header", elem_id="header")
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
                            controls["app.weights"] = gr.Radio(
                                list(WEIGHTS_CHOICES), value="stock", label="Weights", elem_id="weights",
                                visible=trained is not None,
                                info="stock: the preset's FaceID-Plus-v2; trained: " + _trained_text(trained))
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
                    map_diff = gr.Image(label="Difference (after − before)", type="pil", format="png", interactive=False,
                                        elem_id="map-diff")
                gr.Markdown(
                    "_Colour bars: the attention probability one identity token gets from each latent pixel (a softmax "
                    "weight in 0…1, mean over heads; with 4 identity tokens the four sum to 1 at each pixel). The "
                    "difference view is after − before on a symmetric scale: red where AM raised the token's weight, "
                    "blue where it lowered it._", elem_id="map-units")
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
                compare_gallery = gr.Gallery(label="Side by side", columns=len(COMPARE_METHODS) + (trained is not None), height=360, format="png",
                                             object_fit="contain", interactive=False, elem_id="compare-gallery")
                compare_table = gr.Dataframe(headers=["method", "identity similarity", "time (s)", "UNet branches per step"],
                                             datatype=["str", "str", "number", "str"], interactive=False,
                                             elem_id="compare-table", label="Scores")
                compare_info = gr.Markdown("", elem_id="compare-info")
                with gr.Accordion("Evaluation reports", open=bool(find_reports(reports)), elem_id="reports"):
                    gr.Markdown(
                        "Reports written by `python -m lcmla evaluate … --output-dir D`, found in the folders given "
                        "with `--reports` (or `$LCMLA_REPORTS`): "
                        + (", ".join(f"`{r}`" for r in reports) if reports else "_none given_") + ".")
                    with gr.Row():
                        report_choice = gr.Dropdown(choices=find_reports(reports), value=None, label="Report",
                                                    elem_id="report-choice", scale=4)
                        report_refresh = gr.Button("Refresh the list", size="sm", scale=1, elem_id="report-refresh")
                    report_plots = gr.Gallery(label="Pareto plots (ID vs CLIP-T over the identity scales) and grids",
                                              columns=2, height=420, format="png", interactive=False,
                                              object_fit="contain", elem_id="report-plots")
                    report_table = gr.Dataframe(label="summary.csv (mean and 95 % CI per method and scale)",
                                                interactive=False, elem_id="report-summary", wrap=True)
                    report_md = gr.Markdown("", elem_id="report-md")

        missing = set(KNOB_NAMES) - set(controls)
        assert not missing, f"knobs without a widget: {sorted(missing)}"
        knob_components = [controls[name] for name in KNOB_NAMES]
        generate_inputs = [controls[name] for name in GENERATE_INPUTS]

        def pick_engine(ui: Mapping[str, Any]) -> Any:
            """The stock engine, or the trained one when Weights says so (and one is loaded)."""
            choice = ui.get("app.weights") or "stock"
            if choice not in WEIGHTS_CHOICES:
                raise gr.Error(f"weights must be one of {', '.join(WEIGHTS_CHOICES)}, not {choice!r}")
            if choice == "trained":
                if trained is None:
                    raise gr.Error("no trained weights are loaded: start the app with --adapter FILE and/or "
                                   "--kv-lora FILE (or $LCMLA_ADAPTER / $LCMLA_KV_LORA)", title="No trained weights")
                return trained.engine
            return stock

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
            engine = pick_engine(ui)
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
            engine = pick_engine(ui)
            with user_errors("Previews"):
                scale = _PREVIEW_SCALE.parse(ui["app.preview_lcm_scale"])
                wanted = _PREVIEW_STEPS.parse(ui["app.preview_steps"])
                settings = request_settings(ui, {"output.num_images": 1, "lookahead.lcm_lora_scale": scale})
            events: queue.Queue = queue.Queue()
            cancelled = threading.Event()  # set when the client leaves: the worker stops at its next step

            def on_frame(frame: Any) -> None:
                if cancelled.is_set():
                    raise _Cancelled("the previews request was cancelled")
                events.put(("frame", frame))

            def work() -> None:
                try:
                    events.put(("done", engine.previews(settings, paths, steps=wanted, callback=on_frame)))
                except _Cancelled:
                    log.info("previews cancelled: the client left")
                except BaseException as exc:  # noqa: BLE001 - handed to the request's thread
                    events.put(("error", exc))

            stretch = bool(preset.random_weights)
            worker = threading.Thread(target=work, name="lcmla-previews", daemon=True)
            worker.start()
            frames: list[Any] = []
            steps = settings.guidance.steps or preset.steps
            expected = steps if wanted is None else len([k for k in wanted if k < steps])
            progress(0, desc="finding the face")
            try:
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
            finally:
                cancelled.set()  # a closed generator (client gone) stops the worker and frees the engine

        previews_btn.click(gpu(named_handler(run_previews, PREVIEW_INPUTS)), [*generate_inputs, preview_scale, preview_steps],
                           [strip_x0, strip_lcm, preview_final, preview_info],
                           api_name="previews", concurrency_id="engine", show_progress_on=[strip_x0])

        # ---- Attention maps -------------------------------------------------------------------------

        def render_maps(state: Any, block: str, step: Any, token: Any, shared: bool):
            if not state:
                return None, None, None, "Press **Generate and capture maps** first."
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
                return None, None, None, (f"No maps for that choice (block {block!r}, step {step}, token {token}); "
                                    f"steps captured: {', '.join(map(str, store.steps()))}.")
            with user_errors("Drawing the maps"):
                lo = hi = None
                if shared:
                    lo = float(min(before.min(), after.min()))
                    hi = float(max(before.max(), after.max()))
                title = f"{where} · step {k} · token {j}"
                base = _at_least(image, 384)
                unit = "attention probability"
                img_before = overlay_heatmap(base, before, title=title, vmin=lo, vmax=hi, label=unit)
                img_after = overlay_heatmap(base, after, title=title, vmin=lo, vmax=hi, label=unit)
                diff = after - before
                bound = max(float(abs(diff).max()), 1e-8)
                img_diff = overlay_heatmap(base, diff, title=f"after − before · {title}", cmap="coolwarm",
                                           vmin=-bound, vmax=bound, label="change in probability")
            info = (f"{state['mode'].upper() if state['mode'] != 'none' else 'No AM'} · {len(store.blocks())} layers "
                    f"captured over {len(store.steps())} steps · map {tuple(before.shape)} · "
                    f"before: {float(before.min()):.3g}…{float(before.max()):.3g}, after: {float(after.min()):.3g}…"
                    f"{float(after.max()):.3g}")
            if state["mode"] == "none":
                info += "  \n_AM is off, so before and after are the same map; pick am1 or am2 above._"
            return img_before, img_after, img_diff, info

        def run_attention(ui: dict[str, Any], progress: Any):
            """Generate one image with the identity-attention maps captured; returns the first view."""
            paths = _face_paths(ui["app.faces"])
            engine = pick_engine(ui)
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
            before, after, diff, info = render_maps(state, "all", steps[0] if steps else 0, "0", False)
            return (state, gr.update(choices=choices, value="all"),
                    gr.update(minimum=min(steps or [0]), maximum=max(max(steps or [0]), 1), value=steps[0] if steps else 0),
                    gr.update(choices=tokens, value="0"), before, after, diff, info)

        attention_btn.click(gpu(named_handler(run_attention, ATTENTION_INPUTS)), [*generate_inputs, capture_mode],
                            [maps_state, map_block, map_step, map_token, map_before, map_after, map_diff, map_info],
                            api_name="attention_maps", concurrency_id="engine", show_progress_on=[map_after])
        selectors = [maps_state, map_block, map_step, map_token, map_shared]
        for event, name in ((map_block.input, "render_maps"), (map_token.input, None), (map_shared.input, None),
                            (map_step.release, None)):
            event(render_maps, selectors, [map_before, map_after, map_diff, map_info], api_name=name,
                  api_visibility="public" if name else "undocumented", concurrency_limit=4,
                  trigger_mode="always_last", show_progress="minimal")

        # ---- Compare --------------------------------------------------------------------------------

        compare_runs: list[tuple[str, str, Any]] = [(key, label, None) for key, label in COMPARE_METHODS]
        if trained is not None:
            compare_runs.append((trained.method, f"Trained · {METHOD_LABELS[trained.method]}", trained))

        def run_compare(ui: dict[str, Any], progress: Any):
            """The compared methods on the same face, prompt and seed, with identity similarity and time
            (plus the trained weights when the app was started with them)."""
            paths = _face_paths(ui["app.faces"])
            shown: list[tuple[Any, str]] = []
            rows: list[list[Any]] = []
            with user_errors("Compare"):
                base = request_settings(ui, {"output.num_images": 1})
                progress(0, desc="finding the face")
                identity = stock.analyze_faces(paths, base.identity.face_index)
                for i, (key, label, weights) in enumerate(compare_runs):
                    progress((i, len(compare_runs)), desc=label)
                    runner = stock if weights is None else weights.engine
                    settings = base.replace_dotted(method_changes(key, preset.name))
                    t0 = time.perf_counter()
                    result = runner.generate(settings, identity)
                    seconds = time.perf_counter() - t0
                    score = identity_similarity(stock.faces, identity, result.images[0])
                    shown.append((result.images[0], f"{label}: {_similarity_text(score)}, {seconds:.1f} s"))
                    branches = " ".join(str(len(b)) for b in result.branch_calls) or "—"
                    rows.append([label, _similarity_text(score), round(seconds, 3), branches])
                    yield shown, rows, f"{i + 1} of {len(compare_runs)} done …"
            note = f"Seed {base.output.seed} · {base.output.width}×{base.output.height} · {base.guidance.steps} steps."
            if not stock.faces.is_recognizer:
                note += ("  \n_The face backend is the OpenCV stand-in: its embedding is not a face recognizer, so these "
                         "similarities compare pixels, not identities._")
            yield shown, rows, note

        compare_btn.click(gpu(named_handler(run_compare, GENERATE_INPUTS)), generate_inputs, [compare_gallery, compare_table, compare_info],
                          api_name="compare", concurrency_id="engine", show_progress_on=[compare_gallery])

        def show_report(folder: str | None):
            """A finished evaluation report: its plots and grids, summary table and report.md."""
            if not folder:
                return [], None, "Pick a report."
            with user_errors("Opening the report"):
                plots, table, text = read_report(folder, reports)
            return plots, table, text

        report_choice.change(show_report, report_choice, [report_plots, report_table, report_md],
                             api_name="open_report", concurrency_limit=4)
        report_refresh.click(lambda: gr.update(choices=find_reports(reports)), None, report_choice,
                             api_name="list_reports", concurrency_limit=4)

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
        if not stretch:
            return image
        return _stamp(ImageOps.autocontrast(image.convert("RGB"), cutoff=1), "contrast-stretched")

    suffix = " · contrast-stretched" if stretch else ""
    return [(shown(getattr(f, which)), f"step {f.step + 1} · t={f.timestep}{suffix}") for f in frames]


def _stamp(image: Any, text: str) -> Any:
    """``image`` with ``text`` written in its top-left corner on a dark band (a label that travels with
    the picture when it is saved or shared)."""
    from PIL import ImageDraw

    out = _at_least(image, 192).copy()
    draw = ImageDraw.Draw(out)
    box = draw.textbbox((4, 3), text)
    draw.rectangle((0, 0, box[2] + 4, box[3] + 3), fill=(0, 0, 0))
    draw.text((4, 3), text, fill=(255, 255, 255))
    return out


def _at_least(image: Any, side: int) -> Any:
    """``image`` scaled up (whole factor, nearest) until its longer side is at least ``side``."""
    factor = -(-side // max(image.size))
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), 0)


def _examples() -> list[list[Any]]:
    face, prompts = ASSETS / "face.png", ASSETS / "prompts.txt"
    if not face.is_file() or not prompts.is_file():
        return []
    lines = [line.strip() for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [[[str(face)], line] for line in lines]  # all 18 evaluation prompts of LCM-Lookahead


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
    parser.add_argument("--adapter", default=os.environ.get("LCMLA_ADAPTER") or None,
                        help="trained identity adapter (training's ip-adapter-faceid-plusv2_sdxl.safetensors) for "
                             "the Weights choice and Compare's trained column (default: $LCMLA_ADAPTER)")
    parser.add_argument("--kv-lora", default=os.environ.get("LCMLA_KV_LORA") or None,
                        help="trained KV-encoder LoRA (training's kv_encoder_lora.safetensors; default: $LCMLA_KV_LORA)")
    parser.add_argument("--reports", action="append", default=None,
                        help="a folder with evaluation reports (python -m lcmla evaluate --output-dir), for the Compare "
                             "tab; repeatable (default: $LCMLA_REPORTS, folders separated by the path separator)")
    parser.add_argument("--no-fallback", action="store_true",
                        help="exit when the preset's weights are missing instead of running the tiny preset")
    args = parser.parse_args(argv)
    if args.reports is None:
        args.reports = [r for r in (os.environ.get("LCMLA_REPORTS") or "").split(os.pathsep) if r]
    return args


def load_trained(args: argparse.Namespace, engine: Any) -> Trained | None:
    """A second engine with the trained files of ``--adapter`` / ``--kv-lora`` on the engine's preset
    (None without them). It holds its own copy of the model: twice the memory of one engine."""
    if not (args.adapter or args.kv_lora):
        return None
    from lcmla import Engine

    for flag, value in (("--adapter", args.adapter), ("--kv-lora", args.kv_lora)):
        if value and not Path(value).is_file():
            raise LcmlaError(f"{flag} {value}: no such file (training writes it into its --output-dir)")
    trained = Engine.load(engine.preset.name, device=str(engine.device), dtype=engine.dtype,
                          weights_dir=args.weights_dir or os.environ.get("LCMLA_WEIGHTS"),
                          face_models=args.face_models, adapter=args.adapter, kv_encoder_lora=args.kv_lora)
    return Trained(trained, args.adapter, args.kv_lora)


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
        trained = load_trained(args, engine)
    except LcmlaError as exc:
        print(f"error: {exc}")
        return 2
    if engine.preset.random_weights:
        print("NOTE: the tiny preset has random weights — its images are patterns, not photos.", flush=True)
    demo = build_demo(engine, notice=notice, trained=trained, reports=args.reports)
    launch(demo, host=args.host, port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
