"""Upscaler models on the NVIDIA backends: fp16 where spandrel says the architecture supports half precision, fp32
otherwise, and an fp16 output tile with NaN/Inf computed again in fp32.

onnxruntime-cuda   the export's fp16 ONNX (export.upscalers.export_fp16: float32 IO, fp16 inside) on ONNX Runtime's
                   CUDA provider; the fp32 ONNX where there is no fp16 one
torch-cuda         spandrel's module itself on CUDA, cast to fp16 where supported (export.upscalers'
                   TorchUpscalerSession)
tensorrt           no TensorRT engine of upscalers yet: under the tensorrt backend they run on onnxruntime-cuda where
                   its CUDA provider is installed, else on torch-cuda (same precision rules), else (one warning)
                   on onnxruntime's CPU provider in fp32

The fallback (HalfWithFallback) works per model call, so per tile: the fp32 session (the fp32 ONNX on the same
provider, or a second fp32 copy of the module) is opened on the first tile that needs it and kept; the first
retry is logged as a warning, later ones at debug level. An output that is not finite in fp32 either is a
NumericalError. The memory estimate of ModelUpscaler (host memory) is not a device memory check.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, NumericalError

logger = logging.getLogger(__name__)

TENSORRT_RUNNERS = ("onnxruntime-cuda", "torch-cuda")  # what runs upscaler models under the tensorrt backend
CUDA_PROVIDERS = [("CUDAExecutionProvider", {"device_id": "0", "arena_extend_strategy": "kSameAsRequested"}),
                  "CPUExecutionProvider"]  # fmt: skip


class HalfWithFallback:
    """`run` of the fp16 session `half`; where its outputs hold NaN/Inf, the fp32 session `make_fp32()` (opened on
    first need) computes them again; NumericalError where those are not finite either. `retries` counts the calls
    that fell back."""

    def __init__(self, half, make_fp32, name: str):
        self.half, self.make_fp32, self.name = half, make_fp32, name
        self.fp32 = None
        self.retries = 0

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        values = self.half.run(feeds, outputs)
        if _finite(values):
            return values
        self.retries += 1
        level = logging.WARNING if self.retries == 1 else logging.DEBUG
        logger.log(level, "upscaler %s: NaN/Inf in fp16, computing the tile again in fp32 (%d so far)", self.name,
                   self.retries)  # fmt: skip
        if self.fp32 is None:
            self.fp32 = self.make_fp32()
        values = self.fp32.run(feeds, outputs)
        if not _finite(values):
            raise NumericalError(f"the upscaler {self.name} produced NaN/Inf values in fp16 and again in fp32")
        return values


def _finite(values: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(v).all() for v in values.values())


def runner(backend: str) -> str:
    """The backend that runs upscaler models for the GPU backend `backend`, checked: onnxruntime-cuda and torch-cuda
    themselves (a BackendUnavailableError of one line names what is missing); tensorrt the first available of
    TENSORRT_RUNNERS, else (a warning naming why) "onnxruntime" on the CPU, as before GPU upscalers existed."""
    from ..backends.gpu import check_gpu_backend

    if backend != "tensorrt":
        return check_gpu_backend(backend)
    reasons = []
    for name in TENSORRT_RUNNERS:
        try:
            return check_gpu_backend(name)
        except BackendUnavailableError as exc:
            reasons.append(str(exc))
    logger.warning("upscaler models under the tensorrt backend run on onnxruntime-cuda or torch-cuda (no TensorRT "
                   "engines of them yet), and neither is available (%s): running them on onnxruntime on the CPU",
                   "; ".join(reasons))  # fmt: skip
    return "onnxruntime"


def gpu_session(name: str, folder: Path, meta: dict, path: Path, allow_pickle: bool):
    """What runs the upscaler on `name` (onnxruntime-cuda or torch-cuda, as runner() chose it):
    `run({"image": x}, ["upscaled"])`, float32 in and out."""
    if name == "onnxruntime-cuda":
        return onnxruntime_session(folder, meta, CUDA_PROVIDERS)
    return torch_session(path, allow_pickle, meta, "cuda")


def onnxruntime_session(folder: Path, meta: dict, providers: list):
    """The fp16 ONNX on `providers` with the fp32 one as its fallback; the fp32 ONNX alone where there is no fp16."""
    from ..backends.onnxruntime import OnnxRuntimeSession
    from .files import fp16_model_path, model_path

    name = meta["source"]["name"]
    half = fp16_model_path(folder, meta)

    def fp32():
        return OnnxRuntimeSession(model_path(folder), "upscaler", providers)

    if half is None:
        return fp32()
    return HalfWithFallback(OnnxRuntimeSession(half, "upscaler (fp16)", providers), fp32, name)


def torch_session(path: Path, allow_pickle: bool, meta: dict, device: str):
    """spandrel's module on `device`, fp16 where the architecture supports it with a second fp32 module as its
    fallback; fp32 alone otherwise."""
    from export.upscalers import TorchUpscalerSession, load_descriptor

    if device == "cuda":
        from ..backends.torch_cuda import require_cuda

        require_cuda()

    def fp32():
        return TorchUpscalerSession(load_descriptor(path, allow_pickle), device)

    if not meta.get("supports_half"):
        return fp32()
    half = TorchUpscalerSession(load_descriptor(path, allow_pickle), device, "float16")
    return HalfWithFallback(half, fp32, meta["source"]["name"])
