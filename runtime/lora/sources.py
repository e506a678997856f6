"""Where LoRA merging reads parameter shapes and base values: the backend itself, an artifact folder (ONNX files
and their weight maps), or a diffusers checkpoint folder (its .safetensors files, read without torch).

Backends that only implement `apply_weights` (the GPU ones) still get LoRA through the last two.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import LoraError, ModelError
from ..safetensors_reader import read_safetensors
from .weight_map import (
    MAPPED_COMPONENTS,
    MappedInitializer,
    base_parameters,
    canonical_parameter_name,
    ensure_weight_map,
)


class WeightSource(Protocol):
    def parameter_shapes(self, component: str) -> dict[str, tuple[int, ...]]: ...

    def base_parameters(self, component: str, names: Sequence[str]) -> dict[str, np.ndarray]: ...


class ArtifactWeights:
    """Parameters as an export holds them: the weight map names them, the ONNX file has their base values."""

    def __init__(self, folder: Path, manifest):
        self.folder = Path(folder)
        self.manifest = manifest
        self._maps: dict[str, dict[str, MappedInitializer]] = {}
        self._base: dict[str, dict[str, np.ndarray]] = {}  # read once per parameter

    def weight_map(self, component: str) -> dict[str, MappedInitializer]:
        if component not in self._maps:
            self._maps[component] = ensure_weight_map(self.folder, self.manifest, component)
        return self._maps[component]

    def parameter_shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        return {m.parameter: m.shape for m in self.weight_map(component).values()}

    def base_parameters(self, component: str, names: Sequence[str]) -> dict[str, np.ndarray]:
        cache = self._base.setdefault(component, {})
        missing = [n for n in names if n not in cache]
        if missing:
            path = self.folder / self.manifest.components[component].file
            cache.update(base_parameters(path, self.weight_map(component), missing))
        return {n: cache[n] for n in names}

    def initializer_values(self, component: str, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Parameter values (diffusers names) -> the same values under their initializer names and orientation."""
        by_parameter = {m.parameter: (name, m.transposed) for name, m in self.weight_map(component).items()}
        unknown = sorted(set(values) - set(by_parameter))
        if unknown:
            raise ModelError(f"{component} of this export has no weight {unknown[0]} (not in its weight map)")
        return {by_parameter[p][0]: (v.T if by_parameter[p][1] else v) for p, v in values.items()}


class CheckpointWeights:
    """Parameters of a diffusers checkpoint folder, read from its .safetensors files (fp32 files preferred)."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = Path(checkpoint)
        self._tensors: dict[str, dict[str, np.ndarray]] = {}

    def _component(self, component: str) -> dict[str, np.ndarray]:
        if component not in self._tensors:
            files = sorted((self.checkpoint / component).glob("*.safetensors"))
            full = [f for f in files if ".fp16." not in f.name]
            if not files:
                raise LoraError(f"LoRA needs {self.checkpoint / component} as .safetensors files")
            tensors = {}
            for path in full or files:
                tensors.update(read_safetensors(path, LoraError)[0])
            self._tensors[component] = {canonical_parameter_name(component, k): v for k, v in tensors.items()}
        return self._tensors[component]

    def parameter_shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        return {name: tuple(value.shape) for name, value in self._component(component).items()}

    def base_parameters(self, component: str, names: Sequence[str]) -> dict[str, np.ndarray]:
        tensors = self._component(component)
        return {n: np.array(tensors[n], dtype=np.float32) for n in names}


def weight_source(backend) -> WeightSource:
    """The backend when it reports its own parameters, else its artifact folder, else its checkpoint folder."""
    if hasattr(backend, "parameter_shapes") and hasattr(backend, "base_parameters"):
        return backend
    if getattr(backend, "folder", None) is not None and getattr(backend, "manifest", None) is not None:
        return ArtifactWeights(backend.folder, backend.manifest)
    if getattr(backend, "checkpoint", None) is not None:
        return CheckpointWeights(backend.checkpoint)
    raise LoraError(f"the {getattr(backend, 'name', '?')} backend cannot apply LoRA weights")


def mapped_components(backend) -> tuple[str, ...]:
    """The components LoRA can reach that the backend's model has: the export's (manifest) or the checkpoint's
    folders; an SD 1.x/2.x model has no text_encoder_2, an SDXL refiner no text_encoder."""
    manifest = getattr(backend, "manifest", None)
    if manifest is not None:
        return tuple(c for c in MAPPED_COMPONENTS if c in manifest.components)
    checkpoint = getattr(backend, "checkpoint", None)
    if checkpoint is not None:
        return tuple(c for c in MAPPED_COMPONENTS if (Path(checkpoint) / c).is_dir())
    return ("text_encoder", "unet")
