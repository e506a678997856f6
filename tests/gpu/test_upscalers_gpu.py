"""Upscaler models on the NVIDIA backends (runtime.upscalers.gpu), as far as a machine without a GPU can run them.

Here: the fp16 ONNX the export writes (a small random compact SRVGG and ESRGAN) on ONNX Runtime's CPU provider
against spandrel's fp32 torch module; the onnxruntime-cuda session code on the CPU provider; spandrel's module in
fp16 on the CPU (torch-cuda's session class); the NaN fallback with a stand-in fp16 session that returns NaN, against
the fp32 session's own output; the refusals where the packages or the device are missing. `gpu`-marked tests run
the same upscales on CUDA where there is a device. ONNX Runtime's CPU provider has no fp16 Conv: it inserts Casts and
computes those in fp32, so on the CPU the fp16 ONNX differs from fp32 by its fp16 weights and activations at the cast
points, not by fp16 arithmetic; the GPU tests measure that.
"""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest
from PIL import Image

from tests.conftest import HAS_TORCH
from tests.gpu.conftest import needs_cuda

if not HAS_TORCH:
    pytest.skip("exporting upscalers needs torch (export extras)", allow_module_level=True)
try:
    from export.upscalers import import_spandrel

    spandrel = import_spandrel()
except Exception as exc:  # BackendUnavailableError: spandrel is not installed
    pytest.skip(f"spandrel is not installed ({exc})", allow_module_level=True)

import torch  # noqa: E402

from runtime.errors import BackendUnavailableError, NumericalError  # noqa: E402
from runtime.upscalers import load_upscaler  # noqa: E402
from runtime.upscalers.gpu import HalfWithFallback, onnxruntime_session, torch_session  # noqa: E402
from runtime.upscalers.model import ModelUpscaler  # noqa: E402

CPU = ["CPUExecutionProvider"]
FP16_TOLERANCE = 5e-3  # |fp16 - fp32| relative to the output's largest value: ~10 fp16 roundings (2^-11 each)
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")


def _models() -> dict:
    from spandrel.architectures.Compact import Compact
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(0)
    return {
        "esrgan-4x": ESRGAN(num_filters=8, num_blocks=1, scale=4),
        "compact-2x": Compact(num_feat=8, num_conv=2, upscale=2),
        "swinir-2x": SwinIR(
            img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, upscale=2, upsampler="pixelshuffle"
        ),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("gpu-upscalers")
    for stem, model in _models().items():
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / f"{stem}.safetensors")
    return folder


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu-upscaler-engines")


def exported(folder, engines, stem):
    """(the fp32 CPU upscaler, its artifact folder, its meta) of `stem`, exported once."""
    upscaler = load_upscaler(stem, folder, engines_dir=engines)
    artifacts = next(p for p in (engines / "upscalers").iterdir() if p.name.startswith(f"{stem}-"))
    return upscaler, artifacts, json.loads((artifacts / "upscaler.json").read_text())


def descriptor_of(folder, stem):
    from safetensors.torch import load_file

    return spandrel.MAIN_REGISTRY.load(load_file(folder / f"{stem}.safetensors")).eval()


def random_image(width: int, height: int, seed: int = 1) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


