"""Test helpers: tiny home-made InsightFace-compatible ONNX models and awkward test images.

No model weights can be downloaded in the test environment, so :func:`write_tiny_buffalo` builds a
two-file model pack with :mod:`onnx.helper` that ``insightface.app.FaceAnalysis`` loads exactly as
it loads ``buffalo_l``:

``det_tiny.onnx``
    An SCRFD-shaped detector: input ``input.1`` (``1x3xHxW`` float, dynamic H/W, RGB normalised as
    ``(x - 127.5) / 128``), nine outputs (scores, box distances and keypoint offsets for strides 8,
    16 and 32 with two anchors per cell, rank-2 ``(N, 1)``, ``(N, 4)``, ``(N, 10)`` like the real
    SCRFD exports). It is **not** a face detector: strides 8 and 16 never fire; at stride 32 a
    cell fires when the 5x5-cell (160 px) window around it has grey-level contrast, holds at least
    30% skin-coloured pixels (a crude RGB rule) and is the most skin-coloured window of its 7x7-cell
    neighbourhood (so one face-sized region gives one detection). It never fires on flat images nor
    on the black letter-box padding SCRFD adds to non-square photos. Box distances and keypoint
    offsets are constants that draw a plausible frontal face (about 205x245 px at the 640 detector
    size) around the firing cell; on ``assets/face.png`` it finds exactly the face.

``w600k_tiny.onnx``
    An ArcFace-shaped recogniser: ``1x3x112x112`` -> ``1x512``; an 8x8 average pool of the aligned
    crop, centred, times a fixed random matrix. Deterministic, and different crops give different
    embeddings. It does not recognise anybody.

:func:`make_test_images` writes one file per awkward input the image loader must cope with.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent.parent / "assets"
FACE_PNG = ASSETS / "face.png"

DET_FILE = "det_tiny.onnx"
REC_FILE = "w600k_tiny.onnx"

#: ONNX opset / IR version of the tiny models (old enough for any onnxruntime of the last years).
OPSET = 17
IR_VERSION = 8

_STRIDES = (8, 16, 32)
_ANCHORS = 2
_WINDOW = 5  # cells (of 32 px) in the variance / skin-fraction window
_PEAK_WINDOW = 7  # cells in the local-maximum window (one detection per face-sized region)
_SKIN_THRESHOLD = 0.3  # fraction of skin-coloured pixels in the window
_SKIN_GAIN = 10.0
_VAR_THRESHOLD = 0.01  # grey-level variance (input scaled to about -1..1): std of about 13/255
_VAR_GAIN = 1000.0
_PEAK_GAIN = 200.0
# Box distances (left, top, right, bottom) from the face centre, in units of the stride (32 px).
_BOX = (3.2, 3.6, 3.2, 4.0)
# Shift (x, y) of the face centre from the anchor point (a cell's top-left corner), in strides.
_CENTRE = (0.7, -0.7)
# Keypoints relative to the face centre, in units of the box half-width (insightface order:
# image-left eye, image-right eye, nose, image-left mouth corner, image-right mouth corner).
_KPS = ((-0.40, -0.30), (0.40, -0.30), (0.0, 0.12), (-0.33, 0.62), (0.33, 0.62))


def _tensor(name: str, values: np.ndarray):
    """A float32 / int64 initializer."""
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(values), name=name)


def _save(graph, path: Path) -> Path:
    """Wrap ``graph`` in a model of the pinned opset, check it and write it."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lcmla-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _head_nodes(prefix: str, features: str, channels: int, values: np.ndarray, out: str) -> tuple[list, object]:
    """Nodes turning ``features`` (1x1xhxw) into a constant-valued SCRFD head output ``out``.

    Output is ``(h*w*anchors, channels)`` holding ``values`` (length ``channels * anchors``) for
    every cell, laid out like SCRFD's ``transpose(0, 2, 3, 1).reshape(-1, channels)``.
    """
    from onnx import helper

    return [
        helper.make_node("Mul", [features, "zero"], [f"{prefix}_z"], name=f"{prefix}_zero"),
        helper.make_node("Add", [f"{prefix}_z", f"{prefix}_const"], [f"{prefix}_map"], name=f"{prefix}_fill"),
        helper.make_node("Transpose", [f"{prefix}_map"], [f"{prefix}_nhwc"], perm=[0, 2, 3, 1], name=f"{prefix}_t"),
        helper.make_node("Reshape", [f"{prefix}_nhwc", f"shape{channels}"], [out], name=f"{prefix}_flat"),
    ], _tensor(f"{prefix}_const", values.astype(np.float32).reshape(1, channels * _ANCHORS, 1, 1))


