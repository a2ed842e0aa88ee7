"""What the app's tabs share: the input names, the request context (engine, trained weights,
outputs), the API naming of handler parameters, user-error handling, and small display helpers."""

from __future__ import annotations

import inspect
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from lcmla import __version__

from lcmla.knobs import KNOB, KNOB_NAMES, Knob, preset_settings, settings_from_ui, settings_to_ui
from lcmla.memory import MEMORY_NOTES
from lcmla.methods import METHOD_LABELS, METHODS
from lcmla.presets import Preset
from lcmla.settings import GenerationSettings

log = logging.getLogger("lcmla.app")

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "assets"

MAX_FILE_SIZE = "20mb"  # per upload; face photos are shrunk to 2048 px anyway
QUEUE_SIZE = 32  # requests waiting at most; more get "queue full"
OUTPUT_TTL_S = 3600  # PNG downloads are kept this long


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
        raise gr.Error(labelled(str(exc)), title=f"{what}: please check the input", print_exception=False) from None
    except Exception as exc:  # a bug or a resource problem: log it, tell the user, keep serving
        log.exception("%s failed", what)
        raise gr.Error(f"{what} failed unexpectedly ({type(exc).__name__}: {exc})", title=f"{what} failed") from None


def labelled(message: str) -> str:
    """A message that opens with a setting's dotted name, opened with its control's label too:
    'output.width must be …' → 'Width (output.width) must be …' (the words the page shows)."""
    head = message.split(" ", 1)[0]
    knob = KNOB.get(head.split("[", 1)[0])  # "guidance.dcg_a[0] must be …": the list's knob
    return message if knob is None else f"{knob.label} ({head}){message[len(head):]}"


def api_param(name: str) -> str:
    """The HTTP/Python API name of an input: ``identity.ip_adapter_scale`` → ``identity__ip_adapter_scale``
    (the spelling of ``GenerationSettings.replace``), ``app.faces`` → ``faces``."""
    return name.removeprefix("app.").replace(".", "__")


