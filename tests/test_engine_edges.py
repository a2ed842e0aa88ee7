"""Edge cases found by reading the engine (FastFace exactness issue): each failed before its fix."""

from __future__ import annotations

import dataclasses
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from util import make_settings as _settings
from util import px as _px

from lcmla import LcmlaError
from lcmla.attention.context import attention_grid


def test_attention_grid_follows_the_unet_downsampling():
    # a 3x3 stride-2 conv with padding 1 maps n to ceil(n / 2): 125 -> 63 -> 32
    assert attention_grid((125, 100), 125 * 100) == (125, 100)
    assert attention_grid((125, 100), 63 * 50) == (63, 50)
    assert attention_grid((125, 100), 32 * 25) == (32, 25)
    with pytest.raises(ValueError, match="no UNet level"):
        attention_grid((125, 100), 1000)


def test_capture_on_sizes_that_are_not_multiples_of_32(engine, face_path):
    r = engine.generate(_settings(output__width=264, output__height=200, attention__mode="am2",
                                  attention__capture_maps=True), [face_path])
    store = r.attention_maps[0]
    shapes = {tuple(m.shape[-2:]) for m in store.maps.values()}
    assert shapes == {(13, 17), (7, 9)}  # latent 25x33 -> 13x17 -> 7x9 in the attention blocks
    assert store.mean_over("all", 1, 0).shape == (13, 17)


def test_preview_scale_is_not_the_backbone_lora_scale(engine, face_path):
    """An LCM-LoRA backbone (sdxl-lcm-lora) reads guidance.backbone_lora_scale; the previews'
    lookahead.lcm_lora_scale must not change its generation."""
    from lcmla import Engine
    from lcmla.presets import PRESETS

    # the tiny engine, declared an LCM-LoRA backbone as sdxl-lcm-lora is (its LoRA is the tiny one
    # already loaded: nothing is read from the name)
    preset = dataclasses.replace(engine.preset, lcm_lora=PRESETS["sdxl-lcm-lora"].lcm_lora)
    lcm_engine = Engine(preset, engine.components, engine.faces, device="cpu", dtype=engine.dtype)
    base = lcm_engine.generate(_settings(), [face_path])
    other_preview_scale = lcm_engine.generate(_settings(lookahead__lcm_lora_scale=0.1), [face_path])
    no_backbone = lcm_engine.generate(_settings(guidance__backbone_lora_scale=0.0), [face_path])
    plain = engine.generate(_settings(), [face_path])  # the tiny preset has no LCM backbone
    assert np.array_equal(_px(base.images[0]), _px(other_preview_scale.images[0]))
    assert np.array_equal(_px(no_backbone.images[0]), _px(plain.images[0]))
    assert not np.array_equal(_px(base.images[0]), _px(plain.images[0]))


def test_lcm_boundary_is_read_from_the_scheduler(engine):
    from diffusers import LCMScheduler

    assert engine._lcm_boundary() == (10.0, 0.5)  # DDIM pipeline: an LCM scheduler's defaults
    saved = engine.pipe.scheduler
    try:
        engine.pipe.scheduler = LCMScheduler.from_config(saved.config, timestep_scaling=4.0)
        assert engine._lcm_boundary() == (4.0, 0.5)
    finally:
        engine.pipe.scheduler = saved


@pytest.mark.parametrize("kind", ["bytes", "bytesio", "iterator", "pil", "array"])
def test_every_photo_form_gives_the_same_identity_and_kv_reference(engine, face_path, kind):
    data = face_path.read_bytes()
    forms = {
        "bytes": lambda: data,
        "bytesio": lambda: io.BytesIO(data),
        "iterator": lambda: iter([face_path]),
        "pil": lambda: Image.open(face_path),
        "array": lambda: np.asarray(Image.open(face_path).convert("RGB")),
    }
    s = _settings(lookahead__kv=True)
    ref = engine.generate(s, [face_path])
    got = engine.generate(s, forms[kind]())
    assert got.face_boxes == ref.face_boxes
    assert np.array_equal(_px(got.images[0]), _px(ref.images[0]))


def test_a_generator_of_photos_is_consumed_once(engine, face_path, other_face):
    def photos():
        yield face_path
        yield other_face

    r = engine.generate(_settings(lookahead__kv=True), photos())
    assert len(r.face_boxes) == 2
    ref = engine.generate(_settings(lookahead__kv=True), [face_path, other_face])
    assert np.array_equal(_px(r.images[0]), _px(ref.images[0]))


