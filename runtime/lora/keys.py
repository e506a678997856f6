"""LoRA key formats -> layers on diffusers parameters.

kohya / A1111:   lora_unet_<module with _>.lora_down.weight, .lora_up.weight, .alpha
                 lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight ...
                 SDXL: lora_te1_ (CLIP ViT-L), lora_te2_ (OpenCLIP bigG), lora_unet_ under LDM/SGM names as kohya's
                 sd-scripts train them (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q)
                 lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q... (LDM UNet names, also read)
diffusers/PEFT:  unet.<module>.lora_A.weight, .lora_B.weight (optional .alpha);  text_encoder.<module>.lora_A.weight
                 (SDXL's second encoder: text_encoder_2.<module>...)
older diffusers: unet.<...>.attn1.processor.to_q_lora.down.weight / .up.weight;  <module>.lora.down.weight;
                 text_encoder.<module>.lora_linear_layer.down.weight

A kohya module name is the diffusers module path with dots replaced by underscores, so it is resolved against
the model's own parameter names (underscores are ambiguous on their own: `to_out_0` is `to_out.0`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import LoraError
from .files import LoraFile
from .weight_map import TEXT_ENCODERS

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}  # fmt: skip
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# (down suffix, up suffix) of each format, longest first so that ".lora.down.weight" is not read as ".down.weight"
SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
)
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)$")
Shapes = Mapping[str, Mapping[str, tuple[int, ...]]]  # component -> diffusers parameter -> shape


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One low-rank delta: delta = up @ down * scale (reshaped to the parameter), times the user's weight."""

    component: str  # "unet", "text_encoder" or "text_encoder_2"
    parameter: str  # diffusers name of the weight it changes
    down: np.ndarray  # float32 [r, in] or [r, in, kh, kw]
    up: np.ndarray  # float32 [out, r] or [out, r, 1, 1]
    scale: float  # alpha / r (1 without alpha)

    def delta(self, shape: tuple[int, ...]) -> np.ndarray:
        """The float32 delta for a parameter of `shape` (a 1x1 conv LoRA fits a Linear weight and back)."""
        rank = self.down.shape[0]
        product = self.up.reshape(self.up.shape[0], rank) @ self.down.reshape(rank, -1)  # [out, in * kh * kw]
        return (product * np.float32(self.scale)).reshape(shape)


def parse_layers(lora: LoraFile, shapes: Shapes) -> list[LoraLayer]:
    """All layers of `lora`, checked against the model's parameters; LoraError naming the first misfit."""
    groups = _group(lora)
    index = {component: _underscore_index(component, names) for component, names in shapes.items()}
    layers, unknown = [], []
    for (prefix, down_suffix), parts in groups.items():
        target = _resolve(prefix, down_suffix, shapes, index)
        if target is None:
            unknown.append(prefix)
            continue
        layers.append(_layer(lora, prefix, target, parts, shapes))
    if unknown:
        raise LoraError(
            f"LoRA {lora.path.name} does not match this model: {len(unknown)} of {len(groups)} layers name no "
            f"module of it (first: {unknown[0]})"
        )
    return layers


def _group(lora: LoraFile) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """(module prefix, format) -> {"down", "up", "alpha"}; LoraError for a key no known format has."""
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    alphas = {key[: -len(".alpha")]: value for key, value in lora.tensors.items() if key.endswith(".alpha")}
    for key, value in lora.tensors.items():
        if key.endswith(".alpha"):
            continue
        for down_suffix, up_suffix in SUFFIXES:
            for suffix, part in ((down_suffix, "down"), (up_suffix, "up")):
                if key.endswith(suffix):
                    groups.setdefault((key[: -len(suffix)], down_suffix), {})[part] = value
                    break
            else:
                continue
            break
        else:
            raise LoraError(f"LoRA {lora.path.name}: unsupported key {key!r} (not a kohya or diffusers/PEFT LoRA)")
    for (prefix, _), parts in groups.items():
        if prefix in alphas:
            parts["alpha"] = alphas.pop(prefix)
        if "down" not in parts or "up" not in parts:
            raise LoraError(f"LoRA {lora.path.name}: {prefix} lacks its {'up' if 'down' in parts else 'down'} weight")
    return groups


