"""Render a captured identity-attention map as a heat-map over the generated image (matplotlib)."""

from __future__ import annotations

import io

import numpy as np


def overlay_heatmap(image, attn_map, *, title: str | None = None, alpha: float = 0.55, cmap: str = "inferno",
                    vmin: float | None = None, vmax: float | None = None, dpi: int = 100, label: str | None = None):
    """The image with ``attn_map`` (h, w; tensor or array) upsampled and drawn over it, plus a colour
    bar (titled ``label``: say what the numbers are); returns a PIL image. Uses matplotlib's
    non-interactive Agg canvas (thread-safe per figure)."""
    from matplotlib.figure import Figure
    from PIL import Image

    arr = attn_map.detach().float().cpu().numpy() if hasattr(attn_map, "detach") else np.asarray(attn_map, dtype=float)
    base = np.asarray(image.convert("RGB"))
    h, w = base.shape[:2]
    # the title goes under the picture: a web page's image label sits over its top-left corner
    strip = 0.3 / (h / dpi + 0.3) if title else 0.0  # the title's share of the figure's height
    fig = Figure(figsize=(w / dpi * 1.25, h / dpi + (0.3 if title else 0)), dpi=dpi)
    ax = fig.add_axes((0.0, strip, 0.8, 1.0 - strip))
    ax.imshow(base, extent=(0, w, h, 0))
    im = ax.imshow(arr, cmap=cmap, alpha=alpha, extent=(0, w, h, 0), interpolation="bilinear",
                   vmin=vmin if vmin is not None else float(arr.min()), vmax=vmax if vmax is not None else float(arr.max()))
    ax.set_axis_off()
    if title:
        fig.text(0.4, strip / 2, title, fontsize=8, ha="center", va="center")
    cax = fig.add_axes((0.83, 0.1, 0.04, 0.8))
    bar = fig.colorbar(im, cax=cax)
    if label:
        bar.set_label(label, fontsize=7)
        bar.ax.tick_params(labelsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf).convert("RGB")