def _framing_photo() -> Image.Image:
    """100x60: a green band over the top third, below it red left / blue right with a yellow
    strip at the far left; features both ways, so neither a vertical nor a horizontal stretch of
    any crop passes for the right framing."""
    arr = np.zeros((60, 100, 3), np.uint8)
    arr[:20] = (0, 255, 0)
    arr[20:, :50] = (255, 0, 0)
    arr[20:, 50:] = (0, 0, 255)
    arr[20:, :20] = (255, 255, 0)
    return Image.fromarray(arr)


def _framing_cases(frame) -> dict[str, bool]:
    """Which framings of :func:`_framing_photo` ``frame(image, box, size, framing)`` gets right:
    the expected frame is the photo scaled to fit (aspect kept) and the rest filled by repeating
    the photo's edge rows/columns; a face crop spans twice the box in the output's aspect."""
    photo = _framing_photo()
    arr = np.asarray(photo).astype(int)
    box = (40.0, 20.0, 60.0, 40.0)  # a 20x20 "face" in the middle
    ok = {}
    # the whole photo into a portrait frame: 100x60 fits the 40 px width over 24 rows, 28 rows above
    # and below repeat the photo's top and bottom edge rows (green; the bottom row's split)
    tall = np.asarray(frame(photo, None, (40, 80), "photo")).astype(int)
    fitted = np.asarray(photo.resize((40, 24), Image.BICUBIC)).astype(int)
    ok["photo"] = (tall.shape == (80, 40, 3) and np.abs(tall[28:52] - fitted).max() <= 2
                   and np.abs(tall[:28] - fitted[:1]).max() <= 2 and np.abs(tall[52:] - fitted[-1:]).max() <= 2)
    # a landscape face crop: 2x the box's side high (40 px), twice that wide: photo x 10..90, y 10..50
    wide = np.asarray(frame(photo, box, (80, 40), "face")).astype(int)
    ok["face-wide"] = wide.shape == (40, 80, 3) and np.abs(wide - arr[10:50, 10:90]).max() <= 2
    # a portrait face crop: 40 wide, 80 high, y -10..70: 10 rows of edge padding above and below
    tall_face = np.asarray(frame(photo, box, (40, 80), "face")).astype(int)
    padded = np.concatenate([arr[:1].repeat(10, 0), arr, arr[-1:].repeat(10, 0)])[:, 30:70]
    ok["face-tall"] = tall_face.shape == (80, 40, 3) and np.abs(tall_face - padded).max() <= 2
    return {k: bool(v) for k, v in ok.items()}


def test_frame_reference_keeps_the_aspect_and_pads_with_the_border(monkeypatch):
    from lcmla.lookahead import frame_reference

    assert _framing_cases(frame_reference) == {"photo": True, "face-wide": True, "face-tall": True}
    tall = np.asarray(frame_reference(_framing_photo(), None, (40, 80), "photo")).astype(int)
    green = (tall[:, :, 1] > 200) & (tall[:, :, 0] < 50)
    assert green.all(axis=1).sum() == 28 + 8  # the letterbox plus the band's third of 24 rows; a stretch: 27
    with pytest.raises(ValueError, match="framing"):
        frame_reference(_framing_photo(), None, (40, 40), "head")
    # a face box that is not square: the crop spans twice its larger side, about the same centre
    square = (40.0, 20.0, 60.0, 40.0)
    for size in ((80, 40), (40, 80)):
        want = np.asarray(frame_reference(_framing_photo(), square, size, "face"))
        for box in ((40.0, 25.0, 60.0, 35.0), (45.0, 20.0, 55.0, 40.0)):
            assert np.array_equal(np.asarray(frame_reference(_framing_photo(), box, size, "face")), want), (box, size)

    # negative controls: the checks above fail for a plain stretch, a stretched square face crop,
    # and black letterboxing
    def stretch(image, box, size, framing):
        if framing == "face":
            x1, y1, x2, y2 = box
            half = max(x2 - x1, y2 - y1)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            image = image.crop((round(cx - half), round(cy - half), round(cx + half), round(cy + half)))
        return image.resize(size, Image.BICUBIC)

    assert _framing_cases(stretch) == {"photo": False, "face-wide": False, "face-tall": False}
    pad = np.pad
    monkeypatch.setattr(np, "pad", lambda arr, width, mode="constant", **kw: pad(arr, width, mode="constant"))
    black = _framing_cases(frame_reference)
    monkeypatch.undo()
    assert black == {"photo": False, "face-wide": True, "face-tall": False}  # the wide crop needs no padding


