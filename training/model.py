"""What the trainer trains: the identity adapter, the KV-encoder LoRA and optionally the FaceID LoRA.

Everything else is frozen. The parts, each switchable (``--train``):

- ``proj``: the identity projection (h94's ``image_proj``; diffusers' ``encoder_hid_proj``);
- ``ip-kv``: the identity keys/values ``to_k_ip``/``to_v_ip`` of every cross-attention layer;
  (``adapter`` = ``proj`` + ``ip-kv``; lr 1e-5 in the authors' command)
- ``kv-lora``: the KV encoder (SPEC §4) in the authors' design: a rank-4 LoRA on attn1/attn2
  q/k/v/out, active on the encoder pass only, and a rank-4 LoRA on a copy of each attn1's
  ``to_k``/``to_v`` producing the reference K/V (lr 5e-6);
- ``faceid-lora``: FaceID-Plus-v2's companion LoRA.

Exports, in the formats the engine loads: ``ip-adapter-faceid-plusv2_sdxl.safetensors`` in h94's
key layout (``image_proj.*``, ``ip_adapter.<n>.to_{k,v}_ip.weight``; read by diffusers'
``load_ip_adapter`` and by ``lcmla.loading``), its ``_lora.safetensors`` sibling when the FaceID
LoRA was trained, and ``kv_encoder_lora.safetensors`` (``lcmla.kv_lora`` version 2).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PARTS = ("proj", "ip-kv", "kv-lora", "faceid-lora")
ALIASES = {"adapter": ("proj", "ip-kv")}
ADAPTER_FILE = "ip-adapter-faceid-plusv2_sdxl.safetensors"
FACEID_LORA_FILE = "ip-adapter-faceid-plusv2_sdxl_lora.safetensors"
KV_LORA_FILE = "kv_encoder_lora.safetensors"


def parse_parts(text: str) -> tuple[str, ...]:
    """"adapter,kv-lora" → ("proj", "ip-kv", "kv-lora"); unknown names raise ValueError naming them."""
    out: list[str] = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        for part in ALIASES.get(name, (name,)):
            if part not in PARTS:
                raise ValueError(f"unknown trainable part {name!r}; choose from {', '.join((*ALIASES, *PARTS))}")
            if part not in out:
                out.append(part)
    if not out:
        raise ValueError(f"--train names nothing to train; choose from {', '.join((*ALIASES, *PARTS))}")
    return tuple(out)


@dataclass
class Trainables:
    """The trainable parameters by part, and the optimizer's parameter groups."""

    parts: dict[str, list[tuple[str, torch.nn.Parameter]]] = field(default_factory=dict)

    def named(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [item for part in self.parts.values() for item in part]

    def params(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self.named()]

    def groups(self, lr_adapter: float, lr_lora: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: the adapter at ``lr_adapter``, the LoRAs at ``lr_lora``."""
        adapter = [p for part in ("proj", "ip-kv") for _, p in self.parts.get(part, [])]
        lora = [p for part in ("kv-lora", "faceid-lora") for _, p in self.parts.get(part, [])]
        return [g for g in ({"params": adapter, "lr": lr_adapter, "name": "adapter"},
                            {"params": lora, "lr": lr_lora, "name": "lora"}) if g["params"]]


def setup_trainables(pipe, parts: tuple[str, ...], kv_rank: int = 4) -> Trainables:
    """Freeze the pipeline, add the KV-encoder LoRA when asked, and mark the chosen parts trainable
    (in float32: the frozen base may be half precision)."""
    from lcmla.attention.kv_copy import kv_copies
    from lcmla.attention.processors import IdentityAttnProcessor
    from lcmla.kv_lora import ADAPTER_NAME, add_kv_encoder_lora

    unet = pipe.unet
    for module in (unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    if "kv-lora" in parts and ADAPTER_NAME not in getattr(unet, "peft_config", {}):
        add_kv_encoder_lora(unet, rank=kv_rank, design="kv-copy")
    out = Trainables()
    if "proj" in parts:
        proj = unet.encoder_hid_proj
        out.parts["proj"] = [(f"encoder_hid_proj.{n}", p) for n, p in proj.named_parameters()]
    if "ip-kv" in parts:
        items = []
        for name, proc in unet.attn_processors.items():
            if isinstance(proc, IdentityAttnProcessor):
                for sub in ("to_k_ip", "to_v_ip"):
                    for n, p in getattr(proc, sub).named_parameters():
                        items.append((f"{name}.{sub}.{n}", p))
        out.parts["ip-kv"] = items
    if "kv-lora" in parts:
        items = [(n, p) for n, p in unet.named_parameters() if f".{ADAPTER_NAME}." in n]
        for name, copy in kv_copies(unet).items():
            items += [(f"{name}.kv_copy.{n}", p) for n, p in copy.named_parameters()]
        out.parts["kv-lora"] = items
    if "faceid-lora" in parts:
        if "faceid" not in getattr(unet, "peft_config", {}):
            raise ValueError("--train faceid-lora: the loaded adapter has no FaceID LoRA")
        out.parts["faceid-lora"] = [(n, p) for n, p in unet.named_parameters() if ".faceid." in n]
    for _, p in out.named():
        p.data = p.data.float()
        p.requires_grad_(True)
    return out


# ---- export -----------------------------------------------------------------------------------

_H94_LAYER = [  # diffusers' IPAdapterFaceIDPlusImageProjection layer keys → h94's perceiver keys
    (r"^layers\.(\d+)\.ln0\.", r"perceiver_resampler.layers.\1.0.norm1."),
    (r"^layers\.(\d+)\.ln1\.", r"perceiver_resampler.layers.\1.0.norm2."),
    (r"^layers\.(\d+)\.attn\.to_q\.", r"perceiver_resampler.layers.\1.0.to_q."),
    (r"^layers\.(\d+)\.attn\.to_out\.0\.", r"perceiver_resampler.layers.\1.0.to_out."),
    (r"^layers\.(\d+)\.ff\.0\.", r"perceiver_resampler.layers.\1.1.0."),
    (r"^layers\.(\d+)\.ff\.1\.net\.0\.proj\.", r"perceiver_resampler.layers.\1.1.1."),
    (r"^layers\.(\d+)\.ff\.1\.net\.2\.", r"perceiver_resampler.layers.\1.1.3."),
    (r"^proj\.net\.0\.proj\.", "proj.0."),
    (r"^proj\.net\.2\.", "proj.2."),
    (r"^(proj_in|proj_out|norm_out)\.", r"perceiver_resampler.\1."),
]


def faceid_plus_to_h94(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of diffusers' FaceID-Plus key conversion (``_convert_ip_adapter_image_proj_to_
    diffusers``): a loaded ``IPAdapterFaceIDPlusImageProjection`` state dict → h94's ``image_proj``
    keys (the perceiver's separate to_k/to_v joined back into to_kv)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := re.match(r"^layers\.(\d+)\.attn\.to_k\.weight$", key):
            out[f"perceiver_resampler.layers.{m[1]}.0.to_kv.weight"] = torch.cat(
                [value, state[f"layers.{m[1]}.attn.to_v.weight"]])
            continue
        if re.match(r"^layers\.\d+\.attn\.to_v\.weight$", key):
            continue
        for pattern, repl in _H94_LAYER:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value  # norm.* keeps its name
    return out


def adapter_state_dict(unet) -> dict[str, torch.Tensor]:
    """The identity adapter in h94's layout, flat with ``image_proj.``/``ip_adapter.`` prefixes."""
    from lcmla.attention.processors import IdentityAttnProcessor

    proj = unet.encoder_hid_proj.image_projection_layers[0]
    out = {f"image_proj.{k}": v for k, v in faceid_plus_to_h94(proj.state_dict()).items()}
    # h94 numbers the UNet's own attention processors (the projection's resampler has some too)
    names = [n for n in unet.attn_processors if not n.startswith("encoder_hid_proj")]
    procs = unet.attn_processors
    for i, name in enumerate(names):
        proc = procs[name]
        if isinstance(proc, IdentityAttnProcessor):
            out[f"ip_adapter.{i}.to_k_ip.weight"] = proc.to_k_ip[0].weight
            out[f"ip_adapter.{i}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def faceid_lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The FaceID LoRA in diffusers' peft layout (``unet.<module>.lora_A/B.weight``)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name="faceid")
    return {f"unet.{k}": v.detach().float().contiguous().cpu() for k, v in state.items()}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def export_weights(pipe, parts: tuple[str, ...], folder: str | Path, training: dict | None = None) -> dict[str, Path]:
    """Write the trained parts in the formats the engine loads (see the module docstring)."""
    import json

    from lcmla.kv_lora import save_kv_encoder_lora

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    meta = {"format": "pt", "lcmla_training": json.dumps(training or {})}
    if {"proj", "ip-kv", "faceid-lora"} & set(parts):
        out["adapter"] = folder / ADAPTER_FILE
        _atomic_save(adapter_state_dict(pipe.unet), out["adapter"], meta)
    if "faceid-lora" in parts:
        out["faceid_lora"] = folder / FACEID_LORA_FILE
        _atomic_save(faceid_lora_state_dict(pipe.unet), out["faceid_lora"], meta)
    if "kv-lora" in parts:
        out["kv_lora"] = save_kv_encoder_lora(pipe.unet, folder / KV_LORA_FILE, training=training)
    return out
