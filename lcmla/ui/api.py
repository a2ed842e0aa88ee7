"""The API-only endpoint: face photos plus a settings JSON (the JSON lcmla's PNGs carry) → images."""

from __future__ import annotations

from typing import Any

import gradio as gr

from lcmla.errors import LcmlaError
from lcmla.settings import GenerationSettings

from .common import Context, _face_paths, _gpu, user_errors


def generate_from_settings(ctx: Context, faces: Any, settings_json: str, progress: Any = None):
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
        settings = settings.replace(preset=ctx.preset.name)  # this app's backbone
        result = ctx.stock.generate(settings, paths, callback=ctx.step_progress(progress, settings) if progress else None)
    return ([(img, f"seed {seed}") for img, seed in zip(result.images, result.seeds)],
            result.settings.to_json())


def build(ctx: Context) -> None:
    """Hidden components and the /generate_from_settings endpoint (inside the Blocks)."""
    with gr.Group(visible=False):
        api_faces = gr.File(file_count="multiple", file_types=["image"], label="faces")
        api_settings = gr.Textbox(label="settings_json")
        api_images = gr.Gallery(label="images", format="png")
        api_used = gr.Textbox(label="settings_json")
        api_button = gr.Button("generate from settings")

    def endpoint(faces: Any, settings_json: str, progress: gr.Progress = gr.Progress()):
        """Generate from face photos and a settings JSON (what ``python -m lcmla show`` prints); returns
        the images and the settings that ran."""
        return generate_from_settings(ctx, faces, settings_json, progress)

    api_button.click(_gpu(endpoint), [api_faces, api_settings], [api_images, api_used],
                     api_name="generate_from_settings", concurrency_id="engine")
