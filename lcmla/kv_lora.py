"""The KV-encoder LoRA of LCM-Lookahead (SPEC §4): format, creation, saving and loading.

The KV encoder is the denoiser's own UNet with a small LoRA (rank 4 on q/k/v/out of the UNet's
attention layers, attn1 and attn2) that is switched on only for the encoder pass over the
reference. Two designs of the reference K/V exist:

- ``"encoder"`` — the reference K/V are the encoder's own self-attention K/V (lcmla's first design);
- ``"kv-copy"`` — the authors' released design: a separate copy of each attn1's ``to_k``/``to_v``
  with its own rank-4 LoRA produces them (``lcmla.attention.kv_copy``). Without trained weights
  both give the same K/V; with trained weights they do not. The trainer trains this one.

Checkpoint format ("lcmla KV-encoder LoRA", version 2) — one safetensors file:
- the encoder LoRA in diffusers' peft layout, read by ``pipe.load_lora_weights`` as it is (in the
  "kv-copy" design the last transformer block is left out: nothing it computes reaches a recorded
  K/V, and the authors leave it out too):
  ``unet.<module path>.lora_A.weight`` (rank × in) and ``unet.<module path>.lora_B.weight`` (out × rank),
  e.g. ``unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``;
- for the "kv-copy" design, the KV-copy LoRA of each attn1:
  ``kv_copy.<attn1 path>.to_k.lora_A.weight`` / ``.lora_B.weight`` and the same for ``to_v``;
- ``lora_alpha`` = rank (a LoRA scale of 1 applies B·A unscaled);
- safetensors metadata: ``format = "lcmla-kv-encoder-lora"``, ``version = "2"``, ``rank``,
  ``target_modules`` (the regex below), ``reference_kv`` ("encoder" | "kv-copy"), ``kv_copy_rank``
  and free-form ``training`` (JSON) written by the trainer.
Version 1 files (encoder LoRA only, no ``reference_kv``) are read as the "encoder" design.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import LcmlaError, refuse_folder

ADAPTER_NAME = "kv_encoder"
FORMAT = "lcmla-kv-encoder-lora"
VERSION = "2"
READABLE_VERSIONS = ("1", "2")
DESIGNS = ("encoder", "kv-copy")
KV_COPY_PREFIX = "kv_copy."
# q/k/v/out of the UNet's own attention layers; not the FaceID resampler, not to_k_ip/to_v_ip
TARGET_MODULES = r".*(down_blocks|mid_block|up_blocks).*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"


def last_transformer_block(unet) -> str:
    """The path of the UNet's last transformer block in execution order (the last one of the up
    path): in the "kv-copy" design nothing it computes reaches a recorded reference K/V."""
    names = [n for n in unet.attn_processors if n.startswith("up_blocks") and n.endswith(".attn1.processor")]
    return names[-1][: -len(".attn1.processor")]


def encoder_lora_targets(unet, design: str) -> list[str]:
    """The module names the encoder LoRA trains: q/k/v/out of every attn1/attn2 of the UNet's
    blocks, less — in the "kv-copy" design — those of the last transformer block, which cannot
    affect any recorded K/V (the authors leave that block out too)."""
    import re

    pattern = re.compile(TARGET_MODULES)
    skip = last_transformer_block(unet) + "." if design == "kv-copy" else None
    return [n for n, _ in unet.named_modules() if pattern.match(n) and not (skip and n.startswith(skip))]


def add_kv_encoder_lora(unet, rank: int = 4, adapter_name: str = ADAPTER_NAME, design: str = "kv-copy"):
    """Add a fresh KV-encoder LoRA adapter (peft) to ``unet`` — B starts at zero (no effect) — and,
    for the "kv-copy" design, a fresh KV-copy LoRA of the same rank on every self-attention
    processor (the authors' design: both rank 4)."""
    import warnings

    from peft import LoraConfig

    if design not in DESIGNS:
        raise LcmlaError(f"KV-encoder design must be one of {', '.join(DESIGNS)} (got {design!r})")
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                        target_modules=encoder_lora_targets(unet, design))
    with warnings.catch_warnings():  # several adapters on one UNet is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(config, adapter_name=adapter_name)
    if design == "kv-copy":
        from .attention.kv_copy import add_kv_copy

        add_kv_copy(unet, rank)
    return config


def kv_lora_state_dict(unet, adapter_name: str = ADAPTER_NAME) -> dict[str, Any]:
    """The checkpoint's tensors: the encoder LoRA (``unet.`` prefix, adapter name removed) and the
    KV-copy LoRAs (``kv_copy.`` prefix) when present."""
    from peft.utils import get_peft_model_state_dict

    from .attention.kv_copy import kv_copies

    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    out = {f"unet.{k}": v.detach().contiguous().cpu() for k, v in state.items()}
    for name, copy in kv_copies(unet).items():
        path = name[: -len(".processor")]
        for k, v in copy.state_dict().items():
            out[f"{KV_COPY_PREFIX}{path}.{k}"] = v.detach().contiguous().cpu()
    return out


