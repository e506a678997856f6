"""VAE tensors in LDM names, from a checkpoint or from a separate VAE file (LDM or diffusers layout).

A VAE file as people share them (`vae-ft-mse-840000-ema-pruned.safetensors`) holds `encoder.*`, `decoder.*`,
`quant_conv.*` and `post_quant_conv.*`, sometimes under `first_stage_model.`; a diffusers VAE has `down_blocks` and
`mid_block` names instead. Both are brought to LDM names here, so one converter and one shape check serve all.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import ModelError
from .keys import VAE_PREFIX, vae_map, vae_to_ldm
from .reader import read_tensors

VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def split_vae(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A checkpoint's own VAE tensors (prefix stripped; the training loss's tensors dropped)."""
    return {
        name[len(VAE_PREFIX) :]: value
        for name, value in tensors.items()
        if name.startswith(VAE_PREFIX) and name[len(VAE_PREFIX) :].startswith(VAE_PARTS)
    }


def read_vae_file(path: Path, allow_pickle: bool) -> dict[str, np.ndarray]:
    """The VAE of a separate file in LDM names; ModelError when the file holds no VAE."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"VAE file {path} does not exist")
    tensors, _ = read_tensors(path, allow_pickle)
    for prefix in (VAE_PREFIX, "vae."):
        if any(name.startswith(prefix) for name in tensors):
            tensors = {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}
            break
    vae = {name: value for name, value in tensors.items() if name.startswith(VAE_PARTS)}
    if not any(name.startswith("decoder.") for name in vae):
        raise ModelError(f"{path} is not a VAE: it has no decoder.* tensors")
    if any(".down_blocks." in name or ".mid_block." in name for name in vae):
        return diffusers_vae_to_ldm(vae)
    return vae


def diffusers_vae_to_ldm(vae: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A diffusers AutoencoderKL state dict in LDM names (levels and resnets counted from its names)."""
    levels = len({m.group(1) for m in map(re.compile(r"^encoder\.down_blocks\.(\d+)\.").match, vae) if m})
    per = len({m.group(1) for m in map(re.compile(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.").match, vae) if m})
    if levels < 1 or per < 1:
        raise ModelError("the diffusers VAE has no encoder levels (encoder.down_blocks.*)")
    return vae_to_ldm(vae, vae_map(levels, per))
