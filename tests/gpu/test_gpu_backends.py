"""The NVIDIA backends: what runs here (model preparation, the NaN fallback, clean errors without a GPU) and the
`gpu`-marked checks against the fp32 reference that run where CUDA (and TensorRT) exist.

GPU references: ONNX Runtime fp32 on the CPU (check.run_check, per component within the fp16 bound) and the
fp32 pipeline's image end to end; graph replay against the same backend run eagerly.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest

from runtime.errors import BackendUnavailableError
from tests.conftest import needs_torch
from tests.gpu.conftest import HAS_CUDA, needs_cuda, needs_tensorrt


class _Fixed:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def run(self, feeds, outputs=None):
        self.calls += 1
        return {"image": np.full((1, 3, 2, 2), self.value, np.float32)}


def test_nan_guard_recomputes_non_finite_outputs_in_fp32(caplog):
    from runtime.backends.gpu import NanGuard

    fallback = _Fixed(0.5)
    guard = NanGuard(_Fixed(np.nan), lambda: fallback)
    assert np.all(guard.run({"latent": None})["image"] == 0.5) and fallback.calls == 1
    assert any("NaN/Inf" in r.getMessage() for r in caplog.records)
    fine = NanGuard(_Fixed(0.25), lambda: pytest.fail("no fallback for finite outputs"))
    assert np.all(fine.run({})["image"] == 0.25)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error path of a machine without a GPU")
def test_without_driver_the_device_layer_raises_one_line():
    pytest.importorskip("cuda.bindings")
    from runtime import cuda

    for call in (cuda.device_count, lambda: cuda.DeviceBuffer(256), cuda.Stream, cuda.Event):
        with pytest.raises(BackendUnavailableError) as info:
            call()
        assert "\n" not in str(info.value) and "no usable NVIDIA GPU" in str(info.value)


def test_device_layer_checks_every_return_code():
    rt = pytest.importorskip("cuda.bindings.runtime")
    from runtime.cuda import CudaError, check

    assert check((rt.cudaError_t.cudaSuccess, 7), "call") == 7
    assert check((rt.cudaError_t.cudaSuccess, 7, 8), "call") == (7, 8)
    assert check((rt.cudaError_t.cudaSuccess,), "call") is None
    with pytest.raises(CudaError, match=r"^cudaMemcpyAsync failed: cudaErrorInvalidValue: invalid argument$"):
        check((rt.cudaError_t.cudaErrorInvalidValue,), "cudaMemcpyAsync")
    with pytest.raises(BackendUnavailableError, match="cudaErrorNoDevice"):
        check((rt.cudaError_t.cudaErrorNoDevice, None), "cudaGetDeviceCount")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error path of a machine without a GPU")
@pytest.mark.parametrize("backend", ["onnxruntime-cuda", "torch-cuda", "tensorrt"])
def test_gpu_backends_name_what_is_missing(backend):
    from runtime.backends import check_backend

    with pytest.raises(BackendUnavailableError) as info:
        check_backend(backend)
    assert "\n" not in str(info.value) and backend in str(info.value)


@needs_torch
@pytest.mark.slow
def test_onnxruntime_fusions_then_fp16_prepare_the_cuda_models(sd1_fp32):
    """ORT's optimizer fuses the fp32 UNet (NHWC convs, GroupNorm, attention) before the fp16 conversion; the
    timestep embedding stays fp32 and the graph IO float32."""
    import onnx

    from runtime.backends.onnxruntime_cuda import fused_fp16_model

    path = fused_fp16_model(sd1_fp32, "unet", keep_vae_fp32=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["NhwcConv"] > 0 and ops["Conv"] == 0  # fused: every convolution became the CUDA NHWC one
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [1, 1, 1]
    kinds = collections.Counter(t.data_type for t in model.graph.initializer)
    assert kinds[10] > kinds[1]  # mostly fp16 weights
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    sin = next(n for n in model.graph.node if n.op_type == "Sin")
    assert types.get(sin.input[0], 1) == 1
    assert fused_fp16_model(sd1_fp32, "unet", keep_vae_fp32=True) == path  # reused


# ---------------------------------------------------------------------------------------------- on a GPU


def _check_backend(folder, backend):
    from runtime.check import failure_line, run_check

    reports = run_check(folder, backend, "fp16")
    assert failure_line(reports) is None, [r.line() for r in reports]


@pytest.mark.gpu
@needs_cuda
@needs_torch
def test_onnxruntime_cuda_matches_the_fp32_reference(sd1_fp32):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA execution provider (onnxruntime-gpu is not installed)")
    from runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend

    _check_backend(sd1_fp32, OnnxRuntimeCudaBackend(sd1_fp32))


@pytest.mark.gpu
@needs_cuda
@needs_torch
def test_onnxruntime_cuda_graph_replay_equals_eager(sd1_fp32):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA execution provider (onnxruntime-gpu is not installed)")
    from runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend

    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 32, 32), np.float32), "timestep": np.full(2, 500, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), np.float32)}  # fmt: skip
    eager = OnnxRuntimeCudaBackend(sd1_fp32, cuda_graph=False).session("unet").run(feeds)["noise_pred"]
    graphed = OnnxRuntimeCudaBackend(sd1_fp32, cuda_graph=True).session("unet")
    for _ in range(3):  # capture, then replays
        out = graphed.run(feeds)["noise_pred"]
        np.testing.assert_allclose(out, eager, rtol=0, atol=1e-3)
    bigger = {k: np.concatenate([v, v]) for k, v in feeds.items()}
    assert graphed.run(bigger)["noise_pred"].shape == (4, 4, 32, 32)  # a new shape: a new graph id


@pytest.mark.gpu
@needs_cuda
def test_device_layer_graph_replays_a_copy():  # cuda-bindings only: no torch needed
    from runtime import cuda

    stream = cuda.Stream()
    src, dst = cuda.DeviceBuffer(4096), cuda.DeviceBuffer(4096)
    host = cuda.PinnedBuffer((1024,), np.float32)
    host.array[:] = np.arange(1024, dtype=np.float32)
    src.copy_from_host(host.array, stream)
    graph = cuda.CudaGraph(stream, lambda s: dst.copy_from_device(src, 4096, s))
    graph.launch()
    out = np.empty(1024, np.float32)
    dst.copy_to_host(out, stream)
    stream.synchronize()
    np.testing.assert_array_equal(out, np.arange(1024, dtype=np.float32))
    host.array[:] = -1  # a replay copies what the source holds now
    src.copy_from_host(host.array, stream)
    start, end = cuda.Event(), cuda.Event()
    start.record(stream)
    graph.launch()
    end.record(stream)
    dst.copy_to_host(out, stream)
    end.synchronize()
    stream.synchronize()
    np.testing.assert_array_equal(out, np.full(1024, -1, np.float32))
    assert end.elapsed_ms(start) >= 0
    graph.destroy()
    with pytest.raises(cuda.CudaError, match="destroyed"):
        graph.launch()


@pytest.mark.gpu
@needs_tensorrt
@needs_torch
def test_tensorrt_engines_match_reference_and_replay_equals_eager(sd1_fp32, sd1_fp16):
    from export.tensorrt_build import build_request, ensure_engines, timing_cache_path
    from export.tensorrt_builder import TensorRTBuilder
    from runtime.backends.tensorrt import TensorRTBackend

    builder = TensorRTBuilder()
    request = build_request(batch_size=1, width=64, height=64)
    ensure_engines(sd1_fp32, sd1_fp16, request, builder, timing_cache_path(sd1_fp32.parent, builder), progress=False)
    backend = TensorRTBackend(sd1_fp32)
    _check_backend(sd1_fp32, backend)
    unet = backend.session("unet")
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((2, 4, 32, 32), np.float32), "timestep": np.full(2, 500, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), np.float32)}  # fmt: skip
    eager = unet.run(feeds)["noise_pred"]  # warm-up (eager)
    replay = unet.run(feeds)["noise_pred"]  # captured and launched
    assert any(g is not None for g in unet.engines[0].graphs.values())
    np.testing.assert_array_equal(replay, eager)
    feeds["sample"] = feeds["sample"] * 0.5
    np.testing.assert_array_equal(unet.run(feeds)["noise_pred"], unet.run(feeds)["noise_pred"])
