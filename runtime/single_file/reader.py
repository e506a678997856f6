"""Read the tensors of a single-file checkpoint into numpy arrays, without torch.

`.safetensors`: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets), then the
raw data; parsed here and memory-mapped, so truncated or foreign files are caught with one clear message and
bfloat16 is widened to float32 exactly. `.ckpt`/`.pt`/`.pth`/`.bin`: pickles, read only when allowed and then with
runtime.torch_pickle's restricted unpickler (no code runs); a Lightning checkpoint's `state_dict` is unwrapped.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import ModelError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100 << 20
_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


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
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise ModelError(f"{path} is not a safetensors file, or it is truncated (bad header length)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            raise ModelError(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (its header is not a table of tensors)")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    if not header:
        raise ModelError(f"{path} holds no tensors")
    if data_size == 0:
        raise ModelError(f"{path} is truncated: its tensor data is missing")
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length, shape=(data_size,))
    return {name: _tensor(path, name, entry, raw) for name, entry in header.items()}


def _tensor(path: Path, name: str, entry: object, raw: np.ndarray) -> np.ndarray:
    """One tensor of a safetensors file, bounds- and size-checked."""
    try:
        kind, shape, (start, end) = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise ModelError(f"{path}: tensor {name!r} has a malformed header entry") from None
    if end > raw.size or not 0 <= start <= end:
        raise ModelError(f"{path} is truncated: tensor {name!r} reaches past the end of the file")
    count = int(np.prod(shape)) if shape else 1
    if kind == "BF16":
        if end - start != 2 * count:
            raise ModelError(f"{path}: tensor {name!r} has {end - start} bytes for {count} bfloat16 values")
        bits = raw[start:end].view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if kind not in _DTYPES:
        raise ModelError(f"{path}: tensor {name!r} has the unsupported type {kind}")
    dtype = np.dtype(_DTYPES[kind]).newbyteorder("<")
    if end - start != count * dtype.itemsize:
        raise ModelError(f"{path}: tensor {name!r} has {end - start} bytes for {count} {kind} values")
    return raw[start:end].view(dtype).reshape(shape)


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
