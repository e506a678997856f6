"""The NVIDIA backends' registry half: what each needs installed, and opening one (imports stay lazy).

onnxruntime-cuda   fp16 ONNX on ONNX Runtime's CUDA execution provider (the onnxruntime-gpu wheel)
tensorrt           fp16 TensorRT engines built by `cli.py build`, over cuda-bindings (no torch)
torch-cuda         the diffusers modules in fp16 on CUDA, the UNet step as a torch CUDA graph
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from ..errors import BackendUnavailableError, ModelError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e .[gpu]"


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:  # a parent package (cuda for cuda.bindings) is missing
        return True


def check_gpu_backend(name: str) -> str:
    """One BackendUnavailableError line naming what is missing; the name when the packages are there.

    Whether a device exists is checked when the backend opens (it needs the driver)."""
    if name == "tensorrt":
        if _missing("tensorrt"):
            raise BackendUnavailableError(
                "the tensorrt backend needs the 'tensorrt' package (NVIDIA's TensorRT 10+ wheel), which is not "
                "installed"
            )
        if _missing("cuda.bindings"):
            raise BackendUnavailableError(f"the tensorrt backend needs 'cuda-bindings' ({INSTALL_HINT})")
    elif name == "onnxruntime-cuda":
        if _missing("onnxruntime"):
            raise BackendUnavailableError(f"the onnxruntime-cuda backend needs 'onnxruntime-gpu' ({INSTALL_HINT})")
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise BackendUnavailableError(
                "the onnxruntime-cuda backend needs 'onnxruntime-gpu' in place of 'onnxruntime' (this one has no "
                "CUDA execution provider)"
            )
    elif name == "torch-cuda":
        if _missing("torch") or _missing("diffusers"):
            raise BackendUnavailableError(
                "the torch-cuda backend needs 'torch' and 'diffusers' (pip install -e .[export])"
            )
        from .torch_cuda import require_cuda

        require_cuda()
    return name


def open_gpu_backend(name: str, *, artifacts: Path | None, checkpoint: Path | None, allow_pickle: bool = False):
    """The backend `name`: over the artifact folder (fp32 export; fp16 models and engines live inside it) or, for
    torch-cuda, the diffusers checkpoint."""
    if name == "torch-cuda":
        from .torch_cuda import TorchCudaBackend

        return TorchCudaBackend(checkpoint, allow_pickle)
    if artifacts is None:
        raise ModelError(f"the {name} backend runs exported models: give a checkpoint or an artifact folder")
    if name == "tensorrt":
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(artifacts)
    from .onnxruntime_cuda import OnnxRuntimeCudaBackend

    return OnnxRuntimeCudaBackend(artifacts)


def vae_runs_fp16(model: dict) -> bool:
    """Whether the VAE runs in fp16 on a GPU backend: yes for SD 1.x/2.x, as diffusers' StableDiffusionPipeline
    decodes in the pipeline's dtype whatever the VAE config's `force_upcast` says (SD 1.5's says true); the x4
    upscaler's and SDXL's pipelines honour force_upcast (upcast_vae; SDXL's VAE config says it, its decode
    overflows in fp16), so their VAE follows the config (an fp16-safe SDXL VAE given with --vae says false). An fp16
    decode that overflows is computed again in fp32 (NanGuard), as A1111 does."""
    follows_config = model.get("unet_num_class_embeds") or model.get("sdxl")
    return not (follows_config and model.get("vae_force_upcast", True))


class NanGuard:
    """A session whose NaN/Inf outputs are computed again by an fp32 session (the fp16 VAE's overflow), with one
    warning; the fp32 session is opened on first need. The result is never a silently black image. `retried`
    says whether the last run was the fp32 retry (the pipeline notes it in the infotext)."""

    def __init__(self, primary, make_fallback):
        self.primary = primary
        self.make_fallback = make_fallback
        self.fallback = None
        self.retried = False

    def run(self, feeds: dict, outputs: list[str] | None = None) -> dict:
        import numpy as np

        self.retried = False
        values = self.primary.run(feeds, outputs)
        if all(np.isfinite(v).all() for v in values.values()):
            return values
        self.retried = True
        logger.warning("%s produced NaN/Inf values in fp16; computing it again in fp32", _name(self.primary))
        if self.fallback is None:
            self.fallback = self.make_fallback()
        return self.fallback.run(feeds, outputs)


def _name(session) -> str:
    return getattr(session, "component", type(session).__name__)


def fp32_fallback_session(folder: Path, component: str):
    """The fp32 ONNX model of `component` on ONNX Runtime: CUDA provider where this onnxruntime has it, else CPU."""
    import onnxruntime

    from .onnxruntime import OnnxRuntimeBackend

    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return OnnxRuntimeBackend(folder, providers).session(component)
