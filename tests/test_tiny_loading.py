"""The tiny preset's weights (real file layouts) and the one loading path (lcmla.loading).

Everything runs offline on CPU: the tiny weights are built in temporary folders, and every load goes
through the same diffusers calls as the real presets (``load_ip_adapter``, ``load_lora_weights``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import StableDiffusionXLPipeline  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lcmla import tiny  # noqa: E402
from lcmla.errors import MissingWeightsError  # noqa: E402
from lcmla.loading import Components, load_components, load_faceid_state_dict, load_image_encoder  # noqa: E402
from lcmla.presets import FACEID_LORA, FACEID_WEIGHTS, LCM_LORA_REPO, PRESETS  # noqa: E402

TINY = PRESETS["tiny"]
TINY_LCM = dataclasses.replace(TINY, lcm_lora=(LCM_LORA_REPO, tiny.LCM_LORA_FILE))


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.ensure_tiny_weights(tmp_path_factory.mktemp("tiny") / "weights")


@pytest.fixture(scope="module")
def paths(root: Path) -> dict[str, Path]:
    return tiny.tiny_paths(root)


@pytest.fixture(scope="module")
def comps(paths: dict[str, Path]) -> Components:
    return load_components(TINY, paths)


@pytest.fixture(scope="module")
def faceid_bin(paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return torch.load(paths["faceid"] / FACEID_WEIGHTS, map_location="cpu", weights_only=True)


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin"))


def _tensors(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {f"{part}/{k}": v for part, sd in state.items() for k, v in sd.items()}


def _inputs(comps: Components, seed: int = 0) -> dict[str, Any]:
    """UNet inputs for one 32x32 latent with the real IP-Adapter path (CLIP features + ID)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        clip = comps.image_encoder(torch.randn(1, 3, 224, 224, generator=g), output_hidden_states=True)
    return {
        "sample": torch.randn(1, 4, 32, 32, generator=g),
        "encoder_hidden_states": torch.randn(1, 77, 64, generator=g),
        "text_embeds": torch.randn(1, 32, generator=g),
        "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]]),
        "clip_embeds": clip.hidden_states[-2].unsqueeze(1),  # (batch, images, tokens, hidden)
        "id_a": torch.randn(1, 1, 512, generator=g),
        "id_b": torch.randn(1, 1, 512, generator=g),
    }


def _unet(comps: Components, x: dict[str, Any], id_embeds: Any | None, t: int = 500) -> Any:
    """One UNet call; ``id_embeds=None`` calls it without any image conditioning."""
    unet = comps.pipe.unet
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    if id_embeds is not None:
        proj = unet.encoder_hid_proj.image_projection_layers[0]
        proj.clip_embeds = x["clip_embeds"]
        proj.shortcut = True  # FaceID-Plus v2
        added["image_embeds"] = [id_embeds]
    with torch.no_grad():
        return unet(x["sample"], t, encoder_hidden_states=x["encoder_hidden_states"], added_cond_kwargs=added).sample


# ---- the weights ------------------------------------------------------------------------------


def test_build_is_deterministic_and_cached(root: Path, tmp_path: Path) -> None:
    other = tiny.ensure_tiny_weights(tmp_path / "other")
    files = _weight_files(root)
    assert [p.relative_to(root) for p in files] == [p.relative_to(other) for p in _weight_files(other)]
    assert len(files) == 9
    for a in files:
        b = other / a.relative_to(root)
        ta, tb = _tensors(a), _tensors(b)
        assert ta.keys() == tb.keys()
        assert all(torch.equal(ta[k], tb[k]) for k in ta), a
        assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest(), a

    marker = root / tiny.MARKER
    before = {p: p.stat().st_mtime_ns for p in [marker, *files]}
    with mock.patch.object(tiny, "_build_all", side_effect=AssertionError("rebuilt")):
        assert tiny.ensure_tiny_weights(root) == root
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_stale_folder_is_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "junk.txt").write_text("old")
    (folder / tiny.MARKER).write_text("0\n")
    assert tiny.ensure_tiny_weights(folder) == folder
    assert not (folder / "junk.txt").exists()
    assert (folder / tiny.MARKER).read_text().strip() == str(tiny.TINY_VERSION)
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temporary folders left behind


