"""SDXL single files (the SGM layout: conditioner.embedders.*, label_emb.0.*) against diffusers' own single-file
loader, on tiny SDXL checkpoints that follow SDXL's head rules (tests/single_file/ldm.py writes them as single files,
with the OpenCLIP-bigG layout transcribed there independently of the converter).

* Base: sdrt's txt2img from the file equals StableDiffusionXLPipeline.from_single_file(file, config=folder), and
  the folder's own images (diffusers from_pretrained; sdrt on the folder).
* Refiner (bigG alone as embedder 0, 5 time ids): img2img equal to StableDiffusionXLImg2ImgPipeline.from_single_file.
* Inpainting (9-channel UNet): inpaint equal to StableDiffusionXLInpaintPipeline.from_single_file.
Tolerances as for SD 1.x (assert_parity: mean <= 2e-5, max <= 1e-3).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from runtime.errors import ModelError
from tests.conftest import needs_torch
from tests.runtime.test_sdxl_img2img import CFG, HEIGHT, STEPS, WIDTH, generators, init_image
from tests.runtime.test_sdxl_inpaint import mask_image
from tests.runtime.test_txt2img_parity import NEGATIVE, PROMPT, SEED, assert_parity

COMMON = dict(negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=2)
DIFFUSERS = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, num_images_per_prompt=2)


def single_file_pipe(pipeline_class: str, path, folder, sampler: str, schedule: str = "default"):
    """diffusers' own single-file loader on `path`, its configs from `folder`, the sampler's scheduler swapped in."""
    import diffusers

    from runtime.samplers import resolve_sampler

    spec, schedule_type = resolve_sampler(sampler, schedule)
    pipe = getattr(diffusers, pipeline_class).from_single_file(str(path), config=str(folder), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    scheduler_class = getattr(diffusers, spec.diffusers_class)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **spec.diffusers_kwargs(schedule_type))
    return pipe


def _load(model, engines, **options):
    import runtime

    return runtime.load(model, backend="torch", engines_dir=engines, **options)


@needs_torch
def test_sdxl_base_single_file_equals_diffusers(tiny_sdxl_models, tmp_path):
    import diffusers

    folder, path = tiny_sdxl_models("sdxl")
    sd = _load(path, tmp_path)
    result = sd.txt2img(PROMPT, width=WIDTH, height=HEIGHT, sampler="Euler a", **COMMON)
    pipe = single_file_pipe("StableDiffusionXLPipeline", path, folder, "Euler a")
    expected = pipe(PROMPT, width=WIDTH, height=HEIGHT, generator=generators(2), output_type="np", **DIFFUSERS).images
    assert_parity(result.images, expected)
    # the same images as the folder the file was written from: diffusers' and sdrt's
    folder_pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    folder_pipe.set_progress_bar_config(disable=True)
    folder_pipe.scheduler = pipe.scheduler
    own = folder_pipe(PROMPT, width=WIDTH, height=HEIGHT, generator=generators(2), output_type="np", **DIFFUSERS)
    np.testing.assert_allclose(own.images, expected, rtol=0, atol=1e-6)
    from_folder = _load(folder, tmp_path).txt2img(PROMPT, width=WIDTH, height=HEIGHT, sampler="Euler a", **COMMON)
    np.testing.assert_allclose(result.images, from_folder.images, rtol=0, atol=1e-6)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"Model hash: {sha[:10]}, Model: {path.stem}," in result.infotexts[0]
    assert sd.info["family"] == "sdxl" and sd.info["sdxl"]["two_encoders"]
    # SDXL base 1.0's published VAE config: scaling 0.13025, run in float32
    vae = json.loads(next((tmp_path / "single-file").glob("tiny-sdxl-*/vae/config.json")).read_text())
    assert (vae["scaling_factor"], vae["force_upcast"]) == (0.13025, True)


@needs_torch
def test_sdxl_refiner_single_file_equals_diffusers(tiny_sdxl_models, tmp_path):
    folder, path = tiny_sdxl_models("sdxl-refiner")
    sd = _load(path, tmp_path)
    result = sd.img2img(PROMPT, init_image(), strength=0.5, sampler="DPM++ 2M", **COMMON)
    pipe = single_file_pipe("StableDiffusionXLImg2ImgPipeline", path, folder, "DPM++ 2M")
    expected = pipe(PROMPT, image=init_image(), strength=0.5, generator=generators(2), output_type="np", **DIFFUSERS)
    assert_parity(result.images, expected.images)
    facts = sd.info["sdxl"]
    assert (facts["two_encoders"], facts["requires_aesthetics_score"], facts["time_ids"]) == (False, True, 5)


@needs_torch
def test_sdxl_inpainting_single_file_equals_diffusers(tiny_sdxl_models, tmp_path):
    folder, path = tiny_sdxl_models("sdxl-inpaint")
    sd = _load(path, tmp_path)
    result = sd.inpaint(PROMPT, init_image(), mask_image(), mask_blur=0, strength=1.0, sampler="DDIM", **COMMON)
    pipe = single_file_pipe("StableDiffusionXLInpaintPipeline", path, folder, "DDIM")
    expected = pipe(PROMPT, image=init_image(), mask_image=mask_image(), strength=1.0, generator=generators(2),
                    height=HEIGHT, width=WIDTH, output_type="np", **DIFFUSERS)  # fmt: skip
    assert_parity(result.images, expected.images)
    assert sd.info["unet_in_channels"] == 9


UNET = "model.diffusion_model."
BASE = {UNET + "input_blocks.0.0.weight", UNET + "label_emb.0.0.weight", "conditioner.embedders.0.transformer.x"}


@pytest.mark.parametrize(
    ("names", "channels", "message"),
    [
        (BASE, 4, "unknown SDXL layout"),  # embedder 1 (OpenCLIP-bigG) missing
        (BASE | {"conditioner.embedders.1.model.x"}, 5, "a 5-channel UNet"),
        ({"conditioner.embedders.0.model.x", UNET + "input_blocks.0.0.weight"}, 4, "added conditioning"),
        ({"conditioner.embedders.0.model.x", UNET + "label_emb.0.0.weight"}, 9, "a 9-channel UNet"),  # refiner
    ],
)
def test_bad_sdxl_layouts_are_refused_in_one_line(names, channels, message):
    from runtime.single_file.families import detect_family

    with pytest.raises(ModelError, match=message) as info:
        detect_family(set(names), channels)
    assert "\n" not in str(info.value)


def _tokenizer_image(model, engines, **load_options):
    return _load(model, engines, **load_options).txt2img(PROMPT, width=WIDTH, height=HEIGHT, steps=2, seed=SEED).images


@needs_torch
def test_sdxl_tokenizers_from_clip_l_or_a_given_folder(tiny_sdxl_models, tmp_path, monkeypatch):
    """Without SDXL's tokenizer_2 in the cache, CLIP-L's vocabulary padded with "!" stands in (what tokenizer_2 is);
    --tokenizer given an SDXL folder takes its tokenizer/ and tokenizer_2/."""
    from export.tiny import write_tiny_tokenizer
    from runtime.single_file import prepare_checkpoint

    folder, path = tiny_sdxl_models("sdxl")
    expected = _tokenizer_image(folder, tmp_path / "engines")
    hub = tmp_path / "hub"
    write_tiny_tokenizer(hub / "models--openai--clip-vit-large-patch14" / "snapshots" / "1")  # pads with EOS
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    converted = prepare_checkpoint(path, tmp_path / "engines")
    pads = [json.loads((converted / p / "special_tokens_map.json").read_text())["pad_token"] for p in PARTS]
    assert pads == ["<|endoftext|>", "!"]
    np.testing.assert_allclose(_tokenizer_image(path, tmp_path / "engines"), expected, rtol=0, atol=1e-6)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    given = _tokenizer_image(path, tmp_path / "engines-2", tokenizer=folder)
    np.testing.assert_allclose(given, expected, rtol=0, atol=1e-6)


PARTS = ("tokenizer", "tokenizer_2")
# stabilityai/stable-diffusion-xl-refiner-1.0's unet/config.json (what shapes and the head rule must give back)
SDXL_REFINER_UNET = {
    "block_out_channels": [384, 768, 1536, 1536],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": [6, 12, 24, 24],
    "transformer_layers_per_block": 4,
    "cross_attention_dim": 1280,
    "projection_class_embeddings_input_dim": 2560,  # pooled 1280 + 5 ids x 256
}


@needs_torch
@pytest.mark.parametrize("variant", ["base", "refiner"])
def test_sdxl_published_shapes_give_the_published_configs(variant):
    """SDXL base 1.0's and the refiner's UNets (meta tensors: shapes only) in the SGM layout convert back to their
    published configs: heads of 64 channels, depth per level, 256-wide time ids."""
    import torch
    from diffusers import UNet2DConditionModel

    from export.configs import SDXL_UNET
    from runtime.single_file.configs import unet_config, unet_layout
    from runtime.single_file.families import SDXL, SDXL_REFINER
    from runtime.single_file.keys import unet_map
    from tests.single_file.ldm import unet_layout_of

    published = dict(SDXL_UNET) if variant == "base" else dict(SDXL_UNET, **SDXL_REFINER_UNET)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**published)
    table = unet_map(unet_layout_of(published))
    ldm = {table.to_ldm(k): np.broadcast_to(np.float32(0), v.shape) for k, v in unet.state_dict().items()}
    family = SDXL if variant == "base" else SDXL_REFINER
    config = unet_config(ldm, family, unet_layout(ldm), pooled_dim=1280)
    with torch.device("meta"):  # the same modules and shapes (transformer depth per level included) ...
        converted = UNet2DConditionModel.from_config(config)
    shapes = {k: v.shape for k, v in unet.state_dict().items()}
    assert {k: v.shape for k, v in converted.state_dict().items()} == shapes
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim", "cross_attention_dim"):
        assert config[key] == published[key], key
    attention = [kind.startswith("CrossAttn") for kind in published["down_block_types"]]  # ... and heads
    heads = [h for h, a in zip(config["attention_head_dim"], attention) if a]
    assert heads == [h for h, a in zip(published["attention_head_dim"], attention) if a]


@needs_torch
def test_sdxl_v_pred_marker_selects_v_prediction(tiny_sdxl_models, tmp_path):
    """v-prediction SDXL fine-tunes carry an empty `v_pred` tensor (read by ComfyUI): the file converts to a
    v-prediction scheduler and samples as diffusers' single-file pipeline with prediction_type="v_prediction"."""
    from safetensors.numpy import load_file, save_file

    folder, plain = tiny_sdxl_models("sdxl")
    path = tmp_path / "tiny-sdxl-vpred.safetensors"
    save_file({**load_file(str(plain)), "v_pred": np.zeros(0, np.float32)}, str(path))
    sd = _load(path, tmp_path)
    assert (sd.info["prediction_type"], sd.info["source"]["prediction_type_from"]) == ("v_prediction", "v_pred")
    result = sd.txt2img(PROMPT, width=WIDTH, height=HEIGHT, sampler="DPM++ 2M", **COMMON)
    pipe = single_file_pipe("StableDiffusionXLPipeline", path, folder, "DPM++ 2M")
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type="v_prediction")
    expected = pipe(PROMPT, width=WIDTH, height=HEIGHT, generator=generators(2), output_type="np", **DIFFUSERS).images
    assert_parity(result.images, expected)