def _box_and_kps_values() -> tuple[np.ndarray, np.ndarray]:
    """Per-anchor constant box distances (4) and keypoint offsets (10), in stride units."""
    dx, dy = _CENTRE
    left, top, right, bottom = _BOX
    box = np.asarray([left - dx, top - dy, right + dx, bottom + dy], dtype=np.float32)
    half_width = (left + right) / 2.0
    kps = (np.asarray(_KPS, dtype=np.float32) * half_width + np.asarray(_CENTRE, dtype=np.float32)).reshape(-1)
    return np.tile(box, _ANCHORS), np.tile(kps, _ANCHORS)


def _skin_nodes() -> list:
    """Nodes computing ``skin`` (1x1xHxW, 0/1): R > G > B, R > 90 and 0.12 < (R - B) / R < 0.55.

    A classic, crude skin-colour rule on 0..255 pixel values (undoing SCRFD's normalisation).
    """
    from onnx import TensorProto, helper

    def greater(a: str, b: str, out: str) -> list:
        return [helper.make_node("Greater", [a, b], [out], name=out)]

    return [
        helper.make_node("Mul", ["input.1", "px_scale"], ["px_scaled"], name="px_scaled"),
        helper.make_node("Add", ["px_scaled", "px_offset"], ["px"], name="px"),
        helper.make_node("Split", ["px", "split3"], ["red", "green", "blue"], axis=1, name="split_rgb"),
        *greater("red", "green", "r_gt_g"),
        *greater("green", "blue", "g_gt_b"),
        *greater("red", "skin_min_red", "r_bright"),
        helper.make_node("Sub", ["red", "blue"], ["r_minus_b"], name="r_minus_b"),
        helper.make_node("Mul", ["red", "sat_low"], ["red_low"], name="red_low"),
        helper.make_node("Mul", ["red", "sat_high"], ["red_high"], name="red_high"),
        *greater("r_minus_b", "red_low", "sat_above"),
        helper.make_node("Less", ["r_minus_b", "red_high"], ["sat_below"], name="sat_below"),
        helper.make_node("And", ["r_gt_g", "g_gt_b"], ["hue_ok"], name="hue_ok"),
        helper.make_node("And", ["sat_above", "sat_below"], ["sat_ok"], name="sat_ok"),
        helper.make_node("And", ["hue_ok", "sat_ok"], ["colour_ok"], name="colour_ok"),
        helper.make_node("And", ["colour_ok", "r_bright"], ["skin_b"], name="skin_b"),
        helper.make_node("Cast", ["skin_b"], ["skin"], to=TensorProto.FLOAT, name="skin"),
    ]


