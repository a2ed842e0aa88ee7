"""Memory modes, out-of-memory as a user error, and random-weights builds of any preset."""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch
from util import logged_messages, make_settings, px

from lcmla import Engine
from lcmla.errors import LcmlaError, SettingsError
from lcmla.memory import BALANCED_BELOW_GIB, LOW_VRAM_BELOW_GIB, OutOfMemoryError, choose_memory_mode, is_out_of_memory
from lcmla.presets import get_preset, random_weights_preset

GIB = 2**30
SMALL = dict(output__width=64, output__height=64)


@pytest.mark.parametrize(
    ("requested", "device", "free", "expected"),
    [
        ("auto", "cpu", None, "full"),  # nothing to offload to on the CPU
        ("auto", "cuda", None, "full"),  # free memory unknown: do not guess low
        ("auto", "cuda", int(LOW_VRAM_BELOW_GIB * GIB) - 1, "low"),
        ("auto", "cuda:1", math.ceil(LOW_VRAM_BELOW_GIB * GIB), "balanced"),
        ("auto", "cuda", int(BALANCED_BELOW_GIB * GIB) - 1, "balanced"),
        ("auto", "cuda:1", math.ceil(BALANCED_BELOW_GIB * GIB), "full"),
        ("auto", "cuda", 8 * GIB, "low"),
        ("auto", "cuda", 12 * GIB, "balanced"),
        ("auto", "cuda", 80 * GIB, "full"),
        ("low", "cpu", None, "low"),  # asked for: granted, whatever the device
        ("balanced", "cpu", None, "balanced"),
        ("full", "cuda", 1 * GIB, "full"),
    ],
)
def test_memory_mode_choice(requested, device, free, expected):
    assert choose_memory_mode(requested, device, free) == expected


def test_auto_mode_is_chosen_from_the_devices_free_memory(tiny_cache, monkeypatch):
    import lcmla.engine

    seen = []
    monkeypatch.setattr(lcmla.engine, "free_device_memory", lambda device: 5 * GIB)
    real = lcmla.engine.choose_memory_mode
    monkeypatch.setattr(lcmla.engine, "choose_memory_mode", lambda *a: seen.append(a) or real(*a))
    assert Engine.load("tiny", device="cpu", memory="auto").memory_mode == "full"  # the CPU: nothing to offload to
    assert seen == [("auto", "cpu", 5 * GIB)]


def test_memory_mode_rejects_unknown_names():
    with pytest.raises(LcmlaError, match="memory mode 'tiny' is not one of auto, full, balanced, low"):
        choose_memory_mode("tiny", "cpu", None)


def test_out_of_memory_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not the allocator's
    assert is_out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))  # cuDNN's workspace
    assert is_out_of_memory(RuntimeError("MPS backend Out Of Memory (MPS allocated: 9 GB)"))


def test_free_memory_is_read_from_the_device_and_unknown_when_it_cannot_be(monkeypatch):
    from lcmla.memory import free_device_memory

    asked = []

    def mem_get_info(device):
        asked.append(device)
        return 5 * GIB, 80 * GIB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    assert free_device_memory("cuda:1") == 5 * GIB and asked == [torch.device("cuda:1")]
    assert free_device_memory("cpu") is None and len(asked) == 1
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (_ for _ in ()).throw(RuntimeError("no CUDA")))
    assert free_device_memory("cuda") is None


def test_released_memory_empties_the_cuda_cache_only_on_cuda(monkeypatch):
    from lcmla.memory import release_cached_memory

    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    release_cached_memory("cpu")
    assert emptied == []
    release_cached_memory("cuda:0")
    assert emptied == [1]


def test_released_memory_collects_the_failed_requests_reference_cycles():
    """A failed request's frames hold its tensors in reference cycles (traceback ↔ frame): they are
    collected before the next request, not whenever the collector next runs."""
    import gc
    import weakref

    from lcmla.memory import release_cached_memory

    class Held:
        pass

    held = Held()
    held.self = held  # a cycle: only the collector frees it
    gone = weakref.ref(held)
    was = gc.isenabled()
    gc.disable()
    try:
        del held
        assert gone() is not None
        release_cached_memory("cpu")
        assert gone() is None
    finally:
        if was:
            gc.enable()


