"""SDXL's refiner with the hires fix against diffusers, as A1111's hires_fix_refiner_pass "second pass" (its default):
the first pass on the base alone, the second pass on the base until the switch, then on the refiner.

The reference: StableDiffusionXLPipeline for the first pass, A1111's "Latent" upscale by hand
(tests/runtime/test_sdxl_hires.py), then the base's StableDiffusionXLImg2ImgPipeline with the hires strength,
denoising_end=f and output_type="latent", handed to the refiner's StableDiffusionXLImg2ImgPipeline with
denoising_start=f; the second pass's generators are freshly seeded (A1111's second pass) and go on into the refiner;
both pipelines get the hires size as original and target size. A switch before the second pass's first step is the
refiner's img2img alone with the hires strength (diffusers' denoising_start would start the refiner at that earlier
step instead, which A1111 does not do); a switch after its last step is the plain hires fix. Tolerances as for
txt2img (assert_parity)."""

from __future__ import annotations

import pytest

from runtime.pipelines.hires import hires_schedule
from tests.conftest import needs_torch
from tests.runtime.test_sdxl_hires import HIRES_STEPS, STRENGTH, diffusers_hires, upscaled_latents
from tests.runtime.test_sdxl_img2img import CFG, HEIGHT, STEPS, WIDTH, diffusers_pipe, generators
from tests.runtime.test_txt2img_parity import NEGATIVE, PROMPT, SEED, assert_parity

pytestmark = needs_torch

HIRES_W, HIRES_H = 2 * WIDTH, 2 * HEIGHT  # the second pass: the last 4 steps (timesteps 499 333 167 1) of 6


@pytest.fixture(scope="module")
def models(tiny_sdxl, tiny_sdxl_refiner, shared_engines):
    import runtime

    return runtime.load(tiny_sdxl, engines_dir=shared_engines), runtime.load(tiny_sdxl_refiner,
                                                                             engines_dir=shared_engines)  # fmt: skip


def diffusers_refined_hires(base_folder, refiner_folder, sampler, schedule, switch_at, batch):
    """switch_at None: the refiner runs the whole second pass (its img2img with the hires strength)."""
    import diffusers

    base = diffusers_pipe("StableDiffusionXLPipeline", base_folder, sampler, schedule, add_watermarker=False)
    second = diffusers.StableDiffusionXLImg2ImgPipeline(**base.components, add_watermarker=False)
    second.set_progress_bar_config(disable=True)
    refiner = diffusers_pipe("StableDiffusionXLImg2ImgPipeline", refiner_folder, sampler, schedule,
                             add_watermarker=False)  # fmt: skip
    common = {"prompt": [PROMPT] * batch, "negative_prompt": [NEGATIVE] * batch, "guidance_scale": CFG}
    first = base(**common, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS, generator=generators(batch),
                 output_type="latent")  # fmt: skip
    image = upscaled_latents(first.images, HIRES_W, HIRES_H)
    total, _ = hires_schedule(HIRES_STEPS, STRENGTH)
    strength = (HIRES_STEPS + 0.5) / total  # diffusers runs int(total * strength) steps
    size = (HIRES_H, HIRES_W)
    common.update(num_inference_steps=total, original_size=size, target_size=size, generator=generators(batch))
    if switch_at is None:
        return refiner(**common, image=image, strength=strength, output_type="np").images
    held = second(**common, image=image, strength=strength, denoising_end=switch_at, output_type="latent").images
    return refiner(**common, image=held, denoising_start=switch_at, output_type="np").images


def refined_hires(base, refiner, sampler, switch_at, batch):
    return base.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=batch,
                        width=WIDTH, height=HEIGHT, sampler=sampler, hires_width=HIRES_W, hires_height=HIRES_H,
                        hires_upscaler="Latent", hires_steps=HIRES_STEPS, hires_strength=STRENGTH, refiner=refiner,
                        refiner_switch_at=switch_at)  # fmt: skip


@pytest.mark.parametrize(
    ("sampler", "switch_at", "batch"),
    [
        ("Euler a", 0.6, 2),  # cutoff 400: the base runs 499, the refiner 333 167 1; the noise streams go on
        ("DDIM", 0.8, 1),  # cutoff 200: 2 + 2 steps; VP samples: the hand-off latents are x / sqrt(1 + sigma^2)
    ],
)
def test_refiner_in_the_second_pass_matches_diffusers(models, tiny_sdxl, tiny_sdxl_refiner, sampler, switch_at, batch):
    base, refiner = models
    result = refined_hires(base, refiner, sampler, switch_at, batch)
    assert result.images.shape == (batch, HIRES_H, HIRES_W, 3)
    expected = diffusers_refined_hires(tiny_sdxl, tiny_sdxl_refiner, sampler, "default", switch_at, batch)
    assert_parity(result.images, expected)
    text = result.infotexts[0]
    assert "Hires upscaler: Latent" in text and f"Refiner switch at: {switch_at}" in text
    assert f"Refiner: {refiner.name} [{refiner.key[-10:]}]" in text and "Hires refiner" not in text


def test_switch_before_or_after_the_second_pass(models, tiny_sdxl, tiny_sdxl_refiner):
    """A switch at 0.2 (cutoff 800, before timestep 499): the refiner runs the whole second pass; at 0.9995
    (cutoff 0, after the last timestep): the plain hires fix on the base."""
    base, refiner = models
    early = refined_hires(base, refiner, "Euler", 0.2, 1)
    assert_parity(early.images, diffusers_refined_hires(tiny_sdxl, tiny_sdxl_refiner, "Euler", "default", None, 1))
    late = refined_hires(base, refiner, "Euler", 0.9995, 1)
    assert_parity(late.images, diffusers_hires(tiny_sdxl, "Euler", "default", HIRES_W, HIRES_H, "Latent", 1))
