"""sdrt's own TensorRT runtime logic, without TensorRT: which engine a call picks (and the message when none
fits), and how LoRA patches map to refittable engine weights. Stand-in engine objects carry only the profile
sidecar; TensorRT itself is not exercised here (see test_gpu_backends.py for the GPU tests)."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ModelError


def _engine(profile: str, sample: list):
    from runtime.backends.tensorrt import Engine

    engine = Engine.__new__(Engine)  # the selection logic only reads the profile sidecar
    engine.profile = {"profile": profile, "shapes": {"sample": sample, "timestep": [[sample[0][0]]] * 3}}
    return engine


def test_session_picks_a_covering_engine_static_first():
    from runtime.backends.tensorrt import TensorRTSession

    static = _engine("b2-h64-w64-t1", [[2, 4, 64, 64]] * 3)
    dynamic = _engine("b2-dyn32-128-t1", [[2, 4, 32, 32], [2, 4, 64, 64], [2, 4, 128, 128]])
    session = TensorRTSession("unet", [dynamic, static], stream=None)
    assert session._pick({"sample": (2, 4, 64, 64), "timestep": (2,)}) is static
    assert session._pick({"sample": (2, 4, 96, 64), "timestep": (2,)}) is dynamic
    with pytest.raises(ModelError) as info:
        session._pick({"sample": (4, 4, 64, 64), "timestep": (4,)})
    message = str(info.value)
    assert "\n" not in message and "unet" in message and "(built: b2-dyn32-128-t1, b2-h64-w64-t1)" in message
    assert "sample [4, 4, 64, 64]" in message and "cli.py build" in message


def test_patches_map_to_fp16_engine_weights_in_initializer_orientation():
    from runtime.backends.tensorrt_refit import as_engine_dtype, patch_targets
    from runtime.lora.weight_map import MappedInitializer

    mapping = {
        "onnx::MatMul_1": MappedInitializer("down.attn1.to_q.weight", True, (3, 2)),
        "norm.weight": MappedInitializer("down.norm.weight", False, (2,)),
    }
    refittable = {"onnx::MatMul_1__fp16", "norm.weight"}
    q = np.arange(6, dtype=np.float32).reshape(3, 2)
    targets = patch_targets(mapping, {"down.attn1.to_q.weight": q, "down.norm.weight": np.ones(2)}, refittable)
    np.testing.assert_array_equal(targets["onnx::MatMul_1__fp16"], q.T)  # a Linear weight feeding MatMul
    np.testing.assert_array_equal(targets["norm.weight"], np.ones(2, np.float32))
    half = as_engine_dtype("onnx::MatMul_1__fp16", np.array([1e6, -1e6, 0.5], np.float32))
    assert half.dtype == np.float16 and half.tolist() == [65504.0, -65504.0, 0.5]
    assert as_engine_dtype("norm.weight", np.ones(2)).dtype == np.float32
    with pytest.raises(ModelError, match="shape"):
        patch_targets(mapping, {"down.attn1.to_q.weight": q.T}, refittable)
    with pytest.raises(ModelError, match="no refittable weight"):
        patch_targets(mapping, {"up.unknown.weight": q}, refittable)
    with pytest.raises(ModelError, match="not refittable"):
        patch_targets(mapping, {"down.norm.weight": np.ones(2)}, {"onnx::MatMul_1__fp16"})


class _TextEngine:
    """A stand-in text-encoder engine of rows 1..4: last_hidden_state = 2 x embeds, hidden_states = [embeds, 3 x]."""

    outputs = ["last_hidden_state", "hidden_states"]
    static = False

    def __init__(self):
        self.profile = {"profile": "b1-4", "shapes": {"inputs_embeds": [[1, 77, 8], [2, 77, 8], [4, 77, 8]]}}
        self.rows: list[int] = []

    def covers(self, shapes):
        from runtime.backends.tensorrt import _profile_covers

        return _profile_covers(self.profile["shapes"], shapes)

    def run(self, feeds, stream):
        x = feeds["inputs_embeds"]
        self.rows.append(len(x))
        return {"last_hidden_state": 2 * x, "hidden_states": np.stack([x, 3 * x])}


def test_text_encoder_calls_over_the_profile_run_in_slices():
    from runtime.backends.tensorrt import TensorRTSession

    engine = _TextEngine()
    session = TensorRTSession("text_encoder", [engine], stream=None)
    embeds = np.random.default_rng(0).standard_normal((10, 77, 8)).astype(np.float32)  # e.g. 5 texts x 2 chunks
    out = session.run({"inputs_embeds": embeds})
    assert engine.rows == [4, 4, 2]
    np.testing.assert_array_equal(out["last_hidden_state"], 2 * embeds)
    np.testing.assert_array_equal(out["hidden_states"], np.stack([embeds, 3 * embeds]))  # rows on axis 1
    assert session.run({"inputs_embeds": embeds[:3]}, ["last_hidden_state"]).keys() == {"last_hidden_state"}
