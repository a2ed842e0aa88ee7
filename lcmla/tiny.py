"""The offline ``tiny`` preset: seeded random weights written in the real repositories' layouts.

``ensure_tiny_weights`` builds, once per machine, a folder laid out like the hub cache of every
repository the tiny preset needs (one folder per repo id, ``org/name``), with files in exactly the
formats and key layouts of the real files:

- ``lcmla/tiny-sdxl/``: a ``StableDiffusionXLPipeline.save_pretrained`` folder (safetensors, no
  variant) of a tiny SDXL-architecture pipeline: a UNet with SDXL's block structure and
  ``text_time`` added conditioning, a scale-8 ``AutoencoderKL``, two CLIP text encoders with two
  byte-level BPE tokenizers (vocab.json + merges.txt learned here from an embedded corpus, no hub)
  and SDXL's DDIM noise schedule.
- ``h94/IP-Adapter-FaceID/ip-adapter-faceid-plusv2_sdxl.bin``: ``torch.save`` of
  ``{"image_proj": ..., "ip_adapter": ...}`` with the original (pre-diffusers) key names of h94's
  FaceID-Plus-v2 SDXL checkpoint, including its in-file LoRA (``{id}.to_q_lora.down.weight`` ...).
- ``h94/IP-Adapter-FaceID/ip-adapter-faceid-plusv2_sdxl_lora.safetensors``: the same FaceID LoRA
  in the kohya layout (``lora_unet_*.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``).
- ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K/``: a tiny ``CLIPModel`` (both towers, shared
  ``projection_dim`` at the top level of its config only), laid out like laion's repo.
- ``latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors``: a kohya-layout LoRA over the
  modules the real LCM-LoRA trains (attention, feed-forward, projections, resnets, samplers).
- ``madebyollin/taesdxl/``: a tiny ``AutoencoderTiny``.

The weights are random (seeded), so the tiny preset's images are noise-like patterns; its purpose is
to run every real code path (the same loaders, converters and processors as the real weights)
offline and fast. Everything is deterministic: two builds give byte-identical weight files.

torch / diffusers / transformers are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .presets import (
    CLIP_VISION_REPO,
    FACEID_LORA,
    FACEID_REPO,
    FACEID_WEIGHTS,
    LCM_LORA_REPO,
    PRESETS,
    TAESDXL_REPO,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "TINY_VERSION",
    "TINY_BASE_REPO",
    "LCM_LORA_FILE",
    "TINY_UNET",
    "TINY_VAE",
    "TINY_TEXT_ENCODER",
    "TINY_TEXT_ENCODER_2",
    "TINY_VISION",
    "TINY_CLIP_TEXT",
    "TINY_CLIP_PROJECTION",
    "TINY_TAESD",
    "TINY_FACEID_LORA_RANK",
    "TINY_LCM_LORA_RANK",
    "Architecture",
    "TINY",
    "architecture",
    "default_tiny_root",
    "ensure_random_weights",
    "ensure_tiny_weights",
    "random_weights_paths",
    "tiny_paths",
]

#: Bump whenever anything below changes what is written: old folders are then rebuilt.
TINY_VERSION = 2
MARKER = "TINY_VERSION"

TINY_BASE_REPO = PRESETS["tiny"].base_repo  # "lcmla/tiny-sdxl"
LCM_LORA_FILE = "pytorch_lora_weights.safetensors"

_SEED = 20240607  # all seeds below are offsets from this one

# ---- the tiny configs -------------------------------------------------------------------------
# Text encoders: hidden sizes 32 + 32 concatenate to the UNet's cross_attention_dim (64), exactly as
# SDXL's 768 + 1280 = 2048; text_encoder_2's projection (32) is the pooled "text_embeds" that,
# with 6 time ids x addition_time_embed_dim (8), gives projection_class_embeddings_input_dim 80
# (SDXL: 1280 + 6 x 256 = 2816).
_TEXT_HIDDEN = 32
_TEXT2_HIDDEN = 32
_TEXT2_PROJ = 32
_CROSS_DIM = _TEXT_HIDDEN + _TEXT2_HIDDEN  # 64
_TIME_EMBED_DIM = 8

TINY_UNET: dict[str, Any] = {
    "sample_size": 32,  # 256 px / 8
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": _CROSS_DIM,
    "transformer_layers_per_block": [1, 1, 2],  # SDXL: [1, 2, 10]
    # diffusers' historical name: this is the number of heads per block (SDXL: [5, 10, 20]);
    # 64 / 1 and 128 / 2 give SDXL's head dimension of 64 in the attention blocks.
    "attention_head_dim": [1, 1, 2],
    "use_linear_projection": True,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": _TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": _TEXT2_PROJ + 6 * _TIME_EMBED_DIM,  # 80
}

TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 32, 32],  # 4 blocks: 3 downsamplings -> scale 8, as SDXL's VAE
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 256,
    "scaling_factor": 0.13025,  # SDXL's
    "force_upcast": True,
}

TINY_TEXT_ENCODER: dict[str, Any] = {
    "hidden_size": _TEXT_HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 2,  # the pipeline reads hidden_states[-2]
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": _TEXT_HIDDEN,
    "layer_norm_eps": 1e-05,
}

TINY_TEXT_ENCODER_2: dict[str, Any] = {
    "hidden_size": _TEXT2_HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": _TEXT2_PROJ,
    "layer_norm_eps": 1e-05,
}

# The image encoder repo holds a whole CLIPModel (text and vision towers), as laion's does: its
# config.json is a CLIPConfig whose shared ``projection_dim`` sits at the top level only (the
# nested vision_config keeps the default 512, the pitfall of transformers issue #25622), so that the
# tiny preset exercises the same loading path as the real ViT-H/14 (lcmla.loading.load_image_encoder).
TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,  # the FaceID-Plus path reads hidden_states[-2]
    "num_attention_heads": 4,
    "image_size": 224,
    "patch_size": 32,  # 7 x 7 patches + class token = 50 tokens
    "num_channels": 3,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
}
TINY_CLIP_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
}
TINY_CLIP_PROJECTION = 32  # laion ViT-H/14: 1024

TINY_TAESD: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [16, 16, 16, 16],
    "decoder_block_out_channels": [16, 16, 16, 16],
    "act_fn": "relu",
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": [1, 1, 1, 1],  # real taesdxl: [1, 3, 3, 3]; 3 stride-2 stages -> scale 8
    "num_decoder_blocks": [1, 1, 1, 1],  # real taesdxl: [3, 3, 3, 1]
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "force_upcast": False,
    "scaling_factor": 1.0,
}

# SDXL's noise schedule, as a DDIM scheduler.
_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# The identity projection (h94's ProjPlusModel): 512-d insightface embedding -> 4 tokens.
_ID_DIM = 512
_ID_TOKENS = 4
_RESAMPLER_DEPTH = 4
_DIM_HEAD = 64
_FF_MULT = 4

TINY_FACEID_LORA_RANK = 4  # the real FaceID LoRA has rank 128
TINY_LCM_LORA_RANK = 4  # the real LCM-LoRA SDXL has rank 64


@dataclass(frozen=True)
class Architecture:
    """The sizes of every model a random-weights build writes: ``TINY`` (the tiny preset) or
    ``FULL`` (SDXL's real configurations, ``lcmla.sdxl_configs``: for speed and memory figures)."""

    name: str
    base_repo: str  # the pipeline folder's <org>/<name>
    version: int  # bump when what is written changes: old folders are rebuilt
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    vision: dict[str, Any]
    clip_text: dict[str, Any]
    clip_projection: int
    taesd: dict[str, Any]
    faceid_lora_rank: int
    lcm_lora_rank: int
    save_dtype: str = "float32"  # the full build is written in float16 (half the disk and load time)
    vocab_size: int | None = None  # None: the learned BPE vocabulary's size; else the embedding rows


TINY = Architecture(
    name="tiny", base_repo=TINY_BASE_REPO, version=TINY_VERSION, unet=TINY_UNET, vae=TINY_VAE,
    text_encoder=TINY_TEXT_ENCODER, text_encoder_2=TINY_TEXT_ENCODER_2, vision=TINY_VISION, clip_text=TINY_CLIP_TEXT,
    clip_projection=TINY_CLIP_PROJECTION, taesd=TINY_TAESD, faceid_lora_rank=TINY_FACEID_LORA_RANK,
    lcm_lora_rank=TINY_LCM_LORA_RANK,
)


def _full_architecture() -> Architecture:
    from . import sdxl_configs as c

    vision = {k: v for k, v in c.CLIP_H_VISION.items() if k != "projection_dim"}
    return Architecture(
        name="full", base_repo="lcmla/random-sdxl", version=1, unet=c.SDXL_UNET, vae=c.SDXL_VAE,
        text_encoder={k: v for k, v in c.SDXL_TEXT_ENCODER.items() if k != "vocab_size"},
        text_encoder_2={k: v for k, v in c.SDXL_TEXT_ENCODER_2.items() if k != "vocab_size"},
        vision=vision, clip_text=c.CLIP_H_TEXT, clip_projection=c.CLIP_H_VISION["projection_dim"],
        taesd=c.TAESDXL, faceid_lora_rank=128, lcm_lora_rank=64, save_dtype="float16",
        vocab_size=c.SDXL_TEXT_ENCODER["vocab_size"],
    )


def architecture(name: str) -> Architecture:
    """``"tiny"`` or ``"full"``."""
    if name == "tiny":
        return TINY
    if name == "full":
        return _full_architecture()
    raise ValueError(f"random-weights architecture must be 'tiny' or 'full' (got {name!r})")

_BPE_MERGES = 400  # at most; learning stops earlier when no pair repeats

# A small English corpus (written for this file) to learn the BPE merges from: prompt-like text.
_CORPUS = """
a photo of a face. a portrait photo of a person with brown hair, soft light, sharp focus.
a close up photo of a woman smiling in a garden, natural light, shallow depth of field.
a photo of a man wearing glasses in a city street at night, neon lights, rain on the road.
an oil painting of a face in the style of an old master, warm colors, dark background.
a pencil drawing of a person, detailed shading, white paper, black and grey lines.
a comic book illustration of a hero with a red cape, bold outlines, bright colors.
a watercolor painting of a girl reading a book near the window, gentle morning light.
graffiti on a brick wall showing the face of an old man with a long white beard.
a wanted poster with a portrait of a cowboy, sepia tones, torn paper edges.
a photo of a face in a forest, green leaves, sunlight through the trees.
a photo of a face on the beach at sunset, orange sky, waves in the background.
a professional headshot of a young woman, studio lighting, grey backdrop, high quality.
an astronaut portrait inside a space station, floating, earth in the window.
a chef in a kitchen holding a plate of pasta, steam rising, warm tones.
a knight in shining armor standing in a castle hall, torches on the walls.
a painting of a face made of flowers, roses and tulips, spring colors.
a black and white photo of an old woman with wrinkles and kind eyes.
a cinematic still of a detective in a trench coat, film grain, moody shadows.
a person riding a bicycle through the park in autumn, falling leaves, golden hour.
a child laughing in the snow wearing a red scarf and a wool hat.
best quality, high quality, detailed skin texture, realistic, photorealistic, eight k.
monochrome, lowres, bad anatomy, worst quality, low quality, blurry, deformed.
the quick brown fox jumps over the lazy dog while the cat watches from the fence.
"""


# ---- paths ------------------------------------------------------------------------------------


def default_tiny_root(arch: "Architecture | None" = None) -> Path:
    """``$LCMLA_CACHE/tiny-v{TINY_VERSION}``, else ``~/.cache/lcmla/tiny-v{TINY_VERSION}`` (the full
    architecture: ``random-full-v{version}`` beside it)."""
    base = os.environ.get("LCMLA_CACHE")
    cache = Path(base).expanduser() if base else Path.home() / ".cache" / "lcmla"
    if arch is None or arch.name == "tiny":
        return cache / f"tiny-v{TINY_VERSION}"
    return cache / f"random-{arch.name}-v{arch.version}"


def tiny_paths(root: str | Path | None = None) -> dict[str, Path]:
    """role -> local repo folder of the tiny preset, building the weights if needed.

    The roles are those of ``PRESETS["tiny"].required_files(None)`` ("base", "faceid",
    "image_encoder") plus "taesd" and "lcm_lora" (the tiny folder holds an LCM-LoRA too, so that the
    LCM-Lookahead path can run offline; ``load_components`` only loads it when asked or when the
    preset has one).
    """
    return random_weights_paths("tiny", root)


def random_weights_paths(arch: str = "tiny", root: str | Path | None = None) -> dict[str, Path]:
    """role -> local repo folder of a random-weights build (see :func:`tiny_paths`); "base" is the
    architecture's own pipeline folder."""
    spec = architecture(arch)
    folder = ensure_random_weights(arch, root)
    out = {role: folder / repo for role, (repo, _files) in PRESETS["tiny"].required_files(None).items()}
    out["base"] = folder / spec.base_repo
    out["taesd"] = folder / TAESDXL_REPO
    out["lcm_lora"] = folder / LCM_LORA_REPO
    return out


def _marker_ok(folder: Path, version: int = TINY_VERSION) -> bool:
    try:
        return (folder / MARKER).read_text().strip() == str(version)
    except OSError:
        return False


def ensure_tiny_weights(root: str | Path | None = None) -> Path:
    """The folder holding the tiny preset's weights, built (atomically) on first use.

    ``root`` is the folder itself (default: :func:`default_tiny_root`). If it already holds a
    marker for this ``TINY_VERSION`` it is returned as is. Otherwise everything is built in a
    temporary sibling folder and moved into place with ``os.replace``; a stale folder (older
    version, no marker) is replaced. Concurrent builders are safe: the loser discards its copy.
    """
    return ensure_random_weights("tiny", root)


def ensure_random_weights(arch: str = "tiny", root: str | Path | None = None) -> Path:
    """:func:`ensure_tiny_weights` for any architecture: ``"full"`` writes SDXL's real sizes with
    random weights (about 9 GB in float16, built once per machine; never a real model)."""
    spec = architecture(arch)
    folder = Path(root).expanduser() if root is not None else default_tiny_root(spec)
    if _marker_ok(folder, spec.version):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.build-", dir=folder.parent))
    try:
        _build_all(tmp, spec)
        (tmp / MARKER).write_text(f"{spec.version}\n")
        if folder.exists() and not _marker_ok(folder, spec.version):
            stale = Path(tempfile.mkdtemp(prefix=f".{folder.name}.stale-", dir=folder.parent))
            os.replace(folder, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _marker_ok(folder, spec.version):  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ---- the builders -----------------------------------------------------------------------------


def _build_all(out: Path, arch: Architecture = TINY) -> None:
    """Write every repository of ``arch`` under ``out``."""
    import torch
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bars for a one-second build
    try:
        with torch.random.fork_rng(devices=[]):  # keep the caller's RNG untouched
            vocab, merges = _learn_bpe(_CORPUS, _BPE_MERGES)
            unet = _build_sdxl_pipeline(out / arch.base_repo, vocab, merges, arch)
            faceid = out / FACEID_REPO
            faceid.mkdir(parents=True)
            _write_faceid(unet, faceid, arch)
            del unet  # the full UNet is 10 GB in float32: gone before the CLIP model is built
            _write_clip(out / CLIP_VISION_REPO, len(vocab), arch)
            _write_lcm_lora(out / LCM_LORA_REPO, arch)
            _write_taesd(out / TAESDXL_REPO, arch)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _seeded(offset: int) -> None:
    import torch

    torch.manual_seed(_SEED + offset)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable unicode character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _learn_bpe(corpus: str, n_merges: int) -> tuple[list[str], list[tuple[str, str]]]:
    """CLIP-style byte-level BPE learned from ``corpus``: (vocab tokens in id order, merges).

    The vocabulary is CLIP's: the 256 byte characters, the same with the end-of-word suffix
    ``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (the highest id, as
    in CLIP, so that "argmax of the ids" finds the end token). Ties break lexicographically, so the
    result is deterministic. Every string tokenizes: any byte is in the base alphabet.
    """
    b2u = _bytes_to_unicode()
    base = list(b2u.values())
    words = Counter(
        "".join(b2u[b] for b in w.encode("utf-8"))
        for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", corpus.lower())
    )
    seqs: dict[tuple[str, ...], int] = {}
    for word, freq in words.items():
        syms = tuple(word[:-1]) + (word[-1] + "</w>",)
        seqs[syms] = seqs.get(syms, 0) + freq
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for syms, freq in seqs.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < 2:
            break
        merges.append(best)
        joined = best[0] + best[1]
        new: dict[tuple[str, ...], int] = {}
        for syms, freq in seqs.items():
            out: list[str] = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            key = tuple(out)
            new[key] = new.get(key, 0) + freq
        seqs = new
    vocab = base + [t + "</w>" for t in base]
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return vocab, merges


def _write_tokenizer(folder: Path, vocab: list[str], merges: list[tuple[str, str]], pad: str) -> None:
    """The four files of an SDXL tokenizer folder (vocab.json, merges.txt, two json configs)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad,
        "unk_token": "<|endoftext|>",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _build_sdxl_pipeline(folder: Path, vocab: list[str], merges: list[tuple[str, str]],
                         arch: Architecture = TINY) -> "Any":
    """Write the SDXL pipeline folder; return its UNet (for the adapters' shapes)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    eos_id = len(vocab) - 1
    bos_id = len(vocab) - 2
    tok_dir = folder.parent / (folder.name + ".tokenizers")
    _write_tokenizer(tok_dir / "tokenizer", vocab, merges, pad="<|endoftext|>")
    _write_tokenizer(tok_dir / "tokenizer_2", vocab, merges, pad="!")  # SDXL's tokenizer_2 pads with "!"

    _seeded(1)
    unet = UNet2DConditionModel(**arch.unet)
    _seeded(2)
    vae = AutoencoderKL(**arch.vae)
    ids = {"vocab_size": arch.vocab_size or len(vocab), "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": 1}
    _seeded(3)
    text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder, **ids))
    _seeded(4)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_encoder_2, **ids))
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir / "tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir / "tokenizer_2")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=DDIMScheduler(**_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    with torch.no_grad():
        if arch.save_dtype != "float32":
            pipe.to(dtype=getattr(torch, arch.save_dtype))
        pipe.save_pretrained(folder, safe_serialization=True)
    # transformers 5 saves tokenizers as tokenizer.json; write the real repos' four files instead.
    for sub in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(folder / sub)
        os.replace(tok_dir / sub, folder / sub)
    tok_dir.rmdir()
    return unet