def save_kv_encoder_lora(unet, path: str | Path, adapter_name: str = ADAPTER_NAME, training: dict | None = None) -> Path:
    """Write the adapter (and the KV copies, if any) as a KV-encoder LoRA checkpoint, atomically."""
    import os

    from safetensors.torch import save_file

    state = kv_lora_state_dict(unet, adapter_name)
    if not any(k.startswith("unet.") for k in state):
        raise LcmlaError(f"the UNet has no adapter {adapter_name!r} to save")
    rank = next(v.shape[0] for k, v in state.items() if k.startswith("unet.") and k.endswith("lora_A.weight"))
    copy_ranks = {v.shape[0] for k, v in state.items() if k.startswith(KV_COPY_PREFIX) and k.endswith("lora_A.weight")}
    meta = {"format": FORMAT, "version": VERSION, "rank": str(rank), "target_modules": TARGET_MODULES,
            "reference_kv": "kv-copy" if copy_ranks else "encoder",
            "kv_copy_rank": str(max(copy_ranks)) if copy_ranks else "0",
            "training": json.dumps(training or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_kv_lora_metadata(path: str | Path) -> dict[str, str]:
    """The checkpoint's metadata (``reference_kv`` filled in for version 1); a clear error for files
    that are not KV-encoder LoRAs."""
    from safetensors import safe_open

    path = Path(path)
    refuse_folder(path, "the KV-encoder LoRA", (".safetensors",))
    if not path.is_file():
        raise LcmlaError(f"KV-encoder LoRA {str(path)!r} does not exist; pass the kv_encoder_lora.safetensors that "
                         "`python -m training train` wrote into its --output-dir, or that `python -m lcmla "
                         "convert-lookahead` wrote from the authors' checkpoint")
    authors = (" (an LCM-Lookahead authors' checkpoint? convert it with `python -m lcmla convert-lookahead`)"
               if path.suffix in (".pt", ".bin") else "")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
    except Exception as exc:  # not a safetensors file: the authors' checkpoints are torch pickles
        raise LcmlaError(f"{str(path)!r} is not a safetensors file ({exc}){authors}") from None
    if meta.get("format") != FORMAT:
        adapter = any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys)
        hint = authors or (" (it is an IP-Adapter checkpoint: pass it with --adapter)" if adapter else "")
        raise LcmlaError(f"{str(path)!r} is not an lcmla KV-encoder LoRA (metadata format={meta.get('format')!r}){hint}")
    if meta.get("version") not in READABLE_VERSIONS:
        raise LcmlaError(f"{str(path)!r} has KV-encoder LoRA version {meta.get('version')!r}; this lcmla reads "
                         f"{', '.join(READABLE_VERSIONS)}")
    meta.setdefault("reference_kv", "encoder")
    return meta


def load_kv_encoder_lora(pipe, path: str | Path, adapter_name: str = ADAPTER_NAME) -> dict[str, str]:
    """Load a checkpoint onto ``pipe``'s UNet: the encoder LoRA through diffusers'
    ``load_lora_weights`` as a named adapter (the engine keeps it off except on the KV encoder
    pass), and the KV-copy LoRAs onto the self-attention processors."""
    from safetensors.torch import load_file

    meta = read_kv_lora_metadata(path)
    state = load_file(str(path))
    lora = {k: v for k, v in state.items() if k.startswith("unet.")}
    copies = {k[len(KV_COPY_PREFIX):]: v for k, v in state.items() if k.startswith(KV_COPY_PREFIX)}
    from .loading import _quiet_known_messages

    # a second peft adapter on the UNet is the point, and the text encoders have no keys in it
    # (diffusers says "No LoRA keys associated to CLIPTextModel…" once per encoder)
    with _quiet_known_messages():
        pipe.load_lora_weights(lora, adapter_name=adapter_name)
    if copies:
        from .attention.kv_copy import add_kv_copy

        unet = pipe.unet
        made = add_kv_copy(unet, int(meta.get("kv_copy_rank") or 4))
        for name, copy in made.items():
            path_ = name[: -len(".processor")]
            sub = {k[len(path_) + 1:]: v for k, v in copies.items() if k.startswith(path_ + ".")}
            if not sub:  # a layer the checkpoint does not train keeps a zero update
                continue
            ref = next(copy.parameters())
            copy.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in sub.items()}, strict=True)
        unknown = {k.rsplit(".to_", 1)[0] for k in copies} - {n[: -len(".processor")] for n in made}
        if unknown:
            raise LcmlaError(f"{str(path)!r} has KV-copy weights for layers this UNet lacks, e.g. {sorted(unknown)[0]}")
        for copy in made.values():
            copy.requires_grad_(False).eval()
    return meta
