"""fp16 export (export/fp16.py) on the CPU: ONNX Runtime's CPU provider runs the fp16 graphs.

References: the fp32 export of the same checkpoint (itself equal to diffusers to ~1e-6, tests/export/test_export.py)
for the components and end to end; numpy formulas for the synthetic graphs. Measured on the tiny SD1 model:
max abs error / max |reference| about 1.5e-3 (UNet), 7e-4 (text encoder), 2e-3 (VAE forced to fp16); the bound is
2e-2. End to end (8 steps, 64x64) the mean abs image difference is about 1e-3; the bound is 1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import needs_torch

REL_TOLERANCE = 2e-2


def _run(path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def _specs(folder: Path):
    from export.specs import component_specs
    from runtime.manifest import read_manifest

    return component_specs(read_manifest(folder).model)


@needs_torch
@pytest.mark.parametrize("component", ["text_encoder", "unet"])
def test_fp16_component_matches_fp32(sd1_fp32, sd1_fp16, component):
    feeds = _specs(sd1_fp32)[component].sample_inputs(seed=3)
    if component == "unet":
        feeds["timestep"][:] = 817.3  # sin/cos of t * freq must stay fp32 (fp16 t has 0.5 steps near 817)
    ref = _run(sd1_fp32 / "onnx" / f"{component}.onnx", feeds)
    got = _run(sd1_fp16 / "onnx" / f"{component}.onnx", feeds)
    for r, g in zip(ref, got):
        assert g.dtype == np.float32 and g.shape == r.shape  # the graph's IO stays float32
        assert np.isfinite(g).all()
        assert _rel_error(g, r) < REL_TOLERANCE
        assert _rel_error(g, r) > 0  # it really computed in fp16


@needs_torch
def test_fp16_manifest_records_precision_and_upcast_vae(sd1_fp32, sd1_fp16):
    manifest = json.loads((sd1_fp16 / "manifest.json").read_text())
    precisions = {name: c["precision"] for name, c in manifest["components"].items()}
    # the tiny checkpoint's VAE config says force_upcast (as SD 1.5's does), which diffusers' StableDiffusionPipeline
    # does not read: the VAE is fp16 too (an overflowing decode is retried in fp32 at run time)
    assert json.loads((Path(manifest["source"]["path"]) / "vae" / "config.json").read_text())["force_upcast"]
    assert precisions == {"text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp16", "vae_encoder": "fp16"}
    assert manifest["tools"]["fp16_io"] == "float32"
    unet = onnx.load(str(sd1_fp16 / "onnx" / "unet.onnx"))
    sizes = {}
    for t in unet.graph.initializer:
        sizes[t.data_type] = sizes.get(t.data_type, 0) + int(np.prod(t.dims))
    assert sizes[TensorProto.FLOAT16] > 20 * sizes.get(TensorProto.FLOAT, 0)  # weights are fp16
    assert [i.type.tensor_type.elem_type for i in unet.graph.input] == [TensorProto.FLOAT] * 3


@needs_torch
def test_fp16_export_is_reused_and_loads_as_an_artifact_folder(sd1_fp32, sd1_fp16):
    from export.fp16 import export_fp16
    from runtime.manifest import files_intact, read_manifest

    before = (sd1_fp16 / "onnx" / "unet.onnx").stat().st_mtime_ns
    assert export_fp16(sd1_fp32, progress=False) == sd1_fp16
    assert (sd1_fp16 / "onnx" / "unet.onnx").stat().st_mtime_ns == before
    assert files_intact(sd1_fp16, read_manifest(sd1_fp16))


@needs_torch
@pytest.mark.parametrize("component", ["vae_decoder", "vae_encoder"])
def test_vae_converted_to_fp16_when_not_upcast(sd1_fp32, tmp_path, component):
    from export.fp16 import convert_component
    from runtime.manifest import read_manifest

    info = read_manifest(sd1_fp32).components[component]
    spec = _specs(sd1_fp32)[component]
    shapes = {t.name: t.shape for t in spec.inputs + spec.outputs}
    out = tmp_path / "onnx" / f"{component}.onnx"
    converted = convert_component(sd1_fp32 / info.file, out, info, shapes, tmp_path)
    assert converted.precision == "fp16" and converted.file == f"onnx/{component}.onnx"
    feeds = spec.sample_inputs(seed=5)
    ref, got = _run(sd1_fp32 / info.file, feeds)[0], _run(out, feeds)[0]
    assert _rel_error(got, ref) < REL_TOLERANCE


def _graph_model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_pass_keeps_norms_fp32_clamps_constants_and_io_float32(tmp_path):
    """A LayerNorm, a mask add with float32's lowest value and a MatMul, against the numpy formula."""
    from export.fp16 import _float_types, convert_model

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    mask = np.zeros((4, 8), np.float32)
    mask[:, 5:] = np.finfo(np.float32).min
    f = TensorProto.FLOAT
    model = _graph_model(
        [
            helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1, epsilon=1e-5),
            helper.make_node("MatMul", ["n", "w"], ["m"]),
            helper.make_node("Add", ["m", "mask"], ["s"]),
            helper.make_node("Softmax", ["s"], ["y"], axis=-1),
        ],
        [helper.make_tensor_value_info("x", f, [4, 8])],
        [helper.make_tensor_value_info("y", f, [4, 8])],
        [
            numpy_helper.from_array(a, n)
            for a, n in ((np.ones(8, np.float32), "g"), (np.zeros(8, np.float32), "b"), (w, "w"), (mask, "mask"))
        ],  # fmt: skip
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    convert_model(model, _float_types(path))
    onnx.save(model, str(tmp_path / "h.onnx"))
    onnx.checker.check_model(model)
    types = {n.op_type: n for n in model.graph.node}
    assert "LayerNormalization" in types and model.graph.input[0].type.tensor_type.elem_type == f
    x = (rng.standard_normal((4, 8)) * 30 + 5).astype(np.float32)  # large values: fp16 variance would lose them
    n = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    s = n.astype(np.float64) @ w + mask
    y = np.exp(s - s.max(-1, keepdims=True))
    y /= y.sum(-1, keepdims=True)
    got = _run(tmp_path / "h.onnx", {"x": x})[0]
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - y).max() < 5e-3
    assert np.all(got[:, 5:] == 0)  # the clamped mask (-65504) still masks


