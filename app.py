"""lcmla's web app: identity-preserving few-step SDXL with every knob of FastFace and LCM-Lookahead.

    python app.py                          # the offline `tiny` preset (random weights), 127.0.0.1:7860
    python app.py --preset hyper-sdxl-4step --weights-dir ~/weights --host 0.0.0.0
    python app.py --adapter run/ip-adapter-faceid-plusv2_sdxl.safetensors --kv-lora run/kv_encoder_lora.safetensors --reports eval

The thin entry that ``python app.py`` and Hugging Face Spaces run. The app lives in ``lcmla/ui/``:
one module per tab (Generate, Lookahead previews, Attention maps, Compare — layout and handlers),
the shared request context in ``lcmla/ui/common.py``, the page in ``lcmla/ui/demo.py``, the
command line in ``lcmla/ui/cli.py``; the knob table is ``lcmla/knobs.py`` (shared with the CLI).
Every handler turns the widget values into ONE ``GenerationSettings``; the UI never imports torch,
and importing this module loads nothing heavy (the engine is loaded by ``main``).
"""

from __future__ import annotations

from lcmla.errors import LcmlaError  # noqa: F401 - re-exported for callers of load_trained
from lcmla.knobs import (  # noqa: F401 - the knob table, as the app sees it
    KNOB,
    KNOB_NAMES,
    KNOBS,
    NOT_KNOBS,
    Knob,
    flatten,
    preset_settings,
    settings_from_ui,
    settings_to_ui,
)
from lcmla.methods import METHOD_LABELS  # noqa: F401

if __name__ == "__main__":  # before gradio is imported: it reads $GRADIO_SERVER_PORT with int()
    import os
    import sys

    from lcmla.argtypes import server_port_env_problem

    _port_problem = server_port_env_problem(os.environ)
    if _port_problem:
        print(f"error: {_port_problem}", file=sys.stderr)
        raise SystemExit(2)

from lcmla.ui.cli import launch, load_engine, load_trained, main, parse_args  # noqa: F401
from lcmla.ui.common import (  # noqa: F401
    APP_PRESETS,
    ASSETS,
    ATTENTION_INPUTS,
    COMPARE_METHODS,
    GENERATE_INPUTS,
    PREVIEW_INPUTS,
    WEIGHTS_CHOICES,
    Context,
    Trained,
    _examples,
    _gpu,
    _header,
    _providers,
    api_param,
    named_handler,
    ui_defaults,
)
from lcmla.ui.compare import find_reports, read_report  # noqa: F401
from lcmla.ui.demo import build_demo  # noqa: F401

_KNOB = KNOB
_flatten = flatten

__all__ = [
    "APP_PRESETS", "COMPARE_METHODS", "GENERATE_INPUTS", "KNOBS", "KNOB_NAMES", "Knob", "build_demo",
    "launch", "main", "parse_args", "settings_from_ui", "settings_to_ui", "ui_defaults",
]

if __name__ == "__main__":
    raise SystemExit(main())
