"""The Lookahead previews tab: per step, the x̂0 estimate beside the LCM one-step preview, streamed
while the steps run; the worker stops when the client leaves."""

from __future__ import annotations

import inspect
import queue
import threading
from functools import partial
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import gradio as gr

from lcmla.knobs import Knob
from lcmla.settings import check_preview_steps

from .common import (
    PREVIEW_INPUTS,
    Context,
    _at_least,
    _Cancelled,
    _face_paths,
    _gpu,
    _timings_text,
    log,
    notes_text,
    named_handler,
    note_failures,
    user_errors,
    reveal_on_click,
)

#: The tab's own inputs (not settings), parsed like knobs.
_PREVIEW_SCALE = Knob("app.preview_lcm_scale", "LCM-LoRA scale of the previews", "slider")
_PREVIEW_STEPS = Knob("app.preview_steps", "Steps to preview", "steps", placeholder="every step")
#: What the images and captions of contrast-stretched previews say (random-weight presets).
STRETCHED = "contrast-stretched"


def _preview_requirements(engine: Any) -> str:
    """What ``Engine.previews`` needs and this engine lacks ('' when nothing)."""
    lacks = []
    if "lcm" not in tuple(getattr(engine, "adapters", ()) or ()):
        lacks.append("the LCM-LoRA")
    if getattr(getattr(engine, "components", None), "taesd", None) is None:
        lacks.append("TAESD")
    return " and ".join(lacks)


def _strip(frames: Sequence[Any], which: str, stretch: bool = False) -> list[tuple[Any, str]]:
    """Gallery items of one preview kind (``which``: "x0" or "lcm"); ``stretch``: auto-contrast (a
    random-weights TAESD decodes to near-black pictures that would otherwise show nothing), said
    in the caption and stamped on the image itself."""
    from PIL import ImageOps

    def shown(image: Any) -> Any:
        if not stretch:
            return image
        return _stamp(ImageOps.autocontrast(image.convert("RGB"), cutoff=1), STRETCHED)

    suffix = f" · {STRETCHED}" if stretch else ""
    return [(shown(getattr(f, which)), f"step {f.step + 1} · t={f.timestep}{suffix}") for f in frames]


def _stamp(image: Any, text: str) -> Any:
    """``image`` (scaled up to at least 192 px) with ``text`` written in its top-left corner, white on
    a black band: a label that travels with the picture when it is saved or shared."""
    from PIL import ImageDraw

    out = _at_least(image, 192).copy()
    draw = ImageDraw.Draw(out)
    box = draw.textbbox((4, 3), text)
    draw.rectangle((0, 0, box[2] + 4, box[3] + 3), fill=(0, 0, 0))
    draw.text((4, 3), text, fill=(255, 255, 255))
    return out


def layout(ctx: Context) -> SimpleNamespace:
    with gr.Tab("Lookahead previews", id="previews"):
        gr.Markdown(
            "What the model thinks the final image is at each step, from one noise prediction: the DDIM "
            "estimate x̂0 = (z_t − √(1−ᾱ_t)·ε) / √ᾱ_t and the LCM one-step preview ẑ0 = c_skip·z_t + "
            "c_out·x̂0 with the LCM-LoRA (LCM-Lookahead Eq. 3), both decoded by the tiny VAE. Uses the photos, "
            "prompt and knobs of the Generate tab (first image only); frames appear as the steps run."
        )
        lacks = _preview_requirements(ctx.stock)
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
            preview_info = gr.Markdown("", label="Status", elem_id="preview-info")
    return SimpleNamespace(preview_scale=preview_scale, preview_steps=preview_steps, previews_btn=previews_btn,
                           strip_x0=strip_x0, strip_lcm=strip_lcm, preview_final=preview_final,
                           preview_info=preview_info)