def _stride32_logit_nodes(s: str, stride: int) -> list:
    """Nodes computing the stride-32 score logit ``{s}_logit`` (1x1xhxw).

    ``logit = min(var_gain * (var - var_thr), peak_gain * (skin - local_max(skin)))
    + skin_gain * (skin - skin_thr) - penalty * padded`` where ``var`` is the grey variance and
    ``skin`` the skin-pixel fraction of the 5x5-cell window around each cell: a cell fires only if
    its window has contrast and is the most skin-coloured of its 7x7-cell neighbourhood, with a
    score that grows with the skin fraction (0.5 at ``skin_thr``).
    """
    from onnx import TensorProto, helper

    pads = [_WINDOW // 2] * 4
    peak_pads = [_PEAK_WINDOW // 2] * 4

    def cell_mean(source: str, out: str) -> object:
        return helper.make_node("AveragePool", [source], [out], kernel_shape=[stride, stride],
                                strides=[stride, stride], name=out)

    def window_mean(source: str, out: str) -> object:
        return helper.make_node("AveragePool", [source], [out], kernel_shape=[_WINDOW, _WINDOW], strides=[1, 1],
                                pads=pads, count_include_pad=0, name=out)

    def binary(op: str, a: str, b: str, out: str) -> object:
        return helper.make_node(op, [a, b], [out], name=out)

    return [
        cell_mean("gray_sq", f"{s}_meansq"),
        cell_mean("is_pad", f"{s}_pad"),
        cell_mean("skin", f"{s}_skin"),
        window_mean(f"{s}_mean", f"{s}_wmean"),
        window_mean(f"{s}_meansq", f"{s}_wmeansq"),
        window_mean(f"{s}_skin", f"{s}_wskin"),
        binary("Mul", f"{s}_wmean", f"{s}_wmean", f"{s}_wmean2"),
        binary("Sub", f"{s}_wmeansq", f"{s}_wmean2", f"{s}_var"),
        helper.make_node("MaxPool", [f"{s}_wskin"], [f"{s}_peak"], kernel_shape=[_PEAK_WINDOW, _PEAK_WINDOW],
                         strides=[1, 1], pads=peak_pads, name=f"{s}_peak"),
        helper.make_node("MaxPool", [f"{s}_pad"], [f"{s}_wpad"], kernel_shape=[_WINDOW, _WINDOW],
                         strides=[1, 1], pads=pads, name=f"{s}_wpad"),
        binary("Sub", f"{s}_var", "var_thr", f"{s}_excess"),
        binary("Mul", f"{s}_excess", "var_gain", f"{s}_contrast"),
        binary("Sub", f"{s}_wskin", "skin_thr", f"{s}_skin_excess"),
        binary("Mul", f"{s}_skin_excess", "skin_gain", f"{s}_skinness"),
        binary("Sub", f"{s}_wskin", f"{s}_peak", f"{s}_below"),
        binary("Mul", f"{s}_below", "peak_gain", f"{s}_peakness"),
        binary("Min", f"{s}_contrast", f"{s}_peakness", f"{s}_gate"),
        binary("Add", f"{s}_gate", f"{s}_skinness", f"{s}_logit0"),
        binary("Greater", f"{s}_wpad", "pad_frac", f"{s}_padded_b"),
        helper.make_node("Cast", [f"{s}_padded_b"], [f"{s}_padded"], to=TensorProto.FLOAT, name=f"{s}_padded"),
        binary("Mul", f"{s}_padded", "pad_penalty", f"{s}_penalty"),
        binary("Sub", f"{s}_logit0", f"{s}_penalty", f"{s}_logit"),
    ]


def _detector_graph():
    """The SCRFD-compatible graph described in the module docstring."""
    from onnx import TensorProto, helper

    nodes: list = []
    inits = [
        _tensor("gray_w", np.full((1, 3, 1, 1), 1.0 / 3.0, dtype=np.float32)),
        _tensor("zero", np.zeros((1,), dtype=np.float32)),
        _tensor("var_thr", np.asarray([_VAR_THRESHOLD], dtype=np.float32)),
        _tensor("var_gain", np.asarray([_VAR_GAIN], dtype=np.float32)),
        _tensor("peak_gain", np.asarray([_PEAK_GAIN], dtype=np.float32)),
        _tensor("skin_thr", np.asarray([_SKIN_THRESHOLD], dtype=np.float32)),
        _tensor("skin_gain", np.asarray([_SKIN_GAIN], dtype=np.float32)),
        _tensor("px_scale", np.asarray([128.0], dtype=np.float32)),
        _tensor("px_offset", np.asarray([127.5], dtype=np.float32)),
        _tensor("split3", np.asarray([1, 1, 1], dtype=np.int64)),
        _tensor("skin_min_red", np.asarray([90.0], dtype=np.float32)),
        _tensor("sat_low", np.asarray([0.12], dtype=np.float32)),
        _tensor("sat_high", np.asarray([0.55], dtype=np.float32)),
        _tensor("black_level", np.asarray([-0.99], dtype=np.float32)),
        _tensor("pad_frac", np.asarray([0.9], dtype=np.float32)),
        _tensor("pad_penalty", np.asarray([100.0], dtype=np.float32)),
        _tensor("off", np.asarray([-30.0], dtype=np.float32)),
        _tensor("shape1", np.asarray([-1, 1], dtype=np.int64)),
        _tensor("shape4", np.asarray([-1, 4], dtype=np.int64)),
        _tensor("shape10", np.asarray([-1, 10], dtype=np.int64)),
    ]
    nodes += [
        helper.make_node("Conv", ["input.1", "gray_w"], ["gray"], name="gray"),
        helper.make_node("Mul", ["gray", "gray"], ["gray_sq"], name="square"),
        helper.make_node("ReduceMax", ["input.1"], ["brightest"], axes=[1], keepdims=1, name="brightest"),
        helper.make_node("Less", ["brightest", "black_level"], ["is_pad_b"], name="is_pad"),
        helper.make_node("Cast", ["is_pad_b"], ["is_pad"], to=TensorProto.FLOAT, name="is_pad_f"),
    ] + _skin_nodes()
    box_values, kps_values = _box_and_kps_values()
    outputs = {"score": [], "bbox": [], "kps": []}
    for stride in _STRIDES:
        s = f"s{stride}"
        nodes += [
            helper.make_node("AveragePool", ["gray"], [f"{s}_mean"], kernel_shape=[stride, stride],
                             strides=[stride, stride], name=f"{s}_mean"),
        ]
        if stride == _STRIDES[-1]:
            nodes += _stride32_logit_nodes(s, stride)
        else:
            nodes += [
                helper.make_node("Mul", [f"{s}_mean", "zero"], [f"{s}_z"], name=f"{s}_z"),
                helper.make_node("Add", [f"{s}_z", "off"], [f"{s}_logit"], name=f"{s}_logit"),
            ]
        nodes += [
            helper.make_node("Sigmoid", [f"{s}_logit"], [f"{s}_prob"], name=f"{s}_prob"),
            helper.make_node("Concat", [f"{s}_prob"] * _ANCHORS, [f"{s}_probs"], axis=1, name=f"{s}_probs"),
            helper.make_node("Transpose", [f"{s}_probs"], [f"{s}_probs_t"], perm=[0, 2, 3, 1], name=f"{s}_probs_t"),
            helper.make_node("Reshape", [f"{s}_probs_t", "shape1"], [f"score_{stride}"], name=f"{s}_score"),
        ]
        outputs["score"].append(f"score_{stride}")
        for kind, channels, values in (("bbox", 4, box_values), ("kps", 10, kps_values)):
            head, init = _head_nodes(f"{s}_{kind}", f"{s}_mean", channels, values, f"{kind}_{stride}")
            nodes += head
            inits.append(init)
            outputs[kind].append(f"{kind}_{stride}")

    graph_input = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    graph_outputs = []
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride, out in zip(_STRIDES, outputs[kind]):
            graph_outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [f"n{stride}", width]))
    return helper.make_graph(nodes, "tiny_scrfd", [graph_input], graph_outputs, initializer=inits)


