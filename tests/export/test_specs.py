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


# SDXL base 1.0 and its refiner as describe_checkpoint reads their published configs (text_encoder/, text_encoder_2/,
# unet/ config.json, model_index.json); the refiner's "text_*" facts are text encoder 2's (it has no other)
SDXL = dict(
    SD15,
    cross_attention_dim=2048,  # 768 + 1280: both encoders' penultimate states side by side
    unet_sample_size=128,  # 1024 px
    sdxl={
        "text_hidden_size_2": 1280,
        "text_num_layers_2": 32,
        "text_projection_dim": 1280,
        "time_ids": 6,
        "two_encoders": True,
        "requires_aesthetics_score": False,
    },  # fmt: skip
)
SDXL_REFINER = dict(
    SDXL,
    text_hidden_size=1280,
    text_num_layers=32,
    cross_attention_dim=1280,
    sdxl=dict(SDXL["sdxl"], time_ids=5, two_encoders=False, requires_aesthetics_score=True),
)


def test_sdxl_specs_name_both_text_encoders_and_the_unets_added_conditioning():
    specs = component_specs(SDXL)
    assert list(specs) == ["text_encoder", "unet", "vae_decoder", "vae_encoder", "text_encoder_2"]
    unet = specs["unet"]
    assert unet.input_names == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert unet.shapes(batch=2, height=1024, width=1024) == {
        "sample": (2, 4, 128, 128),
        "timestep": (2,),
        "encoder_hidden_states": (2, 77, 2048),
        "text_embeds": (2, 1280),  # text encoder 2's pooled, projected output
        "time_ids": (2, 6),  # original size, crop top-left, target size
        "noise_pred": (2, 4, 128, 128),
    }
    assert unet.dynamic_axes()["text_embeds"] == {0: "batch"} and unet.dynamic_axes()["time_ids"] == {0: "batch"}
    assert specs["text_encoder_2"].shapes(3, 1024, 1024) == {
        "input_ids": (3, 77),
        "token_overrides": (3, 77, 1280),  # the token embeddings where an id is -1 (textual inversion)
        "hidden_states": (33, 3, 77, 1280),  # the embeddings and 32 layers
        "text_embeds": (3, 1280),
    }
    assert specs["text_encoder_2"].inputs[0].dtype == "int32"
    assert specs["vae_decoder"].shapes(1, 1024, 1024)["image"] == (1, 3, 1024, 1024)


def test_sdxl_refiner_specs_have_text_encoder_2_only_and_five_time_ids():
    specs = component_specs(SDXL_REFINER)
    assert "text_encoder" not in specs and "text_encoder_2" in specs
    shapes = specs["unet"].shapes(batch=2, height=1024, width=1024)
    assert shapes["encoder_hidden_states"] == (2, 77, 1280)
    assert shapes["text_embeds"] == (2, 1280) and shapes["time_ids"] == (2, 5)  # ... aesthetic score, not target size


def _engine_specs(model: dict, **request):
    from export.tensorrt_build import build_request, engine_specs

    precisions = {name: "fp16" for name in component_specs(model)}
    precisions.update(vae_decoder="fp32", vae_encoder="fp32")  # SDXL's VAE: force_upcast
    return engine_specs(model, precisions, build_request(**request))


def _ordered(shapes: dict) -> bool:
    """min <= opt <= max on every axis of every input."""
    return all(lo <= mid <= hi for low, opt, high in shapes.values() for lo, mid, hi in zip(low, opt, high))


def test_sdxl_engines_static_1024_profile_carries_the_added_conditioning():
    engines = _engine_specs(SDXL)  # no size given: the native 1024x1024, a static profile (the CUDA-graph path)
    assert list(engines) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    unet = engines["unet"]
    assert unet.profile == "r1-2-h128-w128-t1"
    assert unet.shapes == {  # rows 1 (no guidance) .. 2 (uncond + cond), optimum 2
        "sample": [[1, 4, 128, 128], [2, 4, 128, 128], [2, 4, 128, 128]],
        "timestep": [[1], [2], [2]],
        "encoder_hidden_states": [[1, 77, 2048], [2, 77, 2048], [2, 77, 2048]],
        "text_embeds": [[1, 1280], [2, 1280], [2, 1280]],
        "time_ids": [[1, 6], [2, 6], [2, 6]],
    }
    assert engines["text_encoder_2"].profile == "b1-16"
    assert engines["text_encoder_2"].shapes == {
        "input_ids": [[1, 77], [2, 77], [16, 77]],
        "token_overrides": [[1, 77, 1280], [2, 77, 1280], [16, 77, 1280]],
    }
    assert engines["vae_decoder"].precision == "fp32" and engines["vae_decoder"].profile == "b1-h128-w128"
    assert engines["vae_decoder"].shapes == {"latent": [[1, 4, 128, 128]] * 3}
    assert all(_ordered(e.shapes) for e in engines.values())


def test_sdxl_engines_dynamic_512_to_1536_with_and_terms_and_long_prompts():
    engines = _engine_specs(SDXL, dynamic="512..1536", batch_size=2, and_terms=2, token_chunks=3)
    unet = engines["unet"]
    assert unet.profile == "r1-6-dyn64-192-t1-3"  # rows 1 .. (1 + 2 terms) x 2 images, chunks 1 .. 3
    assert unet.shapes["sample"] == [[1, 4, 64, 64], [4, 4, 128, 128], [6, 4, 192, 192]]  # optimum: 1024 px
    assert unet.shapes["encoder_hidden_states"] == [[1, 77, 2048], [4, 77, 2048], [6, 231, 2048]]
    assert unet.shapes["text_embeds"] == [[1, 1280], [4, 1280], [6, 1280]]
    assert unet.shapes["time_ids"] == [[1, 6], [4, 6], [6, 6]]
    assert engines["vae_decoder"].shapes["latent"] == [[2, 4, 64, 64], [2, 4, 128, 128], [2, 4, 192, 192]]
    assert all(_ordered(e.shapes) for e in engines.values())


def test_sdxl_refiner_engines():
    engines = _engine_specs(SDXL_REFINER)
    assert list(engines) == ["text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    assert engines["unet"].shapes["time_ids"] == [[1, 5], [2, 5], [2, 5]]
    assert engines["unet"].shapes["encoder_hidden_states"][2] == [2, 77, 1280]