def test_kv_path_with_two_reference_photos(engine, face_path, other_face):
    """Several photos: the tokens of all of them are laid side by side in the cache (an extension of
    the paper), and the second photo changes the picture."""
    seen = []
    hook = engine.pipe.unet.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        two = engine.generate(_settings(lookahead__kv=True), [face_path, other_face])
    finally:
        hook.remove()
    assert seen[0] == 4  # the encoder pass: 2 rows (null, text) × 2 photos
    one = engine.generate(_settings(lookahead__kv=True), [face_path])
    assert not np.array_equal(_px(two.images[0]), _px(one.images[0]))
    caches = []
    for photos in ([face_path], [face_path, other_face]):
        steps = []
        engine._run(_settings(lookahead__kv=True), photos, on_guided=lambda st, d, r: steps.append(st))
        caches.append(steps[0].ctx.kv)
    name = next(iter(caches[0].store))
    k1, k2 = caches[0].read(name)[0], caches[1].read(name)[0]
    assert k2.shape[1] == 2 * k1.shape[1]  # the photos' tokens side by side in each row
    assert torch.allclose(k2[:, : k1.shape[1]], k1, atol=1e-5)  # the first photo's tokens come first


def test_text_only_generation(engine):
    r = engine.generate(_settings(), None)
    assert r.identity is None and r.face_boxes == [] and _px(r.images[0]).std() > 1
    again = engine.generate(_settings(identity__ip_adapter_scale=1.7), None)  # λ has nothing to act on
    assert np.array_equal(_px(r.images[0]), _px(again.images[0]))
    with pytest.raises(LcmlaError, match="need.* a face photo"):
        engine.generate(_settings(guidance__dcg=True), None)
    # each identity mechanism is named, alone or together
    for changes, named in (({"lookahead__kv": True}, "lookahead.kv"), ({"attention__mode": "am1"}, "attention.mode"),
                           ({"guidance__dcg": True, "lookahead__kv": False, "attention__mode": "am2"},
                            "guidance.dcg, attention.mode")):
        with pytest.raises(LcmlaError, match=f"^{re.escape(named)} need\\(s\\) a face photo"):
            engine.generate(_settings(**changes), None)


def test_onnx_providers_and_the_analyzer_reports_them(tmp_path):
    from faceutils import write_tiny_buffalo

    from lcmla.faces import FaceAnalyzer, onnx_providers

    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert onnx_providers("cuda:1") == ["CPUExecutionProvider"]
    analyzer = FaceAnalyzer.insightface(name=str(write_tiny_buffalo(tmp_path / "pack")))
    assert analyzer.providers == ("CPUExecutionProvider",)
    assert FaceAnalyzer.haar().providers == ()


def test_onnx_providers_on_cuda(monkeypatch):
    """With onnxruntime-gpu, an engine on cuda:N runs insightface on that GPU, CPU as fallback."""
    import onnxruntime

    from lcmla.faces import onnx_providers

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers("cuda:1") == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert onnx_providers("cuda") == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]


def test_the_full_kv_prediction_reads_its_reference(engine, face_path):
    """KV branches get a row index; the others none (bit-identical to no KV)."""
    from lcmla.denoiser import GuidedDenoiser
    from lcmla.guidance import LookaheadGuidance

    d = GuidedDenoiser(unet=None, conditions=None, guidance=LookaheadGuidance(), context=None)
    assert d.kv_rows(("uncond", "nokv", "full", "kv")) == (("null", "text"), (-1, -1, 1, 0))
    assert d.kv_rows(("uncond", "nokv", "full")) == (("text",), (-1, -1, 0))


def test_a_cut_prompt_is_quoted_as_written(engine):
    """The note on a prompt past CLIP's 75 tokens quotes the lost words as the user wrote them (it
    decoded the cut tokens: "1 7" for "17", all lower case)."""
    from lcmla.engine import words_past

    assert words_past("a b c d e", 3, lambda t: len(t.split())) == "d e"
    assert words_past("a b c", 3, lambda t: len(t.split())) == ""
    assert words_past("a b c d", 3, lambda t: len(t.split())) == "d"  # only the last word is cut
    assert words_past("abc def", 1, len) == "abc def"  # the first word itself does not fit
    tokenizer = engine.pipe.tokenizer
    room = tokenizer.model_max_length - 2
    filler = "a " * room  # exactly what the encoders read (checked), then words they do not
    assert len(tokenizer.tokenize(filler)) == room
    (note,) = [n for n in engine.generate(_settings(prompt=filler + "Room 17, Building B"), None).notes
               if n.startswith("prompt is")]
    assert f"read the first {room}, so 'Room 17, Building B' was left out" in note