def test_the_offload_chain_sends_the_previous_model_back_when_the_next_one_runs():
    """The low mode's chain (diffusers' enable_model_cpu_offload mechanism): each model's forward
    first sends the previous model of the chain back to CPU memory."""
    from lcmla.memory import _offload_chain

    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    hooks = _offload_chain([first, None, second], "cpu")
    assert len(hooks) == 2
    sent_back = []
    hooks[0].offload = lambda: sent_back.append("first")
    hooks[1].offload = lambda: sent_back.append("second")
    second(torch.zeros(1, 2))
    assert sent_back == []  # the first model is in CPU memory already: nothing to send back
    first.to("meta")  # as if it had run on a device (accelerate skips models already on the CPU)
    second(torch.zeros(1, 2))
    assert sent_back == ["first"]


def test_balanced_mode_moves_the_resident_models_to_the_device_for_good():
    from lcmla.memory import enable_balanced

    class Spy:
        def __init__(self):
            self.moves = []

        def to(self, device):
            self.moves.append(device)
            return self

    unet, vae = Spy(), Spy()
    assert enable_balanced([], [unet, None, vae], "cuda:1") == []
    assert unet.moves == ["cuda:1"] and vae.moves == ["cuda:1"]


@pytest.fixture(scope="module")
def low_engine(tiny_cache):
    return Engine.load("tiny", device="cpu", memory="low")


def test_low_vram_mode_gives_the_same_pixels(engine, low_engine, face_path, monkeypatch):
    """Offloaded models (moved to the execution device only while they run) and a tiled, sliced
    VAE give the full mode's image, on the plain and the KV path (the VAE encodes the reference)."""
    assert low_engine.memory_mode == "low" and engine.memory_mode == "full"
    assert low_engine._offload_hooks and low_engine.pipe.vae.use_tiling and low_engine.pipe.vae.use_slicing
    # and one image per sampler loop, even where images are batched (as on CUDA) in the full mode
    from lcmla.presets import resolve_settings
    from lcmla.guidance import guidance_for

    two = resolve_settings(make_settings(**SMALL, output__num_images=2), low_engine.preset)
    guidance = guidance_for(two, two.guidance.steps)
    with monkeypatch.context() as m:
        m.setattr(low_engine, "batch_images", True)
        m.setattr(engine, "batch_images", True)
        assert low_engine.images_per_call(two, guidance) == 1 and engine.images_per_call(two, guidance) == 2
    for changes in ({}, {"lookahead__kv": True}):
        settings = make_settings(**SMALL, output__num_images=2, **changes)
        a = engine.generate(settings, face_path).images
        b = low_engine.generate(settings, face_path).images
        for x, y in zip(a, b):
            assert np.abs(px(x) - px(y)).max() <= 1


@pytest.fixture(scope="module")
def balanced_engine(tiny_cache):
    return Engine.load("tiny", device="cpu", memory="balanced")


def test_balanced_mode_offloads_the_encoders_only_and_gives_the_same_pixels(engine, balanced_engine, face_path):
    """Balanced: hooks on the two text encoders and the image encoder only (the UNet, the VAE and
    TAESD stay put, the VAE untiled); images equal the full mode's, plain and KV, two at once."""
    pipe = balanced_engine.pipe
    hooked = [h.model for h in balanced_engine._offload_hooks]
    assert hooked == [pipe.text_encoder, pipe.text_encoder_2, balanced_engine.components.image_encoder]
    for model in (pipe.unet, pipe.vae, balanced_engine.components.taesd):
        assert not hasattr(model, "_hf_hook")
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing
    for changes in ({}, {"lookahead__kv": True}):
        settings = make_settings(**SMALL, output__num_images=2, **changes)
        a = engine.generate(settings, face_path).images
        b = balanced_engine.generate(settings, face_path).images
        for x, y in zip(a, b):
            assert np.array_equal(px(x), px(y))


