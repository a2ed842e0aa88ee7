"""The LCM-Lookahead authors' checkpoint → lcmla's adapter and KV-encoder LoRA (tiny, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from util import make_settings as _settings
from util import px as _px

from lcmla import LcmlaError
from lcmla.convert import convert_lookahead_checkpoint, split_authors_state
from lcmla.sdxl_configs import attention_processor_names
from lcmla.tiny import TINY_UNET, TINY_VISION

RANK = 4
TOKENS = 16  # the authors' IP-Adapter Plus-Face: 16 tokens


def _authors_checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny state dict laid out like the authors' ``IPAdapterPlusXL(encoder_unet, ...)``: encoder
    LoRA (attn1/attn2 q/k/v/out, ``lora_layer.down/up``), KV copies with LoRA, adapter K/V
    (``extract_kv2``), the Plus resampler (``image_proj_model``), CLIP and base weights."""
    from diffusers import UNet2DConditionModel

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=0.3: torch.randn(*shape, generator=g) * s
    unet = UNet2DConditionModel(**TINY_UNET)
    cross = TINY_UNET["cross_attention_dim"]
    sd: dict[str, torch.Tensor] = {"encoder_unet.conv_in.weight": rnd(32, 4, 3, 3), "image_encoder.vision_model.x": rnd(2)}
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            continue
        block = name[: -len(".attn1.processor")]
        attn1 = unet.get_submodule(block + ".attn1")
        c = attn1.to_q.in_features
        for attn, kv_in in (("attn1", c), ("attn2", cross)):
            for proj, (i, o) in (("to_q", (c, c)), ("to_k", (kv_in, c)), ("to_v", (kv_in, c)), ("to_out.0", (c, c))):
                sd[f"encoder_unet.{block}.{attn}.{proj}.lora_layer.down.weight"] = rnd(RANK, i)
                sd[f"encoder_unet.{block}.{attn}.{proj}.lora_layer.up.weight"] = rnd(o, RANK)
        for proj in ("to_k", "to_v"):
            sd[f"encoder_unet.{block}.extract_kv1.{proj}.weight"] = getattr(attn1, proj).weight.detach().clone()
            sd[f"encoder_unet.{block}.extract_kv1.{proj}.lora_layer.down.weight"] = rnd(RANK, c)
            sd[f"encoder_unet.{block}.extract_kv1.{proj}.lora_layer.up.weight"] = rnd(c, RANK)
            sd[f"encoder_unet.{block}.extract_kv2.{proj}.weight"] = rnd(c, cross, s=0.1)
    dim, emb, heads = 64, TINY_VISION["hidden_size"], 1  # the authors: dim 1280, 20 heads of 64
    p = "image_proj_model."
    sd[p + "latents"] = rnd(1, TOKENS, dim)
    sd[p + "proj_in.weight"], sd[p + "proj_in.bias"] = rnd(dim, emb), rnd(dim)
    sd[p + "proj_out.weight"], sd[p + "proj_out.bias"] = rnd(cross, dim), rnd(cross)
    sd[p + "norm_out.weight"], sd[p + "norm_out.bias"] = 1 + rnd(cross, s=0.05), rnd(cross, s=0.05)
    for i in range(4):
        a, f = f"{p}layers.{i}.0.", f"{p}layers.{i}.1."
        for n in ("norm1", "norm2"):
            sd[a + n + ".weight"], sd[a + n + ".bias"] = 1 + rnd(dim, s=0.05), rnd(dim, s=0.05)
        sd[a + "to_q.weight"], sd[a + "to_kv.weight"], sd[a + "to_out.weight"] = rnd(64 * heads, dim), rnd(128 * heads, dim), rnd(dim, 64 * heads)
        sd[f + "0.weight"], sd[f + "0.bias"] = 1 + rnd(dim, s=0.05), rnd(dim, s=0.05)
        sd[f + "1.weight"], sd[f + "3.weight"] = rnd(4 * dim, dim, s=0.1), rnd(dim, 4 * dim, s=0.1)
    return sd


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("authors")
    sd = _authors_checkpoint()
    torch.save(sd, folder / "model_ckpt.pt")
    return sd, convert_lookahead_checkpoint(folder / "model_ckpt.pt", folder / "out", unet_config=TINY_UNET)


