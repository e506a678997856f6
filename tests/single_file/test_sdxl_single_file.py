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


def _load(model, engines):
    import runtime

    return runtime.load(model, backend="torch", engines_dir=engines)


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
