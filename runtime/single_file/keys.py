"""Tensor names of the original LDM layout (CompVis / A1111 single files) <-> diffusers module names, both ways.

Each model part is described by a list of (LDM prefix, diffusers prefix) pairs built from its structure (levels,
resnets per level, which levels have attention). A name is translated by its longest listed prefix, so the same table
converts a single file to diffusers and a diffusers model back to a single file. Only the VAE's mid-block attention
changes shape (1x1 convolutions in LDM, linear layers in diffusers); the OpenCLIP text encoder fuses q, k and v into
one `in_proj` matrix and is handled in runtime.single_file.text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ModelError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: a transformers CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: an OpenCLIP text tower
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL: CLIP ViT-L, as SD 1.x's
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL: OpenCLIP ViT-bigG with its text projection
SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the SDXL refiner: OpenCLIP ViT-bigG alone

# LDM ResBlock (openaimodel.py) -> diffusers ResnetBlock2D
UNET_RESNET_PARTS = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
# LDM AttnBlock (the VAE's mid-block attention) -> diffusers Attention
VAE_ATTENTION_PARTS = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
VAE_LINEAR_ATTENTION = tuple(f"mid_block.attentions.0.{name}.weight" for _, name in VAE_ATTENTION_PARTS[1:])


@dataclass(frozen=True)
class UNetLayout:
    """What fixes the UNet's tensor names: resnets per level, and whether each level has cross-attention."""

    layers_per_block: int
    down_attention: tuple[bool, ...]  # per level, from the highest resolution
    up_attention: tuple[bool, ...]  # per diffusers up block (lowest resolution first)
    class_embedding: bool = False  # the x4 upscaler's noise-level labels
    added_embedding: bool = False  # SDXL: label_emb.0.{0,2} embed the pooled text and size/crop ids ("text_time")


class PrefixMap:
    """Renames tensor names by their longest listed prefix, in either direction."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.to_diffusers_table = dict(pairs)
        self.to_ldm_table = {diffusers: ldm for ldm, diffusers in pairs}

    def to_diffusers(self, name: str) -> str | None:
        return _rename(name, self.to_diffusers_table)

    def to_ldm(self, name: str) -> str | None:
        return _rename(name, self.to_ldm_table)


def _rename(name: str, table: dict[str, str]) -> str | None:
    """`name` with its longest prefix found in `table` replaced (prefixes end at a dot); None if none is listed."""
    end = len(name)
    while end > 0:
        end = name.rfind(".", 0, end)
        if end < 0:
            return None
        head = name[: end + 1]
        if head in table:
            return table[head] + name[end + 1 :]
    return None


def _resnet(ldm: str, diffusers: str) -> list[tuple[str, str]]:
    return [(f"{ldm}.{a}.", f"{diffusers}.{b}.") for a, b in UNET_RESNET_PARTS]


def unet_map(layout: UNetLayout) -> PrefixMap:
    """The UNet's name table (diffusers UNet2DConditionModel <-> LDM openaimodel.UNetModel, prefix stripped)."""
    levels, per = len(layout.down_attention), layout.layers_per_block
    pairs = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("middle_block.1.", "mid_block.attentions.0."),
        *_resnet("middle_block.0", "mid_block.resnets.0"),
        *_resnet("middle_block.2", "mid_block.resnets.1"),
    ]
    if layout.class_embedding:
        pairs.append(("label_emb.", "class_embedding."))
    if layout.added_embedding:
        pairs += [("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
    for level in range(levels):
        for j in range(per):
            block = 1 + level * (per + 1) + j
            pairs += _resnet(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}")
            if layout.down_attention[level]:
                pairs.append((f"input_blocks.{block}.1.", f"down_blocks.{level}.attentions.{j}."))
        if level < levels - 1:
            pairs.append(
                (f"input_blocks.{1 + level * (per + 1) + per}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.")
            )
    for up in range(levels):
        attention = layout.up_attention[up]
        for j in range(per + 1):
            block = up * (per + 1) + j
            pairs += _resnet(f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{j}")
            if attention:
                pairs.append((f"output_blocks.{block}.1.", f"up_blocks.{up}.attentions.{j}."))
        if up < levels - 1:
            last = up * (per + 1) + per
            pairs.append((f"output_blocks.{last}.{2 if attention else 1}.conv.", f"up_blocks.{up}.upsamplers.0.conv."))
    return PrefixMap(pairs)


def vae_map(levels: int, layers_per_block: int) -> PrefixMap:
    """The VAE's name table (diffusers AutoencoderKL <-> LDM AutoencoderKL, prefix stripped)."""
    pairs = [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in.", f"{side}.conv_in."), (f"{side}.conv_out.", f"{side}.conv_out.")]
        pairs.append((f"{side}.norm_out.", f"{side}.conv_norm_out."))
        for k in (1, 2):
            pairs += _vae_resnet(f"{side}.mid.block_{k}", f"{side}.mid_block.resnets.{k - 1}")
        pairs += [(f"{side}.mid.attn_1.{a}.", f"{side}.mid_block.attentions.0.{b}.") for a, b in VAE_ATTENTION_PARTS]
    for level in range(levels):
        for j in range(layers_per_block):
            pairs += _vae_resnet(f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}")
        if level < levels - 1:
            pairs.append(
                (f"encoder.down.{level}.downsample.conv.", f"encoder.down_blocks.{level}.downsamplers.0.conv.")
            )
    for up in range(levels):
        level = levels - 1 - up  # LDM numbers decoder levels from the highest resolution, diffusers from the lowest
        for j in range(layers_per_block + 1):
            pairs += _vae_resnet(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}")
        if up < levels - 1:
            pairs.append((f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv."))
    return PrefixMap(pairs)


def _vae_resnet(ldm: str, diffusers: str) -> list[tuple[str, str]]:
    return [(f"{ldm}.nin_shortcut.", f"{diffusers}.conv_shortcut."), (f"{ldm}.", f"{diffusers}.")]


def rename_all(tensors: dict[str, np.ndarray], rename, what: str) -> dict[str, np.ndarray]:
    """Every tensor under its new name; ModelError naming the first tensor the table does not know."""
    out = {}
    for name, value in tensors.items():
        new = rename(name)
        if new is None:
            raise ModelError(f"unexpected {what} tensor {name!r}: not a layout sdrt knows")
        out[new] = value
    return out


def vae_to_diffusers(tensors: dict[str, np.ndarray], table: PrefixMap) -> dict[str, np.ndarray]:
    """LDM VAE tensors (prefix stripped) -> diffusers names; the mid-block attention's 1x1 convs become linear."""
    out = rename_all(tensors, table.to_diffusers, "VAE")
    for name, value in out.items():
        if name.endswith(VAE_LINEAR_ATTENTION) and value.ndim == 4:
            out[name] = value.reshape(value.shape[:2])  # [C, C, 1, 1] -> [C, C]
    return out


def vae_to_ldm(tensors: dict[str, np.ndarray], table: PrefixMap) -> dict[str, np.ndarray]:
    """diffusers VAE tensors -> LDM names (prefix not added); linear attention weights become 1x1 convs."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(VAE_LINEAR_ATTENTION) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # [C, C] -> [C, C, 1, 1]
        out[name] = value
    return rename_all(out, table.to_ldm, "VAE")