def _takes_on_step(previews: Any) -> bool:
    """Whether ``engine.previews`` accepts ``on_step`` (a hook after every denoising step), by its
    signature; a wrapper with ``**kwargs`` is trusted to pass it on."""
    try:
        params = inspect.signature(previews).parameters
    except (TypeError, ValueError):
        return False
    return "on_step" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def run_previews(ctx: Context, ui: dict[str, Any], progress: Any):
    """Stream, per step, the x̂0 estimate and the LCM one-step preview (then the final image); a
    status line after every denoising step."""
    # The engine runs in a worker thread. This generator yields after every denoising step (a status
    # line on steps without a preview), so when the client leaves Gradio closes it within a step and
    # the worker stops at its next step, freeing the engine, even when the previewed steps are late.
    paths = _face_paths(ui["app.faces"])
    engine = ctx.pick_engine(ui)
    with user_errors("Previews"):
        scale = _PREVIEW_SCALE.parse(ui["app.preview_lcm_scale"])
        wanted = _PREVIEW_STEPS.parse(ui["app.preview_steps"])
        settings = ctx.request_settings(ui, {"output.num_images": 1, "lookahead.lcm_lora_scale": scale})
        check_preview_steps(None if wanted is None else set(wanted), settings.guidance.steps or ctx.preset.steps)
    events: queue.Queue = queue.Queue()
    cancelled = threading.Event()  # set when the client leaves: the worker stops at its next step

    def check() -> None:
        if cancelled.is_set():
            raise _Cancelled("the previews request was cancelled")

    def on_frame(frame: Any) -> None:
        check()
        events.put(("frame", frame))

    def on_step(info: Any) -> None:  # after every denoising step (a StepInfo)
        events.put(("step", (info.step, info.timestep)))
        check()

    hooks: dict[str, Any] = {"callback": on_frame}
    if _takes_on_step(engine.previews):
        hooks["on_step"] = on_step
    else:  # an engine without the per-step hook: cancelling waits for the next previewed step
        log.debug("engine.previews takes no on_step: the previews stop at the next previewed step")

    def work() -> None:
        try:
            events.put(("done", engine.previews(settings, paths, steps=wanted, **hooks)))
        except _Cancelled:
            log.info("previews cancelled: the client left")
        except BaseException as exc:  # noqa: BLE001 - handed to the request's thread
            events.put(("error", exc))

    stretch = bool(ctx.preset.random_weights)
    worker = threading.Thread(target=work, name="lcmla-previews", daemon=True)
    worker.start()
    frames: list[Any] = []
    steps = settings.guidance.steps or ctx.preset.steps
    shown_step = -1  # the last step a yield reported
    progress(0, desc="finding the face")
    try:
        while True:
            kind, item = events.get()
            if kind == "frame":
                frames.append(item)
                shown_step = item.step
                progress((item.step + 1, steps), desc=f"step {item.step + 1}/{steps}")
                yield (_strip(frames, "x0", stretch), _strip(frames, "lcm", stretch), None,
                       f"Step {item.step + 1} of {steps} (t = {item.timestep}) …")
            elif kind == "step":
                step, timestep = item
                if step == shown_step:  # its frame was just shown
                    continue
                shown_step = step
                progress((step + 1, steps), desc=f"step {step + 1}/{steps}")
                later = sorted(k for k in (wanted or ()) if step < k < steps)
                note = f" · next preview at step {later[0] + 1}" if later else ""
                yield (_strip(frames, "x0", stretch), _strip(frames, "lcm", stretch), None,
                       f"Step {step + 1} of {steps} (t = {timestep}){note} …")
            elif kind == "error":
                with user_errors("Previews"):
                    raise item
            else:
                result = item
                frames = list(result.frames) or frames
                info = (f"**{len(frames)} step{'s' * (len(frames) != 1)} previewed** · seed {settings.output.seed} · "
                        f"LCM-LoRA scale {scale:g} · "
                        f"{_timings_text(getattr(result, 'timings', {}) or {})}")
                if stretch:
                    info += f"  \n_Random weights: the previews are shown {STRETCHED} (stamped on each image)._"
                info += notes_text(getattr(result, "notes", ()) or ())
                yield _strip(frames, "x0", stretch), _strip(frames, "lcm", stretch), result.image, info
                return
    finally:
        cancelled.set()  # a closed generator (client gone) stops the worker and frees the engine


def wire(ctx: Context, tab: SimpleNamespace, controls: dict[str, Any]) -> None:
    """Connect the tab's button (API name: previews)."""
    inputs = [controls[n] for n in PREVIEW_INPUTS[:-2]] + [tab.preview_scale, tab.preview_steps]
    reveal_on_click(tab.previews_btn, 'strip-x0')
    previews = tab.previews_btn.click(_gpu(named_handler(partial(run_previews, ctx), PREVIEW_INPUTS)), inputs,
                                      [tab.strip_x0, tab.strip_lcm, tab.preview_final, tab.preview_info],
                                      api_name="previews", concurrency_id="engine", show_progress_on=[tab.strip_x0])
    note_failures(previews, tab.preview_info, [tab.strip_x0])
