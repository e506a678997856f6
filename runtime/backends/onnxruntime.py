"""ONNX Runtime backend: the exported fp32 ONNX models on the CPU execution provider.

On the CPU provider alone, the UNet and the VAE run their CPU graphs (runtime.manifest.DERIVED_GRAPHS: attention as
MultiHeadAttention, export.onnx_cpu), made at export and, for artifact folders older than that, on first use; one
that is missing, unloadable or made from another export is made again (one warning). Where it cannot be made (no
`onnx` package installed) the exported graph runs, with a warning. Precision "int8" runs the UNet's int8 graph
(MatMul weights quantised, made on first use); LoRA cannot change its weights, so it refuses UNet LoRAs.
"""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import AllocationError, ArtifactError, BackendUnavailableError, InvalidRequestError, ModelError
from ..manifest import (
    DERIVED_GRAPHS,
    FINAL_NORM_FILE,
    REEXPORT_HINT,
    TOKEN_EMBEDDING_FILE,
    derived_graph_file,
    derived_graph_stamp,
    read_manifest,
)
from ..memory import format_bytes
from . import TextTables, cpu_threads

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")  # int8: the UNet's constant-weight MatMuls, dynamic quantisation, CPU provider only
CPU_PROVIDERS = ["CPUExecutionProvider"]
STALE = "was made from another model file or by another version"


class OnnxRuntimeSession:
    derived = False  # runs a derived graph (runtime.manifest.DERIVED_GRAPHS): its attention is fused

    def __init__(
        self, path: Path, component: str, providers: list[str], overrides: dict[str, np.ndarray] | None = None
    ):
        """`overrides`: initializer name -> value replacing the model's (merged LoRA weights)."""
        self.component = component
        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: its errors come back as exceptions, not as stderr lines
        # no memory arena: a run's buffers go back to the system when it ends, so memory follows the current request
        # instead of staying at the largest one served (runtime.memory; README "Serving")
        options.enable_cpu_mem_arena = False
        threads = cpu_threads() if providers == CPU_PROVIDERS else None
        if threads:  # the cores are shared: a fixed pool that sleeps when idle instead of spinning
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # the session reads these while it lives (add_initializer keeps no reference): they stay on the session
        self._override_arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in (overrides or {}).items()}
        self._override_values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self._override_arrays.items()}
        for name, value in self._override_values.items():
            options.add_initializer(name, value)
        if overrides:  # the CPU EP's NCHWc layout pass (level "all") reads conv weights from the file, not these
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise _load_error(path, exc) from exc
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        try:
            values = self._session.run(names, feeds)
        except Exception as exc:
            text = str(exc).strip()
            if _is_allocation_failure(text):
                raise AllocationError(f"{self.component} ran out of memory in onnxruntime ({_asked(text)})") from exc
            reason = text.splitlines()[0][:200] if text else type(exc).__name__
            raise ModelError(f"{self.component} failed in onnxruntime: {reason}") from exc
        return dict(zip(names, values))

    def metadata(self) -> dict[str, str]:
        """The model's ONNX metadata properties."""
        return dict(self._session.get_modelmeta().custom_metadata_map)


def _is_allocation_failure(reason: str) -> bool:
    """Whether an onnxruntime run error is an allocation that failed (its arena's message or std::bad_alloc)."""
    text = reason.lower()
    return "failed to allocate" in text or "bad_alloc" in text or "bad allocation" in text


def _asked(text: str) -> str:
    """'a buffer of 16.0 GiB' when the message gives the size, else the failing node's message."""
    match = re.search(r"buffer of size (\d+)", text)
    if match:
        return f"a buffer of {format_bytes(int(match.group(1)))}"
    return text.rsplit("Status Message:", 1)[-1].strip()[:160]


# onnxruntime's exception types (by name) that mean the file itself is broken; others (a device, an allocation) do not
_BROKEN_FILE_ERRORS = ("InvalidProtobuf", "InvalidGraph", "NoSuchFile", "NoModel")


