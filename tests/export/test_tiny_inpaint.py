"""The tiny inpainting checkpoint: diffusers' StableDiffusionInpaintPipeline loads and runs it, sdrt describes it
as "inpaint" and exports its 9-channel UNet (reference: the diffusers UNet, fp32, run by torch)."""

from __future__ import annotations

import json

import numpy as np

from export.configs import SD15_SCHEDULER
from tests.conftest import needs_torch

pytestmark = needs_torch


def test_the_checkpoint_is_an_inpainting_pipeline(tiny_sd1_inpaint):
    from runtime.checkpoint import describe_checkpoint

    index = json.loads((tiny_sd1_inpaint / "model_index.json").read_text())
    model = describe_checkpoint(tiny_sd1_inpaint)
    assert index["_class_name"] == model["pipeline_class"] == "StableDiffusionInpaintPipeline"
    assert model["variant"] == "inpaint" and model["unet_in_channels"] == 9 and model["latent_channels"] == 4
    scheduler = json.loads((tiny_sd1_inpaint / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == SD15_SCHEDULER and model["prediction_type"] == "epsilon"


def test_diffusers_inpaint_pipeline_runs_it(tiny_sd1_inpaint):
    import torch
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_sd1_inpaint, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))
    out = pipe(
        "a cat",
        image=Image.new("RGB", (32, 32), (200, 30, 30)),
        mask_image=mask,
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_export_takes_nine_unet_channels(tiny_sd1_inpaint, tmp_path):
    import onnxruntime as ort
    import torch
    from diffusers import UNet2DConditionModel

    from export import export_model

    artifact = export_model(tiny_sd1_inpaint, tmp_path / "engines", progress=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(artifact / "onnx" / "unet.onnx"), options, providers=["CPUExecutionProvider"])
    sample_input = session.get_inputs()[0]
    assert sample_input.name == "sample" and sample_input.shape == ["batch", 9, "height", "width"]

    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 9, 16, 16), dtype=np.float32)  # latents + mask + masked-image latents
    timestep = np.array([500.0, 21.5], dtype=np.float32)
    context = rng.standard_normal((2, 77, 32), dtype=np.float32)
    (noise_pred,) = session.run(None, {"sample": sample, "timestep": timestep, "encoder_hidden_states": context})
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_inpaint, subfolder="unet").eval()
    with torch.no_grad():
        expected = unet(*(torch.from_numpy(a) for a in (sample, timestep, context))).sample.numpy()
    assert noise_pred.shape == (2, 4, 16, 16) and np.abs(noise_pred - expected).max() < 1e-4
