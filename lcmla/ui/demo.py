"""The app's page: the header, the four tabs (one module each) and the API-only endpoint."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import gradio as gr

from lcmla.knobs import KNOB_NAMES

from . import api, attention, compare, generate, previews
from .common import OUTPUT_TTL_S, QUEUE_SIZE, Context, Trained, _banner, _header, ui_defaults


def build_demo(engine: Any, *, notice: str | None = None, trained: Trained | None = None,
               reports: Sequence[str | os.PathLike] = ()) -> gr.Blocks:
    """The whole app around a loaded ``lcmla.Engine`` (queued: one request at a time per engine);
    ``trained``: the training package's weights in a second engine; ``reports``: folders with
    evaluation reports."""
    ctx = Context(engine, trained, tuple(reports))
    defaults = ui_defaults(ctx.preset)
    controls: dict[str, Any] = {}
    with gr.Blocks(title="lcmla — identity-preserving few-step SDXL", analytics_enabled=False,
                   delete_cache=(OUTPUT_TTL_S, OUTPUT_TTL_S)) as demo:
        gr.Markdown(_header(engine, trained), elem_classes="lcmla-header", elem_id="header")
        banner = _banner(engine, notice)
        if banner:
            gr.Markdown(banner, elem_classes="lcmla-banner", elem_id="banner")
        with gr.Tabs():
            generate_tab = generate.layout(ctx, controls, defaults)
            previews_tab = previews.layout(ctx)
            attention_tab = attention.layout(ctx)
            compare_tab = compare.layout(ctx)
        missing = set(KNOB_NAMES) - set(controls)
        assert not missing, f"knobs without a widget: {sorted(missing)}"
        generate.wire(ctx, generate_tab, controls)
        previews.wire(ctx, previews_tab, controls)
        attention.wire(ctx, attention_tab, controls)
        compare.wire(ctx, compare_tab, controls)
        api.build(ctx)
        # each page load lists the reports there are now (the choices were fixed when the app started)
        demo.load(compare.list_reports_of(ctx), None, compare_tab.report_choice, api_name="page_reports",
                  api_visibility="private", show_progress="hidden")
    # delete_cache's timed clean-up spares the paths in a component's keep_in_cache. What Gradio has
    # cached by now (the examples' photos) it caches only once, while the page is built: without
    # this every example row fails with a missing file after OUTPUT_TTL_S.
    generate_tab.faces.keep_in_cache.update(f for files in demo.temp_file_sets for f in files)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return demo
