"""The LCM-Lookahead authors' checkpoint → lcmla's adapter and KV-encoder LoRA (tiny, offline)."""

from __future__ import annotations

import re

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


def _authors_checkpoint(seed: int = 0, copy_rank: int = RANK) -> dict[str, torch.Tensor]:
    """A tiny state dict laid out like the authors' ``IPAdapterPlusXL(encoder_unet, ...)`` saves it:
    per transformer block the encoder's base attention weights and LoRA (attn1/attn2 q/k/v/out,
    ``lora_layer.down/up``; none in the last block, which their ``get_lora_injection_modules``
    leaves out), the KV copy with LoRA (``extract_kv1``, every block), the adapter K/V
    (``extract_kv2``), and — because ``KVCopy`` registers its source attention as a submodule — the
    same attn1/attn2 tensors again under ``extract_kv{1,2}.source_attention_block.*``; then the Plus
    resampler (``image_proj_model``), CLIP and other base weights."""
    from diffusers import UNet2DConditionModel

    from lcmla.kv_lora import last_transformer_block

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=0.3: torch.randn(*shape, generator=g) * s
    unet = UNet2DConditionModel(**TINY_UNET)
    cross = TINY_UNET["cross_attention_dim"]
    last = last_transformer_block(unet)
    sd: dict[str, torch.Tensor] = {"encoder_unet.conv_in.weight": rnd(32, 4, 3, 3), "image_encoder.vision_model.x": rnd(2)}
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            continue
        block = name[: -len(".attn1.processor")]
        attn1 = unet.get_submodule(block + ".attn1")
        c = attn1.to_q.in_features
        for attn, kv_in, copy in (("attn1", c, "extract_kv1"), ("attn2", cross, "extract_kv2")):
            own: dict[str, torch.Tensor] = {}  # the attention's state dict, also the KV copy's source block's
            for proj, (i, o) in (("to_q", (c, c)), ("to_k", (kv_in, c)), ("to_v", (kv_in, c)), ("to_out.0", (c, c))):
                own[f"{proj}.weight"] = rnd(o, i)
                if proj == "to_out.0":
                    own[f"{proj}.bias"] = rnd(o)
                if block != last:
                    own[f"{proj}.lora_layer.down.weight"] = rnd(RANK, i)
                    own[f"{proj}.lora_layer.up.weight"] = rnd(o, RANK)
            for k, v in own.items():
                sd[f"encoder_unet.{block}.{attn}.{k}"] = v
                sd[f"encoder_unet.{block}.{copy}.source_attention_block.{k}"] = v
        for proj in ("to_k", "to_v"):
            sd[f"encoder_unet.{block}.extract_kv1.{proj}.weight"] = getattr(attn1, proj).weight.detach().clone()
            sd[f"encoder_unet.{block}.extract_kv1.{proj}.lora_layer.down.weight"] = rnd(copy_rank, c)
            sd[f"encoder_unet.{block}.extract_kv1.{proj}.lora_layer.up.weight"] = rnd(c, copy_rank)
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
    source = {k for k in sd if ".source_attention_block." in k}
    assert any("lora_layer" in k for k in source) and any(".extract_kv2.source" in k for k in source)
    base = {k for k in sd if re.search(r"\.(attn[12]|extract_kv1)\.(to_[qkv]|to_out\.0)\.(weight|bias)$", k)}
    assert set(parts["dropped"]) == source | base | {k for k in sd if k.startswith(("encoder_unet.conv_in", "image_encoder."))}
    key = "unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0.lora_B.weight"
    assert parts["kv_lora"][key] is sd["encoder_unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0.lora_layer.up.weight"]
    last = "up_blocks.1.attentions.2.transformer_blocks.0"  # the tiny UNet's last block: KV copy, no encoder LoRA
    assert f"kv_copy.{last}.attn1.to_v.lora_A.weight" in parts["kv_lora"]
    assert not any(k.startswith(f"unet.{last}.") for k in parts["kv_lora"])
    n_blocks = sum(n.endswith("attn1.processor") for n in names)
    assert len(parts["kv_lora"]) == n_blocks * (16 + 4) - 16 and len(parts["ip_adapter"]) == 2 * n_blocks


@pytest.fixture(scope="module")
def plus_engine(converted):
    """The tiny engine with the converted Plus-Face adapter and KV-encoder LoRA."""
    from lcmla import Engine

    _sd, paths = converted
    return Engine.load("tiny", adapter=paths["adapter"], kv_encoder_lora=paths["kv_lora"])


