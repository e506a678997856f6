"""OpenVINO backend: the exported fp32 ONNX models (the plain onnx/<component>.onnx files) on OpenVINO's CPU plugin.

Compiled models are cached in <artifacts>/openvino-cache/<component>-<size>-<mtime>/ (OpenVINO's CACHE_DIR), so a
second start imports them instead of compiling again. Each model is compiled once with its dynamic axes (batch,
height, width, token chunks); the plugin prepares its kernels per shape as it meets them.

precision "fp32" (the default) sets INFERENCE_PRECISION_HINT f32 explicitly: the CPU plugin computes in bf16 by
default on CPUs that have it. "bf16" asks for bf16 and is refused on a CPU without it, where the plugin would
silently compute in f32.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import openvino as ov

from ..errors import AllocationError, ArtifactError, BackendUnavailableError, InvalidRequestError, ModelError
from ..manifest import REEXPORT_HINT, read_manifest
from . import TextTables, cpu_threads
from .onnxruntime import TEXT_ENCODER_2_INPUTS, OnnxFileBackend, OnnxWeights, check_text_encoder_2

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16"}  # INFERENCE_PRECISION_HINT per sdrt precision
CACHE_FOLDER = "openvino-cache"
DEVICE = "CPU"


def cpu_capabilities(core: ov.Core) -> list[str]:
    """OPTIMIZATION_CAPABILITIES of the CPU plugin, e.g. ['FP32', 'BF16', 'INT8', 'BIN', 'EXPORT_IMPORT']."""
    return [str(c) for c in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]


def require_precision(precision: str, core: ov.Core | None = None) -> None:
    """Refuse a precision this backend or this CPU cannot compute in (one line naming what is missing)."""
    if precision not in PRECISIONS:
        raise InvalidRequestError(f"the openvino backend runs {' or '.join(PRECISIONS)}, not {precision!r}")
    if precision == "bf16":
        capabilities = cpu_capabilities(core or ov.Core())
        if "BF16" not in capabilities:
            raise BackendUnavailableError(
                "openvino bf16 needs a CPU with bf16 instructions (AVX512-BF16 or AMX); this CPU offers "
                f"{', '.join(capabilities)}"
            )


class OpenVinoSession:
    """One compiled model and its infer request; `run` returns copies of the outputs."""

    def __init__(self, path: Path, component: str, core: ov.Core, config: dict, overrides: dict | None = None):
        """`overrides`: initializer name -> value replacing the model's (merged LoRA weights); such a model is
        compiled without the cache (its weights are not the file's)."""
        self.component = component
        try:
            if overrides:
                compiled = core.compile_model(_with_constants(core.read_model(path), overrides), DEVICE, config)
            else:
                folder = cache_dir(path)
                cache = {} if folder is None else {"CACHE_DIR": str(folder)}
                compiled = core.compile_model(str(path), DEVICE, {**config, **cache})
        except RuntimeError as exc:
            raise _load_error(path, exc) from exc
        self.loaded_from_cache = not overrides and bool(compiled.get_property("LOADED_FROM_CACHE"))
        logger.debug("%s %s", "imported from the cache:" if self.loaded_from_cache else "compiled:", path)
        self._request = compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in compiled.inputs]
        self.output_names = [port.get_any_name() for port in compiled.outputs]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        try:
            values = self._request.infer(feeds)  # copies of the outputs (share_outputs=False)
        except (RuntimeError, MemoryError) as exc:
            text = _reason(str(exc)) or type(exc).__name__
            if isinstance(exc, MemoryError) or "bad_alloc" in text or "allocate" in text.lower():
                raise AllocationError(f"{self.component} ran out of memory in openvino ({text})") from exc
            raise ModelError(f"{self.component} failed in openvino: {text}") from exc
        by_name = {port.get_any_name(): value for port, value in values.items()}
        return {name: by_name[name] for name in names}


class OpenVinoTextEncoder(OpenVinoSession):
    """The text encoder: takes `inputs_embeds` [B, 77, D]; `input_ids` [B, 77] are still accepted, looked up here."""

    def __init__(self, path: Path, core: ov.Core, config: dict, tables: TextTables, overrides: dict | None = None):
        super().__init__(path, "text_encoder", core, config, overrides)
        if self.input_names != ["inputs_embeds"]:
            raise ArtifactError(f"{path} takes {self.input_names}, not inputs_embeds (an old export){REEXPORT_HINT}")
        self.tables = tables

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        if "input_ids" in feeds:
            feeds = {"inputs_embeds": self.tables.embed(feeds["input_ids"])}  # [B, 77, D]
        return super().run(feeds, outputs)


