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
    added = config.get("addition_embed_type") == "text_time"
    classes = bool(config.get("num_class_embeds"))
    return UNetLayout(config["layers_per_block"], down, up, class_embedding=classes, added_embedding=added)


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


# SDXL: tiny checkpoints whose shapes follow SDXL's head rules (64 channels per head in the UNet and both encoders)
SDXL_VARIANTS = ("sdxl", "sdxl-inpaint", "sdxl-refiner")
SDXL_POOLED = 32  # text encoder 2's projection width (unlike its hidden width: a transposed projection fails)
SDXL_TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)
SDXL_WIDTH_2 = 128  # text encoder 2's width, 2 heads (diffusers tells SDXL's encoders apart by width: 768 / 1280)


def make_tiny_sdxl(folder: Path, variant: str, seed: int = 0) -> Path:
    """A tiny SDXL diffusers folder (base, inpainting or refiner): as SDXL, no attention at the first level and a
    transformer depth per level (1, then 2 at the lowest level and the mid block)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from export.tiny import (
        BOS_TOKEN,
        EOS_TOKEN,
        TinyConfig,
        _pipeline,
        _randomise_norms,
        _scheduler_configs,
        write_tiny_tokenizer,
    )

    refiner = variant == "sdxl-refiner"
    torch.manual_seed(seed)
    pads = {"tokenizer_2": "!"} if refiner else {"tokenizer": EOS_TOKEN, "tokenizer_2": "!"}
    for part, pad in pads.items():
        write_tiny_tokenizer(folder / part, pad_token=pad)
    vocab = json.loads((folder / "tokenizer_2" / "vocab.json").read_text())

    def text(width: int, act: str, pad: str, cls):
        config = CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=width, intermediate_size=width + 32, num_hidden_layers=3,
            num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=act, projection_dim=SDXL_POOLED,
            bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=vocab[pad],
        )  # fmt: skip
        return cls(config)

    encoder_1 = None if refiner else text(TEXT_WIDTH, "quick_gelu", EOS_TOKEN, CLIPTextModel)
    encoder_2 = text(SDXL_WIDTH_2, "gelu", "!", CLIPTextModelWithProjection)
    ids = 5 if refiner else 6
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=9 if variant == "sdxl-inpaint" else 4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 64, 128), attention_head_dim=[1, 1, 2], transformer_layers_per_block=[1, 1, 2],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=SDXL_WIDTH_2 + (0 if refiner else TEXT_WIDTH), use_linear_projection=True,
        norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED + ids * SDXL_TIME_DIM,
    )  # fmt: skip
    vae = make_vae(2)
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    for module in (encoder_1, encoder_2, unet):
        if module is not None:
            _randomise_norms(module)
    tokenizers = {part: CLIPTokenizer.from_pretrained(folder / part) for part in pads}
    parts = dict(vae=vae, text_encoder=encoder_1, text_encoder_2=encoder_2, unet=unet)
    parts.update(tokenizer=tokenizers.get("tokenizer"), tokenizer_2=tokenizers["tokenizer_2"])
    _pipeline(TinyConfig(variant=variant), **parts).save_pretrained(folder, safe_serialization=True)
    for part, pad in pads.items():
        (folder / part / "tokenizer.json").unlink(missing_ok=True)
        write_tiny_tokenizer(folder / part, pad_token=pad)
    for part, published in _scheduler_configs(variant).items():
        (folder / part / "scheduler_config.json").write_text(json.dumps(published, indent=2))
    return folder


def open_clip_g_to_ldm(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CLIPTextModelWithProjection tensors -> an OpenCLIP text tower (no prefix), written here independently of the
    converter: q, k and v fused into in_proj, layers -> transformer.resblocks, the projection transposed."""
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}  # fmt: skip
    top = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    out, qkv = {}, {}
    for name, value in weights.items():
        name = name.removeprefix("text_model.")
        if name == "text_projection.weight":
            out["text_projection"] = np.ascontiguousarray(value.T)
        elif name in top:
            out[top[name]] = value
        elif name.startswith("encoder.layers."):
            layer, rest = name[len("encoder.layers.") :].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, kind), {})[module[10]] = value
            else:
                out[f"transformer.resblocks.{layer}.{parts[module]}.{kind}"] = value
    for (layer, kind), split in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = np.concatenate([split[c] for c in "qkv"])
    return out


def sdxl_single_file_state(folder: Path) -> dict[str, np.ndarray]:
    """An SDXL diffusers folder in the SGM layout: conditioner.embedders.0.transformer (CLIP-L, HF names) and
    .1.model (OpenCLIP-bigG); a refiner's bigG alone as .0.model; the UNet with label_emb.0.{0,2}; the VAE."""
    state = dict(EXTRA_TENSORS)
    state.update(ldm_unet(folder))
    state.update(ldm_vae(_weights(folder, "vae"), _config(folder, "vae")))
    refiner = not (folder / "text_encoder").is_dir()
    if not refiner:
        clip = {k.removeprefix("text_model."): v for k, v in _weights(folder, "text_encoder").items()}
        state.update({f"conditioner.embedders.0.transformer.text_model.{k}": v for k, v in clip.items()})
    bigg = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    state.update({bigg + k: v for k, v in open_clip_g_to_ldm(_weights(folder, "text_encoder_2")).items()})
    return state


def write_sdxl_single_file(folder: Path, path: Path) -> Path:
    save_file({k: np.ascontiguousarray(v) for k, v in sdxl_single_file_state(folder).items()}, str(path))
    return path