def test_layout_matches_the_real_repos(paths: dict[str, Path]) -> None:
    for role, (repo, files) in TINY.required_files(None).items():
        assert paths[role].as_posix().endswith(repo)
        for name in files:
            assert (paths[role] / name).is_file(), (role, name)
    assert (paths["taesd"] / "config.json").is_file()
    assert (paths["taesd"] / "diffusion_pytorch_model.safetensors").is_file()
    assert (paths["lcm_lora"] / tiny.LCM_LORA_FILE).is_file()
    assert not (paths["base"] / "tokenizer" / "tokenizer.json").exists()  # as in the SDXL repos

    lora = load_file(str(paths["faceid"] / FACEID_LORA))
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in lora
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in lora)
    lcm = load_file(str(paths["lcm_lora"] / tiny.LCM_LORA_FILE))
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in lcm
    assert "lora_unet_up_blocks_0_resnets_0_conv_shortcut.lora_up.weight" in lcm

    # the image encoder repo is a whole CLIPModel, projection_dim at the top level only (laion's layout)
    config = json.loads((paths["image_encoder"] / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"] and config["projection_dim"] == tiny.TINY_CLIP_PROJECTION
    assert config["vision_config"].get("projection_dim", 512) != tiny.TINY_CLIP_PROJECTION
    keys = load_file(str(paths["image_encoder"] / "model.safetensors")).keys()
    assert any(k.startswith("text_model.") for k in keys) and "visual_projection.weight" in keys


def test_faceid_bin_has_h94_key_layout(faceid_bin: dict[str, dict[str, Any]], comps: Components) -> None:
    assert set(faceid_bin) == {"image_proj", "ip_adapter"}
    proj = faceid_bin["image_proj"]
    assert proj["proj.0.weight"].shape == (1024, 512)  # the 512-d insightface embedding
    assert proj["proj.2.weight"].shape == (4 * 64, 1024)  # 4 identity tokens of cross_attention_dim
    assert proj["perceiver_resampler.proj_in.weight"].shape == (64, tiny.TINY_VISION["hidden_size"])
    expected = {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"}
    expected |= {f"perceiver_resampler.{m}.{p}" for m in ("proj_in", "proj_out", "norm_out") for p in ("weight", "bias")}
    for i in range(4):
        a, f = f"perceiver_resampler.layers.{i}.0.", f"perceiver_resampler.layers.{i}.1."
        expected |= {a + n for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
        expected |= {a + "to_q.weight", a + "to_kv.weight", a + "to_out.weight"}
        expected |= {f + "0.weight", f + "0.bias", f + "1.weight", f + "3.weight"}
    assert set(proj) == expected

    # one index per attention processor of the UNet (attn1 even, attn2 odd), LoRA on all of them
    names = [n for n in comps.pipe.unet.attn_processors if not n.startswith("encoder_hid_proj")]
    ip = faceid_bin["ip_adapter"]
    for key_id, name in enumerate(names):
        for p in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"):
            assert f"{key_id}.{p}.down.weight" in ip and f"{key_id}.{p}.up.weight" in ip
        assert (f"{key_id}.to_k_ip.weight" in ip) == name.endswith("attn2.processor")
    assert len(ip) == len(names) * 8 + len(names) // 2 * 2


# Key names of the real files, written out: the h94 FaceID-Plus-v2 SDXL .bin numbers the UNet's
# attention processors in diffusers' ``attn_processors`` order (down blocks, up blocks, then the mid
# block; attn1 even, attn2 odd), and its kohya-layout LoRA names modules by their dotted path with
# "_" (``lora_unet_<path>``). The tiny UNet has SDXL's block structure, so these positions exist in it.
REAL_BIN_KEYS = {
    # key id: the processor it belongs to
    "0.to_q_lora.down.weight": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor",
    "1.to_k_ip.weight": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
    "1.to_v_ip.weight": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
    "1.to_out_lora.up.weight": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
    "33.to_k_ip.weight": "mid_block.attentions.0.transformer_blocks.1.attn2.processor",  # the last: mid block
}
REAL_KOHYA_KEYS = (
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha",
    "lora_unet_up_blocks_0_attentions_2_transformer_blocks_1_attn1_to_v.lora_down.weight",
)
REAL_LCM_KOHYA_KEYS = (
    "lora_unet_down_blocks_0_downsamplers_0_conv.alpha",
    "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight",
    "lora_unet_up_blocks_0_resnets_0_conv_shortcut.lora_up.weight",
    "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj.lora_up.weight",
)


def test_real_key_names_and_their_modules(paths: dict[str, Path], faceid_bin: dict, comps: Components) -> None:
    names = [n for n in comps.pipe.unet.attn_processors if not n.startswith("encoder_hid_proj")]
    assert len(names) == 34 and names[0] == REAL_BIN_KEYS["0.to_q_lora.down.weight"]
    for key, processor in REAL_BIN_KEYS.items():
        assert key in faceid_bin["ip_adapter"], key
        assert names[int(key.split(".")[0])] == processor, key
    # diffusers puts "1.to_k_ip" on exactly that layer
    proc = comps.pipe.unet.attn_processors[REAL_BIN_KEYS["1.to_k_ip.weight"]]
    assert torch.equal(proc.to_k_ip[0].weight, faceid_bin["ip_adapter"]["1.to_k_ip.weight"])
    lora = load_file(str(paths["faceid"] / FACEID_LORA))
    lcm = load_file(str(paths["lcm_lora"] / tiny.LCM_LORA_FILE))
    assert all(k in lora for k in REAL_KOHYA_KEYS)
    assert all(k in lcm for k in REAL_LCM_KOHYA_KEYS)
    # kohya's alpha: a 0-d tensor per module; the scale applied is alpha / rank (peft's scaling)
    assert all(lcm[k].ndim == 0 for k in lcm if k.endswith(".alpha"))
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0"
    alpha, down = lora[key + ".alpha"], lora[key + ".lora_down.weight"]
    layer = comps.pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0")
    assert alpha.ndim == 0 and layer.scaling["faceid"] == pytest.approx(float(alpha) / down.shape[0])


def test_tokenizers_take_any_prompt(paths: dict[str, Path]) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(paths["base"] / "tokenizer", local_files_only=True)
    tok2 = CLIPTokenizer.from_pretrained(paths["base"] / "tokenizer_2", local_files_only=True)
    assert tok.model_max_length == tok2.model_max_length == 77
    vocab = len(tok)
    for prompt in ("a photo of a face", "Ünïcödé 😀 こんにちは\u200b\t\x00 ¿qué?", "", "word " * 200):
        for t in (tok, tok2):
            ids = t(prompt, padding="max_length", max_length=77, truncation=True).input_ids
            assert len(ids) == 77 and max(ids) < vocab
            assert ids[0] == t.bos_token_id and t.eos_token_id in ids
    assert tok.eos_token_id == vocab - 1  # the highest id, as in CLIP
    assert tok2.pad_token == "!" and tok.pad_token == "<|endoftext|>"
    assert len(tok("the photo").input_ids) == 4  # merges learned: "the</w>" and "photo</w>" are single tokens


# ---- the loading path -------------------------------------------------------------------------


def test_load_components_goes_through_diffusers(paths: dict[str, Path], faceid_bin: dict) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    cls = StableDiffusionXLPipeline
    with (
        mock.patch.object(cls, "load_ip_adapter", autospec=True, side_effect=cls.load_ip_adapter) as ip_spy,
        mock.patch.object(cls, "load_lora_weights", autospec=True, side_effect=cls.load_lora_weights) as lora_spy,
    ):
        comps = load_components(TINY_LCM, paths)

    ip_spy.assert_called_once()
    args, kwargs = ip_spy.call_args
    assert kwargs["weight_name"] == FACEID_WEIGHTS and kwargs["image_encoder_folder"] is None
    state = args[1]
    assert set(state["image_proj"]) == set(faceid_bin["image_proj"])
    assert not any("_lora." in k for k in state["ip_adapter"])  # the in-file LoRA is the "faceid" adapter
    assert [(c.kwargs["weight_name"], c.kwargs["adapter_name"]) for c in lora_spy.call_args_list] == [
        (FACEID_LORA, "faceid"),
        (tiny.LCM_LORA_FILE, "lcm"),
    ]

    unet = comps.pipe.unet
    assert tuple(comps.pipe.unet.peft_config) == ("faceid", "lcm")
    assert set(unet.peft_config) == {"faceid", "lcm"}
    assert isinstance(unet.encoder_hid_proj.image_projection_layers[0], IPAdapterFaceIDPlusImageProjection)
    names = [n for n in unet.attn_processors if not n.startswith("encoder_hid_proj")]
    procs = unet.attn_processors
    for key_id, name in enumerate(names):
        proc = procs[name]
        if name.endswith("attn2.processor"):
            assert isinstance(proc, IPAdapterAttnProcessor2_0)
            assert torch.equal(proc.to_k_ip[0].weight, faceid_bin["ip_adapter"][f"{key_id}.to_k_ip.weight"])
            assert torch.equal(proc.to_v_ip[0].weight, faceid_bin["ip_adapter"][f"{key_id}.to_v_ip.weight"])
        else:
            assert isinstance(proc, AttnProcessor2_0)
    # the resampler's weights are the .bin's, after diffusers' key conversion (to_kv split in two)
    resampler = unet.encoder_hid_proj.image_projection_layers[0]
    to_kv = faceid_bin["image_proj"]["perceiver_resampler.layers.2.0.to_kv.weight"]
    assert torch.equal(torch.cat([resampler.layers[2].attn.to_k.weight, resampler.layers[2].attn.to_v.weight]), to_kv)

    # every LoRA key was consumed: each file module is one peft layer holding exactly its tensors
    for adapter, file in (("faceid", paths["faceid"] / FACEID_LORA), ("lcm", paths["lcm_lora"] / tiny.LCM_LORA_FILE)):
        sd = load_file(str(file))
        layers = {n: m for n, m in unet.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A}
        assert len(layers) * 3 == len(sd)
        for n, m in layers.items():
            key = "lora_unet_" + n.replace(".", "_")
            assert torch.equal(m.lora_A[adapter].weight, sd[key + ".lora_down.weight"])
            assert torch.equal(m.lora_B[adapter].weight, sd[key + ".lora_up.weight"])
            assert m.scaling[adapter] == 1.0  # alpha == rank

    assert type(comps.pipe.scheduler).__name__ == "DDIMScheduler"
    assert comps.pipe.scheduler.config.timestep_spacing == "trailing"
    assert comps.pipe.scheduler.config.beta_schedule == "scaled_linear"
    for module in (unet, comps.pipe.vae, comps.pipe.text_encoder, comps.pipe.text_encoder_2, comps.image_encoder, comps.taesd):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert comps.pipe.image_encoder is None  # kept out of the pipeline: FaceID gets CLIP features from us


def test_clip_processor_and_taesd(comps: Components, paths: dict[str, Path]) -> None:
    from PIL import Image

    assert comps.paths == paths and comps.paths is not paths  # where each role came from (evaluation reads it)

    img = Image.new("RGB", (300, 200), (255, 0, 0))
    pixels = comps.clip_processor(images=img, return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224)
    assert pixels[0, 0, 0, 0].item() == pytest.approx((1 - 0.48145466) / 0.26862954, rel=1e-4)
    with torch.no_grad():
        image = comps.taesd.decode(torch.zeros(1, 4, 32, 32)).sample
        latent = comps.pipe.vae.encode(torch.zeros(1, 3, 256, 256)).latent_dist.mean
    assert image.shape == (1, 3, 256, 256) and latent.shape == (1, 4, 32, 32)


def test_ip_adapter_scale_zero_removes_the_identity(paths: dict[str, Path]) -> None:
    comps = load_components(TINY, paths)  # its own copy: the IP-Adapter is unloaded at the end
    x = _inputs(comps)
    comps.pipe.set_ip_adapter_scale(0.8)
    a, b = _unet(comps, x, x["id_a"]), _unet(comps, x, x["id_b"])
    assert (a - b).abs().max() > 1e-3  # the identity matters at a normal scale
    comps.pipe.set_ip_adapter_scale(0.0)
    a0, b0 = _unet(comps, x, x["id_a"]), _unet(comps, x, x["id_b"])
    assert torch.equal(a0, b0)
    # ... and equals the same UNet (same LoRA) with plain attention processors and no image input
    comps.pipe.unload_ip_adapter()
    assert torch.equal(a0, _unet(comps, x, None))


def test_faceid_lora_scale(comps: Components) -> None:
    pipe, x = comps.pipe, _inputs(comps, seed=1)
    pipe.set_ip_adapter_scale(0.8)
    try:
        full = _unet(comps, x, x["id_a"])
        pipe.set_adapters(["faceid"], [0.0])
        zero = _unet(comps, x, x["id_a"])
        pipe.set_adapters(["faceid"], [0.5])
        half = _unet(comps, x, x["id_a"])
        pipe.disable_lora()
        off = _unet(comps, x, x["id_a"])
    finally:
        pipe.enable_lora()
        pipe.set_adapters(["faceid"], [1.0])
    assert torch.equal(zero, off)
    assert (full - off).abs().max() > 1e-3 and (half - off).abs().max() > 1e-4
    assert not torch.equal(half, full)


def test_in_file_lora_equals_the_kohya_lora(paths: dict[str, Path], comps: Components) -> None:
    """diffusers' own path on the untouched .bin (LoRA auto-loaded as "faceid_0") == our path."""
    pipe = StableDiffusionXLPipeline.from_pretrained(str(paths["base"]), local_files_only=True)
    pipe.load_ip_adapter(str(paths["faceid"]), subfolder="", weight_name=FACEID_WEIGHTS, image_encoder_folder=None)
    assert set(pipe.unet.peft_config) == {"faceid_0"}
    ours = dataclasses.replace(comps, pipe=pipe)
    x = _inputs(comps, seed=2)
    pipe.set_ip_adapter_scale(0.8)
    comps.pipe.set_ip_adapter_scale(0.8)
    torch.testing.assert_close(_unet(ours, x, x["id_a"]), _unet(comps, x, x["id_a"]), rtol=1e-5, atol=1e-5)


def test_non_tensor_pickle_is_refused(paths: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(marker),))

    bad = tmp_path / "faceid"
    bad.mkdir()
    torch.save({"image_proj": {}, "ip_adapter": {"0.to_k_ip.weight": Payload()}}, bad / FACEID_WEIGHTS)
    (bad / FACEID_LORA).write_bytes((paths["faceid"] / FACEID_LORA).read_bytes())
    with pytest.raises(MissingWeightsError, match="not a plain tensor checkpoint .*holds Python objects besides "
                                                  "tensors") as refused:
        load_faceid_state_dict(bad / FACEID_WEIGHTS)
    assert "weights_only=False" not in str(refused.value)  # torch's advice would run the file's code
    with pytest.raises(MissingWeightsError, match="not a plain tensor checkpoint"):
        load_components(TINY, {**paths, "faceid": bad})
    assert not marker.exists()
    # a zero-byte or garbled .safetensors is the same clear error (safetensors raised its own type)
    for name, data in (("empty.safetensors", b""), ("garbage.safetensors", b"\0" * 100)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MissingWeightsError, match="not a plain tensor checkpoint.*not a readable safetensors"):
            load_faceid_state_dict(tmp_path / name)
    # a photo given as the adapter is named as one (it was "holds Python objects besides tensors")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "me.png")
    with pytest.raises(MissingWeightsError, match="me.png is a PNG image, not an IP-Adapter checkpoint"):
        load_faceid_state_dict(tmp_path / "me.png")
    torch.load(bad / FACEID_WEIGHTS, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.is_dir()

    wrong = tmp_path / "wrong.bin"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, wrong)
    with pytest.raises(MissingWeightsError, match="IP-Adapter checkpoint"):
        load_faceid_state_dict(wrong)
    # plain containers that weights_only reads, but a number where a tensor belongs
    numbers = tmp_path / "numbers.bin"
    torch.save({"image_proj": {"proj.0.weight": 1.0}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(1)}}, numbers)
    with pytest.raises(MissingWeightsError, match=r"does not hold an IP-Adapter checkpoint \(\{'image_proj', "
                                                  r"'ip_adapter'\} of tensors\)"):
        load_faceid_state_dict(numbers)
    # an IP-Adapter Plus checkpoint where a FaceID-Plus-v2 one is wanted
    plus = tmp_path / "plus.safetensors"
    save_file({"image_proj.latents": torch.zeros(1, 4, 8), "image_proj.proj_in.weight": torch.zeros(8, 8),
               "ip_adapter.1.to_k_ip.weight": torch.zeros(8, 8)}, plus)
    with pytest.raises(MissingWeightsError, match="plus.safetensors is not a FaceID-Plus-v2 checkpoint"):
        load_faceid_state_dict(plus)


def test_a_refusal_reason_is_one_short_line() -> None:
    from lcmla.loading import unreadable_reason

    assert unreadable_reason(ValueError("first line\nsecond line")) == "first line"
    assert unreadable_reason(ValueError("x" * 500)) == "x" * 200
    assert unreadable_reason(ValueError("")) == "ValueError"


def test_missing_files_are_reported(paths: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingWeightsError, match="image_encoder") as info:
        load_components(TINY, {**paths, "image_encoder": empty})
    assert any(m.endswith("model.safetensors") for m in info.value.missing)
    with pytest.raises(MissingWeightsError, match="no local folder given for the 'faceid' weights"):
        load_components(TINY, {k: v for k, v in paths.items() if k != "faceid"})


def test_replacement_unet_and_fused_lora(paths: dict[str, Path], comps: Components, tmp_path: Path) -> None:
    """The Lightning (replacement UNet) and Hyper-SD (fused LoRA) branches, on tiny files."""
    base_unet = StableDiffusionXLPipeline.from_pretrained(str(paths["base"]), local_files_only=True).unet
    state = {k: v.clone() for k, v in base_unet.state_dict().items()}
    state["conv_out.weight"] = state["conv_out.weight"] * 2.0
    (tmp_path / "lightning").mkdir()
    save_file(state, str(tmp_path / "lightning" / "unet.safetensors"))
    lightning = dataclasses.replace(TINY, unet_repo=str(tmp_path / "lightning"), unet_file="unet.safetensors")
    loaded = load_components(lightning, {**paths, "unet": tmp_path / "lightning"})
    assert torch.equal(loaded.pipe.unet.conv_out.weight, state["conv_out.weight"])
    assert tuple(loaded.pipe.unet.peft_config) == ("faceid",)
    # a tensor missing, one of another shape, or a single-file checkpoint's keys: counted and named
    key = "conv_out.weight"
    for name, changed, counts, example in (
        ("lacking", {k: v for k, v in state.items() if k != key}, "1 tensor(s) missing and 0 of another shape", key),
        ("reshaped", {**state, key: state[key][:-1]}, "0 tensor(s) missing and 1 of another shape",
         f"{key} is {list(state[key][:-1].shape)}, not {list(state[key].shape)}"),
        ("single-file", {"model.diffusion_model." + k: v for k, v in state.items()},
         f"{len(state)} tensor(s) missing and 0 of another shape, {len(state)} the model has no place for", None),
    ):
        (tmp_path / name).mkdir()
        save_file(changed, str(tmp_path / name / "unet.safetensors"))
        with pytest.raises(MissingWeightsError) as caught:
            load_components(dataclasses.replace(lightning, unet_repo=str(tmp_path / name)),
                            {**paths, "unet": tmp_path / name})
        message = str(caught.value)
        assert message.startswith(f"the UNet {tmp_path / name / 'unet.safetensors'} does not match "
                                  f"{paths['base'] / 'unet' / 'config.json'}: {counts} (e.g. "), message
        assert example is None or f"(e.g. {example});" in message, message
        assert "not a single-file checkpoint: download it again" in message

    hyper = dataclasses.replace(TINY, fuse_lora=(str(paths["lcm_lora"]), tiny.LCM_LORA_FILE, 0.5))
    fused = load_components(hyper, {**paths, "fused_lora": paths["lcm_lora"]})
    assert tuple(fused.pipe.unet.peft_config) == ("faceid",)  # the fused LoRA left no adapter behind
    lcm = load_file(str(paths["lcm_lora"] / tiny.LCM_LORA_FILE))
    key = "lora_unet_mid_block_resnets_0_conv1"
    down, up = lcm[key + ".lora_down.weight"], lcm[key + ".lora_up.weight"]
    delta = (up.flatten(1) @ down.flatten(1)).reshape(base_unet.mid_block.resnets[0].conv1.weight.shape)
    expected = base_unet.mid_block.resnets[0].conv1.weight + 0.5 * delta
    torch.testing.assert_close(fused.pipe.unet.mid_block.resnets[0].conv1.weight, expected)


def test_image_encoder_from_either_layout(paths: dict[str, Path], comps: Components, tmp_path: Path) -> None:
    """laion's whole-CLIPModel repo and a vision-only save_pretrained folder load to the same tower."""
    from transformers import CLIPModel

    full = CLIPModel.from_pretrained(str(paths["image_encoder"]), local_files_only=True)
    enc = comps.image_encoder
    assert enc.visual_projection.weight.shape == (tiny.TINY_CLIP_PROJECTION, tiny.TINY_VISION["hidden_size"])
    assert torch.equal(enc.visual_projection.weight, full.visual_projection.weight)
    for k, v in full.vision_model.state_dict().items():
        assert torch.equal(enc.vision_model.state_dict()[k], v), k
    enc.save_pretrained(tmp_path / "vision-only")
    again = load_image_encoder(tmp_path / "vision-only", torch.float32)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = enc(x, output_hidden_states=True), again(x, output_hidden_states=True)
    torch.testing.assert_close(a.image_embeds, b.image_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.hidden_states[-2], b.hidden_states[-2], rtol=1e-5, atol=1e-6)
    # a tensor missing or of another shape is named (a strict load's RuntimeError was the message)
    weights = load_file(str(tmp_path / "vision-only" / "model.safetensors"))
    projection = "visual_projection.weight"
    for name, changed in (("lacking", {k: v for k, v in weights.items() if k != projection}),
                          ("reshaped", {**weights, projection: weights[projection][:-1]})):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_bytes((tmp_path / "vision-only" / "config.json").read_bytes())
        save_file(changed, str(folder / "model.safetensors"))
        counts = "1 vision tensor(s) missing and 0" if name == "lacking" else "0 vision tensor(s) missing and 1"
        with pytest.raises(MissingWeightsError, match=rf"image encoder in .*{name} does not match its config.json: "
                                                      rf"{re.escape(counts)} of another shape \(e\.g\. {projection}"):
            load_image_encoder(folder)


def test_an_adapter_and_a_kv_lora_swapped_name_the_right_flag(tmp_path: Path) -> None:
    """Each of the two trained files given to the other's flag says which flag takes it."""
    import torch

    from lcmla.errors import LcmlaError
    from lcmla.kv_lora import FORMAT, read_kv_lora_metadata

    kv = tmp_path / "kv_encoder_lora.safetensors"
    save_file({"down.lora_A.weight": torch.zeros(4, 8)}, str(kv), metadata={"format": FORMAT, "version": "2"})
    adapter = tmp_path / "ip-adapter.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(4, 8), "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 8)},
              str(adapter), metadata={"format": "pt"})
    with pytest.raises(MissingWeightsError, match="KV-encoder LoRA: pass it with --kv-lora"):
        load_faceid_state_dict(kv)
    with pytest.raises(LcmlaError, match="IP-Adapter checkpoint: pass it with --adapter"):
        read_kv_lora_metadata(adapter)
    # a folder (the trainer's output, say) where one file is wanted: named as a folder, with its files
    with pytest.raises(LcmlaError, match=r"IP-Adapter checkpoint .* is a folder, not a file: pass one file in it "
                                         r"\(ip-adapter.safetensors, kv_encoder_lora.safetensors\)"):
        load_faceid_state_dict(tmp_path)
    with pytest.raises(LcmlaError, match=r"KV-encoder LoRA .* is a folder, not a file: pass one file in it"):
        read_kv_lora_metadata(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LcmlaError, match="holds no .safetensors file"):
        read_kv_lora_metadata(empty)
    with pytest.raises(LcmlaError, match="does not exist; pass the kv_encoder_lora.safetensors that `python -m "
                                         "training train` wrote .*`python -m lcmla convert-lookahead`"):
        read_kv_lora_metadata(tmp_path / "gone.safetensors")
    with pytest.raises(MissingWeightsError, match="does not exist; check the path .*convert-lookahead"):
        load_faceid_state_dict(tmp_path / "gone.bin")


