"""ONNX Runtime backend: the exported fp32 ONNX models on the CPU execution provider."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import ModelError
from ..manifest import read_manifest

logger = logging.getLogger(__name__)


class OnnxRuntimeSession:
    def __init__(self, path: Path, component: str, providers: list[str]):
        self.component = component
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load {path} ({reason[:160]}); re-export with --force") from exc
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        try:
            values = self._session.run(names, feeds)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:200]
            raise ModelError(f"{self.component} failed in onnxruntime: {reason}") from exc
        return dict(zip(names, values))


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, artifacts: Path, providers: list[str] | None = None):
        self.folder = Path(artifacts)
        self.manifest = read_manifest(self.folder)
        self.providers = providers or ["CPUExecutionProvider"]
        self._sessions: dict[str, OnnxRuntimeSession] = {}

    def session(self, component: str) -> OnnxRuntimeSession:
        if component not in self._sessions:
            info = self.manifest.components.get(component)
            if info is None:
                raise ModelError(f"{self.folder} has no {component} model; re-export with --force")
            path = self.folder / info.file
            if not path.is_file():
                raise ModelError(f"{path} is missing; re-export with --force")
            logger.debug("loading %s from %s", component, path)
            self._sessions[component] = OnnxRuntimeSession(path, component, self.providers)
        return self._sessions[component]
