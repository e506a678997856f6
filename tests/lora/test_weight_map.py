"""The export's weight map (ONNX initializer -> diffusers parameter), checked against the torch modules."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from runtime.lora.weight_map import (
    match_initializers,
    onnx_initializers,
    parameter_fingerprints,
    read_weight_map,
    weight_map_path,
)
from tests.conftest import needs_torch


def test_matching_by_value_and_transpose():
    rng = np.random.default_rng(0)
    linear, conv, ones = rng.normal(size=(3, 5)), rng.normal(size=(2, 3, 3, 3)), np.ones(4)
    fingerprints = parameter_fingerprints(
        [
            ("a.weight", linear.astype(np.float32)),
            ("b.weight", conv.astype(np.float32)),
            ("n1.weight", ones.astype(np.float32)),
            ("n2.weight", ones.astype(np.float32)),
        ]  # fmt: skip
    )
    initializers = [
        ("onnx::MatMul_1", linear.T.astype(np.float32)),  # stored transposed, as the exporter writes Linear weights
        ("b.weight", conv.astype(np.float32)),
        ("n.weight", ones.astype(np.float32)),  # two parameters hold these values: ambiguous, not mapped
        ("folded", (linear * 2).astype(np.float32)),  # a value no parameter has
        ("ids", np.arange(3)),
    ]
    mapping = match_initializers(initializers, fingerprints)
    assert set(mapping) == {"onnx::MatMul_1", "b.weight"}
    assert (mapping["onnx::MatMul_1"].parameter, mapping["onnx::MatMul_1"].transposed) == ("a.weight", True)
    assert mapping["onnx::MatMul_1"].shape == (3, 5)
    assert (mapping["b.weight"].parameter, mapping["b.weight"].transposed) == ("b.weight", False)
    # one parameter held by two initializers maps to neither
    doubled = match_initializers([("x", linear.T.astype(np.float32)), ("y", linear.astype(np.float32))], fingerprints)
    assert doubled == {}


def _torch_weights(checkpoint, component) -> dict[str, np.ndarray]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    loader = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}[component]
    module = loader.from_pretrained(checkpoint, subfolder=component)
    weights = {}
    for name, parameter in module.named_parameters():
        if component == "text_encoder" and not name.startswith("text_model."):
            name = "text_model." + name  # LoRA files' (and transformers 4's) names
        weights[name] = parameter.detach().numpy()
    return weights


@needs_torch
@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_export_maps_every_linear_and_conv_weight(tiny_sd1, lora_engines, component):
    """Each mapped initializer holds its parameter's values exactly (transposed where it says so), and every
    Linear/conv weight LoRA can touch is mapped (the random weights of the tiny model are all distinct)."""
    folder = next(lora_engines.iterdir())
    model_path = folder / "onnx" / f"{component}.onnx"
    mapping = read_weight_map(weight_map_path(model_path))
    weights = _torch_weights(tiny_sd1, component)
    for name, value in onnx_initializers(model_path, mapping):
        entry = mapping[name]
        expected = weights[entry.parameter]
        assert entry.shape == expected.shape
        np.testing.assert_array_equal(value.T if entry.transposed else value, expected)
    lora_targets = {n for n, v in weights.items() if v.ndim >= 2 and "embedding" not in n}
    assert lora_targets <= {m.parameter for m in mapping.values()}


@needs_torch
def test_old_export_gets_its_map_on_demand(lora_engines, tmp_path):
    """An artifact folder exported before weight maps existed: the map is built from the source on first use."""
    import runtime

    folder = next(lora_engines.iterdir())
    copy = shutil.copytree(folder, tmp_path / folder.name)
    maps = sorted(copy.glob("onnx/*.weight_map.json"))
    assert [p.name for p in maps] == ["text_encoder.weight_map.json", "unet.weight_map.json"]
    expected = {p.name: read_weight_map(p) for p in maps}
    for p in maps:
        p.unlink()
    model = runtime.load(copy)
    shapes = model.backend.parameter_shapes("unet")
    assert "down_blocks.0.resnets.0.conv1.weight" in shapes
    assert read_weight_map(copy / "onnx" / "unet.weight_map.json") == expected["unet.weight_map.json"]


def test_initializers_from_external_data(tmp_path):
    """Models over 2 GiB keep their weights in <name>.onnx.data: they are read from there, one by one."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(1)
    weights = {"w": rng.normal(size=(64, 32)).astype(np.float32), "b": rng.normal(size=(32,)).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)  # fmt: skip
    assert (tmp_path / "m.onnx.data").is_file()
    read = dict(onnx_initializers(path))
    assert set(read) == {"w", "b"}
    for name, value in weights.items():
        np.testing.assert_array_equal(read[name], value)
    assert set(dict(onnx_initializers(path, ["b"]))) == {"b"}
