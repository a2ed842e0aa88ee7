"""insightface's ArcFace recognizer (``buffalo_l``'s ``w600k_r50.onnx``) in torch, differentiable.

The ONNX file is run by :class:`~lcmla.recognizers.onnx_torch.OnnxModule`; this class adds what
insightface's ``ArcFaceONNX`` does around the network: the 112-px ``arcface_dst`` template (the
``insightface5`` landmark scheme), RGB input scaled as ``(x·255 − 127.5) / 127.5`` (or raw
``x·255`` for the old MXNet exports whose graph starts with its own Sub/Mul, the same test
insightface applies), and unit-length embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Recognizer
from .onnx_torch import OnnxConversionError, OnnxModule

#: insightface's ``face_align.arcface_dst``: the five landmarks of a 112×112 ArcFace crop.
ARCFACE_112 = ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041))

#: names tried first when a folder holds several ONNX files
PREFERRED = ("w600k_r50.onnx", "w600k_mbf.onnx", "glintr100.onnx")


def arcface_template(size: int = 112) -> torch.Tensor:
    """The template ``norm_crop`` aligns to at ``size`` (insightface ``estimate_norm``): scaled by
    size/112 when size is a multiple of 112, else by size/128 and shifted 8·ratio to the right. → (5, 2)."""
    ratio = size / 112.0 if size % 112 == 0 else size / 128.0
    shift = 0.0 if size % 112 == 0 else 8.0 * ratio
    dst = torch.tensor(ARCFACE_112, dtype=torch.float32) * ratio
    dst[:, 0] += shift
    return dst


def _input_shape(model) -> list:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def _is_recognizer(model) -> bool:
    """insightface's routing rule: one square image input of side ≥ 112 divisible by 16, one output."""
    shape = _input_shape(model)
    return (len(shape) == 4 and shape[2] is not None and shape[2] == shape[3] and shape[2] >= 112
            and shape[2] % 16 == 0 and len(model.graph.output) == 1)


def _mxnet_normalised(model) -> bool:
    names = [n.name for n in model.graph.node[:8]]
    has_sub = any(n.startswith("Sub") or n.startswith("_minus") for n in names)
    has_mul = any(n.startswith("Mul") or n.startswith("_mul") for n in names)
    return has_sub and has_mul


class ArcFaceRecognizer(Recognizer):
    """An insightface ArcFace ONNX recognizer as a :class:`Recognizer` (crops RGB [0, 1] → unit embeddings)."""

    scheme = "insightface5"

    def __init__(self, net: OnnxModule, input_size: int, embedding_dim: int, *, raw_input: bool = False,
                 name: str = "arcface"):
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.embedding_dim = embedding_dim
        self.raw_input = raw_input
        self.name = name
        self.register_buffer("template", arcface_template(input_size))

    @classmethod
    def from_onnx(cls, path: str | Path) -> "ArcFaceRecognizer":
        import onnx

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ArcFace model not found: {path}")
        model = onnx.load(str(path))
        if not _is_recognizer(model):
            raise OnnxConversionError(f"{path.name} is not an ArcFace-style recognizer (input shape "
                                      f"{_input_shape(model)}, {len(model.graph.output)} outputs)")
        size = _input_shape(model)[2]
        net = OnnxModule(model)
        with torch.no_grad():
            dim = int(net(torch.zeros(1, 3, size, size)).reshape(1, -1).shape[1])
        return cls(net, size, dim, raw_input=_mxnet_normalised(model), name=f"arcface-{path.stem}")

    @classmethod
    def from_model_dir(cls, folder: str | Path) -> "ArcFaceRecognizer":
        """The recognizer of an insightface model pack (``buffalo_l`` or any folder of .onnx files)."""
        import onnx

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"the insightface model folder '{folder}' "
                                    f"{'is a file, not a folder' if folder.exists() else 'does not exist'}: pass the "
                                    "folder of the pack's .onnx files (buffalo_l: ~/.insightface/models/buffalo_l)")
        files = sorted(folder.glob("*.onnx"), key=lambda p: (p.name not in PREFERRED, p.name))
        for path in files:
            if path.name in PREFERRED:
                return cls.from_onnx(path)
            try:
                model = onnx.load(str(path), load_external_data=False)
            except Exception:  # noqa: BLE001 - not a readable model: try the next file
                continue
            if _is_recognizer(model):
                return cls.from_onnx(path)
        raise FileNotFoundError(f"no ArcFace recognizer (e.g. w600k_r50.onnx) among the .onnx files in '{folder}'")

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """crops (B, 3, S, S) RGB in [0, 1] → (B, D) unit embeddings."""
        x = crops * 255.0 if self.raw_input else (crops * 255.0 - 127.5) / 127.5
        features = self.net(x).reshape(crops.shape[0], -1)
        return F.normalize(features.float(), dim=1).to(crops.dtype)
