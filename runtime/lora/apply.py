"""Merging LoRAs into full weights and handing them to the backend (`apply_weights`), once per change of set.

merged = base + sum over LoRAs and layers of  up @ down * (alpha / rank) * multiplier
where the multiplier is the LoRA's text-encoder (both of SDXL's) or UNet weight. The base values come from the
backend; the merged values replace whole parameters, so every set is built from base (A -> B -> A gives A's weights
exactly), and an empty set (no LoRA, or every multiplier 0) restores the base weights.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import LoraError
from .files import LoraFile, read_lora_file, short_hash
from .keys import LoraLayer, parse_layers
from .sources import WeightSource, mapped_components, weight_source
from .weight_map import TEXT_ENCODERS

logger = logging.getLogger(__name__)
MAX_CACHED_FILES = 8  # parsed LoRA files kept for reuse, most recent first


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a request: its file, text-encoder and UNet multipliers, and the name the infotext shows."""

    path: Path
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    alias: str = ""  # the name as mentioned (prompt tag) or the file stem

    @property
    def key(self) -> tuple:
        if not Path(self.path).is_file():
            raise LoraError(f"LoRA file {self.path} does not exist")
        stat = os.stat(self.path)
        return str(Path(self.path).resolve()), stat.st_mtime_ns, stat.st_size, self.te_multiplier, self.unet_multiplier


class WeightBackend(Protocol):
    """The backend weight interface (see runtime.backends): full new values by diffusers parameter name."""

    def apply_weights(self, patches: dict[str, dict[str, np.ndarray]] | None) -> None: ...


def merged_weights(
    uses: Sequence[tuple[LoraUse, list[LoraLayer]]], source: WeightSource
) -> dict[str, dict[str, np.ndarray]]:
    """component -> parameter -> base + the summed deltas (float32); multipliers of 0 contribute nothing."""
    deltas: dict[str, dict[str, np.ndarray]] = {}
    for use, layers in uses:
        for layer in layers:
            multiplier = use.te_multiplier if layer.component in TEXT_ENCODERS else use.unet_multiplier
            if multiplier == 0:
                continue
            shape = source.parameter_shapes(layer.component)[layer.parameter]
            delta = layer.delta(shape) * np.float32(multiplier)
            component = deltas.setdefault(layer.component, {})
            component[layer.parameter] = component[layer.parameter] + delta if layer.parameter in component else delta
    patches = {}
    for component, component_deltas in deltas.items():
        base = source.base_parameters(component, sorted(component_deltas))
        patches[component] = {name: (base[name] + d).astype(np.float32) for name, d in component_deltas.items()}
    return patches


class LoraState:
    """The LoRA set a backend currently carries; `activate` re-applies weights only when the set changes."""

    def __init__(self, backend: WeightBackend):
        self.backend = backend
        self.source: WeightSource | None = None  # parameter shapes and base values, found on first use
        self.components: tuple[str, ...] = ()  # the mapped components the model has (SDXL: text_encoder_2 too)
        self._active: tuple = ()
        self._files: dict[tuple, tuple[LoraFile, list[LoraLayer]]] = {}  # by file identity

    def activate(self, uses: Sequence[LoraUse], allow_pickle: bool = False) -> None:
        """Carry exactly `uses` (empty: the base model). The files are read and checked before any weight
        changes, so a bad LoRA leaves the backend as it was."""
        key = tuple(use.key for use in uses)
        if key == self._active:
            return
        if not hasattr(self.backend, "apply_weights"):
            raise LoraError(f"the {getattr(self.backend, 'name', '?')} backend cannot apply LoRA weights")
        if self.source is None:
            self.source = weight_source(self.backend)
            self.components = mapped_components(self.backend)
        loaded = [(use, self._layers(use, allow_pickle)) for use in uses]
        patches = merged_weights(loaded, self.source)
        self._active = ("unknown",)  # until apply_weights returns: a failure there leaves no trusted state
        self.backend.apply_weights(patches or None)
        self._active = key
        logger.info("LoRA set: %s", ", ".join(f"{u.alias}:{u.unet_multiplier:g}" for u in uses) or "none")

    def _layers(self, use: LoraUse, allow_pickle: bool) -> list[LoraLayer]:
        file_key = use.key[:3]
        if file_key not in self._files:
            lora = read_lora_file(use.path, allow_pickle)
            shapes = {c: self.source.parameter_shapes(c) for c in self.components}
            recent = list(self._files.items())[: MAX_CACHED_FILES - 1]
            self._files = {file_key: (lora, parse_layers(lora, shapes)), **dict(recent)}
        return self._files[file_key][1]

    def short_hash(self, use: LoraUse) -> str:
        """A1111's short hash of the LoRA's file (kept from reading it)."""
        cached = self._files.get(use.key[:3])
        return cached[0].short_hash if cached else short_hash(use.path)
