"""The Attention maps tab: the identity-branch attention before and after AM, and their difference,
per block, step and token; selectors redraw from the stored maps without generating again."""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import Any

import gradio as gr

from lcmla.errors import LcmlaError
from lcmla.settings import AM_MODES

from .common import (
    ATTENTION_INPUTS,
    Context,
    _at_least,
    _face_paths,
    _gpu,
    named_handler,
    note_failures,
    notes_text,
    reveal_on_click,
    user_errors,
)

#: The tab's AM choice for a capture: the Generate tab's, or one of the modes.
CAPTURE_MODES = ("as set in Generate", *AM_MODES)
#: The Block selector's means over a kind of block (each layer is added after a capture).
_KIND_CHOICES = [("All blocks (mean)", "all"), ("Down blocks (mean)", "down"), ("Mid block (mean)", "mid"),
                 ("Up blocks (mean)", "up")]
#: What the colour bars show, under the maps.
UNITS_CAPTION = (
    "_Colour bars: the attention probability one identity token gets from each latent pixel (a softmax "
    "weight in 0…1 over the identity tokens, mean over heads). Before AM the identity tokens' weights at a "
    "pixel sum to 1; AM rescales them (AM1's power and scales, AM2's sharpening and AdaIN), so after AM "
    "they no longer sum to 1 and can exceed the before map's range. The difference view is after − before "
    "on a symmetric scale: red where AM raised the token's weight, blue where it lowered it._"
)


def _block_label(name: str) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.1.attn2.processor' → 'down 1 · attention 0 · layer 1'."""
    parts = name.split(".")
    try:
        if parts[0] == "mid_block":
            return f"mid · attention {parts[2]} · layer {parts[4]}"
        return f"{parts[0].split('_')[0]} {parts[1]} · attention {parts[3]} · layer {parts[5]}"
    except IndexError:
        return name


def layout(ctx: Context) -> SimpleNamespace:
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
                                    info="A kind of block (mean of its layers) or one layer.", min_width=220)
            map_step = gr.Slider(0, max(1, ctx.preset.steps - 1), value=0, step=1, label="Step", elem_id="map-step",
                                 min_width=220)
            map_token = gr.Radio(["0", "1", "2", "3"], value="0", label="Identity token", elem_id="map-token",
                                  min_width=220)
            map_shared = gr.Checkbox(value=False, label="Same colour scale for both",
                                     info="Off: each map uses its own range.", elem_id="map-shared", min_width=220)
        with gr.Row():
            map_before = gr.Image(label="Before AM", type="pil", format="png", interactive=False, elem_id="map-before", min_width=240)
            map_after = gr.Image(label="After AM", type="pil", format="png", interactive=False, elem_id="map-after", min_width=240)
            map_diff = gr.Image(label="Difference (after − before)", type="pil", format="png", interactive=False,
                                elem_id="map-diff", min_width=240)
        gr.Markdown(UNITS_CAPTION, elem_id="map-units")
        map_info = gr.Markdown("", label="Map info", elem_id="map-info")
        maps_state = gr.State(None)
    return SimpleNamespace(capture_mode=capture_mode, attention_btn=attention_btn, map_block=map_block,
                           map_step=map_step, map_token=map_token, map_shared=map_shared, map_before=map_before,
                           map_after=map_after, map_diff=map_diff, map_info=map_info, maps_state=maps_state)


def render_maps(state: Any, block: str, step: Any, token: Any, shared: bool):
    """Before, after and difference overlays of one choice of block, step and token, from the stored maps."""
    from lcmla.attention.overlay import overlay_heatmap

    if not state:
        return None, None, None, "Press **Generate and capture maps** first."
    store, image = state["store"], state["image"]
    try:
        whole = float(step).is_integer()
    except (TypeError, ValueError):
        whole = False
    if not whole:
        return None, None, None, f"The step must be a whole number, one of {', '.join(map(str, store.steps()))} (got {step!r})."
    try:
        k, j = int(float(step)), int(token)
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
    info = (f"{state['mode'].upper() if state['mode'] != 'none' else 'No AM'} · seed {state.get('seed', '—')} · "
            f"{len(store.blocks())} layers "
            f"captured over {len(store.steps())} steps · map {tuple(before.shape)} · "
            f"before: {float(before.min()):.3g}…{float(before.max()):.3g}, after: {float(after.min()):.3g}…"
            f"{float(after.max()):.3g}")
    info += untouched_note(state, block, k)
    info += notes_text(state.get("notes", ()))
    return img_before, img_after, img_diff, info