def test_split_maps_every_tensor_to_its_place():
    sd = _authors_checkpoint()
    names = attention_processor_names(TINY_UNET)
    parts = split_authors_state(sd, names)
    assert parts["ip_adapter"]["1.to_k_ip.weight"] is sd["encoder_unet.down_blocks.1.attentions.0.transformer_blocks.0.extract_kv2.to_k.weight"]
    assert set(parts["dropped"]) == {k for k in sd if k.startswith(("encoder_unet.conv_in", "image_encoder."))
                                     or k.endswith(("extract_kv1.to_k.weight", "extract_kv1.to_v.weight"))}
    key = "unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0.lora_B.weight"
    assert parts["kv_lora"][key] is sd["encoder_unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0.lora_layer.up.weight"]
    assert "kv_copy.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_v.lora_A.weight" in parts["kv_lora"]
    n_blocks = sum(n.endswith("attn1.processor") for n in names)
    assert len(parts["kv_lora"]) == n_blocks * (16 + 4) and len(parts["ip_adapter"]) == 2 * n_blocks


def test_convert_round_trips_into_the_engine(converted, face_path):
    from lcmla import Engine
    from lcmla.attention.kv_copy import kv_copies
    from lcmla.kv_lora import read_kv_lora_metadata

    sd, paths = converted
    assert read_kv_lora_metadata(paths["kv_lora"])["reference_kv"] == "kv-copy"
    engine = Engine.load("tiny", adapter=paths["adapter"], kv_encoder_lora=paths["kv_lora"])
    assert engine.components.adapter_kind == "plus" and "faceid" not in engine.adapters
    unet = engine.pipe.unet
    # every trained tensor landed where the authors' model used it
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            block = name[: -len(".attn2.processor")]
            assert torch.equal(proc.to_k_ip[0].weight, sd[f"encoder_unet.{block}.extract_kv2.to_k.weight"])
            assert torch.equal(proc.to_v_ip[0].weight, sd[f"encoder_unet.{block}.extract_kv2.to_v.weight"])
    copies = kv_copies(unet)
    block = "up_blocks.0.attentions.1.transformer_blocks.1"
    copy = copies[block + ".attn1.processor"]
    assert torch.equal(copy.to_v.lora_B.weight, sd[f"encoder_unet.{block}.extract_kv1.to_v.lora_layer.up.weight"])
    q = unet.get_submodule(block + ".attn2.to_q")
    assert torch.equal(q.lora_A["kv_encoder"].weight, sd[f"encoder_unet.{block}.attn2.to_q.lora_layer.down.weight"])
    assert q.scaling["kv_encoder"] == 1.0  # network_alpha unset in their LoRA: scale 1
    resampler = unet.encoder_hid_proj.image_projection_layers[0]
    assert torch.equal(resampler.latents, sd["image_proj_model.latents"])
    # and it runs: the KV path with the Plus-Face adapter, deterministic, identity-dependent
    s = _settings(lookahead__kv=True)
    a = engine.generate(s, [face_path])
    assert np.array_equal(_px(a.images[0]), _px(engine.generate(s, [face_path]).images[0]))
    no_id = engine.generate(s.replace(identity__ip_adapter_scale=0.0), [face_path])
    assert not np.array_equal(_px(a.images[0]), _px(no_id.images[0]))


def test_convert_refuses_other_files(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"unet.conv_in.weight": torch.zeros(1)}, bad)
    with pytest.raises(LcmlaError, match="not an LCM-Lookahead checkpoint"):
        convert_lookahead_checkpoint(bad, tmp_path / "out", unet_config=TINY_UNET)
    full = _authors_checkpoint()
    for k in [k for k in full if ".extract_kv1." in k and "lora_layer" in k]:
        del full[k]
    torch.save(full, tmp_path / "full.pt")
    with pytest.raises(LcmlaError, match="kvcopy_lora_rank"):
        convert_lookahead_checkpoint(tmp_path / "full.pt", tmp_path / "out", unet_config=TINY_UNET)


def test_cli_convert(tmp_path):
    from lcmla.cli import main

    torch.save(_authors_checkpoint(1), tmp_path / "model_ckpt.pt")
    assert main(["convert-lookahead", str(tmp_path / "model_ckpt.pt"), "--out", str(tmp_path / "o"),
                 "--unet-config", "tiny"]) == 0
    assert (tmp_path / "o" / "kv_encoder_lora.safetensors").is_file()
    assert main(["convert-lookahead", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
