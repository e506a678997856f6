"""SDXL on the NVIDIA backends: what runs here without a GPU (engine specs and sidecars through a stand-in builder,
the TensorRT session's slicing of text encoder 2, ONNX Runtime's fused fp16 models, the torch-cuda sessions' SDXL
calls on CPU modules, the check tool), and the `gpu`-marked parity checks that run where CUDA exists.

References: diffusers' own UNet2DConditionModel / CLIPTextModelWithProjection through the torch backend (fp32,
CPU) for the torch-cuda sessions; ONNX Runtime fp32 on the CPU for the fused and fp16 models (runtime.check).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.errors import InvalidRequestError
from tests.conftest import needs_torch
from tests.gpu.conftest import needs_cuda, needs_tensorrt

FP16_REL = 2e-2  # max |error| / max |reference| of fp16 against fp32 (runtime.check's fp16 tolerance)


def _unet_feeds(seed: int, rows: int = 2, side: int = 16, context: int = 64, pooled: int = 32):
    """The tiny SDXL UNet's inputs: latents, timestep, both encoders' states, pooled text and size/crop ids."""
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((rows, 4, side, side), np.float32),
        "timestep": np.full(rows, 617.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((rows, 77, context), np.float32),
        "text_embeds": rng.standard_normal((rows, pooled), np.float32),
        "time_ids": np.tile(np.array([64, 48, 0, 0, 64, 48], np.float32), (rows, 1)),
    }


def _text_ids(rows: int = 2, width: int = 32) -> dict[str, np.ndarray]:
    ids = np.zeros((rows, 77), np.int32)  # "!" padding (id 0) after start, words, end
    ids[:, 0], ids[:, 1:5], ids[:, 5] = 1, np.arange(10, 14), 2
    ids[:, 3] = -1  # a textual-inversion slot: its token embedding is that row of token_overrides
    overrides = np.zeros((rows, 77, width), np.float32)
    overrides[:, 3] = 0.5 * np.random.default_rng(5).standard_normal((rows, width))
    return {"input_ids": ids, "token_overrides": overrides}


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------------ GPU backends accept SDXL


@pytest.mark.parametrize("backend", ["torch-cuda", "onnxruntime-cuda", "tensorrt", "onnxruntime", "torch", "openvino"])
def test_sdxl_runs_on_every_backend(backend):
    from runtime.backends import BACKENDS
    from runtime.pipelines.sdxl import check_sdxl_backend

    assert backend in BACKENDS
    check_sdxl_backend({"family": "sdxl", "sdxl": {"time_ids": 6}}, backend)  # openvino too, since e5bd3ae


# ------------------------------------------------------------------------------------------------ TensorRT


@needs_torch
def test_sdxl_engines_cover_both_text_encoders_and_the_unets_added_inputs(sdxl_fp32, sdxl_fp16):
    """`cli.py build`'s cache policy on the tiny SDXL export (a stand-in builder in place of TensorRT): an engine for
    text encoder 2, the UNet's profile with text_embeds and time_ids at every point, the VAE kept fp32; the backend's
    request check then reads those sidecars."""
    from export.tensorrt_build import build_request, ensure_engines
    from runtime.backends.tensorrt import TensorRTBackend
    from runtime.manifest import read_manifest
    from tests.gpu.test_tensorrt_build import StandInBuilder, _admission

    builder = StandInBuilder()
    request = build_request(width=96, height=64)
    plans = ensure_engines(sdxl_fp32, sdxl_fp16, request, builder, sdxl_fp32 / "t.cache", progress=False)
    names = {component: path.name for component, path in plans.items()}
    assert names == {  # tiny SDXL: VAE scale factor 2, latent 48 x 32
        "text_encoder": "text_encoder.fp16.b1-16.o3.trt10.99.0.sm90.plan",
        "text_encoder_2": "text_encoder_2.fp16.b1-16.o3.trt10.99.0.sm90.plan",
        "unet": "unet.fp16.r1-2-h32-w48-t1.o3.trt10.99.0.sm90.plan",
        "vae_decoder": "vae_decoder.fp32.b1-h32-w48.o3.trt10.99.0.sm90.plan",  # force_upcast
        "vae_encoder": "vae_encoder.fp32.b1-h32-w48.o3.trt10.99.0.sm90.plan",
    }
    unet = json.loads(plans["unet"].with_suffix(".json").read_text())["shapes"]
    assert unet["text_embeds"] == [[1, 32], [2, 32], [2, 32]]  # text encoder 2's projection: 32 in the tiny model
    assert unet["time_ids"] == [[1, 6], [2, 6], [2, 6]]
    assert unet["encoder_hidden_states"] == [[1, 77, 64], [2, 77, 64], [2, 77, 64]]  # 32 + 32 features
    text_2 = json.loads(plans["text_encoder_2"].with_suffix(".json").read_text())["shapes"]
    assert text_2 == {
        "input_ids": [[1, 77], [2, 77], [16, 77]],
        "token_overrides": [[1, 77, 32], [2, 77, 32], [16, 77, 32]],
    }
    backend = TensorRTBackend.__new__(TensorRTBackend)  # the profile check reads only the manifest and sidecars
    backend.folder, backend.manifest = sdxl_fp32, read_manifest(sdxl_fp32)
    backend.key_suffix = ".trt10.99.0.sm90.plan"
    backend.check_request(_admission(batch=1, rows=2, terms=1, chunks=1, sizes=((96, 64),)))
    with pytest.raises(InvalidRequestError, match="--width 64 --height 64"):
        backend.check_request(_admission(batch=1, rows=2, terms=1, chunks=1, sizes=((64, 64),)))


class _TextEngine2:
    """A stand-in engine of text encoder 2, rows 1..4: hidden_states = [ids, 2 ids] as floats, text_embeds = 3 ids
    of the first column plus the first override value of each row."""

    outputs = ["hidden_states", "text_embeds"]
    static = False

    def __init__(self):
        shapes = {"input_ids": [[1, 77], [2, 77], [4, 77]], "token_overrides": [[1, 77, 3], [2, 77, 3], [4, 77, 3]]}
        self.profile = {"profile": "b1-4", "shapes": shapes}
        self.rows: list[int] = []

    def covers(self, shapes):
        from runtime.backends.tensorrt import _profile_covers

        return _profile_covers(self.profile["shapes"], shapes)

    def run(self, feeds, stream):
        ids = feeds["input_ids"].astype(np.float32)
        self.rows.append(len(ids))
        assert len(feeds["token_overrides"]) == len(ids)
        text_embeds = 3 * ids[:, :1] + feeds["token_overrides"][:, 0, :1]
        return {"hidden_states": np.stack([ids, 2 * ids])[..., None], "text_embeds": text_embeds}


def test_tensorrt_text_encoder_2_calls_over_the_profile_run_in_slices():
    from runtime.backends.tensorrt import TensorRTSession

    engine = _TextEngine2()
    session = TensorRTSession("text_encoder_2", [engine], stream=None)
    ids = np.random.default_rng(0).integers(0, 100, size=(9, 77)).astype(np.int32)  # e.g. 3 texts x 3 chunks
    overrides = np.random.default_rng(1).standard_normal((9, 77, 3)).astype(np.float32)
    out = session.run({"input_ids": ids, "token_overrides": overrides}, ["hidden_states", "text_embeds"])
    assert engine.rows == [4, 4, 1]
    x = ids.astype(np.float32)
    np.testing.assert_array_equal(out["hidden_states"], np.stack([x, 2 * x])[..., None])  # rows on axis 1
    np.testing.assert_array_equal(out["text_embeds"], 3 * x[:, :1] + overrides[:, 0, :1])  # both sliced alike


# ---------------------------------------------------------------------------------------- ONNX Runtime CUDA


@needs_torch
def test_onnxruntime_cuda_fuses_sdxl_models_keeping_the_size_embedding_fp32(sdxl_fp32):
    """The fused fp16 text encoder 2 (ORT's CLIP fusions) runs on the CPU provider too: equal to the fp32 export
    within fp16 tolerance. The fused UNet (CUDA-only kernels) takes all five inputs as float32 and computes the sin/cos
    of both timestep and time_ids in fp32."""
    import onnx
    import onnxruntime as ort

    from runtime.backends.onnxruntime_cuda import fused_fp16_model

    path = fused_fp16_model(sdxl_fp32, "text_encoder_2", keep_vae_fp32=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    fused = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(sdxl_fp32 / "onnx" / "text_encoder_2.onnx"), options,
                               providers=["CPUExecutionProvider"])  # fmt: skip
    feeds = _text_ids(3)
    for got, want in zip(fused.run(None, feeds), ref.run(None, feeds)):
        assert got.dtype == np.float32 and got.shape == want.shape and 0 < _rel(got, want) < FP16_REL
    unet = onnx.shape_inference.infer_shapes(onnx.load(str(fused_fp16_model(sdxl_fp32, "unet", keep_vae_fp32=True))))
    assert [(i.name, i.type.tensor_type.elem_type) for i in unet.graph.input] == [
        (name, onnx.TensorProto.FLOAT) for name in _unet_feeds(0)]  # fmt: skip
    types = {v.name: v.type.tensor_type.elem_type for v in unet.graph.value_info}
    trig = {n.name: types.get(n.input[0]) for n in unet.graph.node if n.op_type in ("Sin", "Cos")}
    assert len(trig) == 4 and set(trig.values()) == {onnx.TensorProto.FLOAT}, trig  # time_proj and add_time_proj


# ----------------------------------------------------------------------------------------------- torch-cuda


class _HostUploads:
    """The torch-cuda session's uploads kept on the host (no pinned memory or device here), with its dtype rule."""

    def __init__(self, dtype):
        self.dtype = dtype

    def tensor(self, name, value):
        import torch

        from runtime.backends.torch_cuda import device_dtype

        return device_dtype(name, torch.from_numpy(np.array(value)), self.dtype)


@needs_torch
def test_torch_cuda_sessions_make_sdxls_calls(tiny_sdxl):
    """The torch-cuda sessions' SDXL calls, run on the CPU in fp32 (the dtype the uploads give): text encoder 2 and
    the UNet eagerly and through the graph wrapper's forward (the function it captures) equal the torch backend,
    which is diffusers' modules called as diffusers' SDXL pipeline calls them."""
    import torch

    from runtime.backends.torch import TorchBackend
    from runtime.backends.torch_cuda import GraphedUNet, TorchCudaSession

    reference = TorchBackend(tiny_sdxl)
    for component, feeds in (("text_encoder_2", _text_ids()), ("unet", _unet_feeds(1))):
        want = reference.session(component).run(feeds)
        module = reference._module(component)
        session = TorchCudaSession(component, module, torch.float32, None)
        session.uploads = _HostUploads(torch.float32)
        got = session.run(feeds)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
        if component == "unet":
            graphed = GraphedUNet(module)
            with torch.inference_mode():
                inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
                np.testing.assert_array_equal(graphed.forward(**inputs).numpy(), want["noise_pred"])


def test_torch_cuda_uploads_keep_the_embedded_inputs_fp32():
    torch = pytest.importorskip("torch")
    from runtime.backends.torch_cuda import device_dtype

    half = torch.float16
    assert device_dtype("time_ids", torch.ones(2, 6), half).dtype == torch.float32  # sizes up to thousands
    assert device_dtype("timestep", torch.ones(2), half).dtype == torch.float32
    assert device_dtype("text_embeds", torch.ones(2, 8), half).dtype == half
    assert device_dtype("input_ids", torch.ones(2, 77, dtype=torch.int32), half).dtype == torch.int32


# ---------------------------------------------------------------------------------------------- cli.py check


@needs_torch
def test_check_compares_every_sdxl_component_fp16_on_the_cpu(sdxl_fp32, sdxl_fp16):
    """`cli.py check`'s comparison with the fp16 SDXL export on ONNX Runtime's CPU provider as the candidate: text
    encoder 2 and the UNet's added inputs are fed, every output within the fp16 bound."""
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.check import failure_line, run_check

    reports = run_check(sdxl_fp32, OnnxRuntimeBackend(sdxl_fp16), "fp16", height=64, width=48)
    outputs = {(r.component, r.output) for r in reports}
    assert {("text_encoder_2", "hidden_states"), ("text_encoder_2", "text_embeds"), ("unet", "noise_pred")} <= outputs
    assert failure_line(reports) is None, [r.line() for r in reports]


# ------------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@needs_cuda
@needs_torch
def test_torch_cuda_sdxl_matches_the_fp32_cpu_reference_and_replays(tiny_sdxl):
    from runtime.backends.torch import TorchBackend
    from runtime.backends.torch_cuda import TorchCudaBackend

    gpu, cpu = TorchCudaBackend(tiny_sdxl, cuda_graph=True), TorchBackend(tiny_sdxl)
    eager = TorchCudaBackend(tiny_sdxl, cuda_graph=False).session("unet")
    for seed in (0, 1, 2):  # capture, then replays with new values
        feeds = _unet_feeds(seed)
        replay = gpu.session("unet").run(feeds)["noise_pred"]
        assert _rel(replay, cpu.session("unet").run(feeds)["noise_pred"]) < FP16_REL
        np.testing.assert_allclose(replay, eager.run(feeds)["noise_pred"], rtol=0, atol=2e-3)
    text = gpu.session("text_encoder_2").run(_text_ids())
    want = cpu.session("text_encoder_2").run(_text_ids())
    assert all(_rel(text[name], want[name]) < FP16_REL for name in want)
    assert gpu.vae_fp32  # SDXL's VAE config says force_upcast
    latent = {"latent": np.random.default_rng(3).standard_normal((1, 4, 16, 16), np.float32)}
    image = gpu.session("vae_decoder").run(latent)["image"]
    assert _rel(image, cpu.session("vae_decoder").run(latent)["image"]) < 5e-3  # fp32 (cuDNN may use TF32)


@pytest.mark.gpu
@needs_cuda
@needs_torch
def test_torch_cuda_sdxl_txt2img_close_to_the_cpu_image(tiny_sdxl, shared_engines):
    import runtime

    options = dict(seed=5, steps=6, width=64, height=64, cfg_scale=5.0, sampler="Euler")
    ref = runtime.load(tiny_sdxl, backend="torch", engines_dir=shared_engines).txt2img("a lighthouse", **options)
    got = runtime.load(tiny_sdxl, backend="torch-cuda", engines_dir=shared_engines).txt2img("a lighthouse", **options)
    diff = np.abs(ref.images.astype(np.float64) - got.images)
    assert np.isfinite(got.images).all() and diff.mean() < 1e-2


@pytest.mark.gpu
@needs_tensorrt
@needs_torch
def test_tensorrt_sdxl_engines_match_the_fp32_reference(sdxl_fp32):
    from export.tensorrt_build import build_engines, build_request
    from runtime.backends.tensorrt import TensorRTBackend
    from runtime.check import failure_line, run_check

    build_engines(sdxl_fp32, sdxl_fp32.parent, build_request(1, 64, 64), progress=False)
    reports = run_check(sdxl_fp32, TensorRTBackend(sdxl_fp32), "fp16")
    assert failure_line(reports) is None, [r.line() for r in reports]
