"""A small ONNX → torch interpreter for feed-forward recognizers (insightface's ``w600k_r50.onnx``).

The graph's initializers become buffers of an :class:`OnnxModule`; its nodes run in the file's
(topological) order with torch functions, so the result is differentiable in its input and moves
with ``.to(device, dtype)`` like any module. Only the operators that face-recognition exports use
are implemented (ResNet/IResNet/MobileFaceNet families: convolutions, batch norm, PReLU, pooling,
element-wise arithmetic, flatten/reshape and the final Gemm/MatMul, plus the shape arithmetic
exporters emit around a reshape). Any other operator is reported by name, with the node, before
anything runs.

Checked against onnxruntime in ``tests/test_arcface.py`` (≤ 1e-4 on random inputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class OnnxConversionError(ValueError):
    """The ONNX file cannot be turned into a torch module (unsupported operator or attribute)."""


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pads(pads, spatial: int) -> tuple[list[int], bool]:
    """ONNX pads [x1_begin, x2_begin, …, x1_end, x2_end, …] → (begin list, symmetric?)."""
    if not pads:
        return [0] * spatial, True
    begin, end = list(pads[:spatial]), list(pads[spatial:])
    return begin, begin == end


def _explicit_pad(x: torch.Tensor, pads, spatial: int, value: float = 0.0) -> torch.Tensor:
    begin, end = list(pads[:spatial]), list(pads[spatial:])
    torch_pads: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):  # F.pad: last dim first
        torch_pads += [b, e]
    return F.pad(x, torch_pads, value=value)


def _axis_shape(t: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """Reshape a per-channel tensor (C,) or (C, 1, 1) to broadcast on ``axis`` of a rank-``rank`` input."""
    shape = [1] * rank
    shape[axis] = -1
    return t.reshape(shape)


def _conv(x, w, b=None, *, strides=None, pads=None, dilations=None, group=1, auto_pad="NOTSET", kernel_shape=None):
    spatial = w.ndim - 2
    if auto_pad not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
        raise OnnxConversionError(f"Conv auto_pad={auto_pad!r} is not supported; re-export with explicit pads")
    begin, symmetric = _pads(pads, spatial)
    if not symmetric:
        x, begin = _explicit_pad(x, pads, spatial), [0] * spatial
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    return fn(x, w, b, stride=strides or 1, padding=begin, dilation=dilations or 1, groups=group)


def _batch_norm(x, scale, bias, mean, var, *, epsilon=1e-5, momentum=0.9, training_mode=0, spatial=1):
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=epsilon)


def _prelu(x, slope):
    if slope.numel() == 1:
        return torch.where(x >= 0, x, x * slope.reshape(()))
    if slope.ndim == 1 and x.ndim > 1 and slope.shape[0] == x.shape[1]:
        slope = _axis_shape(slope, 1, x.ndim)
    return torch.where(x >= 0, x, x * slope)


def _pool(kind: str):
    def run(x, *, kernel_shape, strides=None, pads=None, ceil_mode=0, count_include_pad=0, auto_pad="NOTSET",
            dilations=None, storage_order=0):
        spatial = len(kernel_shape)
        if auto_pad not in ("NOTSET", b"NOTSET", "VALID", b"VALID"):
            raise OnnxConversionError(f"{kind} auto_pad={auto_pad!r} is not supported")
        begin, symmetric = _pads(pads, spatial)
        if not symmetric:
            fill = float("-inf") if kind == "MaxPool" else 0.0
            x, begin = _explicit_pad(x, pads, spatial, fill), [0] * spatial
        if kind == "MaxPool":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[spatial]
            return fn(x, kernel_shape, strides or kernel_shape, begin, dilations or 1, ceil_mode=bool(ceil_mode))
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        return fn(x, kernel_shape, strides or kernel_shape, begin, ceil_mode=bool(ceil_mode),
                  count_include_pad=bool(count_include_pad))

    return run


def _gemm(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.transpose(0, 1) if transA else a
    b = b.transpose(0, 1) if transB else b
    out = alpha * (a @ b)
    return out if c is None else out + beta * c


def _flatten(x, *, axis=1):
    axis = axis if axis >= 0 else x.ndim + axis
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


def _reshape(x, shape, *, allowzero=0):
    dims = [int(v) for v in shape.tolist()]
    dims = [x.shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _axes(axes, tensor_axes=None):
    if tensor_axes is not None:
        return [int(v) for v in tensor_axes.tolist()]
    return list(axes) if axes is not None else None


def _reduce(fn: Callable):
    def run(x, axes_input=None, *, axes=None, keepdims=1, noop_with_empty_axes=0):
        dims = _axes(axes, axes_input)
        if not dims:
            if noop_with_empty_axes:
                return x
            dims = list(range(x.ndim))
        return fn(x, dims, bool(keepdims))

    return run


def _unsqueeze(x, axes_input=None, *, axes=None):
    dims = sorted(d if d >= 0 else d + x.ndim + len(_axes(axes, axes_input)) for d in _axes(axes, axes_input))
    for d in dims:
        x = x.unsqueeze(d)
    return x


def _squeeze(x, axes_input=None, *, axes=None):
    dims = _axes(axes, axes_input)
    if dims is None:
        return x.squeeze()
    for d in sorted((d if d >= 0 else d + x.ndim for d in dims), reverse=True):
        x = x.squeeze(d)
    return x


def _gather(x, index, *, axis=0):
    if index.ndim == 0:
        return x.select(axis, int(index))
    return torch.index_select(x, axis, index.reshape(-1).long()).reshape(
        *x.shape[:axis], *index.shape, *x.shape[axis + 1:])


def _clip(x, lo=None, hi=None, *, min=None, max=None):  # noqa: A002 - ONNX attribute names
    lo = lo if lo is not None else min
    hi = hi if hi is not None else max
    return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))


def _pad(x, pads, value=None, axes=None, *, mode="constant"):
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        raise OnnxConversionError(f"Pad mode={mode!r} is not supported")
    p = [int(v) for v in pads.tolist()]
    n = len(p) // 2
    torch_pads: list[int] = []
    for b, e in zip(reversed(p[:n]), reversed(p[n:])):
        torch_pads += [b, e]
    return F.pad(x, torch_pads, value=0.0 if value is None else float(value))


#: ONNX operator → torch implementation (inputs positional, attributes as keywords).
OPS: dict[str, Callable] = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "PRelu": _prelu,
    "Relu": lambda x: F.relu(x),
    "LeakyRelu": lambda x, *, alpha=0.01: F.leaky_relu(x, alpha),
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
    "Neg": torch.neg,
    "Sqrt": torch.sqrt,
    "Pow": torch.pow,
    "Exp": torch.exp,
    "MatMul": torch.matmul,
    "Gemm": _gemm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda x, *, perm=None: x.permute(*(perm if perm is not None else reversed(range(x.ndim)))),
    "Identity": lambda x: x,
    "Dropout": lambda x, *rest, ratio=0.5, seed=0, training_mode=0: x,
    "GlobalAveragePool": lambda x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True),
    "GlobalMaxPool": lambda x: x.amax(dim=tuple(range(2, x.ndim)), keepdim=True),
    "AveragePool": _pool("AveragePool"),
    "MaxPool": _pool("MaxPool"),
    "ReduceMean": _reduce(lambda x, d, k: x.mean(d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(d, keepdim=k)),
    "ReduceL2": _reduce(lambda x, d, k: torch.linalg.vector_norm(x, 2, d, keepdim=k)),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": lambda *xs, axis: torch.cat(xs, dim=axis),
    "Shape": lambda x, *, start=0, end=None: torch.tensor(list(x.shape)[start:end], dtype=torch.int64),
    "Gather": _gather,
    "Cast": lambda x, *, to, saturate=1: x,
    "Clip": _clip,
    "Pad": _pad,
    "Softmax": lambda x, *, axis=-1: torch.softmax(x, axis),
}


class OnnxModule(nn.Module):
    """An ONNX graph run by torch. ``forward(x)`` takes the graph's single (non-initializer) input
    and returns its first output. Initializers are buffers (a recognizer is frozen; gradients flow
    into the input)."""

    def __init__(self, model):
        super().__init__()
        from onnx import numpy_helper

        graph = model.graph
        init_names = {t.name for t in graph.initializer}
        self._names: dict[str, str] = {}
        for i, tensor in enumerate(graph.initializer):
            array = numpy_helper.to_array(tensor).copy()
            key = f"w{i}"
            self._names[tensor.name] = key
            t = torch.from_numpy(array)
            self.register_buffer(key, t)
        inputs = [v.name for v in graph.input if v.name not in init_names]
        if len(inputs) != 1:
            raise OnnxConversionError(f"expected one graph input, found {inputs}")
        self.input_name = inputs[0]
        self.output_name = graph.output[0].name
        unknown = sorted({n.op_type for n in graph.node if n.op_type not in OPS and n.op_type != "Constant"})
        if unknown:
            raise OnnxConversionError(f"unsupported ONNX operators {unknown}; supported: {sorted(OPS)}")
        self._nodes = []
        for k, node in enumerate(graph.node):
            attrs = _attrs(node)
            if node.op_type == "Constant":
                value = attrs.get("value")
                if value is None:
                    raise OnnxConversionError(f"Constant node {node.name!r}: only the 'value' attribute is supported")
                key = f"c{k}"
                self.register_buffer(key, torch.from_numpy(numpy_helper.to_array(value).copy()))
                self._names[node.output[0]] = key
                continue
            self._nodes.append((node.op_type, list(node.input), list(node.output), attrs, node.name))

    @classmethod
    def load(cls, path: str | Path) -> "OnnxModule":
        import onnx

        return cls(onnx.load(str(path)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, torch.Tensor | None] = {self.input_name: x, "": None}
        for name, key in self._names.items():
            values[name] = getattr(self, key)
        for op, ins, outs, attrs, name in self._nodes:
            args = [values[i] for i in ins]
            while args and args[-1] is None:  # trailing optional inputs left out
                args.pop()
            try:
                result = OPS[op](*args, **attrs)
            except OnnxConversionError:
                raise
            except Exception as exc:  # noqa: BLE001 - name the node that failed
                raise OnnxConversionError(f"ONNX node {name or op!r} ({op}) failed: {exc}") from exc
            if isinstance(result, (tuple, list)):
                for o, r in zip(outs, result):
                    values[o] = r
            else:
                values[outs[0]] = result
        return values[self.output_name]
