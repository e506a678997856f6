"""Backends: one `Session` per model component, `run(feeds) -> outputs` over named numpy arrays.

The backend is chosen once, at load; the pipeline above never asks which one it has.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import BackendUnavailableError, InvalidRequestError

BACKENDS = ("onnxruntime", "torch", "openvino", "onnxruntime-cuda", "tensorrt", "torch-cuda")
GPU_BACKENDS = ("onnxruntime-cuda", "tensorrt", "torch-cuda")  # NVIDIA GPU only; runtime.backends.gpu checks them
# The precisions `load(..., precision=)` offers per backend; the others compute in fp32 only through it (the GPU
# backends' fp16 models come from `export --precision fp16`). int8: the UNet's MatMuls quantised at export.
PRECISIONS = {"onnxruntime": ("fp32", "int8"), "openvino": ("fp32", "bf16")}
# The package each CPU backend imports, and how to install it
PACKAGES = {"onnxruntime": ("onnxruntime", "pip install onnxruntime"), "torch": ("torch", "pip install -e .[export]"),
            "openvino": ("openvino", "pip install -e .[openvino]")}  # fmt: skip


THREADS_VARIABLE = "SDRT_CPU_THREADS"  # threads per CPU model run; unset: the CPU backend's default (every core)


def cpu_threads() -> int | None:
    """The threads a CPU backend runs each model on ($SDRT_CPU_THREADS, for processes that share the cores: several
    servers or test workers on one machine); None: the backend's default. A bad value is an InvalidRequestError."""
    text = os.environ.get(THREADS_VARIABLE, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise InvalidRequestError(f"${THREADS_VARIABLE} must be a positive number of threads, not {text!r}")
    return int(text)


class Session(Protocol):
    """One model component (text_encoder, unet, vae_decoder, vae_encoder) ready to run."""

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True, eq=False)
class TextTables:
    """The text encoder's parts that run on the host: the token lookup before it, the final LayerNorm after it."""

    token_embedding: np.ndarray  # float32 [vocab, D]; read-only (memory-mapped from the artifact for onnxruntime)
    final_norm_weight: np.ndarray  # float32 [D]
    final_norm_bias: np.ndarray  # float32 [D]
    final_norm_eps: float

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """The token embeddings of `input_ids` (int [..., 77]) -> float32 [..., 77, D], the text encoder's input."""
        ids = np.asarray(input_ids)
        vocab = self.token_embedding.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}), got {ids.min()}..{ids.max()}")
        return np.asarray(self.token_embedding[ids], dtype=np.float32)


class Backend(Protocol):
    name: str

    def session(self, component: str) -> Session: ...

    def text_tables(self) -> TextTables: ...


def check_backend(name: str) -> str:
    """Validate a backend name and that its package is installed; return the name."""
    if name not in BACKENDS:
        raise InvalidRequestError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name in GPU_BACKENDS:
        from .gpu import check_gpu_backend

        return check_gpu_backend(name)
    package, install = PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise BackendUnavailableError(
            f"the {name} backend needs the {package!r} package, which is not installed ({install})"
        )
    if name == "torch" and importlib.util.find_spec("diffusers") is None:
        raise BackendUnavailableError("the torch backend needs 'diffusers' (pip install -e .[export])")
    return name


def check_precision(backend: str, precision: str) -> str:
    """Validate `precision` for the (valid) backend `backend`, and that this machine can compute in it; return it."""
    valid = PRECISIONS.get(backend, ("fp32",))
    if precision not in valid:
        note = " (fp16 models for it come from `export --precision fp16`)" if backend in GPU_BACKENDS else ""
        choices = " or ".join(valid)
        raise InvalidRequestError(f"the {backend} backend computes in {choices}, not precision {precision!r}{note}")
    if backend == "openvino" and precision != "fp32":
        from .openvino import require_precision

        require_precision(precision)
    return precision


def open_backend(
    name: str, *, artifacts: Path | None, checkpoint: Path | None, allow_pickle: bool = False, precision: str = "fp32"
) -> Backend:
    """The backend `name` over an artifact folder (onnxruntime, openvino) or a diffusers checkpoint folder (torch;
    .bin pickle weights only with allow_pickle), computing in `precision` (PRECISIONS)."""
    check_backend(name)
    check_precision(name, precision)
    if name in GPU_BACKENDS:
        from .gpu import open_gpu_backend

        return open_gpu_backend(name, artifacts=artifacts, checkpoint=checkpoint, allow_pickle=allow_pickle)
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        options = {} if precision == "fp32" else {"precision": precision}  # fp32: also before int8 existed
        return OnnxRuntimeBackend(artifacts, **options)
    if name == "openvino":
        from .openvino import OpenVinoBackend

        return OpenVinoBackend(artifacts, precision=precision)
    from .torch import TorchBackend

    return TorchBackend(checkpoint, allow_pickle)
