"""ONNX Runtime on the CUDA execution provider (the `onnxruntime-gpu` wheel, the `gpu` extra).

Models: ONNX Runtime's own Stable Diffusion fusions (attention, GroupNorm, BiasSplitGelu ...) only match fp32
graphs, so each fp32 export is fused first (`onnxruntime.transformers.optimizer`, model types unet / vae / clip),
then converted to fp16 with float32 IO (the timestep embedding's nodes kept fp32, and SDXL's time_ids'), into
`<artifacts>/fp16-ort/`. SDXL's text encoder 2 is fused as a CLIP model too; its VAE stays fp32 (force_upcast).
The CPU provider cannot run those fused models; the fp16 export of export/fp16.py is what runs there.

Running: the UNet is bound to fixed device buffers (IO binding) per input shape, and with `enable_cuda_graph`
each shape gets its own `gpu_graph_id`: after one plain run (id -1) ONNX Runtime captures the id's first run and
replays it afterwards.
An input that is the same read-only array object as the one last copied into its bound buffer (the
per-generation text conditioning) is not copied again.
The other components run plainly on the CUDA provider; depth2img's depth estimator (once per request) runs as
its fp32 export, unfused. The VAE decoder's NaN/Inf outputs are computed again in fp32 (the fp16 VAE overflow).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ArtifactError, ModelError
from ..manifest import REEXPORT_HINT, read_manifest
from .gpu import NanGuard, fp32_fallback_session, vae_runs_fp16

logger = logging.getLogger(__name__)

ORT_DIR = "fp16-ort"
MODEL_TYPES = {"unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae", "text_encoder": "clip",
               "text_encoder_2": "clip"}  # fmt: skip


def fused_fp16_model(folder: Path, component: str, keep_vae_fp32: bool) -> Path:
    """`<folder>/fp16-ort/<component>.onnx`: fused by ONNX Runtime's optimizer, then fp16 (reused when present)."""
    from onnxruntime.transformers.optimizer import optimize_model

    from export.fp16 import timestep_path_nodes

    manifest = read_manifest(folder)
    src = folder / manifest.components[component].file
    out = folder / ORT_DIR / f"{component}.onnx"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        optimized = optimize_model(str(src), model_type=MODEL_TYPES[component], num_heads=0, hidden_size=0,
                                   opt_level=0, use_gpu=True)  # fmt: skip
    except Exception as exc:  # onnx/protobuf decode errors: the exported fp32 model itself is broken
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ArtifactError(f"{src} cannot be read for ONNX Runtime's fusions ({reason}){REEXPORT_HINT}") from exc
    keep_fp32 = component.startswith("vae_") and keep_vae_fp32
    if not keep_fp32:
        blocked = timestep_path_nodes(optimized.model) if component == "unet" else []
        optimized.convert_float_to_float16(keep_io_types=True, node_block_list=blocked)
    _save_atomically(optimized, out)
    return out


def _save_atomically(optimized, out: Path) -> None:
    """Save into a scratch folder beside `out`, then rename: the weights file first, the .onnx last (its presence
    means finished)."""
    from export.onnx_clean import EXTERNAL_DATA_THRESHOLD, _weight_bytes

    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=".ort-"))
    try:
        external = _weight_bytes(optimized.model) > EXTERNAL_DATA_THRESHOLD
        optimized.save_model_to_file(str(work / out.name), use_external_data_format=external)
        for path in sorted(work.iterdir(), key=lambda p: p.suffix == ".onnx"):
            os.replace(path, out.parent / path.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


class GraphedSession:
    """The UNet on fixed CUDA buffers, one CUDA graph per input shape (`gpu_graph_id`)."""

    def __init__(self, session, component: str):
        import onnxruntime as ort

        self.ort, self.session, self.component = ort, session, component
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.dtypes = {i.name: _numpy_dtype(i.type) for i in session.get_inputs()}  # "tensor(float)" -> float32
        self.bindings: dict = {}  # input shapes -> (graph id, io binding, input values, output values)
        self.uploaded: dict = {}  # (shapes key, input name) -> the read-only array its bound buffer holds

    def _binding(self, feeds: dict[str, np.ndarray]):
        key = tuple((n, feeds[n].shape) for n in self.input_names)
        if key not in self.bindings:
            for name in self.input_names:
                self.uploaded.pop((key, name), None)
            ort = self.ort
            io = self.session.io_binding()
            inputs = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(feeds[n], self.dtypes[n]), "cuda", 0)
                      for n in self.input_names}  # fmt: skip
            for n, value in inputs.items():
                io.bind_ortvalue_input(n, value)
            for n in self.output_names:
                io.bind_output(n, "cuda", 0)
            io.synchronize_inputs()
            # a plain run (gpu_graph_id -1: no capture) for the output shapes and the arena; ONNX Runtime captures
            # this id on its next run, once the outputs below are bound to fixed buffers
            self.session.run_with_iobinding(io, self._options(-1))
            outputs = dict(zip(self.output_names, io.get_outputs()))
            io.clear_binding_outputs()
            for n, value in outputs.items():
                io.bind_ortvalue_output(n, value)  # fixed output buffers from now on
            self.bindings[key] = (len(self.bindings) + 1, io, inputs, outputs)
        return key, self.bindings[key]

    def _options(self, graph_id: int):
        options = self.ort.RunOptions()
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
        return options

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        key, (graph_id, io, inputs, values) = self._binding(feeds)
        for name, value in inputs.items():
            feed = np.asarray(feeds[name])  # the same object for an array: identity is kept
            if feed is self.uploaded.get((key, name)) and not feed.flags.writeable:
                continue  # its values are on the device already
            # same dtype as the bound buffer (update_inplace copies raw bytes; class_labels are int64)
            value.update_inplace(np.ascontiguousarray(feed, dtype=self.dtypes[name]))
            self.uploaded[key, name] = None if feed.flags.writeable else feed
        io.synchronize_inputs()  # the host -> device copies are done before the replay reads them
        try:
            self.session.run_with_iobinding(io, self._options(graph_id))
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{self.component} failed on the CUDA provider: {reason}") from exc
        return {name: values[name].numpy() for name in (outputs or self.output_names)}