def cache_dir(path: Path) -> Path | None:
    """<artifacts>/openvino-cache/<component>-<size>-<mtime>: OpenVINO keys a model file's cache by its path and
    the compile options only, so the folder name carries what changes when the file is exported again. Folders of
    earlier files of the same component are removed. None (no cache) where the artifact folder is read-only."""
    stat = path.stat()
    root = path.parent.parent / CACHE_FOLDER
    folder = root / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        logger.warning("no openvino model cache for %s (%s): it is compiled at every start", path, exc)
        return None
    for stale in root.glob(f"{path.stem}-*"):
        if stale != folder and stale.name.rsplit("-", 2)[0] == path.stem:
            shutil.rmtree(stale, ignore_errors=True)
    return folder


def _with_constants(model: ov.Model, values: dict[str, np.ndarray]) -> ov.Model:
    """`model` with the Constant nodes named after ONNX initializers replaced by `values` (same shapes)."""
    constants = {op.get_friendly_name(): op for op in model.get_ops() if op.get_type_name() == "Constant"}
    for name, value in values.items():
        old = constants.get(name)
        if old is None:
            raise ModelError(f"openvino's model has no weight {name} to replace (LoRA)")
        array = np.ascontiguousarray(value, dtype=np.float32)
        if tuple(old.get_output_shape(0)) != array.shape:
            raise ModelError(
                f"weight {name}: openvino's model holds {tuple(old.get_output_shape(0))}, not {array.shape}"
            )
        new = ov.opset13.constant(array)
        new.set_friendly_name(name)
        for target in old.output(0).get_target_inputs():
            target.replace_source_output(new.output(0))
    return model


def _reason(text: str) -> str:
    """The human part of an OpenVINO exception: its last line that is not a source location."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return (useful or lines or [""])[-1][:160]


def _load_error(path: Path, exc: Exception) -> ModelError:
    """ArtifactError when the ONNX file cannot be read (exporting again fixes it), ModelError otherwise."""
    text = str(exc)
    if "FrontEnd API failed" in text or "Unable to read the model" in text:
        return ArtifactError(f"{path} is not a loadable ONNX model ({_reason(text)}){REEXPORT_HINT}")
    return ModelError(f"cannot load {path} in openvino ({_reason(text)})")


class OpenVinoBackend(OnnxFileBackend):
    name = "openvino"

    def __init__(self, artifacts: Path, precision: str = "fp32"):
        self.folder = Path(artifacts)
        self.core = ov.Core()
        require_precision(precision, self.core)
        self.precision = precision
        self.manifest = read_manifest(self.folder)
        self.config = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
        threads = cpu_threads()
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        self._sessions: dict[str, OpenVinoSession] = {}
        self._text_tables: TextTables | None = None
        self.weights = OnnxWeights(self)  # LoRA: initializer overrides per component, as onnxruntime's

    def model_path(self, component: str) -> Path:
        """The plain fp32 ONNX file of `component` (never a variant fused with onnxruntime's contrib ops)."""
        if component not in self.manifest.components:
            raise ArtifactError(f"{self.folder} has no {component} model{REEXPORT_HINT}")
        path = self.folder / "onnx" / f"{component}.onnx"
        if not path.is_file():
            raise ArtifactError(f"{path} is missing{REEXPORT_HINT}")
        return path

    def session(self, component: str) -> OpenVinoSession:
        if component not in self._sessions:
            path = self.model_path(component)
            overrides = self.weights.overrides.get(component)
            logger.debug("opening %s from %s (%d weights overridden)", component, path, len(overrides or {}))
            if component == "text_encoder":
                session = OpenVinoTextEncoder(path, self.core, self.config, self.text_tables(), overrides)
            else:
                session = OpenVinoSession(path, component, self.core, self.config, overrides)
                if component == "text_encoder_2":  # a port's "any" name can be an inner one (a Cast's output)
                    ports = session._request.model_inputs
                    check_text_encoder_2(path, [next((n for n in TEXT_ENCODER_2_INPUTS if n in port.get_names()),
                                                     port.get_any_name()) for port in ports])  # fmt: skip
            self._sessions[component] = session
        return self._sessions[component]