def _load_error(path: Path, exc: Exception) -> ModelError:
    """The typed error of a session that failed to load: ArtifactError when the ONNX file is broken (exporting
    again fixes it), ModelError otherwise."""
    text = str(exc).strip()
    reason = (text.splitlines()[0] if text else type(exc).__name__).split(" failed:")[-1].strip().rstrip(".")[:160]
    if type(exc).__name__ in _BROKEN_FILE_ERRORS or "Load model from" in text:
        return ArtifactError(f"{path} is not a loadable ONNX model ({reason}){REEXPORT_HINT}")
    return ModelError(f"cannot load {path} ({reason})")


class OnnxRuntimeTextEncoder(OnnxRuntimeSession):
    """The text encoder: takes `inputs_embeds` [B, 77, D]; `input_ids` [B, 77] are still accepted, looked up here."""

    def __init__(
        self, path: Path, providers: list[str], tables: TextTables, overrides: dict[str, np.ndarray] | None = None
    ):
        super().__init__(path, "text_encoder", providers, overrides)
        if self.input_names != ["inputs_embeds"]:
            raise ArtifactError(f"{path} takes {self.input_names}, not inputs_embeds (an old export){REEXPORT_HINT}")
        self.tables = tables

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        if "input_ids" in feeds:
            feeds = {"inputs_embeds": self.tables.embed(feeds["input_ids"])}  # [B, 77, D]
        return super().run(feeds, outputs)


TEXT_ENCODER_2_INPUTS = ["input_ids", "token_overrides"]  # SDXL's; token_overrides: textual-inversion rows


def check_text_encoder_2(path: Path, input_names: list[str]) -> None:
    """ArtifactError for an SDXL text encoder 2 exported before it took token_overrides."""
    if input_names != TEXT_ENCODER_2_INPUTS:
        raise ArtifactError(f"{path} takes {input_names}, not {TEXT_ENCODER_2_INPUTS} (an old export){REEXPORT_HINT}")