def _recognizer_graph(seed: int = 1234):
    """The ArcFace-compatible graph described in the module docstring."""
    from onnx import TensorProto, helper

    features = 3 * 14 * 14
    rng = np.random.default_rng(seed)
    projection = (rng.standard_normal((features, 512)) / np.sqrt(features)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten"),
        helper.make_node("ReduceMean", ["flat"], ["flat_mean"], axes=[1], keepdims=1, name="centre_mean"),
        helper.make_node("Sub", ["flat", "flat_mean"], ["centred"], name="centre"),
        helper.make_node("MatMul", ["centred", "projection"], ["embedding"], name="project"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 512])],
        initializer=[_tensor("projection", projection)],
    )
    return graph


def write_tiny_buffalo(folder: Path) -> Path:
    """Write ``det_tiny.onnx`` and ``w600k_tiny.onnx`` into ``folder`` (created) and return it.

    ``insightface.app.FaceAnalysis(name=str(folder))`` loads the folder like a ``buffalo_l`` pack:
    the detector routes to ``SCRFD`` (nine outputs) and the recogniser to ``ArcFaceONNX`` (square
    112 input).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _save(_detector_graph(), folder / DET_FILE)
    _save(_recognizer_graph(), folder / REC_FILE)
    return folder


# --------------------------------------------------------------------------------------------------
# Test images
# --------------------------------------------------------------------------------------------------


def face_image():
    """``assets/face.png`` as an RGB PIL image."""
    from PIL import Image

    with Image.open(FACE_PNG) as image:
        return image.convert("RGB")


def portraits() -> dict:
    """The two public-domain portraits on every machine as RGB PIL images: scikit-image's
    ``astronaut`` (512×512) and matplotlib's ``grace_hopper.jpg`` (512×600)."""
    import os

    import matplotlib
    import skimage.data
    from PIL import Image

    with Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")) as hopper:
        return {"astronaut": Image.fromarray(skimage.data.astronaut()), "hopper": hopper.convert("RGB")}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png_bytes(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (PIL refuses it at open)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def exif_rotated_jpeg(upright) -> bytes:
    """JPEG bytes whose pixels are ``upright`` turned 90° counter-clockwise, tagged orientation 6.

    A viewer honouring EXIF (orientation 6: rotate 90° clockwise to display) shows ``upright``.
    """
    from PIL import Image

    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def two_faces_image():
    """A 1024x576 grey canvas holding the face of ``face.png`` twice: 360 px (left) and 220 px (right)."""
    from PIL import Image

    head = face_image().crop((96, 40, 416, 360))  # 320x320 around the head
    canvas = Image.new("RGB", (1024, 576), (128, 128, 128))
    canvas.paste(head.resize((360, 360), Image.Resampling.LANCZOS), (60, 100))
    canvas.paste(head.resize((220, 220), Image.Resampling.LANCZOS), (700, 180))
    return canvas


def make_test_images(folder: Path) -> dict[str, Path]:
    """Write the image-loader test files into ``folder`` (created); return ``{kind: path}``.

    Good inputs: ``exif_rotated`` (300x400 upright, red marker top-left, stored rotated with
    orientation 6), ``rgba`` (left 64 px transparent, next 64 px half), ``la``, ``p`` (palette), ``p_transparent``,
    ``cmyk`` (JPEG), ``gray16`` (16-bit PNG holding only values 1000..3000), ``float_tiff`` (mode F),
    ``huge`` (4000x3000 JPEG), ``grey`` (flat 512x512, no face), ``two_faces``, ``face``.
    Bad inputs: ``tiny`` (16x16), ``truncated`` (half a JPEG), ``text`` (text named ``.jpg``),
    ``empty`` (0 bytes), ``bomb`` (PNG header claiming 40000x40000), ``folder`` (a directory),
    ``missing`` (a path that does not exist).
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    face = face_image()
    paths: dict[str, Path] = {}

    def save(kind: str, name: str, image, **options) -> None:
        paths[kind] = folder / name
        image.save(paths[kind], **options)

    def write(kind: str, name: str, data: bytes) -> None:
        paths[kind] = folder / name
        paths[kind].write_bytes(data)

    upright = face.resize((300, 400), Image.Resampling.LANCZOS)
    upright.paste((255, 0, 0), (0, 0, 40, 40))
    write("exif_rotated", "rotated.jpg", exif_rotated_jpeg(upright))

    rgba = face.convert("RGBA")
    alpha = np.full((face.height, face.width), 255, dtype=np.uint8)
    alpha[:, :64] = 0  # a transparent strip on the left, away from the face
    alpha[:, 64:128] = 128
    rgba.putalpha(Image.fromarray(alpha))
    save("rgba", "rgba.png", rgba)
    la = face.convert("LA")
    la.putalpha(Image.fromarray(alpha))
    save("la", "la.png", la)
    save("p", "palette.png", face.quantize(64))
    transparent = face.quantize(64)
    transparent.info["transparency"] = 0
    save("p_transparent", "palette_transparent.png", transparent, transparency=0)
    save("cmyk", "cmyk.jpg", face.convert("CMYK"), quality=90)
    grey16 = np.asarray(face.convert("L"), dtype=np.float64)
    values16 = (1000 + grey16 / 255.0 * 2000).astype(np.uint16)
    save("gray16", "gray16.png", Image.fromarray(values16))
    save("float_tiff", "float.tiff", Image.fromarray(np.asarray(face.convert("L"), dtype=np.float32) / 255.0 - 0.5))
    save("huge", "huge.jpg", face.resize((4000, 3000), Image.Resampling.BILINEAR), quality=75)
    save("grey", "grey.png", Image.new("RGB", (512, 512), (128, 128, 128)))
    save("two_faces", "two_faces.png", two_faces_image())
    save("face", "face.png", face)

    save("tiny", "tiny.png", face.resize((16, 16)))
    buffer = io.BytesIO()
    face.save(buffer, format="JPEG", quality=90)
    write("truncated", "truncated.jpg", buffer.getvalue()[: len(buffer.getvalue()) // 2])
    write("text", "notes.jpg", b"This is not a photo.\nJust some text.\n")
    write("empty", "empty.jpg", b"")
    write("bomb", "bomb.png", bomb_png_bytes())
    paths["folder"] = folder / "a_folder.jpg"
    paths["folder"].mkdir(exist_ok=True)
    paths["missing"] = folder / "does_not_exist.jpg"
    return paths
