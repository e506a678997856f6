"""TensorRT backend: the engines `cli.py build` wrote, run through cuda-bindings (no torch).

Lifecycle per engine (written against the TensorRT 10.x / 11.x Python API):
  load       deserialize once; an execution context with user-managed activation memory
  activate   every context points at one shared activation block, sized by the largest
             `device_memory_size_v2` of all engines (the stages run one after another on one stream)
  bind       device buffers per input/output (grown, never shrunk); `set_input_shape` + `set_tensor_address`
  infer      host -> device copies through pinned staging buffers, `execute_async_v3`, device -> host into pinned
             buffers, one synchronisation per call; an input that is the same read-only array object as the one
             last uploaded to its buffer (the per-generation text conditioning) is not uploaded again
  graph      the UNet: after one eager warm-up per shape, `execute_async_v3` is captured as a CUDA graph per shape
             and replayed every step; graphs of other shapes stay valid while no buffer moves; a moved buffer, a
             new activation block or a refit drops them all; a capture that fails falls back to eager for that
             shape, with one log line
SDXL: text encoder 2 has engines of its own (token ids in; a call over its rows runs in slices, as text encoder 1's),
the UNet's text_embeds and time_ids are bound like its other inputs, the VAE engine is fp32 (force_upcast).
A request whose UNet shape (rows, token chunks, size) no engine covers is refused before any work by
`check_request`, naming the `cli.py build` options that cover it. depth2img's depth estimator (one call per
request) runs as its fp32 ONNX model on ONNX Runtime.
`apply_weights` refits a refittable engine (`build --refit`) from base + patch values, every call from base.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, InvalidRequestError, ModelError
from ..manifest import read_manifest
from .gpu import NanGuard, fp32_fallback_session

logger = logging.getLogger(__name__)

GRAPHED_COMPONENTS = ("unet",)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SDXL's second: ids and override rows in, states and pooled out


class SharedActivations:
    """One device block every execution context uses for its activations; grows (and says so) when needed."""

    def __init__(self):
        self.buffer = None
        self.size = 0
        self.generation = 0  # bumped on each reallocation: contexts re-point and graphs are recaptured

    def reserve(self, size: int) -> None:
        from ..cuda import DeviceBuffer

        if size > self.size:
            if self.buffer is not None:
                self.buffer.close()
            self.buffer = DeviceBuffer(size)
            self.size = size
            self.generation += 1


class Engine:
    """One deserialized engine, its execution context, bound buffers and (for the UNet) its CUDA graphs."""

    def __init__(self, trt, runtime, plan: Path, shared: SharedActivations, graphed: bool):
        self.trt, self.plan, self.shared, self.graphed = trt, plan, shared, graphed
        self.profile = json.loads(plan.with_suffix(".json").read_text(encoding="utf-8"))
        self.engine = runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise ModelError(f"{plan} does not deserialize here; rebuild it (python cli.py build --force)")
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.context = self.engine.create_execution_context(strategy)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        # the largest activation size over all profiles; TensorRT 11 removed `device_memory_size` (v1), and a v2
        # of 0 is a real answer (no activations), not a reason to ask v1
        if hasattr(self.engine, "device_memory_size_v2"):
            size = self.engine.device_memory_size_v2
        else:
            size = self.engine.device_memory_size
        shared.reserve(int(size))
        self.buffers: dict = {}  # name -> DeviceBuffer
        self.staging: dict = {}  # name -> PinnedBuffer of the same size (host side of every copy)
        self.uploaded: dict = {}  # input name -> the read-only array whose values its device buffer holds
        self.bound: dict[str, tuple[int, ...]] = {}
        self.host_out: dict[str, np.ndarray] = {}  # output name -> pinned view of the bound shape
        self.memory_generation = 0
        self.graphs: dict = {}  # input shapes -> CudaGraph, or None after a failed capture (eager)
        self.warm: set = set()

    def covers(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether the profile the engine was built for admits these input shapes."""
        return _profile_covers(self.profile["shapes"], shapes)

    @property
    def static(self) -> bool:
        return all(low == high for low, _, high in self.profile["shapes"].values())

    def _bind(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Device buffers for these input shapes. Graphs captured for other shapes survive unless a buffer or the
        activation block moved (their kernels hold those addresses)."""
        if shapes == self.bound and self.memory_generation == self.shared.generation:
            return
        for name in self.inputs:
            if not self.context.set_input_shape(name, shapes[name]):
                raise ModelError(f"{self.plan.name} rejects {name} of shape {shapes[name]}")
        moved = self.memory_generation != self.shared.generation
        # after the shapes (TensorRT sizes user-managed activations for the current shapes), on every rebind
        if self.shared.buffer is not None:
            _set_device_memory(self.context, self.shared.buffer.ptr, self.shared.size)
        self.memory_generation = self.shared.generation
        for name in self.inputs + self.outputs:
            shape = tuple(shapes[name]) if name in shapes else tuple(self.context.get_tensor_shape(name))
            moved |= self._ensure_buffer(name, int(np.prod(shape)) * self.dtypes[name].itemsize)
            if not self.context.set_tensor_address(name, self.buffers[name].ptr):
                raise ModelError(f"{self.plan.name}: set_tensor_address({name}) failed")
            if name in self.outputs:
                self.host_out[name] = self._staged(name, shape)
        if moved:
            self.invalidate_graphs()
        self.bound = dict(shapes)

    def _ensure_buffer(self, name: str, nbytes: int) -> bool:
        """A device buffer and a pinned staging buffer of at least `nbytes` for `name`; True if they were (re)made."""
        from ..cuda import DeviceBuffer, PinnedBuffer

        if name in self.buffers and self.buffers[name].nbytes >= nbytes:
            return False
        if name in self.buffers:
            self.buffers[name].close()
            self.staging[name].close()
        self.buffers[name] = DeviceBuffer(nbytes)
        self.staging[name] = PinnedBuffer((nbytes,), np.uint8)
        self.uploaded.pop(name, None)
        return True

    def _staged(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The pinned staging memory of `name` seen as an array of `shape` in the engine's dtype."""
        dtype = self.dtypes[name]
        count = int(np.prod(shape))
        return self.staging[name].array[: count * dtype.itemsize].view(dtype).reshape(shape)

    def _upload(self, name: str, value: np.ndarray, stream) -> None:
        """Copy `value` to its device buffer (converted to the engine's dtype while staging), unless it is the
        same read-only array object uploaded last (kept referenced, so its id cannot be reused)."""
        if value is self.uploaded.get(name) and not value.flags.writeable:
            return
        staged = self._staged(name, value.shape)
        np.copyto(staged, value, casting="unsafe")  # the cast astype would do, without its copy
        self.buffers[name].copy_from_host(staged, stream)
        self.uploaded[name] = value if not value.flags.writeable else None

    def _enqueue(self, stream) -> None:
        if not self.context.execute_async_v3(stream.ptr):
            raise ModelError(f"{self.plan.name}: execute_async_v3 failed (see TensorRT's log)")

    def run(self, feeds: dict[str, np.ndarray], stream) -> dict[str, np.ndarray]:
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        self._bind(shapes)
        for name in self.inputs:
            self._upload(name, np.asarray(feeds[name]), stream)
        self._execute(stream, tuple(sorted(shapes.items())))
        for name in self.outputs:
            self.buffers[name].copy_to_host(self.host_out[name], stream)
        stream.synchronize()
        return {name: self.host_out[name].astype(np.float32, copy=True) for name in self.outputs}

    def _execute(self, stream, key) -> None:
        """Replay the graph of this shape, capture it after one warm-up run, or run eagerly."""
        from ..cuda import CaptureError, CudaGraph

        graph = self.graphs.get(key)
        if graph is not None:
            graph.launch()
            return
        if not self.graphed or key in self.graphs or key not in self.warm:
            self._enqueue(stream)  # eager: not graphed, capture failed before, or the warm-up run
            self.warm.add(key)
            return
        try:
            self.graphs[key] = CudaGraph(stream, self._enqueue)
        except CaptureError as exc:
            logger.warning("%s: CUDA graph capture failed, running eagerly (%s)", self.plan.name, exc)
            self.graphs[key] = None
            self._enqueue(stream)
            return
        self.graphs[key].launch()

    def invalidate_graphs(self) -> None:
        for graph in self.graphs.values():
            if graph is not None:
                graph.destroy()
        self.graphs.clear()
        self.warm.clear()


def _set_device_memory(context, ptr: int, size: int) -> None:
    """TensorRT >= 10.1 (and 11) take (pointer, size) (setDeviceMemoryV2); older bindings one argument or the
    `device_memory` property."""
    if hasattr(context, "set_device_memory"):
        try:
            context.set_device_memory(ptr, size)
        except TypeError:  # a binding without the size argument
            context.set_device_memory(ptr)
    else:
        context.device_memory = ptr


def _profile_covers(profile: dict, shapes: dict) -> bool:
    """Whether a sidecar's {input: [min, opt, max]} admits these input shapes."""
    for name, (low, _, high) in profile.items():
        shape = shapes.get(name)
        if shape is None or len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            return False
    return True


class TensorRTSession:
    """One component: every engine built for it, the best one picked per call by its input shapes."""

    def __init__(self, component: str, engines: list[Engine], stream):
        self.component, self.engines, self.stream = component, engines, stream

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        shapes = {name: tuple(np.shape(value)) for name, value in feeds.items()}
        if self.component in TEXT_ENCODERS and not any(e.covers(shapes) for e in self.engines):
            return self._run_in_slices(feeds, outputs)
        engine = self._pick(shapes)
        values = engine.run(feeds, self.stream)
        return {name: values[name] for name in (outputs or engine.outputs)}

    def _run_in_slices(self, feeds: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        """A text encoder over more rows than its profile takes (many texts x chunks): slices of at most the
        largest row count an engine takes, joined again (rows are independent; hidden_states has rows on axis 1).
        Its inputs: inputs_embeds [n, 77, D] (text encoder 1), or input_ids [n, 77] and token_overrides [n, 77, D]
        (SDXL's text encoder 2), all sliced alike."""
        name, rows = next(iter(feeds.items()))
        step = max(e.profile["shapes"][name][2][0] for e in self.engines)
        parts = [self.run({key: value[i : i + step] for key, value in feeds.items()}, outputs)
                 for i in range(0, len(rows), step)]  # fmt: skip
        return {name: np.concatenate([part[name] for part in parts], axis=1 if name == "hidden_states" else 0)
                for name in parts[0]}  # fmt: skip

    def _pick(self, shapes: dict) -> Engine:
        fitting = [e for e in self.engines if e.covers(shapes)]
        if not fitting:
            built = ", ".join(e.profile["profile"] for e in self.engines) or "none"
            wanted = ", ".join(f"{k} {list(v)}" for k, v in shapes.items())
            raise ModelError(
                f"no TensorRT engine of {self.component} takes {wanted} (built: {built}); build one with python "
                "cli.py build (--width/--height or --dynamic, --batch-size, --and-terms, --token-chunks)"
            )
        return min(fitting, key=lambda e: not e.static)  # a static profile (graph-friendly) first


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, artifacts: Path):
        import tensorrt as trt

        from ..cuda import Stream, compute_capability
        from .onnxruntime import read_text_tables

        self.folder = Path(artifacts)
        self.manifest = read_manifest(self.folder)
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        major, minor = compute_capability(0)
        self.key_suffix = f".trt{trt.__version__}.sm{major}{minor}.plan"
        self.stream = Stream()
        self.shared = SharedActivations()
        self._sessions: dict = {}
        self._tables = None
        self._read_tables = read_text_tables
        self._base_weights: dict[str, dict[str, np.ndarray]] = {}
        if not self._plans():
            raise BackendUnavailableError(
                f"{self.folder / 'tensorrt'} has no engines for TensorRT {trt.__version__} on this GPU: "
                "build them first (python cli.py build --model ...)"
            )

    def _plans(self) -> list[Path]:
        folder = self.folder / "tensorrt"
        return sorted(p for p in folder.glob(f"*{self.key_suffix}") if p.with_suffix(".json").is_file())

    def check_request(self, admission) -> None:
        """InvalidRequestError, before any work, when no UNet engine takes the request `admission` measured (its
        rows, token chunks and every pass's size); the message is the build command that covers it."""
        if admission.mode == "upscale":
            return  # the x4 upscaler's UNet runs at the input size, not the output's
        from export.specs import component_specs

        spec = component_specs(self.manifest.model)["unet"]
        profiles = [json.loads(p.with_suffix(".json").read_text(encoding="utf-8"))
                    for p in self._plans() if p.name.startswith("unet.")]  # fmt: skip
        rows, chunks = admission.batch * admission.rows, admission.prompt.chunks
        for width, height in admission.sizes:
            shapes = {t.name: spec.shapes(rows, height, width, chunks)[t.name] for t in spec.inputs}
            if not any(_profile_covers(p["shapes"], shapes) for p in profiles):
                built = ", ".join(p["profile"] for p in profiles) or "none"
                raise InvalidRequestError(
                    f"no TensorRT UNet engine takes {admission.batch} image(s) of {width}x{height} with "
                    f"{admission.prompt.terms} AND term(s) and {chunks} token chunk(s) ({rows} rows; built: {built}): "
                    f"python cli.py build --batch-size {admission.batch} --and-terms {admission.prompt.terms} "
                    f"--token-chunks {chunks} --width {width} --height {height} (or --dynamic MIN..MAX)"
                )

    def session(self, component: str):
        if component == "depth_estimator" and component not in self._sessions:
            # one call per depth2img request, outside the denoising loop: its fp32 ONNX model is enough
            self._sessions[component] = fp32_fallback_session(self.folder, component)
        if component not in self._sessions:
            plans = [p for p in self._plans() if p.name.split(".", 1)[0] == component]
            if not plans:
                raise ModelError(f"no TensorRT engine of {component} in {self.folder / 'tensorrt'}; run cli.py build")
            graphed = component in GRAPHED_COMPONENTS
            engines = [Engine(self.trt, self.runtime, p, self.shared, graphed) for p in plans]
            session = TensorRTSession(component, engines, self.stream)
            if component == "vae_decoder" and any(".fp16." in p.name for p in plans):
                session = NanGuard(session, lambda: fp32_fallback_session(self.folder, "vae_decoder"))
            self._sessions[component] = session
        return self._sessions[component]

    def text_tables(self):
        if self._tables is None:
            self._tables = self._read_tables(self.folder, self.manifest.model["text_hidden_size"])
        return self._tables

    def apply_weights(self, patches: dict[str, dict[str, np.ndarray]] | None) -> None:
        """Refit the UNet / text encoder(s) engines to base + patch values (None or {}: base weights exactly)."""
        from .tensorrt_refit import refit_component

        for component in sorted({*(patches or {}), *self._base_weights}):  # SDXL: text_encoder_2 too
            values = (patches or {}).get(component, {})
            if not values and component not in self._base_weights:
                continue  # never patched: already base
            session = self.session(component)
            engines = getattr(session, "engines", None) or session.primary.engines
            refit_component(self, component, engines, values)
