"""Convert the LCM-Lookahead authors' trained checkpoint into files lcmla loads.

The authors' trainer (``OrLichter/lcm-lookahead``, ``train_encoder.py``; loaded by ``infer.py`` with
``IPAdapterPlusXL(...).load_state_dict(torch.load("model_ckpt.pt"))``) saves one state dict:

- ``encoder_unet.<block>.attn{1,2}.{to_q,to_k,to_v,to_out.0}.lora_layer.{down,up}.weight`` — the
  encoder's rank-4 LoRA (``<block>`` is a diffusers path such as
  ``down_blocks.1.attentions.0.transformer_blocks.0``; network_alpha unset, i.e. scale 1);
- ``encoder_unet.<block>.extract_kv1.{to_k,to_v}.lora_layer.{down,up}.weight`` — the KV copy's LoRA
  (the copy's own ``.weight`` is a frozen copy of attn1's base weights);
- ``encoder_unet.<block>.extract_kv2.{to_k,to_v}.weight`` — the identity adapter's K/V projections
  (IP-Adapter Plus-Face's ``to_k_ip``/``to_v_ip``, computed by the encoder from the adapter tokens);
- ``image_proj_model.*`` — IP-Adapter Plus's resampler (16 tokens over CLIP ViT-H hidden states);
- ``image_encoder.*`` (the CLIP ViT-H vision tower) and the encoder's base weights (SDXL's).

:func:`convert_lookahead_checkpoint` writes
``ip-adapter-plus-face_lcm-lookahead.safetensors`` (IP-Adapter Plus layout, ``image_proj.*`` and
``ip_adapter.<n>.to_{k,v}_ip.weight`` numbered like the UNet's attention processors, as diffusers'
``load_ip_adapter`` reads it) and ``kv_encoder_lora.safetensors`` (``lcmla.kv_lora`` version 2, the
"kv-copy" design). The base weights and the CLIP tower are not copied: they are SDXL base's and
laion's ViT-H/14, which lcmla loads from their own repositories. Use them with
``Engine.load("sdxl-base", adapter=..., kv_encoder_lora=...)`` and the ``lookahead-released`` method.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import LcmlaError

ADAPTER_FILE = "ip-adapter-plus-face_lcm-lookahead.safetensors"
KV_LORA_FILE = "kv_encoder_lora.safetensors"

_ENC = "encoder_unet."
_LORA = re.compile(r"^encoder_unet\.(?P<block>.+)\.(?P<attn>attn[12])\.(?P<proj>to_q|to_k|to_v|to_out\.0)"
                   r"\.lora_layer\.(?P<side>down|up)\.weight$")
_COPY_LORA = re.compile(r"^encoder_unet\.(?P<block>.+)\.extract_kv1\.(?P<proj>to_k|to_v)\.lora_layer\.(?P<side>down|up)\.weight$")
_COPY_BASE = re.compile(r"^encoder_unet\.(?P<block>.+)\.extract_kv1\.(?P<proj>to_k|to_v)\.weight$")
_ADAPTER_KV = re.compile(r"^encoder_unet\.(?P<block>.+)\.extract_kv2\.(?P<proj>to_k|to_v)\.weight$")
_SIDE = {"down": "lora_A", "up": "lora_B"}


def read_authors_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's tensors, read with ``weights_only=True`` (no code from the file runs).

    The file holds the whole SDXL encoder and the CLIP tower beside the few trained tensors; in
    ``torch.save``'s zip format (its default since torch 1.6) it is memory-mapped (``mmap=True``), so
    only the tensors that are converted are read from disk. The legacy format is read whole.
    """
    import zipfile

    import torch

    path = Path(path)
    if path.is_dir():
        raise LcmlaError(f"{str(path)!r} is a folder, not a file; pass the authors' model_ckpt.pt")
    if not path.is_file():
        raise LcmlaError(f"{str(path)!r} does not exist; pass the authors' model_ckpt.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - any failure of the safe loader (a garbled pickle raises struct.error)
        from .loading import file_kind, unreadable_reason

        kind = file_kind(path)
        if kind is not None:
            raise LcmlaError(f"{str(path)!r} is {kind}, not a checkpoint; pass the authors' model_ckpt.pt") from None
        raise LcmlaError(f"{str(path)!r} is not a plain tensor checkpoint (refused by the safe loader: "
                         f"{unreadable_reason(exc, path)}); pass the authors' model_ckpt.pt") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not any(k.startswith(_ENC) for k in state) \
            or not any(k.startswith("image_proj_model.") for k in state):
        raise LcmlaError(f"{str(path)!r} is not an LCM-Lookahead checkpoint (no encoder_unet.* and image_proj_model.* "
                         "tensors); pass the model_ckpt.pt that their train_encoder.py saves")
    return state


def split_authors_state(state: dict[str, Any], processor_names: list[str]) -> dict[str, dict[str, Any]]:
    """Map the authors' tensors to lcmla's layouts: {"image_proj", "ip_adapter", "kv_lora", "dropped"}.

    ``processor_names``: the target UNet's attention processors in ``attn_processors`` order (the
    numbering of ``ip_adapter`` keys). Pure: no files, no modules.
    """
    ids = {name[: -len(".processor")]: i for i, name in enumerate(processor_names)}
    out: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}, "kv_lora": {}, "dropped": {}}
    copy_base: set[str] = set()
    for key, value in state.items():
        if key.startswith("image_proj_model."):
            out["image_proj"][key[len("image_proj_model."):]] = value
        elif m := _LORA.match(key):
            out["kv_lora"][f"unet.{m['block']}.{m['attn']}.{m['proj']}.{_SIDE[m['side']]}.weight"] = value
        elif m := _COPY_LORA.match(key):
            out["kv_lora"][f"kv_copy.{m['block']}.attn1.{m['proj']}.{_SIDE[m['side']]}.weight"] = value
        elif m := _ADAPTER_KV.match(key):
            attn2 = f"{m['block']}.attn2"
            if attn2 not in ids:
                raise LcmlaError(f"the checkpoint's layer {m['block']} is not in this UNet; is it an SDXL checkpoint?")
            out["ip_adapter"][f"{ids[attn2]}.{m['proj']}_ip.weight"] = value
        else:
            if m := _COPY_BASE.match(key):
                copy_base.add(m["block"])
            out["dropped"][key] = value
    copied = {k.split(".attn1.")[0][len("kv_copy."):] for k in out["kv_lora"] if k.startswith("kv_copy.")}
    if copy_base - copied:
        raise LcmlaError(
            "the checkpoint trains the KV copy's full weights (their kvcopy_lora_rank = 0), which lcmla does not "
            f"support (e.g. {sorted(copy_base - copied)[0]}); use a checkpoint trained with kvcopy_lora_rank > 0")
    if not out["ip_adapter"] or not out["kv_lora"]:
        raise LcmlaError("the checkpoint has no adapter K/V (extract_kv2) or no encoder LoRA; nothing to convert")
    return out


