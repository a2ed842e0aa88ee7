"""The real configurations of SDXL's parts, as published in their repositories' ``config.json``.

Used where the full-size architecture is needed without its weights: the numbering of the UNet's
attention processors (IP-Adapter checkpoints index them), and random-weight builds of the full-size
models for speed and memory measurements. No torch at import.

Sources: ``stabilityai/stable-diffusion-xl-base-1.0`` (``unet``, ``vae``, ``text_encoder``,
``text_encoder_2``), ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (vision tower) and
``madebyollin/taesdxl``.
"""

from __future__ import annotations

from typing import Any

SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],  # diffusers' historical name: heads per block
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled text + 6 time ids × 256
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

SDXL_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SDXL_TEXT_ENCODER: dict[str, Any] = {  # CLIP ViT-L/14 text tower
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

SDXL_TEXT_ENCODER_2: dict[str, Any] = {  # OpenCLIP ViT-bigG/14 text tower (with projection)
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

CLIP_H_VISION: dict[str, Any] = {  # laion ViT-H/14 vision tower; projection_dim 1024
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "image_size": 224,
    "intermediate_size": 5120,
    "num_attention_heads": 16,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "projection_dim": 1024,
}

CLIP_H_TEXT: dict[str, Any] = {  # laion ViT-H/14 text tower (the image-encoder repo holds a whole CLIPModel)
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "vocab_size": 49408,
}

TAESDXL: dict[str, Any] = {
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "upsampling_scaling_factor": 2,
}


def attention_processor_names(unet_config: dict[str, Any] | None = None) -> list[str]:
    """The UNet's attention processor names in diffusers' ``attn_processors`` order (down blocks,
    up blocks, then the mid block; attn1 then attn2 per transformer block): the order IP-Adapter
    checkpoints number them in. Built on the meta device, so no memory is spent."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config or SDXL_UNET)
    return list(unet.attn_processors)
