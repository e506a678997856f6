"""Tiny random LoRA files for the tests, written straight from the key formats (not through runtime.lora).

Each writer picks modules of the real diffusers UNet and CLIP text encoder of a checkpoint, so the same file
also loads in diffusers (`pipe.load_lora_weights`), the independent reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# diffusers module paths of the tiny sd1 checkpoint (export/tiny.py): attention projections (self and cross),
# the feed-forward, the transformer's proj_in/out, a 3x3 resnet conv (LoCon) and the time-embedding projection
UNET_MODULES = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.0.proj_in",
    "mid_block.attentions.0.proj_out",
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.1.resnets.1.conv2",
    "mid_block.resnets.0.time_emb_proj",
)
# the same UNet modules under their LDM (original Stable Diffusion) names, for the tiny sd1 layout (one resnet per
# level, attention in the second down level and the first up level), worked out from openaimodel.UNetModel
LDM_NAMES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.3.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.3.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": "input_blocks.3.1.transformer_blocks.0.attn2.to_v",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": "middle_block.1.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj": (
        "output_blocks.1.1.transformer_blocks.0.ff.net.0.proj"
    ),
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2": "output_blocks.1.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.0.proj_in": "output_blocks.0.1.proj_in",
    "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "up_blocks.1.resnets.1.conv2": "output_blocks.3.0.out_layers.3",
    "mid_block.resnets.0.time_emb_proj": "middle_block.0.emb_layers.1",
}
TE_MODULES = (
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.v_proj",
    "text_model.encoder.layers.1.self_attn.out_proj",
    "text_model.encoder.layers.2.mlp.fc1",
)


def module_weights(checkpoint: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> module path -> its weight's shape, from the checkpoint's own diffusers/transformers modules."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(checkpoint, subfolder="text_encoder")
    te = dict(text_encoder.named_modules())
    te_prefix = "" if "text_model" in te else "text_model."  # transformers 5 dropped the text_model level
    unet_modules = dict(unet.named_modules())
    return {
        "unet": {name: tuple(unet_modules[name].weight.shape) for name in UNET_MODULES},
        "text_encoder": {name: tuple(te[name.removeprefix("text_model.") if te_prefix else name].weight.shape)
                         for name in TE_MODULES},
    }  # fmt: skip


def _pair(rng: np.random.Generator, shape: tuple[int, ...], rank: int, std: float) -> tuple[np.ndarray, np.ndarray]:
    """(down, up) for a weight of `shape`: Linear [out, in] or conv [out, in, kh, kw] (down keeps the kernel)."""
    down_shape = (rank, *shape[1:])
    up_shape = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
    down = rng.normal(0, std, down_shape).astype(np.float32)
    up = rng.normal(0, std, up_shape).astype(np.float32)
    return down, up


def write_kohya(path: Path, shapes: dict, seed: int, rank: int = 4, alpha: float = 2.0, std: float = 0.5,
                components=("unet", "text_encoder"), ldm_names: bool = False) -> Path:  # fmt: skip
    """kohya/A1111 keys: lora_unet_<module with _>.lora_down.weight / .lora_up.weight / .alpha (UNet modules under
    their LDM names with ldm_names; the values do not depend on the naming)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        if component not in components:
            continue
        for module, shape in shapes[component].items():
            name = LDM_NAMES[module] if ldm_names and component == "unet" else module
            key = prefix + name.replace(".", "_")
            tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"] = _pair(rng, shape, rank, std)
            tensors[key + ".alpha"] = np.array(alpha, dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_peft(path: Path, shapes: dict, seed: int, rank: int = 4, std: float = 0.5,
               components=("unet", "text_encoder")) -> Path:  # fmt: skip
    """diffusers/PEFT keys: unet.<module>.lora_A.weight / lora_B.weight (no alpha: scale 1)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for component in components:
        for module, shape in shapes[component].items():
            down, up = _pair(rng, shape, rank, std)
            tensors[f"{component}.{module}.lora_A.weight"] = down
            tensors[f"{component}.{module}.lora_B.weight"] = up
    save_file(tensors, str(path))
    return path


def write_old_diffusers(path: Path, shapes: dict, seed: int, rank: int = 4, std: float = 0.5) -> Path:
    """The pre-PEFT diffusers format, for attention projections only: unet.<attn>.processor.to_q_lora.down.weight
    (to_out.0 as to_out_lora) and text_encoder.<module>.lora_linear_layer.down.weight. Draws the same values as
    write_peft with the same seed and shapes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for component in ("unet", "text_encoder"):
        for module, shape in shapes[component].items():
            down, up = _pair(rng, shape, rank, std)
            if component == "unet":
                attention, projection = module.removesuffix(".0").rsplit(".", 1)
                key = f"unet.{attention}.processor.{projection}_lora"
                tensors[f"{key}.down.weight"], tensors[f"{key}.up.weight"] = down, up
            else:
                key = f"text_encoder.{module}.lora_linear_layer"
                tensors[f"{key}.down.weight"], tensors[f"{key}.up.weight"] = down, up
    save_file(tensors, str(path))
    return path


def attention_only(shapes: dict) -> dict:
    """The attention projections (to_q/k/v/out.0) and text-encoder modules of `shapes`."""
    unet = {m: s for m, s in shapes["unet"].items() if m.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")}
    return {"unet": unet, "text_encoder": dict(shapes["text_encoder"])}