def read_text_tables(folder: Path, hidden_size: int) -> TextTables:
    """The text tables of an artifact folder; the token embedding table is memory-mapped, not read."""
    try:
        token_embedding = np.load(folder / TOKEN_EMBEDDING_FILE, mmap_mode="r", allow_pickle=False)  # [V, D]
        with np.load(folder / FINAL_NORM_FILE, allow_pickle=False) as norm:
            weight, bias, eps = norm["weight"], norm["bias"], float(norm["eps"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"cannot read the text tables of {folder} ({reason}){REEXPORT_HINT}") from exc
    if (
        token_embedding.dtype != np.float32
        or token_embedding.ndim != 2
        or token_embedding.shape[1] != hidden_size
        or weight.shape != (hidden_size,)
        or bias.shape != (hidden_size,)
    ):
        raise ArtifactError(
            f"the text tables of {folder} do not fit the text encoder's width {hidden_size} "
            f"(token embedding {token_embedding.dtype} {token_embedding.shape}){REEXPORT_HINT}"
        )
    return TextTables(token_embedding, weight.astype(np.float32), bias.astype(np.float32), eps)


class OnnxFileBackend:
    """What every backend that runs the export's ONNX files shares: LoRA as initializer overrides (`weights`: an
    OnnxWeights), and the text tables read beside the text encoder. Subclasses set folder, manifest, _sessions,
    _text_tables and weights, and define session(component)."""

    def parameter_shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        """Diffusers parameter -> shape, for the parameters this export's weight map reaches."""
        return self.weights.parameter_shapes(component)

    def base_parameters(self, component: str, names) -> dict[str, np.ndarray]:
        """The base float32 values of parameters (diffusers names), read from the ONNX file (cached)."""
        return self.weights.base_parameters(component, names)

    def check_patches(self, patches: dict[str, dict[str, np.ndarray]]) -> None:
        """Raise InvalidRequestError where this backend cannot take these weights (by default it takes any)."""

    def apply_weights(self, patches: dict[str, dict[str, np.ndarray]] | None) -> None:
        """Replace parameters by full new values (diffusers names); None or {} restores the base weights.

        Every call starts from base; a component whose overrides change gets a new session."""
        self.check_patches(patches or {})
        for component in self.weights.set_patches(patches or {}):
            self._sessions.pop(component, None)
            self.session(component)

    def text_tables(self) -> TextTables:
        """The token embedding table (memory-mapped) and final norm saved beside the ONNX text encoder."""
        if self._text_tables is None:
            self._text_tables = read_text_tables(self.folder, self.manifest.model["text_hidden_size"])
        return self._text_tables


class OnnxRuntimeBackend(OnnxFileBackend):
    name = "onnxruntime"

    def __init__(self, artifacts: Path, providers: list[str] | None = None, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise InvalidRequestError(
                f"unknown precision {precision!r} for the onnxruntime backend; choose one of: {', '.join(PRECISIONS)}"
            )
        self.folder = Path(artifacts)
        self.manifest = read_manifest(self.folder)
        self.providers = providers or list(CPU_PROVIDERS)
        if precision == "int8" and self.providers != CPU_PROVIDERS:
            raise InvalidRequestError("precision int8 runs on ONNX Runtime's CPU execution provider only")
        self.precision = precision
        self._sessions: dict[str, OnnxRuntimeSession] = {}
        self._text_tables: TextTables | None = None
        self.weights = OnnxWeights(self)  # LoRA: initializer overrides per component

    def model_path(self, component: str) -> Path:
        info = self.manifest.components.get(component)
        if info is None:
            raise ArtifactError(f"{self.folder} has no {component} model{REEXPORT_HINT}")
        path = self.folder / info.file
        if not path.is_file():
            raise ArtifactError(f"{path} is missing{REEXPORT_HINT}")
        return path

    def graph_kind(self, component: str) -> str | None:
        """The derived graph of `component` that runs here (manifest.DERIVED_GRAPHS), or None: the exported one."""
        if self.providers != CPU_PROVIDERS:
            return None
        if self.precision == "int8" and component in DERIVED_GRAPHS["int8"]:
            return "int8"
        return "cpu" if component in DERIVED_GRAPHS["cpu"] else None

    def session(self, component: str) -> OnnxRuntimeSession:
        if component not in self._sessions:
            path = self.model_path(component)
            overrides = self.weights.overrides.get(component)
            kind = self.graph_kind(component)
            logger.debug(
                "loading %s from %s, graph %s (%d weights overridden)", component, path, kind, len(overrides or {})
            )
            if kind:
                self._sessions[component] = self._derived_session(component, kind, overrides)
            else:
                self._sessions[component] = self._open(path, component, overrides)
        return self._sessions[component]

    def fused_attention(self) -> list[str]:
        """The components whose attention runs as MultiHeadAttention, one fused operator that never holds the
        attention scores (runtime.memory estimates them without): those running a derived graph, and those not loaded
        yet that will (a derived graph that cannot be made falls back to the exported one, which then tells)."""
        components = [c for c in self.manifest.components if self.graph_kind(c)]
        return [c for c in components if c not in self._sessions or self._sessions[c].derived]

    def _open(self, path: Path, component: str, overrides: dict[str, np.ndarray] | None) -> OnnxRuntimeSession:
        if component == "text_encoder":
            return OnnxRuntimeTextEncoder(path, self.providers, self.text_tables(), overrides)
        session = OnnxRuntimeSession(path, component, self.providers, overrides)
        if component == "text_encoder_2":
            check_text_encoder_2(path, session.input_names)
        return session

    def _derived_session(self, component: str, kind: str, overrides) -> OnnxRuntimeSession:
        """The session of a derived graph, made (again) when missing, unloadable or stale. Where the CPU graph cannot
        be made, the exported graph's session (one warning); a broken export raises ArtifactError (api re-exports)."""
        info = self.manifest.components[component]
        path = self.folder / derived_graph_file(info, kind)
        stamp = derived_graph_stamp(self.folder, info, kind)
        if path.is_file():
            session, problem = self._open_stamped(path, component, stamp, overrides)
            if session is not None:
                return session
            if problem == STALE:  # the export was replaced (or damaged: making it again tells)
                logger.info("%s %s; making it again from %s", path, problem, info.file)
            else:
                logger.warning("%s %s; making it again from %s", path, problem, info.file)
        else:
            logger.info("making %s from %s (first use)", path, info.file)
        problem = make_derived_graph(self.folder, component, kind)
        if problem is None:
            session, problem = self._open_stamped(path, component, stamp, overrides)
            if session is not None:
                return session
        session = self._open(self.model_path(component), component, overrides)  # ArtifactError: a broken export
        if kind == "int8":
            raise ModelError(f"the int8 {component} {problem}")
        logger.warning("%s: its CPU graph %s; running the exported graph", component, problem)
        return session

    def _open_stamped(
        self, path: Path, component: str, stamp: dict, overrides=None
    ) -> tuple[OnnxRuntimeSession | None, str]:
        """(session, "") when the graph at `path` loads and carries `stamp`, else (None, why)."""
        try:
            session = self._open(path, component, overrides)
        except ModelError as exc:
            return None, f"cannot be loaded ({str(exc).removesuffix(REEXPORT_HINT)})"
        metadata = session.metadata()
        if any(metadata.get(key) != value for key, value in stamp.items()):
            return None, STALE
        session.derived = True
        return session, ""

    def check_patches(self, patches: dict[str, dict[str, np.ndarray]]) -> None:
        """The int8 UNet's weights are quantised copies, so UNet patches are refused at that precision."""
        if self.precision == "int8" and any(patches.get(c) for c in DERIVED_GRAPHS["int8"]):
            raise InvalidRequestError("LoRA cannot change the int8 UNet's weights: use precision fp32 with LoRAs")


def make_cpu_graphs(folder: Path, precision: str = "fp32") -> list[Path]:
    """Make the derived graphs the onnxruntime CPU backend runs at `precision` (the fused CPU graphs; at int8 also
    the quantised UNet), or check the ones there: the export's last step, so that the first generation does not
    make them. Each is opened once and let go again. Returns their paths."""
    backend = OnnxRuntimeBackend(folder, precision=precision)
    made = []
    for component, info in backend.manifest.components.items():
        kind = backend.graph_kind(component)
        if kind:
            session = backend.session(component)
            backend._sessions.pop(component)
            if session.derived:
                made.append(backend.folder / derived_graph_file(info, kind))
    return made


class OnnxWeights:
    """The initializer overrides the current LoRA set needs, per component (names from the export's weight map)."""

    def __init__(self, backend: OnnxRuntimeBackend):
        from ..lora.sources import ArtifactWeights

        self.source = ArtifactWeights(backend.folder, backend.manifest)
        self.overrides: dict[str, dict[str, np.ndarray]] = {}  # component -> initializer name -> value

    def parameter_shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        return self.source.parameter_shapes(component)

    def base_parameters(self, component: str, names) -> dict[str, np.ndarray]:
        return self.source.base_parameters(component, names)

    def set_patches(self, patches: dict[str, dict[str, np.ndarray]]) -> list[str]:
        """Turn patches into initializer overrides; return the components whose overrides changed."""
        changed = []
        for component in sorted(set(patches) | set(self.overrides)):
            values = patches.get(component) or {}
            if not values and not self.overrides.get(component):
                continue
            self.overrides[component] = self.source.initializer_values(component, values)
            changed.append(component)
        return changed


def make_derived_graph(folder: Path, component: str, kind: str) -> str | None:
    """Write the derived graph `kind` of `component` in an artifact folder (int8: the CPU graph first); return None,
    or what went wrong (the exported graph can still run)."""
    try:
        from export.onnx_cpu import write_cpu_graph, write_int8_graph
    except ImportError as exc:
        if kind == "int8":
            raise BackendUnavailableError(
                f"precision int8 quantises the UNet once, which needs the onnx package ({exc}): "
                "pip install -e .[export]"
            ) from exc
        return f"cannot be made without the onnx package ({exc})"
    info = read_manifest(folder).components[component]
    cpu = folder / derived_graph_file(info, "cpu")
    try:
        write_cpu_graph(folder / info.file, cpu, derived_graph_stamp(folder, info, "cpu"))
        if kind == "int8":
            write_int8_graph(cpu, folder / derived_graph_file(info, "int8"), derived_graph_stamp(folder, info, "int8"))
    except Exception as exc:  # onnx/protobuf errors of a model the rewrite cannot read
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        return f"could not be made from {info.file} ({reason})"
    return None
