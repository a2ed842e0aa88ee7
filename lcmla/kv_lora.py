"""The KV-encoder LoRA of LCM-Lookahead (SPEC §4): format, creation, saving and loading.

The KV encoder is the denoiser's own UNet with a small LoRA (rank 4 on q/k/v/out of the UNet's
attention layers) that is switched on only for the encoder pass over the reference face.

Checkpoint format ("lcmla KV-encoder LoRA", version 1) — one safetensors file:
- tensors in diffusers' peft LoRA layout, so ``pipe.load_lora_weights`` reads it as it is:
  ``unet.<module path>.lora_A.weight`` (rank × in) and ``unet.<module path>.lora_B.weight``
  (out × rank), e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``;
- ``lora_alpha`` = rank (a LoRA scale of 1 applies B·A unscaled);
- safetensors metadata: ``format = "lcmla-kv-encoder-lora"``, ``version = "1"``, ``rank``,
  ``target_modules`` (the regex below), and free-form ``training`` (JSON) written by the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import LcmlaError

ADAPTER_NAME = "kv_encoder"
FORMAT = "lcmla-kv-encoder-lora"
VERSION = "1"
# q/k/v/out of the UNet's own attention layers; not the FaceID resampler, not to_k_ip/to_v_ip
TARGET_MODULES = r".*(down_blocks|mid_block|up_blocks).*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"


def add_kv_encoder_lora(unet, rank: int = 4, adapter_name: str = ADAPTER_NAME):
    """Add a fresh KV-encoder LoRA adapter (peft) to ``unet``; B starts at zero (no effect)."""
    from peft import LoraConfig

    import warnings

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES)
    with warnings.catch_warnings():  # several adapters on one UNet is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(config, adapter_name=adapter_name)
    return config


def kv_lora_state_dict(unet, adapter_name: str = ADAPTER_NAME) -> dict[str, Any]:
    """The adapter's tensors in the checkpoint layout (``unet.`` prefix, adapter name removed)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {f"unet.{k}": v.detach().contiguous().cpu() for k, v in state.items()}


def save_kv_encoder_lora(unet, path: str | Path, adapter_name: str = ADAPTER_NAME, training: dict | None = None) -> Path:
    """Write the adapter as a KV-encoder LoRA checkpoint (see the module docstring)."""
    from safetensors.torch import save_file

    state = kv_lora_state_dict(unet, adapter_name)
    if not state:
        raise LcmlaError(f"the UNet has no adapter {adapter_name!r} to save")
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    meta = {"format": FORMAT, "version": VERSION, "rank": str(rank), "target_modules": TARGET_MODULES,
            "training": json.dumps(training or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


def read_kv_lora_metadata(path: str | Path) -> dict[str, str]:
    """The checkpoint's metadata; a clear error for files that are not KV-encoder LoRAs."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LcmlaError(f"KV-encoder LoRA {str(path)!r} does not exist; pass the .safetensors file the trainer wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # not a safetensors file
        raise LcmlaError(f"{str(path)!r} is not a safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise LcmlaError(f"{str(path)!r} is not an lcmla KV-encoder LoRA (metadata format={meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise LcmlaError(f"{str(path)!r} has KV-encoder LoRA version {meta.get('version')!r}; this lcmla reads {VERSION}")
    return meta


def load_kv_encoder_lora(pipe, path: str | Path, adapter_name: str = ADAPTER_NAME) -> dict[str, str]:
    """Load a checkpoint onto ``pipe``'s UNet through diffusers' ``load_lora_weights`` as a named
    adapter; the engine keeps it at scale 0 except on the KV encoder pass."""
    meta = read_kv_lora_metadata(path)
    path = Path(path)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
    return meta