def test_convert_round_trips_into_the_engine(converted, plus_engine, face_path):
    from lcmla.attention.kv_copy import kv_copies
    from lcmla.kv_lora import read_kv_lora_metadata

    sd, paths = converted
    assert read_kv_lora_metadata(paths["kv_lora"])["reference_kv"] == "kv-copy"
    engine = plus_engine
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
    # the last block: its KV copy's LoRA, and no encoder LoRA (the checkpoint has none)
    last = "up_blocks.1.attentions.2.transformer_blocks.0"
    assert torch.equal(copies[last + ".attn1.processor"].to_k.lora_A.weight,
                       sd[f"encoder_unet.{last}.extract_kv1.to_k.lora_layer.down.weight"])
    for proj in ("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0"):
        assert "kv_encoder" not in getattr(unet.get_submodule(f"{last}.{proj}"), "lora_A", {}), proj
    resampler = unet.encoder_hid_proj.image_projection_layers[0]
    assert torch.equal(resampler.latents, sd["image_proj_model.latents"])
    # and it runs: the KV path with the Plus-Face adapter, deterministic, identity-dependent
    s = _settings(lookahead__kv=True)
    a = engine.generate(s, [face_path])
    assert np.array_equal(_px(a.images[0]), _px(engine.generate(s, [face_path]).images[0]))
    no_id = engine.generate(s.replace(identity__ip_adapter_scale=0.0), [face_path])
    assert not np.array_equal(_px(a.images[0]), _px(no_id.images[0]))
    # the Plus adapter's CLIP input is framed as the KV reference is: "face" for every photo or none
    import dataclasses

    identity = engine.analyze_faces([face_path])
    mixed = dataclasses.replace(identity, images=identity.images * 2, boxes=(identity.boxes[0], None),
                                crops=identity.crops * 2)
    clip = {(name, f): engine._identity_conditions(i, f)["id"][0]
            for name, i in (("one", identity), ("mixed", mixed)) for f in ("photo", "face")}
    assert not torch.allclose(clip[("one", "face")], clip[("one", "photo")], atol=1e-4)
    assert torch.equal(clip[("mixed", "face")], clip[("mixed", "photo")])


def test_attention_tab_offers_the_plus_face_adapters_16_tokens(plus_engine, face_path):
    """The Attention tab reads the token count from the captured maps: the Plus-Face adapter's
    resampler makes 16 identity tokens (FaceID-Plus-v2: 4), and every one of them can be shown."""
    from lcmla.ui import attention
    from lcmla.ui.common import Context, ui_defaults

    assert plus_engine._identity_tokens() == TOKENS
    ctx = Context(plus_engine)
    ui = {**ui_defaults(plus_engine.preset), "app.faces": [str(face_path)], "output.width": 64, "output.height": 64,
          "prompt": "a pencil drawing of a face", "app.capture_mode": "am2"}
    state, _block, _step, token, *_ = attention.run_attention(ctx, ui, lambda *a, **k: None)
    assert token["choices"] == [str(t) for t in range(TOKENS)] and token["value"] == "0"
    assert {m.shape[1] for m in state["store"].maps.values()} == {TOKENS}
    last = attention.render_maps(state, "all", 0, str(TOKENS - 1), False)
    assert last[1] is not None and "No maps" not in last[3]
    first = attention.render_maps(state, "all", 0, "0", False)
    assert not np.array_equal(np.asarray(first[1]), np.asarray(last[1]))  # another token, another map
    beyond = attention.render_maps(state, "all", 0, str(TOKENS), False)
    assert beyond[1] is None and "No maps for that choice" in beyond[3]


def test_reads_zip_checkpoints_memory_mapped_and_legacy_ones_whole(tmp_path, monkeypatch):
    """The real checkpoint holds all of SDXL and CLIP: torch.save's zip format is memory-mapped
    (weights_only either way); the legacy format, which cannot be, still reads."""
    from lcmla.convert import read_authors_checkpoint

    sd = _authors_checkpoint()
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or load(*a, **kw))
    for name in ("zip.pt", "legacy.pt"):
        got = read_authors_checkpoint(tmp_path / name)
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd)
    assert [(kw["weights_only"], kw["mmap"]) for kw in calls] == [(True, True), (True, False)]
    # tensors saved as one (attn1 and the KV copy's source block) still share storage after loading
    key = "encoder_unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    alias = key.replace(".attn1.", ".extract_kv1.source_attention_block.")
    assert got[key].untyped_storage().data_ptr() == got[alias].untyped_storage().data_ptr()


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
    # a photo passed by mistake is named as one, without torch's "weights_only=False" advice
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "me.png")
    with pytest.raises(LcmlaError, match="'.*me.png' is a PNG image, not a checkpoint") as err:
        convert_lookahead_checkpoint(tmp_path / "me.png", tmp_path / "out", unet_config=TINY_UNET)
    assert "weights_only" not in str(err.value)
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02junk")
    with pytest.raises(LcmlaError, match="not a plain tensor checkpoint \\(refused by the safe loader") as err:
        convert_lookahead_checkpoint(tmp_path / "junk.pt", tmp_path / "out", unet_config=TINY_UNET)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    # text with a checkpoint's name (torch's own errors for it are "101", "pop from empty list"), an empty file, a folder
    (tmp_path / "notes.pt").write_text("some text here\n")
    with pytest.raises(LcmlaError, match=r"refused by the safe loader: it is neither a torch.save zip archive nor a pickle\)"):
        convert_lookahead_checkpoint(tmp_path / "notes.pt", tmp_path / "out", unet_config=TINY_UNET)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(LcmlaError, match=r"refused by the safe loader: the file is empty\)"):
        convert_lookahead_checkpoint(tmp_path / "empty.pt", tmp_path / "out", unet_config=TINY_UNET)
    with pytest.raises(LcmlaError, match="is a folder, not a file; pass the authors' model_ckpt.pt"):
        convert_lookahead_checkpoint(tmp_path, tmp_path / "out", unet_config=TINY_UNET)


