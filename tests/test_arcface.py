"""The ONNX → torch interpreter and the ArcFace recognizer built on it, checked against onnxruntime
and insightface's own ArcFaceONNX on models the tests write (no buffalo_l download exists here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcmla.recognizers.arcface import ArcFaceRecognizer, arcface_template
from lcmla.recognizers.onnx_torch import OnnxConversionError, OnnxModule
from tests.faceutils import FACE_PNG, IR_VERSION, OPSET, write_tiny_buffalo


def _iresnet_graph(seed: int = 0, size: int = 32, width: int = 8, dim: int = 16):
    """An IResNet-shaped graph (insightface's w600k_r50 layout in miniature): conv-BN-PReLU stem,
    two residual blocks (BN → conv → BN → PReLU → conv(stride) → BN, shortcut conv+BN when strided),
    BN, flatten by dynamic Shape/Gather/Concat/Reshape, Gemm (transB) and a final 1-d BatchNorm.
    Dynamic batch; random weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, *shape, scale=0.3):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def bn(x, c, out):
        p = f"{out}_"
        inits.append(numpy_helper.from_array((1 + 0.1 * rng.standard_normal(c)).astype(np.float32), p + "g"))
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), p + "b"))
        inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), p + "m"))
        inits.append(numpy_helper.from_array((0.5 + rng.random(c)).astype(np.float32), p + "v"))
        nodes.append(helper.make_node("BatchNormalization", [x, p + "g", p + "b", p + "m", p + "v"], [out],
                                      epsilon=2e-5, name=f"BatchNormalization_{out}"))
        return out

    def conv(x, cin, cout, out, k=3, stride=1):
        nodes.append(helper.make_node("Conv", [x, w(out + "_w", cout, cin, k, k), w(out + "_b", cout, scale=0.05)],
                                      [out], kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[k // 2] * 4, name=f"Conv_{out}"))
        return out

    def prelu(x, c, out):
        inits.append(numpy_helper.from_array((0.25 + 0.05 * rng.standard_normal((c, 1, 1))).astype(np.float32),
                                             out + "_a"))
        nodes.append(helper.make_node("PRelu", [x, out + "_a"], [out], name=f"PRelu_{out}"))
        return out

    x = prelu(bn(conv("input.1", 3, width, "stem"), width, "stem_bn"), width, "stem_act")
    for i, stride in enumerate((1, 2)):
        h = bn(x, width, f"b{i}_bn1")
        h = conv(h, width, width, f"b{i}_c1")
        h = prelu(bn(h, width, f"b{i}_bn2"), width, f"b{i}_act")
        h = bn(conv(h, width, width, f"b{i}_c2", stride=stride), width, f"b{i}_bn3")
        short = bn(conv(x, width, width, f"b{i}_sc", k=1, stride=stride), width, f"b{i}_scbn") if stride > 1 else x
        nodes.append(helper.make_node("Add", [h, short], [f"b{i}_out"], name=f"Add_{i}"))
        x = f"b{i}_out"
    x = bn(x, width, "final_bn")
    feat = width * (size // 2) ** 2
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "idx0"))
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "minus1"))
    nodes += [
        helper.make_node("Shape", [x], ["shape"], name="Shape_0"),
        helper.make_node("Gather", ["shape", "idx0"], ["batch"], axis=0, name="Gather_0"),
        helper.make_node("Concat", ["batch", "minus1"], ["newshape"], axis=0, name="Concat_0"),
        helper.make_node("Reshape", [x, "newshape"], ["flat"], name="Reshape_0"),
        helper.make_node("Gemm", ["flat", w("fc_w", dim, feat, scale=0.05), w("fc_b", dim, scale=0.05)], ["fc"],
                         transB=1, name="Gemm_0"),
    ]
    out = bn("fc", dim, "features")
    return helper.make_graph(
        nodes, "tiny_iresnet",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", dim])],
        initializer=inits)


