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
    return UNetLayout(per, down, up, class_embedding="label_emb.weight" in tensors)


def unet_config(tensors: dict[str, np.ndarray], family: Family, layout: UNetLayout) -> dict:
    """UNet2DConditionModel's config: channels, levels and attention from the shapes, heads by the family's rule."""
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
    return config


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
    }


def text_config(tensors: dict[str, np.ndarray], family: Family, bos_id: int, eos_id: int, pad_id: int) -> dict:
    """CLIPTextConfig of the text encoder (LDM names, prefix stripped): widths from shapes, heads by 64 channels."""
    if family.text == "clip":
        base = "text_model." if any(n.startswith("text_model.") for n in tensors) else ""
        vocab, width = _shape(tensors, base + "embeddings.token_embedding.weight", "text encoder")
        positions = _shape(tensors, base + "embeddings.position_embedding.weight", "text encoder")[0]
        layers = _count(tensors, r"^(?:text_model\.)?encoder\.layers\.(\d+)\.")
        inner = _shape(tensors, base + "encoder.layers.0.mlp.fc1.weight", "text encoder")[0]
        activation = "quick_gelu"
    else:
        vocab, width = _shape(tensors, "token_embedding.weight", "text encoder")
        positions = _shape(tensors, "positional_embedding", "text encoder")[0]
        layers = open_clip_layers(tensors) - 1  # SD 2 conditions on the penultimate block
        inner = _shape(tensors, "transformer.resblocks.0.mlp.c_fc.weight", "text encoder")[0]
        activation = "gelu"
    if width % TEXT_HEAD_WIDTH or layers < 1:
        raise ModelError(
            f"the text encoder's width {width} is not a multiple of {TEXT_HEAD_WIDTH}: not CLIP-L/OpenCLIP"
        )
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": width // TEXT_HEAD_WIDTH,
        "max_position_embeddings": positions,
        "hidden_act": activation,
        "layer_norm_eps": 1e-05,
        "projection_dim": width,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }
