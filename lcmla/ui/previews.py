"""The Lookahead previews tab: per step, the x̂0 estimate beside the LCM one-step preview, streamed
while the steps run; the worker stops when the client leaves."""

from __future__ import annotations

import queue
import threading
from functools import partial
from types import SimpleNamespace
from typing import Any

import gradio as gr

from .common import (
    PREVIEW_INPUTS,
    Context,
    _Cancelled,
    _face_paths,
    _gpu,
    _preview_requirements,
    _PREVIEW_SCALE,
    _PREVIEW_STEPS,
    _strip,
    _timings_text,
    log,
    named_handler,
    user_errors,
)


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
            preview_info = gr.Markdown("", elem_id="preview-info")
    return SimpleNamespace(preview_scale=preview_scale, preview_steps=preview_steps, previews_btn=previews_btn,
                           strip_x0=strip_x0, strip_lcm=strip_lcm, preview_final=preview_final,
                           preview_info=preview_info)


def run_previews(ctx: Context, ui: dict[str, Any], progress: Any):
    """Stream, per step, the x̂0 estimate and the LCM one-step preview (then the final image)."""
    paths = _face_paths(ui["app.faces"])
    engine = ctx.pick_engine(ui)
    with user_errors("Previews"):
        scale = _PREVIEW_SCALE.parse(ui["app.preview_lcm_scale"])
        wanted = _PREVIEW_STEPS.parse(ui["app.preview_steps"])
        settings = ctx.request_settings(ui, {"output.num_images": 1, "lookahead.lcm_lora_scale": scale})
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

    stretch = bool(ctx.preset.random_weights)
    worker = threading.Thread(target=work, name="lcmla-previews", daemon=True)
    worker.start()
    frames: list[Any] = []
    steps = settings.guidance.steps or ctx.preset.steps
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


def wire(ctx: Context, tab: SimpleNamespace, controls: dict[str, Any]) -> None:
    """Connect the tab's button (API name: previews)."""
    inputs = [controls[n] for n in PREVIEW_INPUTS[:-2]] + [tab.preview_scale, tab.preview_steps]
    tab.previews_btn.click(_gpu(named_handler(partial(run_previews, ctx), PREVIEW_INPUTS)), inputs,
                           [tab.strip_x0, tab.strip_lcm, tab.preview_final, tab.preview_info],
                           api_name="previews", concurrency_id="engine", show_progress_on=[tab.strip_x0])
