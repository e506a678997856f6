"""Text encoders of single files -> transformers CLIPTextModel names (and back, for tests and tools).

SD 1.x stores a transformers CLIPTextModel under `cond_stage_model.transformer.` (older files without the
`text_model.` level). SD 2.x stores an OpenCLIP text tower under `cond_stage_model.model.`: q, k and v fused into
`in_proj_weight` [3D, D], and one more residual block than SD 2 uses (it takes the penultimate layer's output, then
the final LayerNorm), so the converted encoder has one layer fewer, as diffusers' SD 2 text encoders have.
SDXL's OpenCLIP-bigG tower keeps every block (SDXL reads the penultimate hidden states itself) and its projection
head `text_projection` [D, P], which becomes CLIPTextModelWithProjection's `text_projection.weight` [P, D].
"""

from __future__ import annotations

import re

import numpy as np

from ..errors import ModelError
from .keys import CLIP_PREFIX, OPEN_CLIP_PREFIX

# OpenCLIP module names -> CLIPTextModel's (inside one residual block, then outside the blocks)
OPEN_CLIP_BLOCK_PARTS = (
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
)
OPEN_CLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")  # the CLIP projection head; SD reads hidden states
_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")


def clip_to_diffusers(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SD 1.x text encoder tensors (prefix `cond_stage_model.transformer.` stripped) -> CLIPTextModel names."""
    out = {}
    for name, value in tensors.items():
        if name.endswith("position_ids"):  # a buffer (0..76), rebuilt by the model
            continue
        out[name if name.startswith("text_model.") else "text_model." + name] = value
    return out


def open_clip_layers(tensors: dict[str, np.ndarray]) -> int:
    """The number of residual blocks of an OpenCLIP text tower."""
    blocks = {int(m.group(1)) for m in map(_BLOCK.match, tensors) if m}
    if not blocks or blocks != set(range(len(blocks))):
        raise ModelError("the OpenCLIP text encoder's residual blocks are missing or not numbered 0..n-1")
    return len(blocks)


def open_clip_to_diffusers(tensors: dict[str, np.ndarray], sdxl: bool = False) -> dict[str, np.ndarray]:
    """OpenCLIP tensors (prefix stripped) -> CLIPTextModel names. SD 2.x: the last block dropped (SD 2 conditions on
    the penultimate block). SDXL (`sdxl`): every block, and the projection as CLIPTextModelWithProjection's."""
    used = open_clip_layers(tensors) - (0 if sdxl else 1)
    out = {}
    for name, value in tensors.items():
        if name in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[name]] = value
            continue
        if sdxl and name == "text_projection":
            if value.ndim != 2:
                raise ModelError(f"the OpenCLIP text_projection has shape {value.shape}, not [width, projection]")
            out["text_projection.weight"] = np.ascontiguousarray(value.T)  # x @ P  ==  Linear with weight P.T
            continue
        match = _BLOCK.match(name)
        if match is None:
            if name in OPEN_CLIP_UNUSED:
                continue
            raise ModelError(f"unexpected text encoder tensor {OPEN_CLIP_PREFIX + name!r}: not a layout sdrt knows")
        layer, rest = int(match.group(1)), match.group(2)
        if layer < used:
            out.update(_open_clip_block(f"text_model.encoder.layers.{layer}.", rest, value))
    return out


def _open_clip_block(prefix: str, rest: str, value: np.ndarray) -> dict[str, np.ndarray]:
    """One tensor of a residual block under its CLIPTextModel name(s); the fused q/k/v projection split in three."""
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if rest.endswith("weight") else "bias"
        if value.shape[0] % 3:
            raise ModelError(f"the OpenCLIP in_proj {kind} has {value.shape[0]} rows, not a multiple of 3")
        q, k, v = np.split(value, 3, axis=0)  # [3D, D] -> 3 x [D, D]
        return {f"{prefix}self_attn.{p}_proj.{kind}": t for p, t in zip("qkv", (q, k, v))}
    for old, new in OPEN_CLIP_BLOCK_PARTS:
        if rest.startswith(old):
            return {prefix + new + rest[len(old) :]: value}
    raise ModelError(f"unexpected OpenCLIP tensor {rest!r}: not a layout sdrt knows")


def _nested(name: str) -> str:
    """A CLIPTextModel parameter name under `text_model.` (transformers 5 saves it without that level)."""
    return name if name.startswith("text_model.") else "text_model." + name


def clip_to_ldm(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CLIPTextModel tensors -> SD 1.x single-file names (with the `cond_stage_model.transformer.` prefix)."""
    return {CLIP_PREFIX + _nested(name): value for name, value in tensors.items() if not name.endswith("position_ids")}


def open_clip_to_ldm(
    tensors: dict[str, np.ndarray], last_block: dict[str, np.ndarray], text_projection: np.ndarray
) -> dict[str, np.ndarray]:
    """CLIPTextModel tensors -> SD 2.x single-file names (prefixed); `last_block` (OpenCLIP names inside one block)
    becomes the block SD 2 does not use, `text_projection` [D, P] the projection head."""
    top = {new: old for old, new in OPEN_CLIP_TOP.items()}
    out, layers, fused = {}, set(), {}
    for name, value in tensors.items():
        name = _nested(name)
        if name in top:
            out[top[name]] = value
            continue
        match = _LAYER.match(name)
        if match is None:
            continue  # position_ids and the like
        layer, rest = int(match.group(1)), match.group(2)
        layers.add(layer)
        head = f"transformer.resblocks.{layer}."
        qkv = re.match(r"^self_attn\.([qkv])_proj\.(weight|bias)$", rest)
        if qkv:
            fused.setdefault((layer, qkv.group(2)), {})[qkv.group(1)] = value
            continue
        old = next(o for o, n in OPEN_CLIP_BLOCK_PARTS if rest.startswith(n))
        new = next(n for o, n in OPEN_CLIP_BLOCK_PARTS if rest.startswith(n))
        out[head + old + rest[len(new) :]] = value
    for (layer, kind), parts in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = np.concatenate([parts[p] for p in "qkv"])
    extra = len(layers)
    out.update({f"transformer.resblocks.{extra}.{rest}": value for rest, value in last_block.items()})
    out["text_projection"] = text_projection
    return {OPEN_CLIP_PREFIX + name: value for name, value in out.items()}
