"""dlib's CNN face detector (``mmod_human_face_detector.dat``, CC0; Max-Margin Object Detection)
in torch, forward only.

The network: three 5×5/2 convolutions (16, 32, 32 channels) and three 5×5 ones (45 channels), each
with batch norm (its running statistics folded into an affine map) and relu, then one 9×9
convolution to a score map; the input is RGB minus dlib's mean colour, divided by 256. dlib runs it
on an image pyramid (each level 5/6 of the previous, ``pyramid_down<6>``) tiled into one image;
here each level runs on its own, framed by the same 11 px of black border, which gives the same
scores except within a few pixels of a level's edge. Every score above the threshold is an 80×80
detection window in its level, centred on the point the output maps back to (8·q + 14 in the
padded level); windows are mapped to the image and pruned by non-maximum suppression at dlib's
IoU threshold (0.338). Differences from dlib: the pyramid's downsampling filter (PIL's bilinear
here) and the smallest levels (here down to half the window), so boxes can differ by a few pixels
and scores slightly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .dlib_format import DlibFormatError, read_dnn
from .dlib_resnet import Affine, _conv


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # left, top, right, bottom (dlib's inclusive corners)
    score: float


def _iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def nms(dets: list[Detection], iou: float, covered: float = 1.0) -> list[Detection]:
    """Greedy non-maximum suppression by score (dlib's ``test_box_overlap``: overlapping when the
    IoU exceeds ``iou`` or one box covers more than ``covered`` of the other)."""
    kept: list[Detection] = []
    for d in sorted(dets, key=lambda d: -d.score):
        if all(_iou(d.box, k.box) <= iou for k in kept):
            kept.append(d)
    return kept


class MMODDetector(nn.Module):
    def __init__(self, layers, mean_rgb, window: tuple[int, int], nms_iou: float, outer_padding: int = 11):
        super().__init__()
        mods: list[nn.Module] = []
        for layer in layers:
            if layer.kind == "con":
                mods.append(_conv(layer))
            elif layer.kind == "affine":
                mods.append(Affine(layer))
            elif layer.kind == "relu":
                mods.append(nn.ReLU())
            else:
                raise DlibFormatError(f"unexpected layer {layer.kind} in dlib's face detector")
        self.net = nn.Sequential(*mods)
        self.register_buffer("mean", torch.tensor(mean_rgb, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.window = window
        self.nms_iou = nms_iou
        self.pad = outer_padding
        # where output position q lands in the input: each conv maps p → p·stride − padding + kernel//2
        convs = [m for m in mods if isinstance(m, nn.Conv2d)]
        self.scale_offset = (float(np.prod([c.stride[0] for c in convs])), self._offset(convs))
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _offset(convs) -> float:
        offset = 0.0
        for c in reversed(convs):  # output → input, outermost conv first
            offset = offset * c.stride[0] - c.padding[0] + c.kernel_size[0] // 2
        return offset

    @classmethod
    def load(cls, path: str | Path | None = None) -> "MMODDetector":
        from .dlib_resnet import model_path

        f = read_dnn(path or model_path("detector"))
        if f.loss != "loss_mmod_" or f.input_kind != "input_rgb_image_pyramid":
            raise DlibFormatError("not dlib's MMOD face detector")
        w, h, _ = f.loss_info["detector_windows"][0]
        return cls(f.layers, f.input_info["avg"], (w, h), f.loss_info["overlaps_nms"][0],
                   f.input_info.get("pyramid_outer_padding", 11))

    def levels(self, image: Image.Image, min_side: int) -> list[Image.Image]:
        """The pyramid: the image, then each level 5/6 of the previous, down to ``min_side``."""
        out = [image]
        w, h = image.size
        while True:
            w, h = (w * 5) // 6, (h * 5) // 6
            if min(w, h) < min_side:
                return out
            out.append(image.resize((w, h), Image.BILINEAR))

    @torch.inference_mode()
    def detect(self, image_rgb: np.ndarray, upsample: int = 0, threshold: float = 0.0) -> list[Detection]:
        """Faces in an RGB uint8 image (H, W, 3), best first; ``upsample`` doubles the image that
        many times first (finds smaller faces, as dlib's ``upsample_num_times``)."""
        img = Image.fromarray(np.ascontiguousarray(image_rgb[..., :3]))
        factor = 2 ** upsample
        if upsample:
            img = img.resize((img.width * factor, img.height * factor), Image.BILINEAR)
        device = self.mean.device
        scale, offset = self.scale_offset
        ww, wh = self.window
        dets: list[Detection] = []
        for level in self.levels(img, min(ww, wh) // 2):
            arr = torch.from_numpy(np.asarray(level, dtype=np.float32)).permute(2, 0, 1)[None].to(device)
            x = F.pad(arr, (self.pad,) * 4, value=0.0)
            x = (x - self.mean) / 256.0  # black padding, as in dlib's tiled pyramid
            scores = self.net(x)[0, 0]
            ys, xs = torch.nonzero(scores > threshold, as_tuple=True)
            if len(ys) == 0:
                continue
            sx, sy = img.width / level.width / factor, img.height / level.height / factor
            for yy, xx in zip(ys.tolist(), xs.tolist()):
                cx, cy = xx * scale + offset - self.pad, yy * scale + offset - self.pad
                left, top = cx - ww // 2, cy - wh // 2
                box = (left * sx, top * sy, (left + ww - 1) * sx, (top + wh - 1) * sy)
                dets.append(Detection(box, float(scores[yy, xx])))
        return nms(dets, self.nms_iou)
