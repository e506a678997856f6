"""The LDM <-> diffusers name tables, checked against diffusers' own single-file converters.

The tests write a tiny single file with runtime.single_file's tables run backwards; diffusers'
convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint / convert_ldm_clip_checkpoint / convert_open_clip_checkpoint
must read it back to exactly the original weights, and so must sdrt's own conversion.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.single_file.conftest import VARIANTS

pytestmark = needs_torch


def _original(folder, part: str) -> dict[str, np.ndarray]:
    """A part's weights, text encoder names under `text_model.` as published checkpoints have them."""
    from safetensors.numpy import load_file

    weights = load_file(next((folder / part).glob("*.safetensors")))
    if part == "text_encoder":
        weights = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in weights.items()}
        weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    return weights


def _diffusers_conversion(folder, single_file) -> dict[str, dict[str, np.ndarray]]:
    """What diffusers' own converters make of the single file, per part."""
    import torch
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    checkpoint = load_file(str(single_file))
    config = {part: json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae")}
    if any(k.startswith("cond_stage_model.model.") for k in checkpoint):
        text = convert_open_clip_checkpoint(CLIPTextModel.from_pretrained(folder / "text_encoder"), checkpoint)
    else:
        text = convert_ldm_clip_checkpoint(checkpoint)
    parts = {
        "unet": convert_ldm_unet_checkpoint(checkpoint, config["unet"]),
        "vae": convert_ldm_vae_checkpoint(checkpoint, config["vae"]),
        "text_encoder": text,
    }
    return {
        part: {k: v.numpy() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        for part, tensors in parts.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_diffusers_reads_the_single_file_back(tiny_models, variant):
    folder, single_file = tiny_models(variant)
    converted = _diffusers_conversion(folder, single_file)
    layers = json.loads((folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    for part in ("unet", "vae", "text_encoder"):
        original, theirs = _original(folder, part), converted[part]
        extra = set(theirs) - set(original)
        # SD 2's unused last OpenCLIP block: diffusers ignores it only for the real 24-block model
        assert all(f"encoder.layers.{layers}." in k for k in extra), (part, sorted(extra)[:3])
        assert set(original) <= set(theirs), (part, sorted(set(original) - set(theirs))[:3])
        for name, value in original.items():
            np.testing.assert_array_equal(theirs[name], value, err_msg=f"{part}: {name}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdrt_converts_to_the_original_weights(tiny_models, variant, tmp_path):
    from safetensors.numpy import load_file

    from runtime.single_file import prepare_checkpoint

    folder, single_file = tiny_models(variant)
    prediction = "v_prediction" if variant == "sd2-v" else None
    converted = prepare_checkpoint(single_file, tmp_path / "engines", prediction_type=prediction)
    for part in ("unet", "vae", "text_encoder"):
        ours = load_file(next((converted / part).glob("*.safetensors")))
        original = _original(folder, part)
        assert set(ours) == set(original), part
        for name, value in original.items():
            np.testing.assert_array_equal(ours[name], value, err_msg=f"{part}: {name}")
    for part, keys in {
        "unet": ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim", "attention_head_dim",
                 "use_linear_projection", "down_block_types", "up_block_types"),
        "vae": ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor"),
        "text_encoder": ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "vocab_size", "hidden_act", "max_position_embeddings"),
    }.items():  # fmt: skip
        ours = json.loads((converted / part / "config.json").read_text())
        theirs = json.loads((folder / part / "config.json").read_text())
        assert {k: ours[k] for k in keys} == {k: _listed(theirs[k]) for k in keys}, part
    unet = json.loads((converted / "unet" / "config.json").read_text())
    theirs = json.loads((folder / "unet" / "config.json").read_text())
    assert _listed(unet.get("only_cross_attention", False)) == _listed(theirs["only_cross_attention"])
    assert unet.get("num_class_embeds") == theirs["num_class_embeds"]
    v_models = ("sd2-v", "x4-upscaler")
    scheduler = json.loads((converted / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler.get("prediction_type", "epsilon") == ("v_prediction" if variant in v_models else "epsilon")
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == json.loads((folder / "model_index.json").read_text())["_class_name"]


def _listed(value):
    return list(value) if isinstance(value, tuple) else value
