"""Backends: one `Session` per model component, `run(feeds) -> outputs` over named numpy arrays.

The backend is chosen once, at load; the pipeline above never asks which one it has.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import BackendUnavailableError, InvalidRequestError

BACKENDS = ("onnxruntime", "torch")


class Session(Protocol):
    """One model component (text_encoder, unet, vae_decoder, vae_encoder) ready to run."""

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]: ...


class Backend(Protocol):
    name: str

    def session(self, component: str) -> Session: ...


def check_backend(name: str) -> str:
    """Validate a backend name and that its package is installed; return the name."""
    if name not in BACKENDS:
        raise InvalidRequestError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    package = {"onnxruntime": "onnxruntime", "torch": "torch"}[name]
    if importlib.util.find_spec(package) is None:
        raise BackendUnavailableError(f"the {name} backend needs the {package!r} package, which is not installed")
    if name == "torch" and importlib.util.find_spec("diffusers") is None:
        raise BackendUnavailableError("the torch backend needs 'diffusers' (pip install -e .[export])")
    return name


def open_backend(name: str, *, artifacts: Path | None, checkpoint: Path | None) -> Backend:
    """The backend `name` over an artifact folder (onnxruntime) or a diffusers checkpoint folder (torch)."""
    check_backend(name)
    if name == "onnxruntime":
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(artifacts)
    from .torch import TorchBackend

    return TorchBackend(checkpoint)
