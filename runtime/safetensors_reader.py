"""Reading .safetensors files into numpy without torch: memory-mapped, checked, bfloat16 widened to float32.

The layout: an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets, plus an
optional `__metadata__` table of strings), then the raw data. A truncated or foreign file gets one clear message,
raised as the caller's error type (ModelError for checkpoints, LoraError for LoRA files).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .errors import ModelError, SdrtError

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


def read_safetensors(path: Path, error: type[SdrtError] = ModelError) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as read-only memory maps, bfloat16 ones widened to float32 arrays; the header's metadata)."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise error(f"{path} is not a safetensors file, or it is truncated (bad header length)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError):
            raise error(f"{path} is not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise error(f"{path} is not a safetensors file (its header is not a table of tensors)")
    metadata = header.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
    if not header:
        return {}, metadata
    data_size = size - 8 - length
    if data_size == 0:
        raise error(f"{path} is truncated or corrupt: its tensor data is missing")
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length, shape=(data_size,))
    return {name: _tensor(path, name, entry, raw, error) for name, entry in header.items()}, metadata


def _tensor(path: Path, name: str, entry: object, raw: np.ndarray, error: type[SdrtError]) -> np.ndarray:
    """One tensor of a safetensors file, bounds- and size-checked."""
    try:
        kind, shape, (start, end) = entry["dtype"], [int(n) for n in entry["shape"]], entry["data_offsets"]
        start, end = int(start), int(end)
    except (TypeError, KeyError, ValueError):
        raise error(f"{path}: tensor {name!r} has a malformed header entry") from None
    if end > raw.size or not 0 <= start <= end:
        raise error(f"{path} is truncated or corrupt: tensor {name!r} reaches past the end of the file")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if kind == "BF16":  # the upper 16 bits of a float32
        if end - start != 2 * count:
            raise error(f"{path}: tensor {name!r} has {end - start} bytes for {count} bfloat16 values")
        bits = raw[start:end].view("<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if kind not in _DTYPES:
        raise error(f"{path}: tensor {name!r} has the unsupported type {kind}")
    dtype = np.dtype(_DTYPES[kind]).newbyteorder("<")
    if end - start != count * dtype.itemsize:
        raise error(f"{path}: tensor {name!r} has {end - start} bytes for {count} {kind} values")
    return raw[start:end].view(dtype).reshape(shape)