def _model(graph):
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lcmla-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _ort(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_interpreter_matches_onnxruntime_and_passes_gradients():
    model = _model(_iresnet_graph())
    x = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
    reference = _ort(model, x)
    net = OnnxModule(model).eval()
    inp = torch.from_numpy(x).requires_grad_(True)
    out = net(inp)
    assert out.shape == reference.shape == (3, 16)
    assert np.abs(out.detach().numpy() - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())
    out.pow(2).sum().backward()
    assert inp.grad is not None and torch.isfinite(inp.grad).all() and inp.grad.abs().sum() > 0
    # float64 copy agrees too (buffers follow .to(dtype); int64 shape constants stay int64)
    out64 = net.to(torch.float64)(torch.from_numpy(x).double())
    assert np.abs(out64.detach().numpy() - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())


def test_unsupported_operator_is_named():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("LRN", ["x"], ["y"], size=3)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    with pytest.raises(OnnxConversionError, match="LRN"):
        OnnxModule(_model(graph))


def test_arcface_recognizer_equals_insightface_on_the_tiny_pack(tmp_path):
    """Same face, same landmarks: our differentiable alignment + converted network versus insightface's
    norm_crop + onnxruntime (ArcFaceONNX.get_feat)."""
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.utils import face_align
    from PIL import Image

    from lcmla.recognizers.base import align_faces

    folder = write_tiny_buffalo(tmp_path / "pack")
    recognizer = ArcFaceRecognizer.from_model_dir(folder).eval()
    assert recognizer.input_size == 112 and recognizer.embedding_dim == 512
    assert torch.allclose(recognizer.template, arcface_template(112))

    rgb = np.asarray(Image.open(FACE_PNG).convert("RGB"))
    kps = np.array([[180, 200], [250, 198], [215, 245], [188, 290], [246, 288]], np.float32)
    theirs = ArcFaceONNX(model_file=str(folder / "w600k_tiny.onnx"))
    crop_bgr = face_align.norm_crop(rgb[:, :, ::-1].copy(), landmark=kps, image_size=112)
    ref = theirs.get_feat(crop_bgr).reshape(-1)
    ref = ref / np.linalg.norm(ref)

    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    ours = recognizer(align_faces(image, torch.from_numpy(kps)[None], recognizer))[0]
    assert float(ours.detach() @ torch.from_numpy(ref)) > 0.999
    ours.sum().backward()
    assert image.grad.abs().sum() > 0  # the loss reaches the pixels
    # on the crop insightface made, the embeddings agree to float precision
    same = recognizer(torch.from_numpy(crop_bgr[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255)[0]
    assert np.abs(same.detach().numpy() - ref).max() < 1e-5


def test_model_dir_without_recognizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="w600k_r50"):
        ArcFaceRecognizer.from_model_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere' does not exist: pass the folder of the pack's .onnx files"):
        ArcFaceRecognizer.from_model_dir(tmp_path / "nowhere")
    (tmp_path / "w600k_r50.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="onnx' is a file, not a folder"):
        ArcFaceRecognizer.from_model_dir(tmp_path / "w600k_r50.onnx")


def test_template_matches_insightface_estimate_norm():
    from insightface.utils import face_align

    for size in (112, 128, 224):
        src = np.asarray(face_align.arcface_dst, np.float32)
        m = face_align.estimate_norm(src, size)  # maps the 112-template to the size-template
        mapped = src @ m[:, :2].T + m[:, 2]
        assert np.abs(arcface_template(size).numpy() - mapped).max() < 1e-3


def test_trainer_identity_loss_uses_the_converted_arcface(tmp_path):
    """--id-network arcface with an insightface pack: the loss network is the converted ONNX model,
    the loss of an image against itself is 0 and it has a gradient on another image."""
    from PIL import Image

    from training.train import _identity_loss, build_parser

    folder = write_tiny_buffalo(tmp_path / "pack")
    args = build_parser().parse_args(["--preset", "tiny", "--data", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                                      "--max-train-steps", "1", "--id-network", "arcface",
                                      "--face-models", str(folder)])
    loss_fn, kind = _identity_loss(args, None, torch.device("cpu"))
    assert kind == "arcface" and isinstance(loss_fn.recognizer, ArcFaceRecognizer)
    face = torch.from_numpy(np.asarray(Image.open(FACE_PNG).convert("RGB")).copy()).permute(2, 0, 1)[None]
    face = face.float() / 127.5 - 1
    target, found = loss_fn.reference(face)
    assert bool(found.all())
    lm, _ = loss_fn.detect(face)
    other = (face.flip(-1) * 0.8).requires_grad_(True)
    same = 1 - (loss_fn.embed(face, lm) * target).sum()
    assert abs(float(same)) < 1e-5
    diff = 1 - (loss_fn.embed(other, lm) * target).sum()
    diff.backward()
    assert float(diff.detach()) > 1e-3 and other.grad.abs().sum() > 0
    # the loss's embedding of a [-1, 1] image is insightface's own (norm_crop + onnxruntime) on its uint8 pixels
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.utils import face_align

    rgb = np.asarray(Image.open(FACE_PNG).convert("RGB"))
    kps = np.array([[180, 200], [250, 198], [215, 245], [188, 290], [246, 288]], np.float32)
    theirs = ArcFaceONNX(model_file=str(folder / "w600k_tiny.onnx"))
    ref = theirs.get_feat(face_align.norm_crop(rgb[:, :, ::-1].copy(), landmark=kps, image_size=112)).reshape(-1)
    with torch.no_grad():
        ours = loss_fn.embed(face, torch.from_numpy(kps)[None])[0].numpy()
    assert float(ours @ ref / np.linalg.norm(ref)) > 0.99999  # (a channel swap gives 0.88 here)


def test_the_recognizers_import_by_the_names_the_readme_gives_and_the_package_stays_light():
    import subprocess
    import sys

    from lcmla.recognizers import ArcFaceRecognizer as A
    from lcmla.recognizers import DlibFaces, DlibRecognizer, Recognizer
    from lcmla.recognizers.dlib_pipeline import DlibFaces as D

    assert A is ArcFaceRecognizer and DlibFaces is D and issubclass(DlibRecognizer, Recognizer)
    code = "import sys, lcmla.recognizers; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