def test_an_adapter_for_another_unet_is_refused_with_its_shapes(paths: dict[str, Path], faceid_bin, tmp_path: Path) -> None:
    """An adapter whose identity K/V are numbered or shaped for another UNet (SDXL's on the tiny
    preset) is refused by name, with the two layer counts or the shape it needs, not diffusers' KeyError."""
    from lcmla.loading import adapter_fit_problem, cross_attention_shapes

    shapes = cross_attention_shapes(load_components(TINY, paths).pipe.unet)
    ip = {k: v for k, v in faceid_bin["ip_adapter"].items() if "_lora." not in k}
    assert shapes and adapter_fit_problem(ip, shapes) is None  # the preset's own adapter fits
    more = dict(ip, **{f"{2 * len(shapes) + 1}.to_k_ip.weight": ip["1.to_k_ip.weight"].clone(),
                       f"{2 * len(shapes) + 1}.to_v_ip.weight": ip["1.to_v_ip.weight"].clone()})
    assert adapter_fit_problem(more, shapes).startswith(f"it holds identity K/V for {len(shapes) + 1} cross-attention "
                                                        f"layers and this UNet has {len(shapes)}")
    width, context = shapes[0]
    wide = dict(ip, **{"1.to_v_ip.weight": torch.zeros(width * 2, context)})
    assert adapter_fit_problem(wide, shapes) == (f"its layer 1 to_v_ip is [{width * 2}, {context}] where this UNet's "
                                                 f"layer needs [{width}, {context}]: it was made for another UNet")
    renumbered = {f"{int(k.split('.')[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in ip.items()}
    assert adapter_fit_problem(renumbered, shapes).startswith("its layers are numbered 0, 2, 4, 6, … where this UNet's are 1, 3, 5")
    no_v = {k: v for k, v in ip.items() if k != "3.to_v_ip.weight"}
    assert adapter_fit_problem(no_v, shapes) == "its layer 3 has no to_v_ip.weight"

    for name, state in (("more", more), ("wide", wide)):
        file = tmp_path / f"{name}.safetensors"
        tensors = {f"image_proj.{k}": v.contiguous() for k, v in faceid_bin["image_proj"].items()}
        tensors.update({f"ip_adapter.{k}": v.contiguous() for k, v in state.items()})
        save_file(tensors, str(file), metadata={"format": "pt"})
        with pytest.raises(MissingWeightsError, match=rf"the IP-Adapter {file} does not fit the tiny preset's UNet: .*"
                                                      r"pass an adapter trained for tiny"):
            load_components(TINY, paths, adapter=file)
    # an image projection of other widths (the UNet's layers fit): refused by name, not load_state_dict's traceback
    proj = {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim == 2 else v for k, v in faceid_bin["image_proj"].items()}
    file = tmp_path / "proj.safetensors"
    tensors = {f"image_proj.{k}": v.contiguous() for k, v in proj.items()}
    tensors.update({f"ip_adapter.{k}": v.contiguous() for k, v in ip.items()})
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(MissingWeightsError, match=rf"the IP-Adapter {file} does not fit the tiny preset \("):
        load_components(TINY, paths, adapter=file)


def test_known_messages_are_dropped_only_inside_the_block(caplog: pytest.LogCaptureFixture) -> None:
    """quiet_messages drops its prefixes from its loggers while the block runs and nothing else;
    quiet_torchvision_notice adds its one filter once however often it is called."""
    import logging

    from lcmla.loading import _TORCHVISION_NOTICE, quiet_messages, quiet_torchvision_notice

    log = logging.getLogger("lcmla.test.quiet")
    with caplog.at_level(logging.WARNING, logger=log.name):
        with quiet_messages((log.name,), ("known:",)):
            log.warning("known: harmless")
            log.warning("something else")
        log.warning("known: after the block")
    assert [r.getMessage() for r in caplog.records] == ["something else", "known: after the block"]
    assert not log.filters
    notices = logging.getLogger("transformers.utils.import_utils")
    quiet_torchvision_notice()
    quiet_torchvision_notice()
    assert notices.filters.count(_TORCHVISION_NOTICE) == 1


def test_the_adapter_kind_is_read_from_the_image_projection_keys() -> None:
    from lcmla.loading import adapter_kind

    t = torch.zeros(1)
    faceid = {"proj.0.weight": t, "perceiver_resampler.proj_in.weight": t}
    plus = {"latents": t, "proj_in.weight": t, "layers.0.0.norm1.weight": t}
    assert adapter_kind({"image_proj": faceid}) == "faceid-plus-v2"
    assert adapter_kind({"image_proj": plus}) == "plus"
    for proj in ({"proj.0.weight": t}, {"latents": t}, {"proj_in.weight": t}, {"proj.weight": t}):
        with pytest.raises(MissingWeightsError, match=r"neither FaceID-Plus-v2 nor IP-Adapter Plus \(image_proj keys"):
            adapter_kind({"image_proj": proj})


def test_an_adapters_own_lora_and_a_renamed_lcm_lora_are_the_ones_loaded(paths: dict[str, Path], tmp_path: Path) -> None:
    """A FaceID adapter given with ``adapter=`` takes the ``<stem>_lora.safetensors`` beside it (else the
    preset's LoRA); a preset's LCM-LoRA is read under the file name the preset gives."""
    mine = tmp_path / "mine.bin"
    mine.write_bytes((paths["faceid"] / FACEID_WEIGHTS).read_bytes())
    alone = tmp_path / "alone" / "mine.bin"
    alone.parent.mkdir()
    alone.write_bytes(mine.read_bytes())
    lora = load_file(str(paths["faceid"] / FACEID_LORA))
    save_file({k: v * 2 for k, v in lora.items()}, str(tmp_path / "mine_lora.safetensors"))
    # a fresh stock load, not the module's ``comps``: other tests change that one's adapter weights
    stock, own, fallback = (load_components(TINY, paths, adapter=a) for a in (None, mine, alone))
    x = _inputs(stock)
    out = {name: _unet(c, x, x["id_a"]) for name, c in (("stock", stock), ("own", own), ("fallback", fallback))}
    assert torch.equal(out["fallback"], out["stock"])
    assert (out["own"] - out["stock"]).abs().max() > 1e-4  # the sibling's (doubled) LoRA, not the preset's

    renamed = tmp_path / "lcm"
    renamed.mkdir()
    (renamed / "lcm-renamed.safetensors").write_bytes((paths["lcm_lora"] / tiny.LCM_LORA_FILE).read_bytes())
    preset = dataclasses.replace(TINY, lcm_lora=(LCM_LORA_REPO, "lcm-renamed.safetensors"))
    comps = load_components(preset, {**paths, "lcm_lora": renamed})
    assert "lcm" in comps.pipe.get_active_adapters()