def test_pass_keeps_the_timestep_path_fp32_until_the_linear_layer(tmp_path):
    """t -> Mul(freq) -> Sin -> MatMul: Sin must see float32 (t * freq up to ~1000 rad)."""
    from export.fp16 import _float_types, convert_model

    f = TensorProto.FLOAT
    freqs = np.array([[1.0, 0.5, 0.25, 0.125]], np.float32)
    w = np.eye(4, dtype=np.float32)
    model = _graph_model(
        [
            helper.make_node("Unsqueeze", ["timestep", "axes"], ["t1"]),
            helper.make_node("Mul", ["t1", "freqs"], ["arg"]),
            helper.make_node("Sin", ["arg"], ["emb"]),
            helper.make_node("MatMul", ["emb", "w"], ["y"]),
        ],
        [helper.make_tensor_value_info("timestep", f, [2])],
        [helper.make_tensor_value_info("y", f, [2, 4])],
        [
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
            numpy_helper.from_array(freqs, "freqs"),
            numpy_helper.from_array(w, "w"),
        ],  # fmt: skip
    )
    onnx.save(model, str(tmp_path / "m.onnx"))
    convert_model(model, _float_types(tmp_path / "m.onnx"))
    onnx.save(model, str(tmp_path / "h.onnx"))
    t = np.array([817.3, 999.0], np.float32)
    expected = np.sin(t.astype(np.float64)[:, None] * freqs)
    got = _run(tmp_path / "h.onnx", {"timestep": t})[0]
    assert np.abs(got - expected).max() < 2e-3  # fp16 rounding of sin only; an fp16 t would be off by ~0.3
    sin = next(n for n in model.graph.node if n.op_type == "Sin")
    assert sin.input[0] == "arg"  # fed by the fp32 Mul directly, no Cast to fp16 before it


@needs_torch
@pytest.mark.slow
def test_fp16_end_to_end_image_close_to_fp32(sd1_fp32, sd1_fp16):
    import runtime

    options = dict(seed=7, steps=8, width=64, height=64, cfg_scale=6.0, sampler="Euler")
    fp32 = runtime.load(sd1_fp32).txt2img("a red house by a lake", **options).images
    fp16 = runtime.load(sd1_fp16).txt2img("a red house by a lake", **options).images
    diff = np.abs(fp32.astype(np.float64) - fp16)
    assert np.isfinite(fp16).all()
    assert 0 < diff.mean() < 1e-2 and diff.max() < 0.1


@needs_torch
def test_fp16_weight_map_names_the_fp16_initializers(sd1_fp32, sd1_fp16):
    """LoRA / TensorRT refit find each parameter in the fp16 model: the mapped fp16 initializer holds the fp32
    initializer's values rounded to fp16."""
    from runtime.lora.weight_map import read_weight_map, weight_map_path

    fp32_map = read_weight_map(weight_map_path(sd1_fp32 / "onnx" / "unet.onnx"))
    fp16_map = read_weight_map(weight_map_path(sd1_fp16 / "onnx" / "unet.onnx"))
    assert len(fp16_map) == len(fp32_map) > 0
    models = (onnx.load(str(folder / "onnx" / "unet.onnx")) for folder in (sd1_fp32, sd1_fp16))
    fp32, fp16 = ({t.name: numpy_helper.to_array(t) for t in model.graph.initializer} for model in models)
    for name, mapped in fp16_map.items():
        source = name.removesuffix("__fp16")
        assert fp32_map[source] == mapped
        np.testing.assert_array_equal(fp16[name], fp32[source].astype(fp16[name].dtype))


def test_unknown_precision_is_one_line_before_any_work(tmp_path):
    from export.fp16 import export_with_precision
    from runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"^unknown precision 'bf16'; choose one of: fp32, fp16, int8$"):
        export_with_precision(tmp_path / "missing", tmp_path / "engines", "bf16")
    assert not (tmp_path / "engines").exists()