class OnnxRuntimeCudaBackend:
    name = "onnxruntime-cuda"

    def __init__(self, artifacts: Path, cuda_graph: bool = True, device_id: int = 0):
        from .onnxruntime import read_text_tables

        self.folder = Path(artifacts)
        self.manifest = read_manifest(self.folder)
        self.cuda_graph = cuda_graph
        self.device_id = device_id
        self._sessions: dict = {}
        self._tables = read_text_tables(self.folder, self.manifest.model["text_hidden_size"])

    def _providers(self, graph: bool) -> list:
        options = {"device_id": str(self.device_id), "arena_extend_strategy": "kSameAsRequested",
                   "enable_cuda_graph": "1" if graph else "0"}  # fmt: skip
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]

    def session(self, component: str):
        if component not in self._sessions:
            import onnxruntime as ort

            from .onnxruntime import OnnxRuntimeSession

            if component not in self.manifest.components:
                raise ModelError(f"{self.folder} has no {component} model; re-export with --force")
            if component not in MODEL_TYPES:  # the depth estimator: ONNX Runtime has no fusions for it
                path = self.folder / self.manifest.components[component].file
                self._sessions[component] = OnnxRuntimeSession(path, component, self._providers(False))
                return self._sessions[component]
            keep_vae = not vae_runs_fp16(self.manifest.model)
            try:
                session = self._open(ort, component, keep_vae)
            except ArtifactError:  # the fused fp16 file is derived here: rebuild it once from the fp32 export
                fused = self.folder / ORT_DIR / f"{component}.onnx"
                if not fused.is_file():
                    raise  # the fp32 export itself is broken: api.load exports it again
                logger.warning("%s: the fused fp16 model is unreadable; fusing it again", component)
                fused.unlink()
                session = self._open(ort, component, keep_vae)
            if component == "vae_decoder" and not keep_vae:
                session = NanGuard(session, lambda: fp32_fallback_session(self.folder, "vae_decoder"))
            self._sessions[component] = session
        return self._sessions[component]

    def _open(self, ort, component: str, keep_vae: bool):
        from .onnxruntime import OnnxRuntimeSession, OnnxRuntimeTextEncoder, check_text_encoder_2

        path = fused_fp16_model(self.folder, component, keep_vae)
        if component == "text_encoder":
            return OnnxRuntimeTextEncoder(path, self._providers(False), self._tables)
        if component == "text_encoder_2":
            session = OnnxRuntimeSession(path, component, self._providers(False))
            check_text_encoder_2(path, session.input_names)
            return session
        if self.cuda_graph and component == "unet":
            return self._graphed_session(ort, path, component)
        return OnnxRuntimeSession(path, component, self._providers(False))

    def _graphed_session(self, ort, path: Path, component: str):
        """The CUDA-graph session, or (one warning) the plain CUDA one where ONNX Runtime refuses graph capture for
        this model at session creation (a compute node placed on the CPU provider, control flow)."""
        from .onnxruntime import OnnxRuntimeSession

        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            raw = ort.InferenceSession(str(path), options, providers=self._providers(True))
        except Exception as exc:  # onnxruntime raises its own Fail/RuntimeException types here
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            logger.warning("%s: no CUDA graph on ONNX Runtime (%s); running it without", component, reason)
            return OnnxRuntimeSession(path, component, self._providers(False))
        return GraphedSession(raw, component)

    def text_tables(self):
        return self._tables


_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}  # fmt: skip


def _numpy_dtype(onnx_type: str):
    return np.dtype(_ONNX_TYPES.get(onnx_type, np.float32))
