"""Test helpers for the web app: serve ``app.build_demo`` on a free local port, count engine calls."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # app.py lives at the top of the repository
    sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CountingEngine:
    """The real engine, counting the requests that run the model (so a test can tell a redraw
    from a new generation). Everything else is passed through."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("generate")
        return self._engine.generate(*args, **kwargs)

    def previews(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("previews")
        return self._engine.previews(*args, **kwargs)


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