def test_convert_reads_a_wrapped_state_dict_and_keeps_the_copies_rank(tmp_path):
    """A checkpoint saved as {"state_dict": ...} converts like the bare one; KV copies of another
    rank than the encoder LoRA's are written with that rank in the metadata (and load at it)."""
    from lcmla.kv_lora import read_kv_lora_metadata

    sd = _authors_checkpoint(copy_rank=2)
    torch.save({"state_dict": sd, "step": 100}, tmp_path / "wrapped.pt")
    paths = convert_lookahead_checkpoint(tmp_path / "wrapped.pt", tmp_path / "out", unet_config=TINY_UNET)
    meta = read_kv_lora_metadata(paths["kv_lora"])
    assert (meta["rank"], meta["kv_copy_rank"]) == (str(RANK), "2")


def test_split_refuses_checkpoints_that_do_not_fit(tmp_path):
    names = attention_processor_names(TINY_UNET)
    sd = _authors_checkpoint()
    no_resampler = {k: v for k, v in sd.items() if not k.startswith("image_proj_model.")}
    torch.save(no_resampler, tmp_path / "half.pt")
    with pytest.raises(LcmlaError, match="not an LCM-Lookahead checkpoint"):
        convert_lookahead_checkpoint(tmp_path / "half.pt", tmp_path / "out", unet_config=TINY_UNET)
    key = next(k for k in sd if k.endswith(".extract_kv2.to_k.weight"))
    block = key[len("encoder_unet."):].split(".extract_kv2.")[0]
    other = {**sd, key.replace(block, "up_blocks.7.attentions.0.transformer_blocks.0"): sd[key]}
    with pytest.raises(LcmlaError, match=r"layer up_blocks\.7\.attentions\.0\.transformer_blocks\.0 is not in this UNet"):
        split_authors_state(other, names)
    untrained = {k: v for k, v in sd.items() if "lora_layer" not in k and ".extract_kv1." not in k}
    with pytest.raises(LcmlaError, match="no adapter K/V .* or no encoder LoRA; nothing to convert"):
        split_authors_state(untrained, names)


def test_cli_convert(tmp_path):
    from lcmla.cli import main

    torch.save(_authors_checkpoint(1), tmp_path / "model_ckpt.pt")
    assert main(["convert-lookahead", str(tmp_path / "model_ckpt.pt"), "--out", str(tmp_path / "o"),
                 "--unet-config", "tiny"]) == 0
    assert (tmp_path / "o" / "kv_encoder_lora.safetensors").is_file()
    # --unet-config tiny numbers the adapter's layers as the tiny UNet does (SDXL's numbering differs)
    from safetensors.torch import load_file

    direct = convert_lookahead_checkpoint(tmp_path / "model_ckpt.pt", tmp_path / "direct", unet_config=TINY_UNET)
    for role, path in direct.items():
        mine, theirs = load_file(str(tmp_path / "o" / path.name)), load_file(str(path))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), role
    assert main(["convert-lookahead", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2


def test_cli_convert_keeps_an_earlier_conversion_and_refuses_a_bad_out(tmp_path, capsys):
    """A second conversion into the same --out is refused (before the checkpoint is read) unless
    --overwrite; an --out that is a file, or under one, is a message, not a traceback."""
    import hashlib

    from lcmla.cli import main

    ckpt = tmp_path / "model_ckpt.pt"
    torch.save(_authors_checkpoint(1), ckpt)
    args = ["convert-lookahead", str(ckpt), "--unet-config", "tiny", "--out"]
    assert main([*args, str(tmp_path / "o")]) == 0
    files = sorted((tmp_path / "o").iterdir())
    digest = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in files}
    torch.save(_authors_checkpoint(2), ckpt)
    capsys.readouterr()
    assert main([*args, str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "already holds ip-adapter-plus-face_lcm-lookahead.safetensors and kv_encoder_lora.safetensors" in err
    assert "--overwrite" in err
    assert {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in files} == digest
    assert main([*args, str(tmp_path / "o"), "--overwrite"]) == 0
    assert {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in files} != digest

    (tmp_path / "file").write_text("x")
    for out, says in ((tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "sub", "cannot be created")):
        capsys.readouterr()
        assert main([*args, str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
