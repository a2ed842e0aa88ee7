"""A reader for dlib's serialized models (``.dat``), in pure Python and numpy.

dlib's ``serialize`` writes integers as a control byte (the number of value bytes, 0x80 for a
negative value) followed by the little-endian magnitude; floats as an integer mantissa and an
integer exponent (value = m·2^e); strings as a length and bytes; booleans as the characters '0'
and '1'; tensors as version 2, four dimensions (samples, k, rows, columns) and raw little-endian
float32 values; alias tensors (views into a layer's parameters) as version 1 and their dimensions.

A DNN (``dlib::loss_*<layers…<input_*>>``) is written as: the loss's version, name and options;
the nesting of the layer stack as one version number per layer from the outside in (2 for a
computational layer, 1 for a tag or skip layer, 3 for the innermost layer, which holds the
input); the input layer's details; then each computational layer's details from the inside out,
each followed by bookkeeping (three booleans and gradient tensors). :func:`read_dnn` returns the
loss, the nesting and the layers in that inside-out order; the tag/skip wiring is not in the file
(it is in the network's C++ type), so model builders pair the layers with the known architecture.

:func:`read_shape_predictor` reads a ``shape_predictor`` (an ensemble of regression trees).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LcmlaError


class DlibFormatError(LcmlaError):
    """A file that is not the dlib model it should be."""


class _Reader:
    def __init__(self, data: bytes, name: str):
        self.b, self.p, self.name = data, 0, name

    def _need(self, n: int) -> None:
        if self.p + n > len(self.b):
            raise DlibFormatError(f"{self.name} ends early (truncated or not a dlib model file)")

    def byte(self) -> int:
        self._need(1)
        v = self.b[self.p]
        self.p += 1
        return v

    def int(self) -> int:
        c = self.byte()
        n = c & 0x0F
        if c & 0x70 or n > 8:
            raise DlibFormatError(f"{self.name}: bad integer at byte {self.p - 1} (not a dlib model file)")
        self._need(n)
        v = int.from_bytes(self.b[self.p:self.p + n], "little")
        self.p += n
        return -v if c & 0x80 else v

    def float(self) -> float:
        m, e = self.int(), self.int()
        if e >= 32000:  # dlib's markers for inf, -inf, nan
            return {32000: float("inf"), 32001: float("-inf")}.get(e, float("nan"))
        return float(m) * 2.0 ** e

    def string(self, max_len: int = 256) -> str:
        n = self.int()
        if not 0 <= n <= max_len:
            raise DlibFormatError(f"{self.name}: bad string length {n} at byte {self.p} (not a dlib model file)")
        self._need(n)
        raw = self.b[self.p:self.p + n]
        self.p += n
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise DlibFormatError(f"{self.name}: bad string at byte {self.p - n} (not a dlib model file)") from None

    def bool(self) -> bool:
        c = self.byte()
        if c not in (0x30, 0x31):
            raise DlibFormatError(f"{self.name}: bad boolean at byte {self.p - 1}")
        return c == 0x31

    def tensor(self) -> np.ndarray:
        """A dlib tensor (version 2): (samples, k, rows, columns) float32."""
        if self.int() != 2:
            raise DlibFormatError(f"{self.name}: unsupported tensor version at byte {self.p}")
        dims = [self.int() for _ in range(4)]
        n = int(np.prod(dims))
        self._need(4 * n)
        arr = np.frombuffer(self.b, dtype="<f4", count=n, offset=self.p).reshape(dims).copy()
        self.p += 4 * n
        return arr

    def alias(self) -> tuple[int, ...]:
        if self.int() != 1:
            raise DlibFormatError(f"{self.name}: unsupported alias tensor version at byte {self.p}")
        return tuple(self.int() for _ in range(4))


@dataclass
class Layer:
    """One computational layer: its dlib name and what it holds."""

    kind: str  # con, affine, relu, max_pool, avg_pool, add_prev, fc
    params: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _layer(r: _Reader) -> Layer:
    name = r.string()
    if name == "con_4":
        params = r.tensor().reshape(-1)
        num_filters, nr, nc, sy, sx, py, px = (r.int() for _ in range(7))
        filters, biases = r.alias(), r.alias()
        [r.float() for _ in range(4)]  # learning-rate / weight-decay multipliers
        n_w = int(np.prod(filters))
        return Layer("con", None, {"weight": params[:n_w].reshape(filters), "bias": params[n_w:n_w + biases[1]],
                                   "stride": (sy, sx), "padding": (py, px), "kernel": (nr, nc)})
    if name == "affine_":
        params = r.tensor().reshape(-1)
        gamma, _beta = r.alias(), r.alias()  # beta: read past (its alias is not needed)
        mode = r.int()
        k = gamma[1] if gamma[1] > 1 else gamma[3]
        return Layer("affine", None, {"gamma": params[:k], "beta": params[k:2 * k], "mode": mode})
    if name == "bn_con2":  # batch norm, evaluated with its running statistics: an affine map
        params = r.tensor().reshape(-1)
        gamma_dims, _ = r.alias(), r.alias()
        _means, _invstds, running_mean, running_var = (r.tensor().reshape(-1) for _ in range(4))
        r.int(), r.int()  # num_updates, running_stats_window_size
        [r.float() for _ in range(4)]
        eps = r.float()
        k = gamma_dims[1]
        scale = params[:k] / np.sqrt(running_var + eps)
        return Layer("affine", None, {"gamma": scale, "beta": params[k:2 * k] - running_mean * scale, "mode": 0})
    if name == "relu_":
        return Layer("relu")
    if name in ("max_pool_2", "avg_pool_2"):
        nr, nc, sy, sx, py, px = (r.int() for _ in range(6))
        return Layer(name[:-2], None, {"kernel": (nr, nc), "stride": (sy, sx), "padding": (py, px)})
    if name.startswith("add_prev"):
        return Layer("add_prev")
    if name == "fc_2":
        n_out, _n_in = r.int(), r.int()  # the input count is implied by the weights
        params = r.tensor().reshape(-1)
        weights, biases = r.alias(), r.alias()
        bias_mode = r.int()
        [r.float() for _ in range(4)]
        n_w = int(np.prod(weights))
        return Layer("fc", None, {"weight": params[:n_w].reshape(weights[0], weights[1]),
                                  "bias": params[n_w:n_w + n_out] if n_w < params.size else None,
                                  "bias_mode": bias_mode})
    raise DlibFormatError(f"{r.name}: unsupported dlib layer {name!r}")


def _trailer(r: _Reader, innermost: bool) -> None:
    """add_layer's bookkeeping after a layer's details: three flags and gradient tensors."""
    for _ in range(3):
        r.bool()
    for _ in range(3):
        r.tensor()
    if innermost:
        r.int()  # _sample_expansion_factor


@dataclass
class DnnFile:
    loss: str
    loss_info: dict[str, Any]
    nesting: list[int]  # versions from the outside in: 2 layer, 1 tag/skip, 3 innermost
    input_kind: str
    input_info: dict[str, Any]
    layers: list[Layer]  # inside out


def _mmod_options(r: _Reader) -> dict[str, Any]:
    """``mmod_options`` as loss_mmod_ writes it (version 1: one detector window; version 4: several)."""
    version = r.int()
    if version == 1:
        w, h = r.int(), r.int()
        out = {"detector_windows": [(w, h, "")], "loss_per_false_alarm": r.float(),
               "loss_per_missed_target": r.float(), "truth_match_iou_threshold": r.float()}
        out["overlaps_nms"] = (r.float(), r.float())
        out["overlaps_ignore"] = (r.float(), r.float())
        return out
    if version != 4:
        raise DlibFormatError(f"{r.name}: unsupported mmod_options version {version}")
    windows = []
    for _ in range(r.int()):
        w, h = r.int(), r.int()
        label = r.string()
        windows.append((w, h, label))
    out = {"detector_windows": windows, "loss_per_false_alarm": r.float(), "loss_per_missed_target": r.float(),
           "truth_match_iou_threshold": r.float()}
    out["overlaps_nms"] = (r.float(), r.float())  # test_box_overlap: iou threshold, percent covered
    out["overlaps_ignore"] = (r.float(), r.float())
    out["use_bounding_box_regression"] = r.bool()
    out["bbr_lambda"] = r.float()
    return out


def read_dnn(path: str | Path) -> DnnFile:
    """Read a dlib DNN file (the face ResNet or the MMOD detector; see the module docstring)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DlibFormatError(f"cannot read the dlib model {path}: {exc.strerror or exc}") from None
    r = _Reader(data, path.name)
    if r.int() != 1:
        raise DlibFormatError(f"{path.name} is not a dlib network file (bad header)")
    loss = r.string()
    if loss == "loss_metric_2":
        loss_info = {"margin": r.float(), "distance_threshold": r.float()}
    elif loss == "loss_mmod_":
        loss_info = _mmod_options(r)
    else:
        raise DlibFormatError(f"{path.name}: unsupported dlib loss {loss!r}")
    nesting = []
    while True:
        v = r.int()
        nesting.append(v)
        if v == 3:
            break
        if v not in (1, 2) or len(nesting) > 10000:
            raise DlibFormatError(f"{path.name}: unexpected layer version {v}")
    input_kind = r.string()
    if input_kind == "input_rgb_image_sized":
        info = {"avg": (r.float(), r.float(), r.float()), "size": (r.int(), r.int())}
    elif input_kind == "input_rgb_image_pyramid":
        info = {"avg": (r.float(), r.float(), r.float()), "pyramid_padding": 10, "pyramid_outer_padding": 11}
        at = r.p
        try:
            follows_layer = r.string().startswith(("con_", "relu_", "affine_"))
        except DlibFormatError:
            follows_layer = False
        r.p = at
        if not follows_layer:  # newer files store the paddings; older ones use dlib's defaults (10, 11)
            info["pyramid_padding"], info["pyramid_outer_padding"] = r.int(), r.int()
    else:
        raise DlibFormatError(f"{path.name}: unsupported dlib input layer {input_kind!r}")
    layers = []
    first = True
    while r.p < len(r.b):
        layers.append(_layer(r))
        _trailer(r, first)
        first = False
    if sum(v != 1 for v in nesting) != len(layers):
        raise DlibFormatError(f"{path.name}: {len(layers)} layers for a nesting of {len(nesting)}")
    return DnnFile(loss, loss_info, nesting, input_kind, info, layers)
