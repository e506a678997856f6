"""diffusers/transformers config.json of each part, read from the tensors' shapes plus the family's data.

Every function takes the part's tensors in LDM names with the part's prefix stripped.
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import ModelError
from .families import TEXT_HEAD_WIDTH, Family, unet_heads
from .keys import UNetLayout
from .text import open_clip_layers

NORM_GROUPS = 32  # GroupNorm groups in every SD UNet and VAE


def _shape(tensors: dict[str, np.ndarray], name: str, what: str) -> tuple[int, ...]:
    if name not in tensors:
        raise ModelError(f"the {what} lacks the tensor {name!r}: the checkpoint is incomplete or not SD")
    return tuple(tensors[name].shape)


def _count(tensors: dict[str, np.ndarray], pattern: str) -> int:
    """How many distinct indices the first group of `pattern` takes among the names."""
    found = {m.group(1) for m in map(re.compile(pattern).match, tensors) if m}
    return len(found)


def unet_layout(tensors: dict[str, np.ndarray]) -> UNetLayout:
    """Resnets per level and the levels with attention, from the LDM UNet's block names."""
    blocks = _count(tensors, r"^input_blocks\.(\d+)\.")
    downsamplers = sorted(
        {int(m.group(1)) for m in map(re.compile(r"^input_blocks\.(\d+)\.0\.op\.").match, tensors) if m}
    )
    per = downsamplers[0] - 1 if downsamplers else blocks - 1
    if per < 1 or blocks % (per + 1) or len(downsamplers) != blocks // (per + 1) - 1:
        raise ModelError("the UNet's input blocks do not form whole levels: not an SD UNet layout")
    levels = blocks // (per + 1)
    down = tuple(f"input_blocks.{1 + i * (per + 1)}.1.proj_in.weight" in tensors for i in range(levels))
    up = tuple(f"output_blocks.{i * (per + 1)}.1.proj_in.weight" in tensors for i in range(levels))
    return UNetLayout(
        per,
        down,
        up,
        class_embedding="label_emb.weight" in tensors,
        added_embedding="label_emb.0.0.weight" in tensors,
    )


def unet_config(
    tensors: dict[str, np.ndarray], family: Family, layout: UNetLayout, pooled_dim: int | None = None
) -> dict:
    """UNet2DConditionModel's config: channels, levels and attention from the shapes, heads by the family's rule.

    SDXL (`pooled_dim`: text encoder 2's projection width) adds the "text_time" embedding and a transformer depth
    per level."""
    per, levels = layout.layers_per_block, len(layout.down_attention)
    conv_in = _shape(tensors, "input_blocks.0.0.weight", "UNet")
    channels = [
        _shape(tensors, f"input_blocks.{1 + i * (per + 1)}.0.out_layers.3.weight", "UNet")[0] for i in range(levels)
    ]
    attention = next((n for n in tensors if n.endswith(".transformer_blocks.0.attn2.to_k.weight")), None)
    if attention is None or "middle_block.1.proj_in.weight" not in tensors:
        raise ModelError("the UNet has no cross-attention: not an SD UNet")
    proj_in = _shape(tensors, "middle_block.1.proj_in.weight", "UNet")
    depth = _count(tensors, r"^middle_block\.1\.transformer_blocks\.(\d+)\.")
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": family.sample_size,
        "in_channels": conv_in[1],
        "out_channels": _shape(tensors, "out.2.weight", "UNet")[0],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
        "block_out_channels": channels,
        "layers_per_block": per,
        "transformer_layers_per_block": depth,
        "cross_attention_dim": tensors[attention].shape[1],
        "attention_head_dim": unet_heads(family, channels),
        "use_linear_projection": len(proj_in) == 2,
        "upcast_attention": family.upcast_attention,
        "norm_num_groups": NORM_GROUPS,
        "norm_eps": 1e-05,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_scale_factor": 1,
    }
    if channels[0] != conv_in[0]:
        raise ModelError("the UNet's first level does not keep conv_in's width: not an SD UNet")
    if family.only_cross_attention:  # x4-upscaling.yaml: disable_self_attentions on all but the lowest level
        config["only_cross_attention"] = [i < levels - 1 for i in range(levels)]  # published: [T, T, T, F]
    if layout.class_embedding:
        config["num_class_embeds"] = tensors["label_emb.weight"].shape[0]
    if layout.added_embedding:
        config.update(_sdxl_unet(tensors, family, layout, pooled_dim, depth))
    return config


