"""Reading LoRA files into numpy: .safetensors (runtime.safetensors_reader, bf16 included) and, only if allowed,
torch pickles.

Also A1111's short hash of a LoRA file for the infotext: for .safetensors the "addnet" hash (sha256 of everything
after the header, as kohya's sd-scripts compute it), for other files the sha256 of the whole file; 12 hex digits.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LoraError, ModelError
from ..safetensors_reader import read_safetensors

PICKLE_SUFFIXES = (".pt", ".ckpt")
LORA_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass(frozen=True, eq=False)
class LoraFile:
    path: Path
    tensors: dict[str, np.ndarray]  # key -> float32 array
    metadata: dict[str, str] = field(default_factory=dict)
    short_hash: str = ""  # A1111's shorthash (12 hex digits)


def read_lora_file(path: Path, allow_pickle: bool = False) -> LoraFile:
    """The tensors of a LoRA file as float32; LoraError when it cannot be one (missing, truncated, a pickle
    without allow_pickle, no tensors)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, metadata = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise LoraError(f"{path} is a pickle, which can run code: allow pickles (--allow-pickle) if you trust it")
        tensors, metadata = _read_pickle(path), {}
    else:
        raise LoraError(f"{path}: a LoRA file must end in {', '.join(LORA_SUFFIXES)}")
    if not tensors:
        raise LoraError(f"{path} holds no tensors, so it is not a LoRA")
    return LoraFile(path, tensors, metadata, short_hash(path))


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(float32 tensors, header metadata) of a .safetensors LoRA file; LoraError when it is not one."""
    tensors, metadata = read_safetensors(path, LoraError)
    return {name: value.astype(np.float32) for name, value in tensors.items()}, metadata


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    """A torch.save'd dict of tensors, through the restricted unpickler (no code runs)."""
    from ..torch_pickle import load_torch_file

    try:
        obj = load_torch_file(path)
    except ModelError as exc:
        raise LoraError(str(exc)) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise LoraError(f"{path} does not hold a dict of tensors, so it is not a LoRA")
    return {str(k): np.asarray(v, dtype=np.float32) for k, v in obj.items()}


def short_hash(path: Path) -> str:
    """A1111's Lora shorthash: the addnet hash for .safetensors, else sha256 of the file; first 12 hex digits."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        if Path(path).suffix.lower() == ".safetensors":
            (length,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + length)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]
