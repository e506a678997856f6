"""Exports of the tiny SD 2 depth and x4 upscaler checkpoints: the depth estimator as a component of its own, the
upscaler's UNet with class labels. Reference: the transformers / diffusers modules from the checkpoint, fp32, run by
torch, and sdrt's torch backend; both within 1e-4 of the ONNX models (measured: about 1e-6)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.export.test_export import TOLERANCE, max_diff, session

pytestmark = needs_torch


@pytest.fixture(scope="module")
def depth_export(tiny_sd2_depth, engines_dir):
    from export import export_model

    return export_model(tiny_sd2_depth, engines_dir, progress=False)


@pytest.fixture(scope="module")
def x4_export(tiny_x4_upscaler, engines_dir):
    from export import export_model

    return export_model(tiny_x4_upscaler, engines_dir, progress=False)


def test_depth_checkpoint_is_described(tiny_sd2_depth):
    from runtime.checkpoint import describe_checkpoint

    model = describe_checkpoint(tiny_sd2_depth)
    assert model["variant"] == "depth" and model["pipeline_class"] == "StableDiffusionDepth2ImgPipeline"
    assert model["unet_in_channels"] == 5 and model["prediction_type"] == "epsilon"
    processor = json.loads((tiny_sd2_depth / "feature_extractor" / "preprocessor_config.json").read_text())
    assert model["depth_estimator"] == {"model_type": "dpt", "image_size": 32, "preprocessor": processor}
    assert model["unet_num_class_embeds"] is None and "max_noise_level" not in model


def test_manifest_lists_the_depth_estimator(depth_export):
    from runtime.manifest import COMPONENTS, TensorInfo, read_manifest

    manifest = read_manifest(depth_export)
    assert set(manifest.components) == {*COMPONENTS, "depth_estimator"}
    estimator = manifest.components["depth_estimator"]
    assert estimator.inputs == {"pixel_values": TensorInfo("float32", ["batch", 3, 32, 32])}
    assert estimator.outputs == {"predicted_depth": TensorInfo("float32", ["batch", 32, 32])}
    (graph_input,) = session(depth_export / estimator.file).get_inputs()
    assert (graph_input.name, graph_input.type) == ("pixel_values", "tensor(float)")
    assert graph_input.shape == ["batch", 3, 32, 32]


def test_depth_estimator_matches_transformers_and_the_torch_backend(tiny_sd2_depth, depth_export):
    import torch
    from transformers import DPTForDepthEstimation

    from runtime.backends.torch import TorchBackend

    model = DPTForDepthEstimation.from_pretrained(tiny_sd2_depth / "depth_estimator").eval()
    torch_session = TorchBackend(tiny_sd2_depth).session("depth_estimator")
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        pixel_values = rng.uniform(-1, 1, (batch, 3, 32, 32)).astype(np.float32)
        (depth,) = session(depth_export / "onnx" / "depth_estimator.onnx").run(None, {"pixel_values": pixel_values})
        with torch.no_grad():
            expected = model(torch.from_numpy(pixel_values)).predicted_depth
        assert depth.shape == (batch, 32, 32) and expected.std() > 0.1  # a depth that varies over the image
        assert max_diff(depth, expected) <= TOLERANCE
        assert max_diff(depth, torch_session.run({"pixel_values": pixel_values})["predicted_depth"]) <= TOLERANCE


def test_depth_export_is_reused_and_watches_the_image_processor(tiny_sd2_depth, depth_export, engines_dir, tmp_path):
    from export import export_model
    from runtime.checkpoint import fingerprint

    stamp = (depth_export / "manifest.json").stat().st_mtime_ns
    assert export_model(tiny_sd2_depth, engines_dir, progress=False) == depth_export
    assert (depth_export / "manifest.json").stat().st_mtime_ns == stamp
    copy = shutil.copytree(tiny_sd2_depth, tmp_path / "copy")
    before = fingerprint(copy)
    config = copy / "feature_extractor" / "preprocessor_config.json"
    config.write_text(config.read_text().replace('"resample": 3', '"resample": 2'))
    assert fingerprint(copy) != before


def test_upscaler_unet_takes_class_labels(tiny_x4_upscaler, x4_export):
    import torch
    from diffusers import UNet2DConditionModel

    from runtime.backends.torch import TorchBackend
    from runtime.checkpoint import describe_checkpoint
    from runtime.manifest import TensorInfo, read_manifest

    assert describe_checkpoint(tiny_x4_upscaler)["variant"] == "upscale-x4"
    unet_info = read_manifest(x4_export).components["unet"]
    assert unet_info.inputs["sample"].shape == ["batch", 7, "height", "width"]
    assert unet_info.inputs["class_labels"] == TensorInfo("int64", ["batch"])
    onnx_unet = session(x4_export / unet_info.file)
    unet = UNet2DConditionModel.from_pretrained(tiny_x4_upscaler, subfolder="unet").eval()
    torch_session = TorchBackend(tiny_x4_upscaler).session("unet")
    rng = np.random.default_rng(1)
    for labels in ([20], [0, 350, 998]):
        batch = len(labels)
        feeds = {
            "sample": rng.standard_normal((batch, 7, 8, 12)).astype(np.float32),  # latents + noised low-res image
            "timestep": np.full(batch, 817.3, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, 32)).astype(np.float32),
            "class_labels": np.array(labels, dtype=np.int64),
        }
        (noise_pred,) = onnx_unet.run(None, feeds)
        with torch.no_grad():
            tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
            expected = unet(**tensors).sample
        assert noise_pred.shape == (batch, 4, 8, 12)
        assert max_diff(noise_pred, expected) <= TOLERANCE
        assert max_diff(noise_pred, torch_session.run(feeds)["noise_pred"]) <= TOLERANCE
        (relabelled,) = onnx_unet.run(None, dict(feeds, class_labels=feeds["class_labels"] + 1))
        assert max_diff(noise_pred, relabelled) > 10 * TOLERANCE  # the label is used


@pytest.mark.parametrize(
    ("variant", "remove", "message"),
    [
        ("x4", "low_res_scheduler", "looks like an x4 upscaler .* but has no low_res_scheduler/scheduler_config.json"),
        ("depth", "feature_extractor", "has a depth estimator but no feature_extractor/preprocessor_config.json"),
        ("depth", "depth_estimator/model.safetensors", "depth_estimator holds no weights"),
    ],
)
def test_incomplete_checkpoints_are_model_errors(tiny_sd2_depth, tiny_x4_upscaler, tmp_path, variant, remove, message):
    from runtime.checkpoint import describe_checkpoint, resolve_checkpoint
    from runtime.errors import ModelError

    copy = shutil.copytree(tiny_x4_upscaler if variant == "x4" else tiny_sd2_depth, tmp_path / variant)
    path = copy / remove
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(ModelError, match=message) as caught:
        describe_checkpoint(resolve_checkpoint(copy))
    assert "\n" not in str(caught.value)