def _underscore_index(component: str, names: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """kohya module name (dots -> underscores) -> diffusers module path, for every `.weight` parameter; for the
    UNet also under its LDM name (`input_blocks_1_1_proj_in`), which some trainers write (kohya's for SDXL)."""
    modules = [name.removesuffix(".weight") for name in names if name.endswith(".weight")]
    index = {module.replace(".", "_"): module for module in modules}
    if component == "unet":
        for ldm, module in _ldm_names(modules).items():
            index.setdefault(ldm.replace(".", "_"), module)
    return index


# SDXL's added conditioning (text_embeds + time_ids) under SGM's names: label_emb = Sequential(Sequential(Linear,
# SiLU, Linear))
SGM_ADDED_EMBEDDING = {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}


def _ldm_names(modules: list[str]) -> dict[str, str]:
    """LDM module path -> diffusers module path of a diffusers UNet, from the single-file name table."""
    from ..single_file.keys import UNetLayout, unet_map

    present = set(modules)
    sgm = {ldm: module for ldm, module in SGM_ADDED_EMBEDDING.items() if module in present}
    levels = sum(1 for i in range(64) if f"down_blocks.{i}.resnets.0.conv1" in present)
    per = sum(1 for j in range(64) if f"down_blocks.0.resnets.{j}.conv1" in present)
    if levels == 0 or per == 0:
        return sgm
    layout = UNetLayout(
        layers_per_block=per,
        down_attention=tuple(f"down_blocks.{i}.attentions.0.proj_in" in present for i in range(levels)),
        up_attention=tuple(f"up_blocks.{i}.attentions.0.proj_in" in present for i in range(levels)),
        class_embedding=any(m.startswith("class_embedding.") for m in modules),
    )
    table = unet_map(layout)
    names = dict(sgm)
    for module in modules:
        ldm = table.to_ldm(module + ".weight")
        if ldm is not None:
            names[ldm.removesuffix(".weight")] = module
    return names


def _resolve(prefix: str, down_suffix: str, shapes: Shapes, index: dict) -> tuple[str, str] | None:
    """(component, diffusers weight name) of a module prefix, or None when the model has no such module."""
    for start, component in KOHYA_PREFIXES.items():
        if prefix.startswith(start) and component in index:
            module = index[component].get(prefix[len(start) :])
            return (component, module + ".weight") if module else None
    component, module = "unet", prefix  # old diffusers files name UNet modules without a prefix
    for start, name in PEFT_PREFIXES.items():
        if prefix.startswith(start):
            component, module = name, prefix[len(start) :]
    if down_suffix == "_lora.down.weight":  # attn processor format: <attn>.processor.to_q(_lora...)
        match = _PROCESSOR.search(module)
        if match is None:
            return None
        module = module[: match.start()] + "." + match.group(1) + (".0" if match.group(1) == "to_out" else "")
    if component in TEXT_ENCODERS and not module.startswith(("text_model.", "text_projection")):
        module = "text_model." + module
    weight = module + ".weight"
    return (component, weight) if weight in shapes.get(component, {}) else None


def _layer(lora: LoraFile, prefix: str, target: tuple[str, str], parts: dict, shapes: Shapes) -> LoraLayer:
    component, parameter = target
    down, up = parts["down"], parts["up"]
    rank = down.shape[0] if down.ndim else 0
    shape = shapes[component][parameter]
    fits = (
        down.ndim in (2, 4)
        and up.ndim == down.ndim
        and rank > 0
        and up.shape[1] == rank
        and up.shape[2:] in ((), (1, 1))
        and up.shape[0] * int(np.prod(down.shape[1:])) == int(np.prod(shape))
        and up.shape[0] == shape[0]
    )
    if not fits:
        raise LoraError(
            f"LoRA {lora.path.name} does not match this model: {prefix} has down {tuple(down.shape)} and up "
            f"{tuple(up.shape)}, but {component} {parameter} is {tuple(shape)}"
        )
    alpha = parts.get("alpha")
    scale = float(np.asarray(alpha).reshape(-1)[0]) / rank if alpha is not None else 1.0
    return LoraLayer(component, parameter, down, up, scale)
