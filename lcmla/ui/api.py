"""The API-only endpoint: face photos, a prompt and a settings JSON (the JSON lcmla's PNGs carry) → images."""

from __future__ import annotations

import json
from typing import Any

import gradio as gr

from lcmla.errors import LcmlaError
from lcmla.settings import GenerationSettings

from .common import Context, _face_paths, _gpu, user_errors, with_face_example


def generate_from_settings(ctx: Context, faces: Any, settings_json: str, prompt: str = "", progress: Any = None):
    """Generate from face photos and a settings JSON — the JSON that lcmla's PNGs carry and
    ``python -m lcmla show`` prints; a non-empty ``prompt`` replaces the JSON's prompt.

    The settings run on this app's preset: when the JSON names another one, they still run (on this
    app's backbone, so the picture differs from the PNG's) and the info says so.
    Returns (the images, the settings that ran as JSON, a one-paragraph info)."""
    paths = _face_paths(faces)
    with user_errors("Generate from settings"):
        if not (settings_json or "").strip():
            raise LcmlaError("settings_json is empty: pass the JSON a PNG of lcmla carries "
                             "(python -m lcmla show image.png prints it)")
        try:
            settings = GenerationSettings.from_json(settings_json)
            data = json.loads(settings_json)
        except (ValueError, TypeError, KeyError) as exc:
            raise LcmlaError(f"settings_json is not lcmla settings: {exc}") from None
        asked = data.get("preset") if isinstance(data, dict) else None
        settings = settings.replace(preset=ctx.preset.name)  # this app's backbone
        prompt_given = bool((prompt or "").strip())
        if prompt_given:
            settings = settings.replace(prompt=prompt)
        result = ctx.stock.generate(settings, paths, callback=ctx.step_progress(progress, settings) if progress else None)
        files = result.save(ctx.outputs.new())  # the PNGs with their settings embedded, as /generate returns
    s = result.settings
    notes = [f"{len(result.images)} image{'s' * (len(result.images) != 1)} · seeds {', '.join(map(str, result.seeds))} · "
             f"{s.output.width}×{s.output.height} · {s.guidance.steps} steps · preset {ctx.preset.name!r}",
             "prompt: the prompt parameter (it replaced the JSON's)" if prompt_given else "prompt: the JSON's"]
    if asked and asked != ctx.preset.name:
        notes.append(f"the settings name the {asked!r} preset but this app runs {ctx.preset.name!r}: they ran on "
                     f"{ctx.preset.name!r}, so the picture differs from one made with {asked!r}")
    if result.random_weights:
        notes.append("random weights (tiny preset): the images are patterns, not photos")
    notes.extend(f"note: {n}" for n in result.notes)
    return ([(str(f), f"seed {seed}") for f, seed in zip(files, result.seeds)], s.to_json(), "; ".join(notes) + ".")


def build(ctx: Context) -> None:
    """Hidden components and the /generate_from_settings endpoint (inside the Blocks)."""
    with gr.Group(visible=False):
        api_faces = with_face_example(gr.File(file_count="multiple", file_types=["image"], label="faces"))
        api_settings = gr.Textbox(label="settings_json")
        api_prompt = gr.Textbox("", label="prompt")
        api_images = gr.Gallery(label="images", format="png")
        api_used = gr.Textbox(label="settings_json")
        api_info = gr.Textbox(label="info")
        api_button = gr.Button("generate from settings")

    def endpoint(faces: Any, settings_json: str, prompt: str = "", progress: gr.Progress = gr.Progress()):
        """Generate from face photos and a settings JSON (what ``python -m lcmla show`` prints; a
        non-empty prompt replaces the JSON's); returns the images, the settings that ran and an info
        line (which says when the JSON names another preset than the app's)."""
        return generate_from_settings(ctx, faces, settings_json, prompt, progress)

    endpoint.__name__ = endpoint.__qualname__ = "generate_from_settings"
    api_button.click(_gpu(endpoint), [api_faces, api_settings, api_prompt], [api_images, api_used, api_info],
                     api_name="generate_from_settings", concurrency_id="engine")
