"""The NVIDIA path's behaviour that needs no GPU: what a driver too old for cuda-bindings says, that a TensorRT plan
which does not deserialize is a clear error and never a re-export, the VAE precision diffusers' pipelines use, and
the infotext note of an fp16 VAE decode retried in fp32."""

from __future__ import annotations

import importlib.machinery
import inspect
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import ArtifactError, BackendUnavailableError, ModelError
from tests.conftest import needs_torch


def _fake_cuda_runtime(driver: int, runtime: int):
    """The parts of cuda.bindings.runtime that check() and the driver message use, answering as a machine whose
    driver supports CUDA `driver` (e.g. 12080) while the bindings were built for `runtime` (13000)."""
    errors = types.SimpleNamespace(cudaSuccess=0, cudaErrorInsufficientDriver=35)
    names = {35: b"cudaErrorInsufficientDriver"}
    return types.SimpleNamespace(
        cudaError_t=errors,
        cudaGetErrorName=lambda err: (0, names[err]),
        cudaGetErrorString=lambda err: (0, b"CUDA driver version is insufficient for CUDA runtime version"),
        cudaDriverGetVersion=lambda: (0, driver),
        cudaRuntimeGetVersion=lambda: (0, runtime),
        cudaGetDeviceCount=lambda: (35, 0),
    )


def test_a_driver_too_old_for_cuda_bindings_says_both_versions_and_what_to_install(monkeypatch):
    from runtime.cuda import api

    monkeypatch.setattr(api, "runtime_module", lambda: _fake_cuda_runtime(driver=12080, runtime=13000))
    with pytest.raises(BackendUnavailableError) as info:
        api.device_count()
    message = str(info.value)
    assert "\n" not in message and "no usable NVIDIA GPU" not in message
    assert "supports CUDA 12.8" in message and "needs CUDA 13.0" in message
    assert "cuda-bindings==12.*" in message and "tensorrt-cu12" in message and "update the driver" in message


def test_without_any_driver_the_message_stays_no_usable_gpu(monkeypatch):
    from runtime.cuda import api

    monkeypatch.setattr(api, "runtime_module", lambda: _fake_cuda_runtime(driver=0, runtime=13000))
    with pytest.raises(BackendUnavailableError, match="no usable NVIDIA GPU"):
        api.device_count()


class _FakeRuntime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, plan: bytes):
        return None  # what TensorRT answers for a truncated plan or one from another version


def _fake_tensorrt() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec sees an installed package
    trt.__version__ = "10.98.0"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.Runtime = _FakeRuntime
    return trt


@needs_torch
def test_a_tensorrt_plan_that_does_not_deserialize_is_a_clear_error_and_no_reexport(
    monkeypatch, tiny_sd1, sd1_fp32, gpu_engines_dir
):
    import runtime
    import runtime.api as api
    import runtime.cuda as cuda

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    monkeypatch.setattr(cuda, "Stream", lambda: None)
    monkeypatch.setattr(cuda, "compute_capability", lambda device=0: (9, 0))
    monkeypatch.setattr(api, "check_backend", lambda name: name)  # cuda-bindings' driver check: no driver here
    folder = Path(sd1_fp32) / "tensorrt"
    folder.mkdir(exist_ok=True)
    written = []
    for component in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        plan = folder / f"{component}.fp16.b1-1.o3.trt10.98.0.sm90.plan"
        plan.write_bytes(b"not a plan")
        plan.with_suffix(".json").write_text(json.dumps({"profile": "b1-1", "shapes": {}}))
        written += [plan, plan.with_suffix(".json")]
    exports = []
    real = api.ensure_exported
    monkeypatch.setattr(api, "ensure_exported", lambda *a, **k: exports.append(bool(k.get("force"))) or real(*a, **k))
    try:
        with pytest.raises(ModelError) as info:
            runtime.load(tiny_sd1, backend="tensorrt", engines_dir=gpu_engines_dir)
    finally:
        for path in written:
            path.unlink()
    assert not isinstance(info.value, ArtifactError)  # the only error api.load re-exports on
    message = str(info.value)
    assert "\n" not in message and "does not deserialize" in message and "cli.py build --force" in message
    assert exports == [False]  # the artifacts were looked up once, never exported again


def test_vae_precision_follows_what_diffusers_pipelines_do():
    """diffusers' StableDiffusionPipeline (SD 1.x/2.x) decodes in the pipeline's dtype and never reads force_upcast;
    its upscale pipeline upcasts a force_upcast VAE."""
    pipelines = pytest.importorskip("diffusers.pipelines")
    from runtime.backends.gpu import vae_runs_fp16

    assert "force_upcast" not in inspect.getsource(pipelines.StableDiffusionPipeline)
    assert "force_upcast" in inspect.getsource(pipelines.StableDiffusionUpscalePipeline)
    sd15 = {"vae_force_upcast": True, "unet_num_class_embeds": None}  # SD 1.5's VAE config says force_upcast
    assert vae_runs_fp16(sd15) and vae_runs_fp16(dict(sd15, vae_force_upcast=False))
    assert not vae_runs_fp16({"vae_force_upcast": True, "unet_num_class_embeds": 1000})  # the x4 upscaler
    assert vae_runs_fp16({"vae_force_upcast": False, "unet_num_class_embeds": 1000})


class _Overflowing:
    """An fp16 VAE decoder that overflows: NaN everywhere."""

    component = "vae_decoder"

    def run(self, feeds, outputs=None):
        latent = feeds["latent"]
        return {"image": np.full((latent.shape[0], 3, latent.shape[2] * 2, latent.shape[3] * 2), np.nan, np.float32)}


@needs_torch
def test_an_fp16_decode_retried_in_fp32_gives_the_fp32_image_and_says_so_in_the_infotext(tiny_sd1):
    import runtime
    from runtime.backends.gpu import NanGuard

    sd = runtime.load(tiny_sd1, backend="torch")
    options = dict(steps=2, seed=3, width=64, height=64, sampler="Euler")
    reference = sd.txt2img("a cat", **options)
    fp32 = sd.backend.session("vae_decoder")
    guard = NanGuard(_Overflowing(), lambda: fp32)
    original = sd.backend.session
    sd.backend.session = lambda name: guard if name == "vae_decoder" else original(name)
    retried = sd.txt2img("a cat", **options)
    np.testing.assert_array_equal(retried.images, reference.images)
    assert "VAE precision: fp32 retry after fp16 NaN" in retried.infotexts[0]
    assert "VAE precision" not in reference.infotexts[0]
    guard.primary = fp32  # a decode that does not overflow: no note on the next image
    assert "VAE precision" not in sd.txt2img("a cat", **options).infotexts[0]


@needs_torch
def test_onnxruntime_cuda_runs_the_depth_estimator_as_its_fp32_export(tiny_sd2_depth, shared_engines):
    """depth2img on onnxruntime-cuda opened every component but the depth estimator (a KeyError); it now runs the
    fp32 export, unfused (here on the CPU provider: this onnxruntime has no CUDA one)."""
    import runtime
    from runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend

    model = runtime.load(tiny_sd2_depth, engines_dir=shared_engines)  # the session's export, reused
    size = model.info["depth_estimator"]["image_size"]
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)}
    depth = OnnxRuntimeCudaBackend(model.backend.folder).session("depth_estimator").run(feeds)["predicted_depth"]
    reference = model.backend.session("depth_estimator").run(feeds)["predicted_depth"]
    np.testing.assert_allclose(depth, reference, rtol=1e-5, atol=1e-5)
