"""The Generate tab: photos, prompt, every knob, the authors' one-click configurations, settings
from a PNG; and its handlers (plain functions of the request context and the inputs)."""

from __future__ import annotations

import inspect
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr

from lcmla.errors import SettingsError
from lcmla.knobs import KNOB, KNOB_NAMES, preset_settings, settings_to_ui
from lcmla.methods import METHOD_LABELS, SAMPLER_KNOBS, method_changes
from lcmla.pngmeta import settings_from_png

from .common import (
    APP_PRESETS,
    GENERATE_INPUTS,
    WEIGHTS_CHOICES,
    Context,
    _examples,
    _face_paths,
    _gpu,
    _timings_text,
    _trained_text,
    api_param,
    log,
    named_handler,
    note_failures,
    notes_text,
    user_errors,
    widget,
    with_context,
    reveal_on_click,
    with_face_example,
)

#: The Generate summary before the first run.
RUN_INFO_START = "Upload a face photo and press **Generate**."


def layout(ctx: Context, controls: dict[str, Any], defaults: dict[str, Any]) -> SimpleNamespace:
    """The tab's components; every knob's widget goes into ``controls`` by knob name."""

    def knob(name: str) -> gr.components.Component:
        controls[name] = component = widget(KNOB[name], defaults[name])
        return component

    with gr.Tab("Generate", id="generate"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=6, min_width=380):
                with gr.Row():
                    faces = with_face_example(gr.File(label="Face photos", file_count="multiple", file_types=["image"],
                                                      type="filepath", elem_id="faces", height=150, scale=3))
                    faces_found = gr.Gallery(label="Faces found", columns=3, height=150,
                                             format="png", interactive=False, elem_id="faces-found", scale=2)
                controls["app.faces"] = faces
                knob("prompt")
                knob("negative_prompt")
                generate_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                with gr.Row():
                    knob("output.seed")
                    randomize = gr.Checkbox(label="Randomise seed", value=False, elem_id="randomize-seed",
                                            info="Draw a new seed per click (the seed field shows it; Previews and "
                                                 "Attention maps name it in their summary).")
                    controls["app.randomize_seed"] = randomize
                    controls["app.weights"] = gr.Radio(
                        list(WEIGHTS_CHOICES), value="stock", label="Weights", elem_id="weights",
                        visible=ctx.trained is not None,
                        info="stock: the preset's FaceID-Plus-v2; trained: " + _trained_text(ctx.trained))
                with gr.Row():
                    knob("output.num_images")
                    knob("guidance.steps")
                    knob("guidance.scheduler")
                with gr.Row():
                    knob("output.width")
                    knob("output.height")
                with gr.Row():
                    gr.Textbox(f"{ctx.preset.name} — {ctx.preset.title}", label="Preset (chosen when the app starts)",
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
                run_info = gr.Markdown(RUN_INFO_START, label="Summary", elem_id="run-info")
                downloads = gr.File(label="PNG downloads (settings embedded)",
                                    file_count="multiple", interactive=False, elem_id="downloads")
                with gr.Accordion("Settings of this run (JSON)", open=False):
                    settings_json = gr.Code(language="json", interactive=False, label="Settings JSON", show_label=False,
                                            elem_id="settings-json")
                examples = _examples()
                if examples:
                    gr.Examples(examples=examples, inputs=[faces, controls["prompt"]], label="Examples",
                                cache_examples=False, examples_per_page=6)
        # what the last configuration button set of the sampler knobs (see configuration_changes);
        # inside the tab: a component between the tabs themselves shifts Gradio's tab labels
        sampler_left = gr.State(None)
    return SimpleNamespace(faces=faces, faces_found=faces_found, generate_btn=generate_btn, gallery=gallery,
                           run_info=run_info, downloads=downloads, settings_json=settings_json,
                           settings_png=settings_png, preset_buttons=preset_buttons, sampler_left=sampler_left)


# ---- handlers ------------------------------------------------------------------------------------


def run_generate(ctx: Context, ui: dict[str, Any], progress: Any):
    """Generate images: face photos, prompt and every knob by name; returns the gallery, the PNG
    downloads (settings embedded), a summary, the faces used, the seed and the settings JSON."""
    paths = _face_paths(ui["app.faces"])
    engine = ctx.pick_engine(ui)
    with user_errors("Generate"):
        settings = ctx.request_settings(ui)
        progress(0, desc="finding the face")
        result = engine.generate(settings, paths, callback=ctx.step_progress(progress, settings))
        files = result.save(ctx.outputs.new())
        used = [engine.faces.draw_boxes(path, [face], 0) for path, face in zip(paths, result.identity.faces)]
    # the gallery shows the saved PNGs, so its own download button gives them with the settings embedded
    images = [(str(f), f"seed {seed}") for f, seed in zip(files, result.seeds)]
    s = result.settings
    info = (f"**{len(images)} image{'s' * (len(images) > 1)}** · seeds {', '.join(map(str, result.seeds))} · "
            f"{s.output.width}×{s.output.height} · {s.guidance.steps} steps · {_timings_text(result.timings)}")
    if result.random_weights:
        info += "  \n_Random weights (tiny preset): the images are patterns, not photos._"
    info += notes_text(result.notes)
    return (images, [str(f) for f in files], info, [(img, "used face") for img in used],
            s.output.seed, s.to_json())


def show_faces(ctx: Context, files: Any, face_index: Any):
    """Boxes on every uploaded photo as soon as it arrives (a warning, not an error, when none)."""
    if not files:
        return []
    try:
        chosen = KNOB["identity.face_index"].parse(face_index) or 0
    except SettingsError:
        chosen = 0
    shown = []
    for path in _face_paths(files):
        name = Path(path).name
        try:
            found = ctx.stock.faces.detect(path)
        except ValueError as exc:
            gr.Warning(str(exc), title="Unusable photo")
            continue
        except Exception as exc:
            log.exception("face preview failed")
            gr.Warning(f"could not read {name!r}: {exc}", title="Unusable photo")
            continue
        if not found:
            gr.Warning(f"no face found in {name!r}; use a clear, frontal, well-lit photo", title="No face")
        shown.append((ctx.stock.faces.draw_boxes(path, found, chosen),  # past the last face: none highlighted
                      f"{name}: {len(found)} face{'s' * (len(found) != 1)}"))
    return shown


def preset_changes(ctx: Context, key: str) -> dict[str, Any]:
    """Widget values (by knob name) that one of the authors' configurations sets."""
    return {name: KNOB[name].show(value) for name, value in method_changes(key, ctx.preset.name).items()
            if name in KNOB}


def configuration_changes(ctx: Context, key: str, left: dict[str, Any] | None,
                          current: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, list[str]]:
    """What one of the authors' configurations' buttons does, given what the last one left.

    ``left`` is what the previously applied configuration set of :data:`SAMPLER_KNOBS` (``{"by":
    key, "values": {knob: widget value}}``, or None) and ``current`` those widgets' values now.
    Returns (widget values to set by knob name, what this one leaves for the next, the knobs put
    back): a sampler knob the previous configuration set, that this one does not set and that
    still holds that value (the user has not changed it since) goes back to the preset's own, so
    Baseline after "LCM-Lookahead (as released)" runs the backbone's 4 steps again, not 50.
    """
    changes = preset_changes(ctx, key)
    restored: list[str] = []
    if left:
        own = settings_to_ui(preset_settings(ctx.preset), ctx.preset)
        for name, value in left["values"].items():
            if name not in changes and current.get(name) == value:
                changes[name] = own[name]
                restored.append(name)
    sets = {n: changes[n] for n in SAMPLER_KNOBS if n in changes and n not in restored}
    return changes, ({"by": key, "values": sets} if sets else None), restored


def restored_text(ctx: Context, key: str, left: dict[str, Any], restored: list[str], values: dict[str, Any]) -> str:
    """The toast saying which sampler knobs went back to the preset's, and why."""
    shown = "; ".join(f"{KNOB[n].label}: {values[n]}" for n in restored)
    return (f"{METHOD_LABELS[key]} runs on the preset's own sampler, so what {METHOD_LABELS[left['by']]} set is "
            f"back to the {ctx.preset.name} preset's: {shown}.")


def check_settings_png(ctx: Context, path: str | None) -> Any:
    """The PNG box's validator: a file that holds no lcmla settings is refused on the box itself,
    named as the user knows it, and no control changes (Gradio runs the loader only when valid)."""
    if not path:
        return gr.validate(True, "")
    try:
        settings_from_png(path, name=Path(path).name)
    except ValueError as exc:  # SettingsError, ImageError
        return gr.validate(False, str(exc))
    return gr.validate(True, "")


def load_settings(ctx: Context, path: str | None) -> dict[str, Any]:
    """Every knob's widget value from the settings a PNG of lcmla carries ({} without a file)."""
    if not path:
        return {}
    with user_errors("Loading settings"):
        settings = settings_from_png(path, name=Path(path).name)
    if settings.preset != ctx.preset.name:
        gr.Warning(f"this PNG was made with the {settings.preset!r} preset; the app runs {ctx.preset.name!r}, "
                   "so the same settings give a different picture", title="Another preset")
    else:
        gr.Info("Every control now holds the settings of that PNG.", title="Settings loaded")
    return settings_to_ui(settings, ctx.preset)  # every knob, by name


def wire(ctx: Context, tab: SimpleNamespace, controls: dict[str, Any]) -> None:
    """Connect the tab's events (API names: generate, detect_faces, preset_*, load_settings)."""
    knob_components = [controls[name] for name in KNOB_NAMES]
    reveal_on_click(tab.generate_btn, 'gallery')
    generate = tab.generate_btn.click(
        _gpu(named_handler(partial(run_generate, ctx), GENERATE_INPUTS)), [controls[n] for n in GENERATE_INPUTS],
        [tab.gallery, tab.downloads, tab.run_info, tab.faces_found, controls["output.seed"], tab.settings_json],
        api_name="generate", concurrency_id="engine", show_progress_on=[tab.gallery],
    )
    note_failures(generate, tab.run_info, [tab.gallery], RUN_INFO_START)
    tab.faces.change(with_context(show_faces, ctx), [tab.faces, controls["identity.face_index"]], tab.faces_found,
                     api_name="detect_faces", concurrency_limit=4, show_progress="minimal")
    for key, button in tab.preset_buttons.items():
        button.click(_configuration(ctx, key, controls, tab.sampler_left), [tab.sampler_left, *(controls[n] for n in SAMPLER_KNOBS)],
                     [*knob_components, tab.sampler_left], api_name="preset_" + key.replace("+", "_").replace("-", "_"),
                     concurrency_limit=None, show_progress="hidden")

    def load_settings_png(path: str | None):
        """Every knob set from the settings a PNG made by lcmla carries (the others stay)."""
        return {controls[name]: value for name, value in load_settings(ctx, path).items()}

    tab.settings_png.upload(load_settings_png, tab.settings_png, knob_components, api_name="load_settings",
                            validator=partial(check_settings_png, ctx), concurrency_limit=4)


def _configuration(ctx: Context, key: str, controls: dict[str, Any], left_state: Any):
    """The handler of one of the authors' configurations' buttons, named and documented after it."""
    own = settings_to_ui(preset_settings(ctx.preset), ctx.preset)

    def apply(left: Any, *current: Any):
        changes, leaves, restored = configuration_changes(ctx, key, left, dict(zip(SAMPLER_KNOBS, current)))
        if restored:
            gr.Info(restored_text(ctx, key, left, restored, changes), title="The preset's own sampler")
        return {**{controls[n]: v for n, v in changes.items() if n in controls}, left_state: leaves}

    # the API names the sampler knobs it reads (defaults: the preset's own values)
    apply.__signature__ = inspect.Signature([
        inspect.Parameter("left", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        *(inspect.Parameter(api_param(n), inspect.Parameter.POSITIONAL_OR_KEYWORD, default=own[n]) for n in SAMPLER_KNOBS)])

    apply.__name__ = apply.__qualname__ = "preset_" + key.replace("+", "_").replace("-", "_")
    apply.__doc__ = (f"The knob values of the authors' configuration {APP_PRESETS[key]!r} ({key}): its guidance, AM, "
                     "KV and FreeU knobs; the photos, prompt and every other knob stay.")
    return apply
