"""Test helpers: tiny diffusers checkpoints whose shapes follow the families' head rules, and their single files.

The single file is written with runtime.single_file's tables run backwards (diffusers -> LDM names); the tests then
check diffusers' own single-file converters read it back to the original weights, so the tables are independently
right in both directions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from runtime.single_file.keys import UNET_PREFIX, VAE_PREFIX, UNetLayout, unet_map, vae_map, vae_to_ldm
from runtime.single_file.text import clip_to_ldm, open_clip_to_ldm

TEXT_WIDTH = 64  # one head of 64 channels: CLIP-L's and OpenCLIP-H's head width
# Buffers and training leftovers real single files carry; the converter must ignore them.
EXTRA_TENSORS = {
    "alphas_cumprod": np.linspace(0.99, 0.01, 1000, dtype=np.float32),
    "model_ema.decay": np.array(0.9999, dtype=np.float32),
    "first_stage_model.loss.logvar": np.zeros((), dtype=np.float32),
}


SD2_UNET = dict(block_out_channels=(64, 128), attention_head_dim=[1, 2], use_linear_projection=True)
UNETS = {  # per variant: UNet blocks that follow the family's head rule (SD 1.x: 8 heads; SD 2.x: 64 channels each)
    "sd1": dict(block_out_channels=(32, 64), attention_head_dim=8),
    "sd1-inpaint": dict(block_out_channels=(32, 64), attention_head_dim=8, in_channels=9),
    "sd2-v": dict(SD2_UNET),
    "sd2-depth": dict(SD2_UNET, in_channels=5),
    "x4-upscaler": dict(  # the published block pattern: no attention at the top level, no self-attention but last
        block_out_channels=(32, 32, 64), attention_head_dim=8, use_linear_projection=True, in_channels=7,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        only_cross_attention=(True, True, False), num_class_embeds=1000,
    ),
}  # fmt: skip
SD2_VARIANTS = ("sd2-v", "sd2-depth", "x4-upscaler")


def make_tiny(folder: Path, variant: str, seed: int = 0) -> Path:
    """A tiny diffusers checkpoint of `variant` (see UNETS); text width 64 with one head (CLIP's head width)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from export.tiny import BOS_TOKEN, EOS_TOKEN, TinyConfig, _pipeline, _randomise_norms, write_tiny_tokenizer

    sd2 = variant in SD2_VARIANTS
    torch.manual_seed(seed)
    pad = "!" if sd2 else EOS_TOKEN
    write_tiny_tokenizer(folder / "tokenizer", pad_token=pad)
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=TEXT_WIDTH, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=1, max_position_embeddings=77, hidden_act="gelu" if sd2 else "quick_gelu",
            bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[pad],
        )
    )  # fmt: skip
    blocks = {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "in_channels": 4}  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, out_channels=4, layers_per_block=1, cross_attention_dim=TEXT_WIDTH, norm_num_groups=32,
        **{**blocks, **UNETS[variant]},
    )  # fmt: skip
    vae = make_vae(3 if variant == "x4-upscaler" else 2)
    for module in (text, unet):
        _randomise_norms(module)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    parts = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet)
    _pipeline(TinyConfig(variant=variant), **parts).save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    write_tiny_tokenizer(folder / "tokenizer", pad_token=pad)
    from export.tiny import _scheduler_configs

    for part, published in _scheduler_configs(variant).items():
        (folder / part / "scheduler_config.json").write_text(json.dumps(published, indent=2))
    return folder


def make_vae(levels: int = 2):
    """A tiny AutoencoderKL with random norms (2 levels: 2x2 pixels per latent; 3 levels, the x4 upscaler's: 4x4)."""
    from diffusers import AutoencoderKL

    from export.tiny import _randomise_norms

    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64)[-levels:], down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        **({"scaling_factor": 0.08333} if levels == 3 else {}),
    )  # fmt: skip
    _randomise_norms(vae)
    return vae


def _config(folder: Path, part: str) -> dict:
    return json.loads((folder / part / "config.json").read_text())


def _weights(folder: Path, part: str) -> dict[str, np.ndarray]:
    return load_file(next((folder / part).glob("*.safetensors")))


def unet_layout_of(config: dict) -> UNetLayout:
    down = tuple(t.startswith("CrossAttn") for t in config["down_block_types"])
    up = tuple(t.startswith("CrossAttn") for t in config["up_block_types"])
    return UNetLayout(config["layers_per_block"], down, up, class_embedding=bool(config.get("num_class_embeds")))


def ldm_unet(folder: Path) -> dict[str, np.ndarray]:
    table = unet_map(unet_layout_of(_config(folder, "unet")))
    return {UNET_PREFIX + table.to_ldm(k): v for k, v in _weights(folder, "unet").items()}


def ldm_vae(weights: dict[str, np.ndarray], config: dict, prefix: str = VAE_PREFIX) -> dict[str, np.ndarray]:
    table = vae_map(len(config["block_out_channels"]), config["layers_per_block"])
    return {prefix + k: v for k, v in vae_to_ldm(weights, table).items()}


def ldm_text(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """The text encoder in single-file names; SD 2 gets the unused last OpenCLIP block and projection (random)."""
    weights = _weights(folder, "text_encoder")
    config = _config(folder, "text_encoder")
    if config["hidden_act"] != "gelu":
        return clip_to_ldm(weights)
    rng = np.random.default_rng(seed)
    width, inner = config["hidden_size"], config["intermediate_size"]
    shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,), "attn.in_proj_weight": (3 * width, width),
              "attn.in_proj_bias": (3 * width,), "attn.out_proj.weight": (width, width),
              "attn.out_proj.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
              "mlp.c_fc.weight": (inner, width), "mlp.c_fc.bias": (inner,), "mlp.c_proj.weight": (width, inner),
              "mlp.c_proj.bias": (width,)}  # fmt: skip
    last = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    return open_clip_to_ldm(weights, last, rng.standard_normal((width, width)).astype(np.float32))


def single_file_state(folder: Path) -> dict[str, np.ndarray]:
    """The whole checkpoint in the original LDM layout, with the extra tensors real files have."""
    state = dict(EXTRA_TENSORS)
    state.update(ldm_unet(folder))
    state.update(ldm_vae(_weights(folder, "vae"), _config(folder, "vae")))
    state.update(ldm_text(folder))
    return state


def write_single_file(folder: Path, path: Path) -> Path:
    save_file({k: np.ascontiguousarray(v) for k, v in single_file_state(folder).items()}, str(path))
    return path