def convert_lookahead_checkpoint(src: str | Path, out_dir: str | Path, unet_config: dict | None = None,
                                 overwrite: bool = False) -> dict[str, Path]:
    """Write the adapter and the KV-encoder LoRA converted from the authors' ``src`` into
    ``out_dir`` (see the module docstring); returns {"adapter": path, "kv_lora": path}.

    Files of those names already in ``out_dir`` are refused, before anything is read, unless
    ``overwrite``; an output folder that cannot be made or written is refused first too."""
    from safetensors.torch import save_file

    from .errors import check_output_dir
    from .kv_lora import FORMAT, TARGET_MODULES
    from .sdxl_configs import attention_processor_names

    out = Path(out_dir).expanduser()
    check_output_dir(out, "--out")
    paths = {"adapter": out / ADAPTER_FILE, "kv_lora": out / KV_LORA_FILE}
    taken = [p.name for p in paths.values() if p.exists()]
    if taken and not overwrite:
        raise LcmlaError(f"--out {out} already holds {' and '.join(taken)} (an earlier conversion?); pass another "
                         "--out, or --overwrite to replace them")
    parts = split_authors_state(read_authors_checkpoint(src), attention_processor_names(unet_config))
    out.mkdir(parents=True, exist_ok=True)
    adapter = {f"image_proj.{k}": v.contiguous() for k, v in parts["image_proj"].items()}
    adapter.update({f"ip_adapter.{k}": v.contiguous() for k, v in parts["ip_adapter"].items()})
    lora = {k: v.contiguous() for k, v in parts["kv_lora"].items()}
    rank = next(v.shape[0] for k, v in lora.items() if k.startswith("unet.") and k.endswith("lora_A.weight"))
    copy_ranks = [v.shape[0] for k, v in lora.items() if k.startswith("kv_copy.") and k.endswith("lora_A.weight")]
    meta = {"format": FORMAT, "version": "2", "rank": str(rank), "target_modules": TARGET_MODULES,
            "reference_kv": "kv-copy", "kv_copy_rank": str(max(copy_ranks)),
            "training": json.dumps({"converted_from": Path(src).name, "source": "OrLichter/lcm-lookahead"})}
    for path, tensors, metadata in ((paths["adapter"], adapter, {"format": "pt"}), (paths["kv_lora"], lora, meta)):
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    return paths
