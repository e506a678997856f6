"""The TensorRT side of engine builds (TensorRT 10.x / 11.x Python API): strongly typed networks parsed from the
fp16 ONNX, one optimisation profile, builder optimisation level, a persistent timing cache, optional REFIT.

Strongly typed networks take their precisions from the ONNX types (BuilderFlag.FP16 was deprecated in 10.12 and
removed in 11), so the fp16 export decides what runs in fp16 and what stays fp32.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from runtime.errors import BackendUnavailableError, ModelError
from runtime.manifest import atomic_write_bytes

from .tensorrt_build import EngineSpec

logger = logging.getLogger(__name__)

WORKSPACE_BYTES = 8 << 30  # bounded tactic workspace (builds that take all memory fail on smaller GPUs)


def _compute_capability() -> str:
    from runtime.cuda import compute_capability

    major, minor = compute_capability(0)
    return f"{major}{minor}"


class _Progress:
    """Build phases as log lines with elapsed time (a TensorRT IProgressMonitor, created lazily)."""

    @staticmethod
    def create(trt):
        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)
                self.started: dict[str, float] = {}

            def phase_start(self, phase_name, parent_phase, num_steps):
                self.started[phase_name] = time.perf_counter()
                if parent_phase is None:
                    logger.info("tensorrt: %s (%d steps)", phase_name, num_steps)

            def step_complete(self, phase_name, step):
                return True  # never cancel

            def phase_finish(self, phase_name):
                elapsed = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
                logger.debug("tensorrt: %s done in %.1f s", phase_name, elapsed)

        return Monitor()


class TensorRTBuilder:
    """Builds serialized engines; `can_deserialize` is the cache's load check."""

    def __init__(self):
        try:
            import tensorrt as trt
        except ImportError as exc:
            message = "building engines needs the 'tensorrt' package, which is not installed"
            raise BackendUnavailableError(message) from exc
        self.trt = trt
        self.version = trt.__version__
        self.compute_capability = _compute_capability()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)

    def can_deserialize(self, plan: bytes) -> bool:
        try:
            return self.runtime.deserialize_cuda_engine(plan) is not None
        except Exception:  # TensorRT raises its own types for corrupt or foreign plans
            return False

    def build(self, onnx_path: Path, spec: EngineSpec, timing_cache: Path) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse_from_file(str(onnx_path)):  # reads external weights beside the file
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ModelError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}")
        config = builder.create_builder_config()
        config.builder_optimization_level = spec.opt_level
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
        if spec.refit:
            config.set_flag(trt.BuilderFlag.REFIT)
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in spec.shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
        monitor = _Progress.create(trt) if hasattr(trt, "IProgressMonitor") else None
        if monitor is not None:
            config.progress_monitor = monitor
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise ModelError(f"TensorRT could not build {spec.component} ({spec.profile}); see its log above")
        atomic_write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()))
        return bytes(plan)