def untouched_note(state: dict[str, Any], block: str, step: int) -> str:
    """Why the before and after maps of a choice are the same, where AM left it untouched: AM off,
    a kind of block or a layer outside the targets, or a step outside AM's steps."""
    if state["mode"] == "none":
        return "  \n_AM is off, so before and after are the same map; pick am1 or am2 above._"
    targets = tuple(state.get("targets", ("down", "mid", "up")))
    from lcmla.attention.context import block_kind

    kind = None if block == "all" else block if block in ("down", "mid", "up") else block_kind(block)
    if kind is not None and kind not in targets:
        return (f"  \n_{kind.capitalize()} blocks are not among this capture's AM targets ({', '.join(targets)}), so "
                "before and after are the same map; tick it under Blocks in the Generate tab to include it._")
    am_steps = state.get("am_steps")
    if am_steps is not None and step not in am_steps:
        return (f"  \n_AM is applied at steps {', '.join(map(str, am_steps))} only, so at step {step} before and "
                "after are the same map._")
    return ""


def run_attention(ctx: Context, ui: dict[str, Any], progress: Any):
    """Generate one image with the identity-attention maps captured; returns the first view."""
    paths = _face_paths(ui["app.faces"])
    engine = ctx.pick_engine(ui)
    mode = ui["app.capture_mode"]
    with user_errors("Attention capture"):
        extra: dict[str, Any] = {"output.num_images": 1, "attention.capture_maps": True}
        if mode in AM_MODES:
            extra["attention.mode"] = mode
        settings = ctx.request_settings(ui, extra)
        progress(0, desc="finding the face")
        result = engine.generate(settings, paths, callback=ctx.step_progress(progress, settings))
        if not result.attention_maps:
            raise LcmlaError("the engine returned no attention maps for this request")
    store = result.attention_maps[0]
    am = result.settings.attention
    state = {"store": store, "image": result.images[0], "mode": am.mode, "targets": list(am.targets),
             "am_steps": None if am.steps is None else [k for k in am.steps if k < result.settings.guidance.steps],
             "notes": list(result.notes),
             "seed": result.seeds[0]}
    steps = store.steps()
    n_tokens = int(next(iter(store.maps.values())).shape[1]) if store.maps else 4
    tokens = [str(t) for t in range(n_tokens)]
    choices = _KIND_CHOICES + [(_block_label(b), b) for b in store.blocks()]
    before, after, diff, info = render_maps(state, "all", steps[0] if steps else 0, "0", False)
    return (state, gr.update(choices=choices, value="all"),
            gr.update(minimum=min(steps or [0]), maximum=max(max(steps or [0]), 1), value=steps[0] if steps else 0),
            gr.update(choices=tokens, value="0"), before, after, diff, info)


def wire(ctx: Context, tab: SimpleNamespace, controls: dict[str, Any]) -> None:
    """Connect the capture button (API name: attention_maps) and the selectors (render_maps)."""
    t = tab
    inputs = [controls[n] for n in ATTENTION_INPUTS[:-1]] + [t.capture_mode]
    reveal_on_click(t.attention_btn, 'map-after')
    capture = t.attention_btn.click(_gpu(named_handler(partial(run_attention, ctx), ATTENTION_INPUTS)), inputs,
                                    [t.maps_state, t.map_block, t.map_step, t.map_token, t.map_before, t.map_after, t.map_diff,
                                     t.map_info],
                                    api_name="attention_maps", concurrency_id="engine", show_progress_on=[t.map_after])
    capture.success(
        # the first view is drawn with separate colour scales: redraw it as the checkbox says
        render_maps, [t.maps_state, t.map_block, t.map_step, t.map_token, t.map_shared],
        [t.map_before, t.map_after, t.map_diff, t.map_info], api_name="attention_maps_redraw", api_visibility="private",
        preprocess=False, show_progress="hidden")
    note_failures(capture, t.map_info, [t.map_after])
    selectors = [t.maps_state, t.map_block, t.map_step, t.map_token, t.map_shared]
    # the step slider redraws on .input: dragging (coalesced by always_last) and typing into its box alike
    for event, name in ((t.map_block.input, "render_maps"), (t.map_token.input, None), (t.map_shared.input, None),
                        (t.map_step.input, None)):
        # preprocess=False: the values as sent, so a step typed past the slider's range gets
        # render_maps' "no maps for that choice … steps captured" instead of Gradio's range error
        # (which would also refuse every later redraw while the box holds it)
        event(render_maps, selectors, [t.map_before, t.map_after, t.map_diff, t.map_info], api_name=name,
              api_visibility="public" if name else "undocumented", concurrency_limit=4,
              trigger_mode="always_last", show_progress="minimal", preprocess=False)
