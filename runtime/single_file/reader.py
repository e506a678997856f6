"""Read the tensors of a single-file checkpoint into numpy arrays, without torch.

`.safetensors`: runtime.safetensors_reader's memory maps (truncated or foreign files caught with one clear message,
bfloat16 widened to float32 exactly). `.ckpt`/`.pt`/`.pth`/`.bin`: pickles, read only when allowed and then with
runtime.torch_pickle's restricted unpickler (no code runs); a Lightning checkpoint's `state_dict` is unwrapped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import safetensors_reader
from ..errors import ModelError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def is_single_file(path: Path) -> bool:
    """Whether `path` names a checkpoint file sdrt can read (by its suffix)."""
    return path.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


def read_tensors(path: Path, allow_pickle: bool) -> tuple[dict[str, np.ndarray], int | None]:
    """Every tensor of a single-file checkpoint by name (arrays may be read-only memory maps), and a Lightning
    checkpoint's `global_step` (None if absent; diffusers reads 875000 as SD 2 base, an epsilon model)."""
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path), None
    if suffix not in PICKLE_SUFFIXES:
        raise ModelError(
            f"{path}: unknown checkpoint format {suffix!r} (use .safetensors, or .ckpt with --allow-pickle)"
        )
    if not allow_pickle:
        raise ModelError(
            f"{path} is a pickle, which can run code when loaded: convert it to .safetensors, or allow pickles "
            "(--allow-pickle, allow_pickle=True) if you trust it; it is then read without running any code"
        )
    return _state_dict(path)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file as read-only memory maps; ModelError for a truncated or foreign file."""
    tensors, _ = safetensors_reader.read_safetensors(path, ModelError)
    if not tensors:
        raise ModelError(f"{path} holds no tensors")
    return tensors


def _state_dict(path: Path) -> tuple[dict[str, np.ndarray], int | None]:
    """The tensors of a torch.save'd checkpoint: its `state_dict` when it has one (Lightning), else the dict."""
    from ..torch_pickle import load_torch_file

    data = load_torch_file(path)
    step = data.get("global_step") if isinstance(data, dict) else None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a state dict")
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
    if not tensors:
        raise ModelError(f"{path} holds no tensors")
    return tensors, int(step) if isinstance(step, (int, np.integer)) else None