def _sdxl_unet(
    tensors: dict[str, np.ndarray], family: Family, layout: UNetLayout, pooled_dim: int | None, mid_depth: int
) -> dict:
    """SDXL's added conditioning: label_emb.0.0 reads the pooled text (pooled_dim) then 6 size/crop ids (the
    refiner: 5, an aesthetic score for the target size), each embedded in addition_time_embed_dim features; and the
    transformer depth of each level (SDXL base: [1, 2, 10]; levels without attention take the mid block's)."""
    added = _shape(tensors, "label_emb.0.0.weight", "UNet")[1]
    ids = 5 if family.text == "sdxl_refiner" else 6
    if pooled_dim is None or added <= pooled_dim or (added - pooled_dim) % ids:
        raise ModelError(
            f"the UNet's added conditioning takes {added} features: not the pooled text ({pooled_dim}) plus {ids} "
            "embedded size/crop ids"
        )
    per = layout.layers_per_block
    depths = [
        _count(tensors, rf"^input_blocks\.{1 + i * (per + 1)}\.1\.transformer_blocks\.(\d+)\.") if a else mid_depth
        for i, a in enumerate(layout.down_attention)
    ]
    if depths[-1] != mid_depth:  # diffusers gives the mid block the last level's depth
        raise ModelError(f"the UNet's mid block has {mid_depth} transformer blocks, its lowest level {depths[-1]}")
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": (added - pooled_dim) // ids,
        "projection_class_embeddings_input_dim": added,
        "transformer_layers_per_block": depths if len(set(depths)) > 1 else mid_depth,
    }


def vae_layout(tensors: dict[str, np.ndarray]) -> tuple[int, int]:
    """(levels, resnets per encoder level) of an LDM VAE."""
    levels = _count(tensors, r"^encoder\.down\.(\d+)\.")
    per = _count(tensors, r"^encoder\.down\.0\.block\.(\d+)\.")
    if levels < 1 or per < 1:
        raise ModelError("the VAE has no encoder levels (encoder.down.*): not an SD VAE")
    return levels, per


def vae_config(tensors: dict[str, np.ndarray], family: Family) -> dict:
    """AutoencoderKL's config from an LDM VAE's shapes; scaling factor and image size from the family."""
    levels, per = vae_layout(tensors)
    channels = [_shape(tensors, f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0] for i in range(levels)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(tensors, "encoder.conv_in.weight", "VAE")[1],
        "out_channels": _shape(tensors, "decoder.conv_out.weight", "VAE")[0],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": channels,
        "latent_channels": _shape(tensors, "encoder.conv_out.weight", "VAE")[0] // 2,  # mean and log-variance
        "layers_per_block": per,
        "norm_num_groups": NORM_GROUPS,
        "act_fn": "silu",
        "sample_size": family.sample_size * 2 ** (levels - 1),
        "scaling_factor": family.vae_scaling_factor,
        **({"force_upcast": True} if family.force_upcast else {}),
    }


def text_config(tensors: dict[str, np.ndarray], text: str, bos_id: int, eos_id: int, pad_id: int) -> dict:
    """CLIPTextConfig of the text encoder (LDM names, prefix stripped): widths from shapes, heads by 64 channels.

    `text`: "clip" (CLIP-L), "open_clip" (SD 2.x: the last block unused) or "open_clip_g" (SDXL's second encoder:
    every block, and its projection: a CLIPTextModelWithProjection)."""
    projection = None
    if text == "clip":
        base = "text_model." if any(n.startswith("text_model.") for n in tensors) else ""
        vocab, width = _shape(tensors, base + "embeddings.token_embedding.weight", "text encoder")
        positions = _shape(tensors, base + "embeddings.position_embedding.weight", "text encoder")[0]
        layers = _count(tensors, r"^(?:text_model\.)?encoder\.layers\.(\d+)\.")
        inner = _shape(tensors, base + "encoder.layers.0.mlp.fc1.weight", "text encoder")[0]
        activation = "quick_gelu"
    else:
        vocab, width = _shape(tensors, "token_embedding.weight", "text encoder")
        positions = _shape(tensors, "positional_embedding", "text encoder")[0]
        layers = open_clip_layers(tensors) - (1 if text == "open_clip" else 0)  # SD 2: the penultimate block
        if text == "open_clip_g":
            projection = _shape(tensors, "text_projection", "text encoder")[1]
        inner = _shape(tensors, "transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0]
        activation = "gelu"
    if width % TEXT_HEAD_WIDTH or layers < 1:
        raise ModelError(
            f"the text encoder's width {width} is not a multiple of {TEXT_HEAD_WIDTH}: not CLIP-L/OpenCLIP"
        )
    return {
        "architectures": ["CLIPTextModel" if projection is None else "CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": width // TEXT_HEAD_WIDTH,
        "max_position_embeddings": positions,
        "hidden_act": activation,
        "layer_norm_eps": 1e-05,
        "projection_dim": width if projection is None else projection,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }
