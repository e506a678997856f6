"""The CPU graphs (export.onnx_cpu): every attention block of the tiny UNet and VAE as one MultiHeadAttention node
(counted against diffusers' own Attention modules), outputs equal to the exported graph's; the int8 UNet's image
within measured bounds of fp32; derived graphs made again when missing, broken or stale."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = needs_torch

COMPONENTS = ("unet", "vae_decoder", "vae_encoder")
# int8 UNet vs fp32, same seed, 48x32, 6 Euler steps: float images in [0, 1]. Measured on the tiny SD1 checkpoint:
# mean 4.0e-3, max 2.4e-2 (ONNX Runtime 1.32, AMD EPYC with AVX-512 VNNI); the bounds leave 2.5x.
INT8_MEAN_BOUND, INT8_MAX_BOUND = 1e-2, 6e-2
SMALL = {"width": 48, "height": 32, "steps": 6, "seed": 7, "sampler": "Euler"}


def attention_modules(source: Path, component: str) -> int:
    """How many diffusers Attention modules the component's torch module holds (the reference count)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

    if component == "unet":
        module = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    else:
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
        module = vae.decoder if component == "vae_decoder" else vae.encoder
    return sum(isinstance(m, Attention) for m in module.modules())


def run(path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_attention_block_is_one_multi_head_attention_node(sd1_export, component):
    import onnx

    from export.specs import component_specs
    from runtime.manifest import derived_graph_file, read_manifest

    manifest = read_manifest(sd1_export.artifact)
    info = manifest.components[component]
    cpu = sd1_export.artifact / derived_graph_file(info, "cpu")
    graph = onnx.load(str(cpu), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    expected = attention_modules(sd1_export.source, component)
    assert expected > 0 and ops["MultiHeadAttention"] == expected and ops["Softmax"] == 0, ops
    weight_map = sd1_export.artifact / info.file.replace(".onnx", ".weight_map.json")
    if weight_map.is_file():  # LoRA overrides replace these initializers by name: all of them must still be there
        mapped = set(json.loads(weight_map.read_text())["initializers"])
        assert mapped and mapped <= {t.name for t in graph.initializer}
    feeds = component_specs(manifest.model)[component].sample_inputs()
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal(v.shape).astype(v.dtype) if v.dtype == np.float32 else v for k, v in feeds.items()}
    for fused, plain in zip(run(cpu, feeds), run(sd1_export.artifact / info.file, feeds)):
        assert fused.shape == plain.shape
        np.testing.assert_allclose(fused, plain, rtol=0, atol=1e-5)


@pytest.fixture
def artifact_copy(sd1_export, tmp_path) -> Path:
    """A copy of the tiny export these tests may damage or add derived graphs to."""
    return Path(shutil.copytree(sd1_export.artifact, tmp_path / sd1_export.artifact.name))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_int8_unet_image_within_bounds_of_fp32(artifact_copy):
    import runtime
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.errors import InvalidRequestError

    sd = runtime.load(artifact_copy)
    fp32 = sd.txt2img("a red cube", **SMALL).images[0]
    sd.backend = OnnxRuntimeBackend(artifact_copy, precision="int8")
    assert sd.backend.session("unet").metadata()["sdrt.derived_graph"] == "int8/1"
    int8 = sd.txt2img("a red cube", **SMALL).images[0]
    difference = np.abs(int8.astype(np.float64) - fp32)  # float images in [0, 1]
    assert 0 < difference.mean() <= INT8_MEAN_BOUND and difference.max() <= INT8_MAX_BOUND, difference.max()
    with pytest.raises(InvalidRequestError, match="LoRA cannot change the int8 UNet"):
        sd.backend.apply_weights({"unet": {"conv_in.weight": np.zeros((1,), np.float32)}})
    with pytest.raises(InvalidRequestError, match="unknown precision 'int4'"):
        OnnxRuntimeBackend(artifact_copy, precision="int4")


def cpu_graph(folder: Path, component: str = "unet") -> Path:
    from runtime.manifest import derived_graph_file, read_manifest

    return folder / derived_graph_file(read_manifest(folder).components[component], "cpu")


def fused_ops(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def unet_output(backend) -> np.ndarray:
    from export.specs import component_specs

    feeds = component_specs(backend.manifest.model)["unet"].sample_inputs()
    return backend.session("unet").run(feeds)["noise_pred"]


@pytest.mark.parametrize("damage", ["missing", "zeroed", "stale"])
def test_cpu_graph_is_made_again(artifact_copy, caplog, damage):
    """An export older than CPU graphs (missing), a damaged one (one warning), one made from another model file
    (stale: silently) are made again from the exported model, and the session runs the fused graph."""
    from export.onnx_cpu import write_cpu_graph
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    path = cpu_graph(artifact_copy)
    if damage == "missing":
        path.unlink()
    elif damage == "zeroed":
        path.write_bytes(bytes(path.stat().st_size))
    else:
        write_cpu_graph(artifact_copy / "onnx" / "unet.onnx", path, {"sdrt.source_file_sha256": "0" * 64})
    with caplog.at_level(logging.INFO, logger="runtime.backends.onnxruntime"):
        backend = OnnxRuntimeBackend(artifact_copy)
        output = unet_output(backend)
    assert len(warnings_of(caplog)) == (1 if damage == "zeroed" else 0), warnings_of(caplog)
    assert fused_ops(path)["MultiHeadAttention"] > 0 and np.isfinite(output).all()
    assert backend.session("unet").metadata()["sdrt.source_file_sha256"] != "0" * 64


def test_without_onnx_the_exported_graph_runs_with_one_warning(artifact_copy, caplog, monkeypatch):
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    cpu_graph(artifact_copy).unlink()
    monkeypatch.setitem(sys.modules, "export.onnx_cpu", None)  # importing it raises ImportError
    with caplog.at_level(logging.INFO, logger="runtime.backends.onnxruntime"):
        backend = OnnxRuntimeBackend(artifact_copy)
        output = unet_output(backend)
    (line,) = warnings_of(caplog)
    assert "unet: its CPU graph cannot be made without the onnx package" in line, line
    assert not cpu_graph(artifact_copy).exists() and np.isfinite(output).all()


def test_export_makes_the_derived_graphs_once(sd1_export, artifact_copy, caplog):
    """`cli.py export --precision int8` leaves the CPU graphs and the int8 UNet beside the export (here: an export
    that has none yet), and the backend then runs them without making them again."""
    import cli
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.manifest import derived_graph_file, read_manifest

    manifest = read_manifest(artifact_copy)
    wanted = [artifact_copy / derived_graph_file(manifest.components[c], "cpu") for c in COMPONENTS]
    wanted.append(artifact_copy / derived_graph_file(manifest.components["unet"], "int8"))
    for path in wanted:
        path.unlink(missing_ok=True)
    engines = str(artifact_copy.parent)  # the copy is this folder's export of the same source: reused
    argv = ["--quiet", "export", "--model", str(sd1_export.source), "--engines", engines, "--precision", "int8"]
    assert cli.main(argv) == 0
    made = {path: path.stat().st_mtime_ns for path in wanted}
    backend = OnnxRuntimeBackend(artifact_copy, precision="int8")
    with caplog.at_level(logging.INFO, logger="runtime.backends.onnxruntime"):
        assert all(backend.session(c).derived for c in COMPONENTS)
    assert not [r.getMessage() for r in caplog.records if "making" in r.getMessage()]
    assert {path: path.stat().st_mtime_ns for path in wanted} == made
