"""Test helpers for the web app: serve ``app.build_demo`` on a free local port, count engine calls,
and the trained files (a KV-encoder LoRA, an identity adapter as training exports them) and an
evaluation report folder that the app's tests share (import the fixtures by name)."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # app.py lives at the top of the repository
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PassThrough:
    """A wrapper of the real engine: what a subclass does not define is the engine's own."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CountingEngine(PassThrough):
    """The real engine, counting the requests that run the model (so a test can tell a redraw
    from a new generation). Everything else is passed through."""

    def __init__(self, engine: Any):
        super().__init__(engine)
        self.calls: list[str] = []

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("generate")
        return self._inner.generate(*args, **kwargs)

    def previews(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("previews")
        return self._inner.previews(*args, **kwargs)


@contextmanager
def serve(engine: Any, **options: Any) -> Iterator[tuple[Any, str]]:
    """The app around ``engine`` (``options``: build_demo's keywords), launched in this process on
    127.0.0.1; yields (demo, url)."""
    import app

    demo = app.build_demo(engine, **options)
    port = free_port()
    app.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield demo, f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def kv_lora(tmp_path_factory):
    """A KV-encoder LoRA with random (non-zero) B matrices: it changes the KV path's images."""
    import torch

    from lcmla import Engine
    from lcmla.kv_lora import add_kv_encoder_lora, save_kv_encoder_lora

    scratch = Engine.load("tiny", device="cpu")
    add_kv_encoder_lora(scratch.pipe.unet)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in scratch.pipe.unet.named_parameters():
            if "lora_B" in name and "kv_encoder" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return save_kv_encoder_lora(scratch.pipe.unet, tmp_path_factory.mktemp("trained") / "kv_encoder_lora.safetensors")


@pytest.fixture(scope="module")
def trained_adapter(tmp_path_factory):
    """An identity adapter written by training's own export (``training.model.export_weights``, h94's
    layout: ``ip-adapter-faceid-plusv2_sdxl.safetensors``) after its identity K/V projections were
    moved off the stock weights, so it gives other images than the preset's adapter."""
    import torch

    from lcmla import Engine
    from lcmla.attention.processors import IdentityAttnProcessor
    from training.model import export_weights

    scratch = Engine.load("tiny", device="cpu")
    gen = torch.Generator().manual_seed(1)
    changed = 0
    with torch.no_grad():
        for proc in scratch.pipe.unet.attn_processors.values():
            if isinstance(proc, IdentityAttnProcessor):
                for layer in (proc.to_k_ip[0], proc.to_v_ip[0]):
                    layer.weight.add_(torch.randn(layer.weight.shape, generator=gen) * layer.weight.std() * 2)
                    changed += 1
    assert changed, "the tiny engine has no identity attention processors to train"
    files = export_weights(scratch.pipe, ("proj", "ip-kv"), tmp_path_factory.mktemp("trained-adapter"))
    return files["adapter"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A report folder in the layout ``python -m lcmla evaluate`` writes, plus a stray folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("reports")
    run = root / "eval-tiny"
    run.mkdir()
    (run / "report.md").write_text("# Evaluation\n\n![pareto](pareto-dlib.png)\n\n| method | ID |\n|---|---|\n| baseline | 0.1 |\n")
    (run / "summary.csv").write_text("method,scale,id_dlib_mean\nbaseline,0.5,0.1\nam2+dcg,0.5,0.2\n")
    Image.new("RGB", (80, 60), (200, 30, 30)).save(run / "pareto-dlib.png")
    Image.new("RGB", (80, 60), (30, 200, 30)).save(run / "grid-lookahead.png")
    (root / "not-a-report").mkdir()
    return root