@pytest.mark.parametrize("mode", ["balanced", "low"])
def test_the_encoders_leave_the_device_before_the_first_step(mode, balanced_engine, low_engine, face_path):
    """In both offloading modes every offloaded encoder is sent back once the conditions are
    computed, before the first UNet call: the denoising never holds an encoder (without a face
    the low mode's chain alone would have left the second text encoder there)."""
    eng = {"balanced": balanced_engine, "low": low_engine}[mode]
    events = []
    encoders = {id(m) for m in (eng.pipe.text_encoder, eng.pipe.text_encoder_2, eng.components.image_encoder)}
    for hook in eng._offload_hooks:
        if id(hook.model) in encoders:
            hook.offload = lambda _off=hook.offload, _m=hook.model: (events.append(("offload", id(_m))), _off())
    handle = eng.pipe.unet.register_forward_pre_hook(lambda *_: events.append(("unet", None)))
    try:
        for faces in (face_path, None):
            events.clear()
            eng.generate(make_settings(**SMALL), faces)
            first_unet = events.index(("unet", None))
            assert {m for e, m in events[:first_unet] if e == "offload"} == encoders
    finally:
        handle.remove()
        for hook in eng._offload_hooks:
            hook.__dict__.pop("offload", None)


def _out_of_memory_message(eng, face_path) -> str:
    """The user error of a request whose second UNet call runs out of memory."""
    handle, _ = _raise_once(eng.pipe.unet, torch.OutOfMemoryError("CUDA out of memory"))
    try:
        with pytest.raises(OutOfMemoryError) as info:
            eng.generate(make_settings(**SMALL), face_path)
    finally:
        handle.remove()
    return str(info.value)


def test_out_of_memory_in_balanced_mode_suggests_the_low_one(balanced_engine, face_path):
    message = _out_of_memory_message(balanced_engine, face_path)
    assert "the low-VRAM mode (--memory low" in message and "balanced" not in message


