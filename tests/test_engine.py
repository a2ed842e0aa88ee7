"""End-to-end engine behaviour on the tiny preset (real loading path, random weights)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from util import make_settings as _settings
from util import noise as _noise
from util import stock_pipeline as _plain_pipeline
from util import px as _px

from lcmla import ImageError, NoFaceError, SettingsError, settings_from_png


def test_generate_basics(engine, face_path):
    steps = []
    result = engine.generate(_settings(), [face_path], callback=steps.append)
    assert len(result.images) == 1 and result.images[0].size == (256, 256)
    assert result.settings.guidance.steps == 4 and result.settings.output.width == 256
    assert result.seeds == [0]
    assert [s.step for s in steps] == [0, 1, 2, 3]
    assert steps[0].latents.shape == steps[0].x0.shape == (1, 4, 32, 32)
    assert {"faces", "conditions", "denoise", "decode", "total"} <= set(result.timings)
    assert len(result.face_boxes) == 1 and result.random_weights
    assert _px(result.images[0]).std() > 1.0  # not a blank image


def test_same_seed_same_pixels_and_seeds_advance(engine, face_path):
    a = engine.generate(_settings(output__seed=3, output__num_images=2), [face_path])
    b = engine.generate(_settings(output__seed=3, output__num_images=2), [face_path])
    assert a.seeds == [3, 4]
    for x, y in zip(a.images, b.images):
        assert np.array_equal(_px(x), _px(y))
    assert not np.array_equal(_px(a.images[0]), _px(a.images[1]))
    # image 1 alone, from its own seed, is the same picture
    c = engine.generate(a.image_settings(1), [face_path])
    assert np.array_equal(_px(c.images[0]), _px(a.images[1]))


def test_identity_changes_the_image(engine, face_path, other_face):
    a = engine.generate(_settings(), [face_path])
    b = engine.generate(_settings(), [other_face])
    assert np.abs(_px(a.images[0]) - _px(b.images[0])).mean() > 0.5


def test_knobs_change_the_image_without_reloading(engine, face_path):
    unet_id = id(engine.pipe.unet)
    base = _px(engine.generate(_settings(), [face_path]).images[0])
    for change in ({"identity__ip_adapter_scale": 0.0}, {"identity__lora_scale": 0.0}, {"identity__shortcut": False}):
        img = _px(engine.generate(_settings(**change), [face_path]).images[0])
        assert np.abs(img - base).mean() > 0.1, change
    assert id(engine.pipe.unet) == unet_id
    again = _px(engine.generate(_settings(), [face_path]).images[0])
    assert np.array_equal(again, base)  # nothing leaked from the previous requests


def test_zero_ip_scale_equals_pipeline_without_adapter(engine, face_path):
    ours = engine.generate(_settings(identity__ip_adapter_scale=0.0, output__seed=5), [face_path]).images[0]
    pipe = _plain_pipeline(engine, ip_adapter=False, lora=True)
    ref = pipe(prompt="a pencil drawing of a face", num_inference_steps=4, guidance_scale=1.0,
               width=256, height=256, latents=_noise(5)).images[0]
    assert np.abs(_px(ours) - _px(ref)).max() <= 1


def test_non_square_output_and_freeu_equal_stock_diffusers(engine, face_path):
    """λ = 0 at 320×256 (SDXL's size micro-conditioning is (height, width)) and with FreeU at
    values where b1 ≠ b2 and s1 ≠ s2: the engine's image is stock diffusers' from the same seed."""
    pipe = _plain_pipeline(engine, ip_adapter=False, lora=True)

    def stock(**kw):
        return pipe(prompt="a pencil drawing of a face", num_inference_steps=4, guidance_scale=1.0,
                    generator=torch.Generator("cpu").manual_seed(7), **kw).images

    wide = _settings(identity__ip_adapter_scale=0.0, output__seed=7, output__width=320, output__height=256)
    ours = engine.generate(wide, [face_path]).images[0]
    assert ours.size == (320, 256)
    assert np.abs(_px(ours) - _px(stock(width=320, height=256)[0])).max() <= 1
    # FreeU moves this tiny random UNet's pixels little: compare the final latents
    freeu = dict(b1=1.3, b2=1.05, s1=0.9, s2=0.2)
    steps = []
    engine.generate(_settings(identity__ip_adapter_scale=0.0, output__seed=7, freeu__enabled=True,
                              **{f"freeu__{k}": v for k, v in freeu.items()}), [face_path], callback=steps.append)
    pipe.unet.enable_freeu(**freeu)
    assert torch.allclose(steps[-1].latents, stock(width=256, height=256, output_type="latent"), atol=1e-4)
    pipe.unet.disable_freeu()
    plain = stock(width=256, height=256, output_type="latent")
    assert not torch.allclose(steps[-1].latents, plain, atol=1e-2)  # FreeU acted


def _stock_faceid_inputs(engine, pipe, identity, cfg: bool):
    """FaceID-Plus-v2 inputs the stock diffusers way (its docs' recipe): the CLIP image encoder
    registered on the pipeline, ``prepare_ip_adapter_image_embeds`` on the aligned crop, the
    features set on the projection; the identity embedding (zeros for the negative) as image embeds."""
    c = engine.components
    pipe.register_modules(image_encoder=c.image_encoder, feature_extractor=c.clip_processor)
    clip = pipe.prepare_ip_adapter_image_embeds([list(identity.crops)], None, torch.device("cpu"), 1, cfg)[0]
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    proj.clip_embeds, proj.shortcut = clip, True
    pipe.set_ip_adapter_scale(0.8)
    emb = torch.as_tensor(identity.embedding).reshape(1, 1, -1)
    return [torch.cat([torch.zeros_like(emb), emb])] if cfg else [emb]


def test_zero_lora_scale_equals_lora_disabled(engine, face_path):
    identity = engine.analyze_faces([face_path])
    ours = engine.generate(_settings(identity__lora_scale=0.0, output__seed=6), identity).images[0]
    pipe = _plain_pipeline(engine, ip_adapter=True, lora=False)
    embeds = _stock_faceid_inputs(engine, pipe, identity, cfg=False)
    ref = pipe(prompt="a pencil drawing of a face", ip_adapter_image_embeds=embeds, num_inference_steps=4,
               guidance_scale=1.0, width=256, height=256, latents=_noise(6)).images[0]
    assert np.abs(_px(ours) - _px(ref)).max() <= 1


def test_shortcut_scale_equals_stock_diffusers(engine, face_path):
    """FaceID-Plus-v2's CLIP branch weight (``identity.shortcut_scale`` = 0.5) is diffusers'
    ``shortcut_scale`` on the projection: the same image as the stock pipeline set that way."""
    identity = engine.analyze_faces([face_path])
    s = _settings(identity__lora_scale=0.0, identity__shortcut_scale=0.5, output__seed=6)
    ours = engine.generate(s, identity).images[0]
    pipe = _plain_pipeline(engine, ip_adapter=True, lora=False)
    embeds = _stock_faceid_inputs(engine, pipe, identity, cfg=False)
    pipe.unet.encoder_hid_proj.image_projection_layers[0].shortcut_scale = 0.5
    ref = pipe(prompt="a pencil drawing of a face", ip_adapter_image_embeds=embeds, num_inference_steps=4,
               guidance_scale=1.0, width=256, height=256, latents=_noise(6)).images[0]
    assert np.abs(_px(ours) - _px(ref)).max() <= 1
    full = engine.generate(s.replace(identity__shortcut_scale=1.0), identity).images[0]
    assert np.abs(_px(ours) - _px(full)).max() > 1


def test_the_clip_features_of_several_photos_are_their_mean(engine, face_path, other_face):
    """FaceID-Plus-v2 reads the CLIP features of the aligned crops averaged over the photos (and the
    identity embedding the faces module averages)."""
    both = engine.analyze_faces([face_path, other_face])
    one, two = engine.analyze_faces([face_path]), engine.analyze_faces([other_face])
    clip = {k: engine._identity_conditions(i)["id"][1] for k, i in (("both", both), ("one", one), ("two", two))}
    assert clip["both"].shape == clip["one"].shape and clip["both"].shape[:2] == (1, 1)
    assert torch.allclose(clip["both"], (clip["one"] + clip["two"]) / 2, atol=1e-5)
    assert not torch.allclose(clip["one"], clip["two"], atol=1e-3)


def test_classic_cfg_equals_stock_diffusers(engine, face_path):
    """Classic CFG at s = 3 with a negative prompt: the engine's two batched branches equal stock
    diffusers' CFG with the IP-Adapter's negative (zero identity, CLIP of an all-zero input)."""
    identity = engine.analyze_faces([face_path])
    ours = engine.generate(_settings(guidance__guidance_scale=3.0, negative_prompt="blurry", output__seed=8),
                           identity)
    assert ours.branch_calls == [("uncond", "full")] * 4
    pipe = _plain_pipeline(engine, ip_adapter=True, lora=True)
    embeds = _stock_faceid_inputs(engine, pipe, identity, cfg=True)
    ref = pipe(prompt="a pencil drawing of a face", negative_prompt="blurry", ip_adapter_image_embeds=embeds,
               num_inference_steps=4, guidance_scale=3.0, width=256, height=256, latents=_noise(8)).images[0]
    assert np.abs(_px(ours.images[0]) - _px(ref)).max() <= 1
    plain = engine.generate(_settings(guidance__guidance_scale=1.0, output__seed=8), identity)
    assert np.abs(_px(ours.images[0]) - _px(plain.images[0])).mean() > 0.1


def test_several_reference_photos(engine, face_path, other_face):
    r = engine.generate(_settings(), [face_path, other_face])
    assert len(r.face_boxes) == 2
    emb = r.identity.embedding
    assert abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5
    # averaging is an average: the same photo twice is that photo once
    once = engine.generate(_settings(), [face_path])
    twice = engine.generate(_settings(), [face_path, face_path])
    assert np.abs(_px(once.images[0]) - _px(twice.images[0])).max() <= 1
    assert not np.array_equal(_px(once.images[0]), _px(r.images[0]))


def test_png_round_trip_reproduces_the_image(engine, face_path, tmp_path):
    r = engine.generate(_settings(output__seed=11, output__num_images=2, identity__lora_scale=0.4), [face_path])
    paths = r.save(tmp_path)
    assert [p.name for p in paths] == ["lcmla-11.png", "lcmla-12.png"]
    s = settings_from_png(paths[1])
    assert s == r.image_settings(1) and s.output.seed == 12 and s.identity.lora_scale == 0.4
    again = engine.generate(s, [face_path]).images[0]
    from PIL import Image

    assert np.array_equal(_px(again), _px(Image.open(paths[1]).convert("RGB")))


def test_settings_from_foreign_png_is_a_clear_error(tmp_path):
    from PIL import Image

    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(SettingsError, match="holds no lcmla settings"):
        settings_from_png(path)


def test_bad_inputs_raise_clear_errors(engine, tmp_path):
    from PIL import Image

    grey = tmp_path / "grey.png"
    Image.new("RGB", (256, 256), (128, 128, 128)).save(grey)
    junk = tmp_path / "notes.jpg"
    junk.write_text("not an image")
    with pytest.raises(NoFaceError, match="grey.png"):
        engine.generate(_settings(), [grey])
    with pytest.raises(ImageError, match="notes.jpg"):
        engine.generate(_settings(), [junk])
    with pytest.raises(ImageError, match="'missing.jpg' does not exist"):
        engine.generate(_settings(), [tmp_path / "missing.jpg"])
    with pytest.raises(ImageError, match="no face photo was given"):
        engine.generate(_settings(), [])
    with pytest.raises(ValueError, match="GenerationSettings"):
        engine.generate({"prompt": "x"}, [grey])


def test_concurrent_requests_do_not_leak(engine, face_path):
    s1 = _settings(identity__ip_adapter_scale=0.2, identity__lora_scale=0.3, output__seed=1)
    s2 = _settings(identity__ip_adapter_scale=1.2, identity__lora_scale=1.0, output__seed=1, guidance__guidance_scale=2.0)
    solo = {1: _px(engine.generate(s1, [face_path]).images[0]), 2: _px(engine.generate(s2, [face_path]).images[0])}
    got: dict[int, list] = {1: [], 2: []}

    def work(key, s):
        for _ in range(2):
            got[key].append(_px(engine.generate(s, [face_path]).images[0]))

    threads = [threading.Thread(target=work, args=(1, s1)), threading.Thread(target=work, args=(2, s2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in (1, 2):
        for img in got[key]:
            assert np.array_equal(img, solo[key])
