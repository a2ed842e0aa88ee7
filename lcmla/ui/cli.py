"""``python app.py``: the command line, loading the engines, launching the server."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from lcmla.argtypes import PORT, OneLineParser
from lcmla.errors import LcmlaError, MissingWeightsError
from lcmla.acceleration import COMPILE_MODES
from lcmla.memory import MEMORY_MODES
from lcmla.presets import PRESETS

from .common import ASSETS, CSS, MAX_FILE_SIZE, Trained, _gpu, _theme, log
from .demo import build_demo


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve ``demo`` with the app's limits, theme and styles (used by ``main`` and the tests)."""
    return demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock, quiet=quiet,
        max_file_size=MAX_FILE_SIZE, show_error=True, allowed_paths=[str(ASSETS)], theme=_theme(), css=CSS,
        footer_links=["api"],
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(
        prog="app.py", description="lcmla's web app: identity-preserving few-step SDXL (FastFace + LCM-Lookahead).")
    parser.add_argument("--preset", default=os.environ.get("LCMLA_PRESET") or "tiny", choices=sorted(PRESETS),
                        help="backbone to load (default: $LCMLA_PRESET or tiny, the offline random-weights preset)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 for everyone)")
    parser.add_argument("--port", type=PORT, default=os.environ.get("GRADIO_SERVER_PORT") or "7860",
                        help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    parser.add_argument("--weights-dir", default=None,
                        help="folder with <org>/<name> weight folders (default: $LCMLA_WEIGHTS, then the HF cache)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, … (default: CUDA when present)")
    parser.add_argument("--face-models", default=None, help="insightface model folder (default: buffalo_l)")
    parser.add_argument("--download", action="store_true", help="download missing weights from the Hugging Face Hub")
    parser.add_argument("--memory", choices=MEMORY_MODES, default=os.environ.get("LCMLA_MEMORY") or "auto",
                        help="full: every model on the GPU; balanced: the text and image encoders offloaded to CPU "
                             "memory between requests, for 12-16 GB cards; low: every model offloaded + VAE tiling, "
                             "for 8-12 GB cards; auto (default, or $LCMLA_MEMORY): by the GPU's free memory (full "
                             "from 14 GiB, balanced from 11.2 GiB, else low)")
    parser.add_argument("--compile", choices=COMPILE_MODES, default=os.environ.get("LCMLA_COMPILE") or "none",
                        help="torch.compile: am (FastFace's identity branch) or unet (that and the UNet); the first "
                             "requests compile, later sizes and image counts reuse their graphs (default: none, or "
                             "$LCMLA_COMPILE)")
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
                          face_models=args.face_models, adapter=args.adapter, kv_encoder_lora=args.kv_lora,
                          memory=engine.memory_mode, compile=args.compile)
    return Trained(trained, args.adapter, args.kv_lora)


def load_engine(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The engine for ``args`` and a notice for the page; falls back to `tiny` when weights are missing."""
    from lcmla import Engine  # imports torch: only here, never at import time

    kwargs = {"device": args.device, "weights_dir": args.weights_dir or os.environ.get("LCMLA_WEIGHTS"),
              "allow_download": args.download, "face_models": args.face_models, "memory": args.memory,
              "compile": args.compile}
    try:
        return Engine.load(args.preset, **kwargs), None
    except MissingWeightsError as exc:
        if args.preset == "tiny" or args.no_fallback:
            raise
        log.warning("%s", exc)
        notice = (f"The weights of the `{args.preset}` preset are not on this machine, so the app runs the offline "
                  f"`tiny` preset instead. {exc}")
        return Engine.load("tiny", device=args.device, memory=args.memory, compile=args.compile), notice


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port`` (taken, or an address of another machine),
    found by binding it as the server will; None when it is free."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, port))
    except OSError as exc:
        return (f"cannot listen on {host}:{port} ({exc.strerror or exc}): another program (an earlier app.py?) "
                f"holds the port, or the address is not this machine's; pass --port N (e.g. --port {port + 1}), "
                f"stop the other program, or pass another --host")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    _gpu(lambda: None)  # on ZeroGPU Spaces, `spaces` must be imported before torch
    from lcmla.loading import quiet_torchvision_notice

    quiet_torchvision_notice()
    problem = port_problem(args.host, args.port)  # said before the model loads, not after
    if problem:
        print(f"error: {problem}")
        return 2
    try:
        engine, notice = load_engine(args)
        trained = load_trained(args, engine)
    except LcmlaError as exc:
        print(f"error: {exc}")
        return 2
    if engine.preset.random_weights:
        print("NOTE: the tiny preset has random weights — its images are patterns, not photos.", flush=True)
    demo = build_demo(engine, notice=notice, trained=trained, reports=args.reports)
    try:
        launch(demo, host=args.host, port=args.port, share=args.share)
    except OSError as exc:  # taken in the seconds the model took to load
        if "port" not in str(exc).lower():
            raise
        print(f"error: {port_problem(args.host, args.port) or exc}")
        return 2
    return 0
