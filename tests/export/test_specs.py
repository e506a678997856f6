"""Component specs: shapes for allocation, dynamic axes for export; importable without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from export.specs import component_specs

SD15 = {  # the describe_checkpoint facts of SD 1.5 that the specs read
    "text_hidden_size": 768,
    "text_num_layers": 12,
    "text_max_length": 77,
    "cross_attention_dim": 768,
    "unet_in_channels": 4,
    "latent_channels": 4,
    "vae_scale_factor": 8,
    "unet_sample_size": 64,
}


def test_shapes_for_a_512_by_768_request_with_two_token_chunks():
    specs = component_specs(SD15)
    assert specs["unet"].shapes(batch=2, height=512, width=768, chunks=2) == {
        "sample": (2, 4, 64, 96),
        "timestep": (2,),
        "encoder_hidden_states": (2, 154, 768),
        "noise_pred": (2, 4, 64, 96),
    }
    assert specs["text_encoder"].shapes(1, 512, 512) == {
        "inputs_embeds": (1, 77, 768),
        "last_hidden_state": (1, 77, 768),
        "hidden_states": (13, 1, 77, 768),
    }
    assert specs["vae_decoder"].shapes(1, 512, 768)["image"] == (1, 3, 512, 768)
    assert specs["vae_encoder"].shapes(1, 512, 768)["latent_parameters"] == (1, 8, 64, 96)


def test_dynamic_axes_and_sample_inputs():
    unet = component_specs(SD15)["unet"]
    assert unet.dynamic_axes()["encoder_hidden_states"] == {0: "batch", 1: "sequence"}
    assert unet.dynamic_axes()["noise_pred"] == {0: "batch", 2: "height", 3: "width"}
    samples = unet.sample_inputs()
    assert list(samples) == unet.input_names
    assert samples["sample"].shape == (2, 4, 64, 64) and samples["timestep"].dtype.name == "float32"


def test_image_size_must_be_a_multiple_of_the_vae_factor():
    with pytest.raises(ValueError, match="multiple of the VAE scale factor 8"):
        component_specs(SD15)["unet"].shapes(1, 512, 500)


def test_specs_and_the_export_package_import_without_torch():
    code = "import sys; import export, export.specs; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
