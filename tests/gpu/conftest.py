"""Shared fixtures of the NVIDIA-path tests: one fp32 and one fp16 export of the tiny SD1 checkpoint per session.

The `gpu` marker's tests skip with the reason where CUDA, cuda-bindings or TensorRT are absent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import HAS_TORCH, single_torch_thread


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU, asked of the kernel driver's device files and not of CUDA: where a GPU
    is present but the driver, cuda-bindings or torch's CUDA fail, the GPU tests run and fail with that reason; only a
    machine without a GPU skips them."""
    return any(Path("/dev").glob("nvidia[0-9]*"))


HAS_CUDA = gpu_present()
HAS_TENSORRT = _has("tensorrt")
HAS_CUPY = _has("cupy")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no NVIDIA GPU on this machine (no /dev/nvidia*)")
needs_tensorrt = pytest.mark.skipif(
    not (HAS_CUDA and HAS_TENSORRT), reason="TensorRT (the 'tensorrt' package) and an NVIDIA GPU are needed"
)


one_torch_thread = pytest.fixture(scope="session", autouse=True)(single_torch_thread)


@pytest.fixture(scope="session")
def gpu_engines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gpu-engines")


@pytest.fixture(scope="session")
def sd1_fp32(tiny_sd1: Path, gpu_engines_dir: Path) -> Path:
    if not HAS_TORCH:
        pytest.skip("exporting needs torch and diffusers (export extras)")
    from export import export_model

    return export_model(tiny_sd1, gpu_engines_dir, progress=False)


@pytest.fixture(scope="session")
def sd1_fp16(sd1_fp32: Path) -> Path:
    from export.fp16 import export_fp16

    return export_fp16(sd1_fp32, progress=False)


@pytest.fixture(scope="session")
def sdxl_fp32(tiny_sdxl: Path, shared_engines: Path, gpu_engines_dir: Path) -> Path:
    """The tiny SDXL export (the session's shared one, copied: fp16 models, fused models and engine sidecars are
    written inside it)."""
    import shutil

    if not HAS_TORCH:
        pytest.skip("exporting needs torch and diffusers (export extras)")
    from export import export_model

    shared = export_model(tiny_sdxl, shared_engines, progress=False)
    return Path(shutil.copytree(shared, gpu_engines_dir / shared.name))


@pytest.fixture(scope="session")
def sdxl_fp16(sdxl_fp32: Path) -> Path:
    from export.fp16 import export_fp16

    return export_fp16(sdxl_fp32, progress=False)