def _uniform(gen: "torch.Generator", shape: tuple[int, ...], bound: float) -> "torch.Tensor":
    import torch

    return (torch.rand(shape, generator=gen) * 2.0 - 1.0) * bound


def _linear(gen: "torch.Generator", out_f: int, in_f: int) -> "torch.Tensor":
    """A weight like nn.Linear's default init (uniform, bound 1/sqrt(in))."""
    return _uniform(gen, (out_f, in_f), in_f**-0.5)


def _layernorm(gen: "torch.Generator", dim: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """LayerNorm weight and bias near (1, 0), slightly perturbed so that they are not trivial."""
    return 1.0 + _uniform(gen, (dim,), 0.05), _uniform(gen, (dim,), 0.05)


def _faceid_image_proj(gen: "torch.Generator", cross_dim: int, clip_hidden: int) -> dict[str, Any]:
    """``image_proj`` of h94's ProjPlusModel, original key names (diffusers converts them)."""
    heads = cross_dim // _DIM_HEAD
    inner = heads * _DIM_HEAD
    ff_inner = cross_dim * _FF_MULT
    sd: dict[str, Any] = {}
    sd["proj.0.weight"] = _linear(gen, _ID_DIM * 2, _ID_DIM)
    sd["proj.0.bias"] = _uniform(gen, (_ID_DIM * 2,), _ID_DIM**-0.5)
    sd["proj.2.weight"] = _linear(gen, cross_dim * _ID_TOKENS, _ID_DIM * 2)
    sd["proj.2.bias"] = _uniform(gen, (cross_dim * _ID_TOKENS,), (_ID_DIM * 2) ** -0.5)
    sd["norm.weight"], sd["norm.bias"] = _layernorm(gen, cross_dim)
    p = "perceiver_resampler."
    sd[p + "proj_in.weight"] = _linear(gen, cross_dim, clip_hidden)
    sd[p + "proj_in.bias"] = _uniform(gen, (cross_dim,), clip_hidden**-0.5)
    sd[p + "proj_out.weight"] = _linear(gen, cross_dim, cross_dim)
    sd[p + "proj_out.bias"] = _uniform(gen, (cross_dim,), cross_dim**-0.5)
    sd[p + "norm_out.weight"], sd[p + "norm_out.bias"] = _layernorm(gen, cross_dim)
    for i in range(_RESAMPLER_DEPTH):
        a = f"{p}layers.{i}.0."
        sd[a + "norm1.weight"], sd[a + "norm1.bias"] = _layernorm(gen, cross_dim)
        sd[a + "norm2.weight"], sd[a + "norm2.bias"] = _layernorm(gen, cross_dim)
        sd[a + "to_q.weight"] = _linear(gen, inner, cross_dim)
        sd[a + "to_kv.weight"] = _linear(gen, inner * 2, cross_dim)
        sd[a + "to_out.weight"] = _linear(gen, cross_dim, inner)
        f = f"{p}layers.{i}.1."
        sd[f + "0.weight"], sd[f + "0.bias"] = _layernorm(gen, cross_dim)
        sd[f + "1.weight"] = _linear(gen, ff_inner, cross_dim)
        sd[f + "3.weight"] = _linear(gen, cross_dim, ff_inner)
    return sd


def _processor_hidden_size(unet: Any, name: str) -> int:
    """The hidden size of the attention layer behind processor ``name`` (diffusers' own rule)."""
    channels = list(unet.config.block_out_channels)
    if name.startswith("mid_block"):
        return channels[-1]
    if name.startswith("up_blocks"):
        return list(reversed(channels))[int(name[len("up_blocks.")])]
    return channels[int(name[len("down_blocks.")])]


def _write_faceid(unet: Any, folder: Path, arch: Architecture = TINY) -> None:
    """The FaceID-Plus-v2 .bin (original layout, LoRA included) and its kohya LoRA twin."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(_SEED + 10)
    cross_dim = int(unet.config.cross_attention_dim)
    image_proj = _faceid_image_proj(gen, cross_dim, int(arch.vision["hidden_size"]))
    rank = arch.faceid_lora_rank
    ip_adapter: dict[str, Any] = {}
    kohya: dict[str, Any] = {}
    # h94's checkpoint is torch.nn.ModuleList(unet.attn_processors.values()).state_dict(): one
    # index per processor (attn1 = LoRAAttnProcessor, attn2 = LoRAIPAttnProcessor), in that order.
    for key_id, name in enumerate(unet.attn_processors.keys()):
        hidden = _processor_hidden_size(unet, name)
        is_cross = name.endswith("attn2.processor")
        kv_in = cross_dim if is_cross else hidden
        module = "lora_unet_" + name[: -len(".processor")].replace(".", "_")
        for proj, (in_f, out_f), kohya_name in (
            ("to_q_lora", (hidden, hidden), "to_q"),
            ("to_k_lora", (kv_in, hidden), "to_k"),
            ("to_v_lora", (kv_in, hidden), "to_v"),
            ("to_out_lora", (hidden, hidden), "to_out_0"),
        ):
            down = _uniform(gen, (rank, in_f), in_f**-0.5)
            up = torch.randn((out_f, rank), generator=gen) * 0.1
            ip_adapter[f"{key_id}.{proj}.down.weight"] = down
            ip_adapter[f"{key_id}.{proj}.up.weight"] = up
            kohya[f"{module}_{kohya_name}.alpha"] = torch.tensor(float(rank))
            kohya[f"{module}_{kohya_name}.lora_down.weight"] = down.clone()
            kohya[f"{module}_{kohya_name}.lora_up.weight"] = up.clone()
        if is_cross:
            ip_adapter[f"{key_id}.to_k_ip.weight"] = _linear(gen, hidden, cross_dim)
            ip_adapter[f"{key_id}.to_v_ip.weight"] = _linear(gen, hidden, cross_dim)
    torch.save({"image_proj": image_proj, "ip_adapter": ip_adapter}, folder / FACEID_WEIGHTS)
    save_file(dict(sorted(kohya.items())), str(folder / FACEID_LORA))


def _lcm_target(name: str) -> bool:
    """The modules the real LCM-LoRA SDXL trains (train_lcm_distill_lora_sdxl's target list)."""
    leaf_patterns = (
        r"\.to_q$",
        r"\.to_k$",
        r"\.to_v$",
        r"\.to_out\.0$",
        r"\.proj_in$",
        r"\.proj_out$",
        r"\.ff\.net\.0\.proj$",
        r"\.ff\.net\.2$",
        r"\.resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)$",
        r"\.(down|up)samplers\.0\.conv$",
    )
    return name.startswith(("down_blocks.", "mid_block.", "up_blocks.")) and any(
        re.search(p, name) for p in leaf_patterns
    )


def _write_lcm_lora(folder: Path, arch: Architecture = TINY) -> None:
    """A kohya-layout LoRA (``lora_unet_*``) over the UNet's linear and conv layers (their names
    and shapes read off the architecture's UNet built on the meta device)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    with init_empty_weights():
        unet = UNet2DConditionModel(**arch.unet)
    gen = torch.Generator().manual_seed(_SEED + 20)
    rank = arch.lcm_lora_rank
    sd: dict[str, Any] = {}
    for name, module in unet.named_modules():
        if not _lcm_target(name):
            continue
        key = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear):
            down = _uniform(gen, (rank, module.in_features), module.in_features**-0.5)
            up = torch.randn((module.out_features, rank), generator=gen) * 0.05
        elif isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            fan_in = module.in_channels * kh * kw
            down = _uniform(gen, (rank, module.in_channels, kh, kw), fan_in**-0.5)
            up = torch.randn((module.out_channels, rank, 1, 1), generator=gen) * 0.05
        else:  # pragma: no cover - every target above is a Linear or a Conv2d
            continue
        sd[f"{key}.alpha"] = torch.tensor(float(rank))
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
    if arch.save_dtype != "float32":
        sd = {k: v.to(getattr(torch, arch.save_dtype)) for k, v in sd.items()}
    folder.mkdir(parents=True)
    save_file(dict(sorted(sd.items())), str(folder / LCM_LORA_FILE))


def _write_clip(folder: Path, vocab_size: int, arch: Architecture = TINY) -> None:
    """A CLIPModel (config.json + model.safetensors), laid out like laion's CLIP repos."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    text = {**arch.clip_text, "vocab_size": arch.vocab_size or vocab_size, "bos_token_id": vocab_size - 2,
            "eos_token_id": vocab_size - 1}
    config = CLIPConfig(text_config=text, vision_config=dict(arch.vision), projection_dim=arch.clip_projection)
    _seeded(30)
    model = CLIPModel(config)
    with torch.no_grad():
        if arch.save_dtype != "float32":
            model.to(dtype=getattr(torch, arch.save_dtype))
        model.save_pretrained(folder, safe_serialization=True)


def _write_taesd(folder: Path, arch: Architecture = TINY) -> None:
    """An AutoencoderTiny (config.json + diffusion_pytorch_model.safetensors)."""
    import torch
    from diffusers import AutoencoderTiny

    _seeded(40)
    model = AutoencoderTiny(**arch.taesd)
    with torch.no_grad():
        model.save_pretrained(folder, safe_serialization=True)
    # diffusers registers an alias ``block_out_channels`` that its own loader then rejects with a
    # warning ("passed to AutoencoderTiny, but are not expected"); the real taesdxl config has none.
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("block_out_channels", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