# ---- the fp16 export ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stem", ["compact-2x", "esrgan-4x"])
def test_fp16_onnx_runs_on_the_cpu_provider_within_fp16_of_spandrels_fp32_module(folder, engines, stem):
    import onnx
    import onnxruntime as ort

    _, artifacts, meta = exported(folder, engines, stem)
    descriptor = descriptor_of(folder, stem)
    assert descriptor.supports_half and meta["fp16_model"]
    half = artifacts / meta["fp16_model"]
    model = onnx.load(str(half))
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    kinds = {t.data_type for t in model.graph.initializer if t.name in conv_weights}
    assert kinds == {onnx.TensorProto.FLOAT16}  # the weights are fp16, not a copy of the fp32 graph
    io = [v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)]
    assert io == [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT]  # the host side stays float32

    x = np.random.default_rng(4).random((1, 3, 40, 56), dtype=np.float32)
    got = ort.InferenceSession(str(half), providers=CPU).run(["upscaled"], {"image": x})[0]
    with torch.no_grad():
        expected = descriptor.model(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (1, 3, 40 * descriptor.scale, 56 * descriptor.scale)
    error = relative_error(got, expected)
    assert 0 < error <= FP16_TOLERANCE  # 0 would mean fp32 weights


def test_architectures_spandrel_runs_in_fp32_only_get_no_fp16_model(folder, engines):
    _, artifacts, meta = exported(folder, engines, "swinir-2x")
    assert not descriptor_of(folder, "swinir-2x").supports_half
    assert meta["fp16_model"] is None and not list(artifacts.glob("*-fp16.onnx"))
    session = onnxruntime_session(artifacts, meta, CPU)
    assert not isinstance(session, HalfWithFallback)  # the fp32 ONNX, no fallback needed


def test_onnxruntime_cuda_session_code_on_the_cpu_provider_upscales_as_fp32_does(folder, engines):
    fp32, artifacts, meta = exported(folder, engines, "compact-2x")
    session = onnxruntime_session(artifacts, meta, CPU)
    assert isinstance(session, HalfWithFallback)
    half = ModelUpscaler(fp32.name, fp32.path, meta, session, 32, 8)
    reference = ModelUpscaler(fp32.name, fp32.path, meta, fp32.session, 32, 8)
    image = random_image(56, 40)
    got, expected = np.asarray(half.upscale(image, 2)).astype(int), np.asarray(reference.upscale(image, 2)).astype(int)
    assert got.shape == expected.shape == (80, 112, 3)
    assert np.abs(got - expected).max() <= 2 and session.retries == 0 and session.fp32 is None


def test_torch_session_in_half_on_the_cpu_within_fp16_of_fp32(folder, engines):
    _, artifacts, meta = exported(folder, engines, "compact-2x")
    session = torch_session(folder / "compact-2x.safetensors", False, meta, "cpu")
    assert isinstance(session, HalfWithFallback)
    assert {p.dtype for p in session.half.descriptor.model.parameters()} == {torch.float16}
    x = np.random.default_rng(5).random((1, 3, 24, 40), dtype=np.float32)
    got = session.run({"image": x}, ["upscaled"])["upscaled"]
    with torch.no_grad():
        expected = descriptor_of(folder, "compact-2x").model(torch.from_numpy(x)).numpy()
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert 0 < relative_error(got, expected) <= FP16_TOLERANCE


# ---- the NaN fallback -----------------------------------------------------------------------------------------


class NanSession:
    """A stand-in fp16 session: NaN (or +Inf) everywhere on the calls listed in `bad`, else the wrapped session."""

    def __init__(self, inner, bad=None, value=np.nan):
        self.inner, self.bad, self.value, self.calls = inner, bad, value, 0

    def run(self, feeds, outputs=None):
        self.calls += 1
        values = self.inner.run(feeds, outputs)
        if self.bad is None or self.calls in self.bad:
            values = {k: np.full_like(v, self.value) for k, v in values.items()}
        return values


def test_a_nan_fp16_output_is_computed_again_by_the_fp32_session_logged_once(folder, engines, caplog):
    fp32, artifacts, meta = exported(folder, engines, "compact-2x")
    opened = []

    def make_fp32():
        opened.append(1)
        return fp32.session

    guarded = HalfWithFallback(NanSession(fp32.session, bad={2, 3}, value=np.inf), make_fp32, "compact-2x")
    x = [np.random.default_rng(i).random((1, 3, 16, 24), dtype=np.float32) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="runtime.upscalers.gpu"):
        outs = [guarded.run({"image": xi}, ["upscaled"])["upscaled"] for xi in x]
    assert opened == [1] and guarded.retries == 2  # opened on the first bad call, kept for the second
    for xi, out in zip(x, outs):
        assert np.array_equal(out, fp32.session.run({"image": xi}, ["upscaled"])["upscaled"])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "fp32" in warnings[0].getMessage()


def test_nan_tiles_in_an_upscale_come_out_as_the_fp32_upscale(folder, engines):
    fp32, _, meta = exported(folder, engines, "compact-2x")
    reference = ModelUpscaler(fp32.name, fp32.path, meta, fp32.session, 32, 8)
    guarded = HalfWithFallback(NanSession(fp32.session), lambda: fp32.session, "compact-2x")
    upscaler = ModelUpscaler(fp32.name, fp32.path, meta, guarded, 32, 8)
    image = random_image(56, 40, seed=2)
    assert np.array_equal(np.asarray(upscaler.upscale(image, 2)), np.asarray(reference.upscale(image, 2)))
    assert guarded.retries == 4  # 2 x 2 tiles of 32 with overlap 8 over 56 x 40, every one NaN in "fp16"


def test_nan_in_fp32_too_is_a_numerical_error(folder, engines):
    fp32, _, meta = exported(folder, engines, "compact-2x")
    guarded = HalfWithFallback(NanSession(fp32.session), lambda: NanSession(fp32.session), "compact-2x")
    upscaler = ModelUpscaler(fp32.name, fp32.path, meta, guarded, 32, 8)
    with pytest.raises(NumericalError) as info:
        upscaler.upscale(random_image(24, 24), 2)
    assert str(info.value) == "the upscaler compact-2x produced NaN/Inf values in fp16 and again in fp32"


# ---- opening the GPU backends ---------------------------------------------------------------------------------


def _ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.mark.skipif(_ort_has_cuda(), reason="this onnxruntime has the CUDA provider")
def test_onnxruntime_cuda_without_onnxruntime_gpu_is_refused_before_any_export(folder, tmp_path):
    with pytest.raises(BackendUnavailableError) as info:
        load_upscaler("compact-2x", folder, backend="onnxruntime-cuda", engines_dir=tmp_path)
    assert "\n" not in str(info.value) and "onnxruntime-gpu" in str(info.value)
    assert not (tmp_path / "upscalers").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a CUDA device")
def test_torch_cuda_without_a_device_is_refused(folder, tmp_path):
    with pytest.raises(BackendUnavailableError, match="CUDA build of torch and an NVIDIA GPU") as info:
        load_upscaler("compact-2x", folder, backend="torch-cuda", engines_dir=tmp_path)
    assert "\n" not in str(info.value) and not (tmp_path / "upscalers").exists()


@pytest.mark.skipif(_ort_has_cuda() or torch.cuda.is_available(), reason="a CUDA runner is available")
def test_tensorrt_without_either_runner_runs_upscalers_on_the_cpu_with_one_warning(folder, engines, caplog):
    fp32, _, _ = exported(folder, engines, "compact-2x")
    with caplog.at_level(logging.WARNING, logger="runtime.upscalers.gpu"):
        upscaler = load_upscaler("compact-2x", folder, backend="tensorrt", engines_dir=engines)
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = record.getMessage()
    assert "\n" not in message and "under the tensorrt backend run on onnxruntime-cuda or torch-cuda" in message
    assert "onnxruntime-gpu" in message and "CUDA build of torch" in message and "on the CPU" in message
    image = random_image(40, 32, seed=3)
    assert not isinstance(upscaler.session, HalfWithFallback)
    assert np.array_equal(np.asarray(upscaler.upscale(image, 2)), np.asarray(fp32.upscale(image, 2)))


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_tensorrt_runs_upscalers_as_onnxruntime_cuda_where_its_provider_is_there(folder, engines, monkeypatch):
    """The whole load path of onnxruntime-cuda (and tensorrt through it) with the package check answered yes: the
    CUDA provider is not in this onnxruntime, which then runs the session on the CPU provider listed after it."""
    import runtime.backends.gpu as gpu

    checked = []
    monkeypatch.setattr(gpu, "check_gpu_backend", lambda name: checked.append(name) or name)
    fp32, _, meta = exported(folder, engines, "compact-2x")
    image = random_image(40, 32, seed=3)
    expected = np.asarray(fp32.upscale(image, 2)).astype(int)
    for backend in ("onnxruntime-cuda", "tensorrt"):
        checked.clear()
        upscaler = load_upscaler("compact-2x", folder, backend=backend, engines_dir=engines)
        assert checked == ["onnxruntime-cuda"]  # tensorrt: its first runner, found available
        assert isinstance(upscaler.session, HalfWithFallback) and upscaler.session.half.component == "upscaler (fp16)"
        assert np.abs(np.asarray(upscaler.upscale(image, 2)).astype(int) - expected).max() <= 2


def test_tensorrt_falls_back_to_torch_cuda_where_onnxruntime_has_no_cuda_provider(monkeypatch):
    import runtime.backends.gpu as gpu
    from runtime.upscalers.gpu import runner

    def check(name):
        if name == "onnxruntime-cuda":
            raise BackendUnavailableError("no onnxruntime-gpu")
        return name

    monkeypatch.setattr(gpu, "check_gpu_backend", check)
    assert runner("tensorrt") == "torch-cuda"


# ---- on a GPU -------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["torch-cuda", "onnxruntime-cuda"])
def test_gpu_upscale_in_fp16_matches_the_fp32_cpu_upscale(folder, engines, backend):
    if backend == "onnxruntime-cuda" and importlib.util.find_spec("onnxruntime") and not _ort_has_cuda():
        pytest.skip("onnxruntime-gpu is not installed (its CUDA provider is missing)")
    for stem in ("compact-2x", "esrgan-4x"):
        fp32 = load_upscaler(stem, folder, engines_dir=engines, tile_size=64)  # onnxruntime on the CPU
        upscaler = load_upscaler(stem, folder, backend=backend, engines_dir=engines, tile_size=64)
        assert isinstance(upscaler.session, HalfWithFallback)
        image = random_image(96, 80, seed=6)
        got = np.asarray(upscaler.upscale(image, 2)).astype(int)
        expected = np.asarray(fp32.upscale(image, 2)).astype(int)
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 3
        assert upscaler.session.retries == 0
