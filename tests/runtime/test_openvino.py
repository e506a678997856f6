"""The openvino backend: the same ONNX artifacts on OpenVINO's CPU plugin.

fp32 against diffusers with the parity tests' tolerances (txt2img <= 2e-5 mean / 1e-3 max, img2img <= 5e-5 / 2e-3),
a LoRA against diffusers' fused LoRA, shapes the pipeline meets against ONNX Runtime's run of the same file, the
model cache (a second start imports what the first compiled), and bf16 against fp32 where the CPU has bf16.

bf16 bounds: emulating bf16 on this tiny model in torch (diffusers' pipeline under bf16 autocast, and with every
module cast to bf16) moved the images by mean 1.8e-3 / 2.1e-3 and max 1.0e-2 / 1.3e-2 from fp32; the test allows
mean 1e-2 and max 6e-2.
"""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.runtime.test_img2img_parity import assert_close, init_image
from tests.runtime.test_img2img_parity import reference as img2img_reference
from tests.runtime.test_txt2img_parity import (
    CFG,
    HEIGHT,
    NEGATIVE,
    PROMPT,
    SEED,
    STEPS,
    WIDTH,
    assert_parity,
    reference_images,
)

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
pytestmark = [needs_torch, pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed (openvino extra)")]
GENERATION = dict(negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=2)


def has_bf16() -> bool:
    import openvino as ov

    from runtime.backends.openvino import cpu_capabilities

    return "BF16" in cpu_capabilities(ov.Core())


@pytest.fixture(scope="module")
def openvino_sd1(tiny_sd1, shared_engines):
    import runtime

    return runtime.load(tiny_sd1, backend="openvino", engines_dir=shared_engines)


@pytest.fixture(scope="module")
def txt2img_reference(tiny_sd1):
    return reference_images(tiny_sd1, "DPM++ 2M", "Karras")


def test_txt2img_matches_diffusers(openvino_sd1, txt2img_reference):
    options = dict(GENERATION, width=WIDTH, height=HEIGHT, sampler="DPM++ 2M", schedule="Karras")
    result = openvino_sd1.txt2img(PROMPT, **options)
    assert_parity(result.images, txt2img_reference)
    assert "Backend: openvino" in result.infotexts[0] and "Precision" not in result.infotexts[0]


def test_img2img_matches_diffusers(openvino_sd1, tiny_sd1):
    result = openvino_sd1.img2img(PROMPT, init_image(), strength=0.6, sampler="Euler", **GENERATION)
    assert_close(result.images, img2img_reference(tiny_sd1, "Euler", "default", 0.6))


def test_shapes_match_onnxruntime(openvino_sd1):
    """Batch, size and token chunks change between calls of one compiled model, as between requests."""
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    reference = OnnxRuntimeBackend(openvino_sd1.backend.folder)
    rng = np.random.default_rng(0)
    for batch, h, w, chunks in ((1, 8, 8, 1), (3, 6, 10, 2), (2, 4, 12, 3)):
        feeds = {
            "sample": rng.standard_normal((batch, 4, h, w), dtype=np.float32),
            "timestep": np.full(batch, 321.0, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77 * chunks, 32), dtype=np.float32),
        }
        got = openvino_sd1.backend.session("unet").run(feeds)["noise_pred"]
        expected = reference.session("unet").run(feeds)["noise_pred"]
        assert got.shape == (batch, 4, h, w)
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_second_start_imports_the_cache(openvino_sd1, tmp_path):
    """A fresh copy of the artifacts: the first start compiles and writes the cache, the second only imports it;
    a file exported again is compiled again and its old cache removed."""
    from runtime.backends.openvino import CACHE_FOLDER, OpenVinoBackend

    folder = tmp_path / "artifacts"
    shutil.copytree(openvino_sd1.backend.folder, folder, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    components = ("text_encoder", "unet", "vae_decoder")
    first = OpenVinoBackend(folder)
    assert not any(first.session(c).loaded_from_cache for c in components)
    blobs = {p: p.stat().st_mtime_ns for p in (folder / CACHE_FOLDER).rglob("*.blob")}
    assert len(blobs) == len(components)
    second = OpenVinoBackend(folder)
    assert all(second.session(c).loaded_from_cache for c in components)
    assert {p: p.stat().st_mtime_ns for p in (folder / CACHE_FOLDER).rglob("*.blob")} == blobs  # nothing rewritten
    unet = folder / "onnx" / "unet.onnx"
    unet.write_bytes(unet.read_bytes())  # exported again: same path, new file
    third = OpenVinoBackend(folder)
    assert not third.session("unet").loaded_from_cache and third.session("vae_decoder").loaded_from_cache
    assert len(list((folder / CACHE_FOLDER).glob("unet-*"))) == 1


def test_broken_model_is_an_artifact_error(openvino_sd1, tmp_path):
    from runtime.backends.openvino import CACHE_FOLDER, OpenVinoBackend
    from runtime.errors import ArtifactError

    folder = tmp_path / "artifacts"
    shutil.copytree(openvino_sd1.backend.folder, folder, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    model = folder / "onnx" / "vae_decoder.onnx"
    model.write_bytes(model.read_bytes()[:3000])
    with pytest.raises(ArtifactError, match=r"vae_decoder.onnx is not a loadable ONNX model .*re-export"):
        OpenVinoBackend(folder).session("vae_decoder")


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="diffusers' LoRA loading needs peft")
def test_lora_matches_diffusers(openvino_sd1, tiny_sd1, tmp_path):
    from tests.lora.lora_files import module_weights, write_kohya
    from tests.lora.test_lora_parity import GENERATION as LORA_GENERATION
    from tests.lora.test_lora_parity import PROMPT as LORA_PROMPT
    from tests.lora.test_lora_parity import reference

    path = write_kohya(tmp_path / "kohya.safetensors", module_weights(tiny_sd1), seed=1)
    result = openvino_sd1.txt2img(LORA_PROMPT, loras=[(path, 0.8)], **LORA_GENERATION)
    assert_parity(result.images, reference(tiny_sd1, [(path, 0.8, 0.8)]))
    base = openvino_sd1.txt2img(LORA_PROMPT, **LORA_GENERATION).images  # base weights back, from the cache
    assert np.abs(base - result.images).max() > 0.02
    assert all(openvino_sd1.backend.session(c).loaded_from_cache for c in ("text_encoder", "unet"))


@pytest.mark.skipif(not HAS_OPENVINO or not has_bf16(), reason="this CPU has no bf16 (OPTIMIZATION_CAPABILITIES)")
def test_bf16_within_bounds_of_fp32(openvino_sd1, tiny_sd1, shared_engines):
    import runtime

    bf16 = runtime.load(tiny_sd1, backend="openvino", engines_dir=shared_engines, precision="bf16")
    options = dict(GENERATION, width=WIDTH, height=HEIGHT, sampler="DPM++ 2M", schedule="Karras")
    fp32_images = openvino_sd1.txt2img(PROMPT, **options).images
    result = bf16.txt2img(PROMPT, **options)
    diff = np.abs(result.images.astype(np.float64) - fp32_images)
    assert diff.mean() <= 1e-2 and diff.max() <= 6e-2, f"mean {diff.mean():.2e}, max {diff.max():.2e}"
    assert diff.max() > 1e-5  # bf16 was really used, not a silent f32
    assert "Precision: bf16" in result.infotexts[0]


def test_bf16_refused_without_cpu_support(monkeypatch, tmp_path):
    import runtime
    from runtime.backends import openvino as backend
    from runtime.errors import BackendUnavailableError

    monkeypatch.setattr(backend, "cpu_capabilities", lambda core: ["FP32", "INT8", "BIN", "EXPORT_IMPORT"])
    with pytest.raises(BackendUnavailableError, match=r"^openvino bf16 needs a CPU with bf16 .* FP32, INT8, BIN"):
        runtime.load(tmp_path / "no-model", backend="openvino", precision="bf16")  # refused before the model is read