def _raise_once(module, error):
    calls = {"n": 0}

    def hook(_module, _args, _kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second UNet call of the request: mid-generation
            raise error

    return module.register_forward_pre_hook(hook, with_kwargs=True), calls


def test_out_of_memory_is_a_user_error_and_the_next_request_runs(engine, face_path, monkeypatch):
    settings = make_settings(**SMALL)
    before = engine.generate(settings, face_path).images[0]
    handle, calls = _raise_once(engine.pipe.unet, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    import lcmla.engine

    released = []
    real_release = lcmla.engine.release_cached_memory
    monkeypatch.setattr(lcmla.engine, "release_cached_memory", lambda device: released.append(device) or real_release(device))
    try:
        with pytest.raises(OutOfMemoryError) as info:
            engine.generate(settings, face_path)
    finally:
        handle.remove()
    assert released == ["cpu"]  # the cache is emptied once the request's tensors are gone
    message = str(info.value)
    assert calls["n"] == 2
    assert "1 image(s) at 64×64" in message and "smaller size" in message
    assert "the balanced or the low-VRAM mode (--memory balanced or --memory low" in message
    assert "Tried to allocate 20.00 GiB" in message  # what the device said
    assert isinstance(info.value, LcmlaError) and info.value.__context__ is None  # no frames kept alive
    assert engine._lock.acquire(blocking=False)  # the lock was released
    engine._lock.release()
    after = engine.generate(settings, face_path).images[0]
    assert np.array_equal(px(before), px(after))


def test_out_of_memory_in_low_mode_does_not_suggest_it_again(low_engine, face_path):
    message = _out_of_memory_message(low_engine, face_path)
    assert "low-VRAM" not in message and "smaller size" in message


def test_other_errors_pass_through(engine, face_path):
    handle, _ = _raise_once(engine.pipe.unet, RuntimeError("a bug, not memory"))
    try:
        with pytest.raises(RuntimeError, match="a bug, not memory"):
            engine.generate(make_settings(**SMALL), face_path)
    finally:
        handle.remove()


def test_random_weights_preset_keeps_the_schedule_and_says_random():
    real = get_preset("sdxl-lightning-4step")
    p = random_weights_preset(real, "full")
    assert (p.name, p.scheduler, p.scheduler_kwargs, p.steps, p.width, p.guidance_scale) == (
        real.name, real.scheduler, real.scheduler_kwargs, real.steps, real.width, real.guidance_scale)
    assert p.random_weights and "RANDOM WEIGHTS" in p.title and p.unet_repo is None and p.face_backend == "haar"
    with pytest.raises(SettingsError, match="tiny, full"):
        random_weights_preset(real, "huge")


def test_any_preset_runs_on_random_weights(tiny_cache, face_path):
    """The LCM-LoRA preset's scheduler and adapter over the tiny random build, through Engine.load."""
    engine = Engine.load("sdxl-lcm-lora", device="cpu", random_weights="tiny")
    assert engine.preset.random_weights and type(engine.pipe.scheduler).__name__ == "LCMScheduler"
    assert "lcm" in engine.adapters
    result = engine.generate(make_settings(**SMALL), face_path)
    assert result.random_weights and result.settings.preset == "sdxl-lcm-lora"


def test_full_architecture_is_sdxl_at_its_real_size():
    """The full random build's models, counted on the meta device, have the published parameter
    counts of SDXL's UNet, VAE and text encoders, laion's CLIP ViT-H/14 and TAESDXL."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lcmla.tiny import architecture

    a = architecture("full")

    def count(module):
        return sum(p.numel() for p in module.parameters())

    with init_empty_weights():
        assert count(UNet2DConditionModel(**a.unet)) == 2_567_463_684
        assert count(AutoencoderKL(**a.vae)) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig(**a.text_encoder, vocab_size=a.vocab_size))) == 123_060_480
        assert count(CLIPTextModelWithProjection(CLIPTextConfig(**a.text_encoder_2, vocab_size=a.vocab_size))) == 694_659_840
        clip = CLIPModel(CLIPConfig(text_config=a.clip_text, vision_config=a.vision, projection_dim=a.clip_projection))
        assert count(clip) == 986_109_441
        assert count(AutoencoderTiny(**a.taesd)) == 2_445_063


def test_the_app_header_says_which_memory_mode_runs(engine, low_engine, balanced_engine):
    pytest.importorskip("gradio")
    from lcmla.ui.common import _header

    assert "cpu, every model in device memory" in _header(engine)
    assert "low-VRAM mode" in _header(low_engine)
    assert "balanced memory mode (text and image encoders in CPU memory" in _header(balanced_engine)


def test_the_app_takes_the_memory_flag(monkeypatch):
    pytest.importorskip("gradio")
    from lcmla.ui.cli import parse_args

    assert parse_args([]).memory == "auto"
    assert parse_args(["--memory", "low"]).memory == "low"
    assert parse_args(["--memory", "balanced"]).memory == "balanced"
    monkeypatch.setenv("LCMLA_MEMORY", "full")
    assert parse_args([]).memory == "full"


def test_the_fp16_fix_vae_replaces_the_upcast_when_present(tiny_cache, tmp_path):
    """In float16, SDXL's VAE is kept in float32 (it overflows in float16) unless
    madebyollin/sdxl-vae-fp16-fix is on the machine: then that VAE runs in float16."""
    from diffusers import AutoencoderKL

    from lcmla.loading import load_components
    from lcmla.presets import PRESETS, VAE_FP16_FIX_REPO
    from lcmla.tiny import TINY_VAE, tiny_paths

    fix = tmp_path / VAE_FP16_FIX_REPO  # a tiny VAE the test writes, in the --weights-dir layout
    AutoencoderKL(**{**TINY_VAE, "force_upcast": False}).save_pretrained(fix, safe_serialization=True)
    paths = tiny_paths()
    with logged_messages("diffusers") as said:
        stock = load_components(PRESETS["tiny"], paths, dtype=torch.float16)
    assert stock.pipe.vae.dtype == torch.float32 and stock.pipe.unet.dtype == torch.float16
    # float16 on the CPU runs (slowly): neither diffusers' "cannot run with `cpu` device" warning
    # (once per module) nor its note on the VAE's deliberate float32 cast reaches the user
    assert not [m for m in said if "cannot run with" in m or "kept in float32" in m], said
    fixed = load_components(PRESETS["tiny"], {**paths, "vae_fp16_fix": fix}, dtype=torch.float16)
    assert fixed.pipe.vae.dtype == torch.float16 and not fixed.pipe.vae.config.force_upcast
    assert fixed.pipe.vae.config.block_out_channels == TINY_VAE["block_out_channels"]