def named_handler(fn: Callable[[dict[str, Any], Any], Any], names: Sequence[str]) -> Callable:
    """``fn(ui, progress)`` (typically ``functools.partial(handler, context)``) as a handler whose signature names every input, so Gradio's API page and
    ``gradio_client`` show ``prompt``, ``identity__ip_adapter_scale``, … instead of ``param_0`` ….
    ``ui`` maps the input names (``names``) to their values. Generators stay generators (streaming)."""
    params = [inspect.Parameter(api_param(n), inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    signature = inspect.Signature(params)
    inner = getattr(fn, "func", fn)  # a functools.partial(handler, context) names its handler
    name = getattr(inner, "__name__", "handler")

    def bind(args: tuple, kwargs: dict) -> tuple[dict[str, Any], Any]:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise gr.Error(f"{name}: {exc}; the parameters are {', '.join(p.name for p in params[:-1])}") from None
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
    handler.__name__ = handler.__qualname__ = name
    handler.__doc__ = inner.__doc__
    return handler


def with_context(fn: Callable, ctx: Any) -> Callable:
    """``fn(ctx, *inputs)`` as a handler of the inputs alone that keeps ``fn``'s name, docstring and
    signature (less ``ctx``): Gradio's API page reads them, and a ``functools.partial`` would show
    partial's own docstring ("partial(func, *args, **keywords) - new function …")."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())[1:]

    if inspect.isgeneratorfunction(fn):
        def handler(*args: Any, **kwargs: Any):
            yield from fn(ctx, *args, **kwargs)
    else:
        def handler(*args: Any, **kwargs: Any):
            return fn(ctx, *args, **kwargs)
    handler.__name__ = handler.__qualname__ = fn.__name__
    handler.__doc__ = fn.__doc__
    handler.__module__ = fn.__module__
    handler.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    names = {p.name for p in params} | {"return"}
    handler.__annotations__ = {k: v for k, v in getattr(fn, "__annotations__", {}).items() if k in names}
    handler.__wrapped__ = fn  # type: ignore[attr-defined] - typing.get_type_hints reads fn's globals
    return handler


class _Cancelled(Exception):
    """Raised inside a worker's callback to stop a request whose client has left."""


def _face_path(item: Any) -> str:
    """One uploaded photo as a path: a str, a path (pathlib's ``.name`` is the file's name alone),
    or an upload object's ``.name`` (a temporary file's full path)."""
    if isinstance(item, str):
        return item
    if isinstance(item, os.PathLike):
        return os.fspath(item)
    name = getattr(item, "name", None)
    if not isinstance(name, str) or not name:
        raise gr.Error(f"a face photo arrived as {type(item).__name__}, not a file: upload the photo again",
                       title="No face photo")
    return name


def _face_paths(files: Any) -> list[str]:
    """gr.File(file_count='multiple') value → list of paths; at least one."""
    if files is None:
        files = []
    elif isinstance(files, (str, os.PathLike)) or hasattr(files, "name"):
        files = [files]
    paths = [_face_path(f) for f in files]
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


# the API page's example face photo (Gradio's example for a file input is a PDF, which the face
# inputs refuse): skimage's astronaut, a public-domain portrait, at a release tag
FACE_EXAMPLE_URL = "https://github.com/scikit-image/scikit-image/raw/v0.22.0/skimage/data/astronaut.png"


def with_face_example(files: gr.File) -> gr.File:
    """``files`` (a face-photos input) with a face photo as its example on the API page and in
    ``view_api``: set on this one component, Gradio's class is untouched."""
    from gradio_client import handle_file

    files.example_payload = lambda: [handle_file(FACE_EXAMPLE_URL)]
    files.example_value = lambda: [FACE_EXAMPLE_URL]
    return files


def reveal_on_click(button: gr.Button, elem_id: str) -> None:
    """When ``button`` is pressed, scroll the output ``elem_id`` (where the progress shows) into view
    if its middle (where Gradio draws the progress) lies below the window, as on a narrow screen,
    where the outputs stack under the knobs.
    Browser-side only: no request, no API endpoint; a wide layout, where it is in view, stays put."""
    js = ("() => { const el = document.getElementById(%r); if (!el) return;"
          " const r = el.getBoundingClientRect();"  # the progress shows in the middle of the output
          " if (r.top + Math.min(r.height, 400) / 2 + 60 > window.innerHeight)"
          " el.scrollIntoView({behavior: 'smooth', block: 'start'}); }") % elem_id
    button.click(None, None, None, js=js, queue=False, api_visibility="private", show_progress="hidden")


#: The first words of a tab's summary once its last request stopped with an error (failure_note).
FAILED_MARK = "⚠ **The last request stopped with an error**"


def failure_note(info: str | None, placeholder: str = "") -> str | None:
    """A tab's summary once its request stopped with an error (a refusal or a failure): Gradio
    leaves the outputs as they were, so say whose they are. A summary that is a progress line of
    this request (ending in "…") means the outputs are its unfinished part; any other is the request
    before's. Nothing shown yet (empty, ``placeholder``) or already marked stays as it is."""
    text = (info or "").strip()
    if not text or text == placeholder.strip() or text.startswith(FAILED_MARK):
        return info
    where = "its message is in the corner of the page"
    if text.endswith("…"):
        return f"{FAILED_MARK} ({where}) before it finished; shown is what it had done. Its last status: {text}"
    return f"{FAILED_MARK} ({where}); everything shown here is from the request before it.\n\n{text}"


def note_failures(dependency: Any, info: gr.Markdown, shown: Sequence[Any] = (), placeholder: str = "") -> None:
    """When the request of ``dependency`` (a tab's button event) fails, mark the tab's summary
    ``info`` with :func:`failure_note`, and lift Gradio's "Error" cover off the outputs ``shown``
    (where the progress showed; their pictures stay as they were). Browser only: the API's errors
    stay errors, as they were."""

    def mark_failed(text: str | None):
        note = failure_note(text, placeholder)
        return (note, *(gr.skip() for _ in shown)) if shown else note

    dependency.failure(mark_failed, info, [info, *shown], queue=False, api_visibility="private", show_progress="hidden")


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


def notes_text(notes: Sequence[str], prefix: str = "") -> str:
    """The engine's request notes (``Result.notes``) as Markdown lines to append to a summary:
    each on its own line, in italics, after ``prefix`` (a column's name); "" when there are none."""
    return "".join(f"  \n_Note: {prefix}{_md_escape(n)}_" for n in notes)


def _md_escape(text: str) -> str:
    """``text`` with the characters Markdown would read as emphasis or markup escaped."""
    return "".join("\\" + c if c in "\\`*_[]<>#|" else c for c in text)


def _timings_text(timings: Mapping[str, float]) -> str:
    order = ("faces", "conditions", "denoise", "decode", "previews", "total")
    parts = [f"{k} {timings[k]:.2f} s" for k in order if k in timings]
    return " · ".join(parts)


# ------------------------------------------------------------------------------------------------
# The app


CSS = """
.prose.lcmla-banner {border-left: 4px solid #d97706; background: #fffbeb; padding: 10px 14px; border-radius: 6px; color: #3f2d0c;}
.lcmla-banner p {margin: 0;}
.lcmla-header h1 {margin-bottom: 0;}
#generate-btn, #previews-btn, #attention-btn, #compare-btn {min-height: 48px; font-size: 1.05em;}
.lcmla-presets button {min-width: 0 !important;}
.lcmla-note {font-size: 0.9em; opacity: 0.85;}
/* Gradio's gallery stretches fewer pictures than columns to full-width squares, taller than the
   box: fixed-height thumbnails show the whole picture and its caption inside the box */
#faces-found .thumbnail-item {height: 112px !important; aspect-ratio: auto !important;}
#strip-x0 .thumbnail-item, #strip-lcm .thumbnail-item {height: 180px !important; aspect-ratio: auto !important;}
#faces-found .thumbnail-item img, #strip-x0 .thumbnail-item img, #strip-lcm .thumbnail-item img {object-fit: contain !important;}
#compare-gallery .caption-label {white-space: normal; text-overflow: clip; max-width: calc(100% - 8px);}
/* the PNG box's refusal goes under the box (Gradio lays it over the box's top, where it covered
   the box's label and its Clear button); the margin leaves it room in the accordion */
#settings-png:has(.validation-error) {overflow: visible !important; margin-bottom: 6.5em;}
#settings-png .wrap:has(> .validation-error) {top: 100%; bottom: auto; height: auto; min-height: 0; padding: 6px 0 0;
  background: none; overflow: visible;}
#settings-png .wrap > .validation-error {position: static; margin: 0; width: 100%;}
@media (max-width: 640px) {#settings-png:has(.validation-error) {margin-bottom: 11em;}}
/* a narrow screen: two pictures a row, the gallery growing instead of scrolling sideways */
@media (max-width: 640px) {
  #strip-x0 .grid-container, #strip-lcm .grid-container, #compare-gallery .grid-container {
    grid-template-columns: repeat(2, minmax(0, 1fr)) !important;}
  #strip-x0 .grid-wrap, #strip-lcm .grid-wrap, #compare-gallery .grid-wrap {height: auto !important; max-height: none !important;}
  #strip-x0, #strip-lcm, #compare-gallery {height: auto !important;}
}
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
        f"{engine.faces.backend}{_providers(engine)} · {_memory_text(engine)} · lcmla {__version__}",
    ]
    if trained is not None:
        lines.append(f"**Trained weights:** {_trained_text(trained)} — pick them with *Weights* in Generate; "
                     "Compare adds a column for them.")
    return "\n\n".join(lines)


def _memory_text(engine: Any) -> str:
    """Where the model runs and how it holds memory (lcmla.memory's modes)."""
    device = str(getattr(engine, "device", "cpu"))
    mode = getattr(engine, "memory_mode", "full")
    if mode in MEMORY_NOTES:
        text = f"{device}, {MEMORY_NOTES[mode]}"
    else:
        text = f"{device}, every model in device memory"
    compiled = getattr(engine, "compiled", ())
    if compiled:  # lcmla.acceleration
        text += f", torch.compile ({', '.join(compiled)}; the first requests compile)"
    return text


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
# The request context every handler gets


@dataclass
class Context:
    """What a handler works with: the stock engine, the trained one (or None), the evaluation report
    folders and the per-request output folders. Handlers are plain functions of (context, inputs)."""

    stock: Any
    trained: Trained | None = None
    reports: Sequence[str | os.PathLike] = ()
    outputs: _Outputs = field(default_factory=lambda: _Outputs())

    @property
    def preset(self) -> Preset:
        return self.stock.preset

    def pick_engine(self, ui: Mapping[str, Any]) -> Any:
        """The stock engine, or the trained one when Weights says so (and one is loaded)."""
        choice = ui.get("app.weights") or "stock"
        if choice not in WEIGHTS_CHOICES:
            raise gr.Error(f"weights must be one of {', '.join(WEIGHTS_CHOICES)}, not {choice!r}")
        if choice == "trained":
            if self.trained is None:
                raise gr.Error("no trained weights are loaded: start the app with --adapter FILE and/or "
                               "--kv-lora FILE (or $LCMLA_ADAPTER / $LCMLA_KV_LORA)", title="No trained weights")
            return self.trained.engine
        return self.stock

    def request_settings(self, ui: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> GenerationSettings:
        """The widget values (by input name) as ONE validated GenerationSettings (a new seed when asked)."""
        settings = settings_from_ui(ui, self.preset, extra)
        if ui.get("app.randomize_seed"):
            settings = settings.replace(output__seed=secrets.randbelow(2**31))
        return settings

    def step_progress(self, progress: Any, settings: GenerationSettings) -> Callable[[Any], None]:
        """An engine callback that moves Gradio's progress bar over images × steps."""
        steps = settings.guidance.steps or self.preset.steps
        total = steps * settings.output.num_images

        done = [0]  # a running count: the engine batches images, so their steps arrive interleaved

        def report(info: Any) -> None:
            done[0] += 1
            progress((done[0], max(total, done[0])), desc=f"step {info.step + 1}/{info.num_steps} · "
                                                          f"image {info.image_index + 1}/{settings.output.num_images}")

        return report


def widget(knob: Knob, value: Any) -> gr.components.Component:
    """The Gradio widget of a knob, at ``value``."""
    common: dict[str, Any] = {"label": knob.label, "value": value, "elem_id": knob.elem_id}
    if knob.info:
        common["info"] = knob.info
    if knob.kind in ("text", "floats", "steps"):
        return gr.Textbox(lines=knob.lines, max_lines=max(knob.lines, 4), placeholder=knob.placeholder or None, **common)
    if knob.kind == "int":  # range and wholeness are checked with the knob's own message (knobs._parse_number_field):
        return gr.Number(**common)  # precision=0 would round 1.5 to 2 silently, before any check
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
