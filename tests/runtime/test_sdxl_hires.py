"""SDXL hires fix against diffusers: StableDiffusionXLPipeline for the first pass, the upscale done by hand as A1111
does it (tests/runtime/test_hires.py's helpers), StableDiffusionXLImg2ImgPipeline for the second pass with freshly
seeded generators. The second pass's time ids are A1111's hires conditioning: the covering size (hr_upscale_to_x/y)
as original and target size, given to diffusers as original_size/target_size. Tolerances as for txt2img."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.pipelines.hires import hires_schedule, upscale_size
from tests.conftest import needs_torch
from tests.runtime.test_hires import resized_uint8
from tests.runtime.test_sdxl_img2img import CFG, HEIGHT, STEPS, WIDTH, diffusers_pipe, generators
from tests.runtime.test_txt2img_parity import NEGATIVE, PROMPT, SEED, assert_parity

pytestmark = needs_torch

HIRES_STEPS, STRENGTH = 4, 0.6  # the last 4 steps of a 6-step schedule (int(4 / 0.6))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, shared_engines):
    import runtime

    return runtime.load(tiny_sdxl, engines_dir=shared_engines)


def upscaled_latents(latents, width, height):
    """A1111's "Latent": bilinear F.interpolate to the covering size, then the centre crop (truncate_x/y)."""
    import torch

    scale = WIDTH // latents.shape[3]
    cover_w, cover_h = upscale_size(WIDTH, HEIGHT, width, height)
    up = torch.nn.functional.interpolate(latents, size=(cover_h // scale, cover_w // scale), mode="bilinear")
    cut_w, cut_h = (cover_w - width) // scale, (cover_h - height) // scale
    return up[:, :, cut_h // 2 : up.shape[2] - (cut_h + 1) // 2, cut_w // 2 : up.shape[3] - (cut_w + 1) // 2]


def diffusers_hires(folder, sampler, schedule, width, height, upscaler, batch):
    import diffusers

    base = diffusers_pipe("StableDiffusionXLPipeline", folder, sampler, schedule, add_watermarker=False)
    second = diffusers.StableDiffusionXLImg2ImgPipeline(**base.components, add_watermarker=False)
    second.set_progress_bar_config(disable=True)
    common = {"prompt": [PROMPT] * batch, "negative_prompt": [NEGATIVE] * batch, "guidance_scale": CFG}
    latent = upscaler == "Latent"
    first = base(**common, width=WIDTH, height=HEIGHT, num_inference_steps=STEPS, generator=generators(batch),
                 output_type="latent" if latent else "np")  # fmt: skip
    image = upscaled_latents(first.images, width, height) if latent else resized_uint8(first.images, width, height)
    total, start = hires_schedule(HIRES_STEPS, STRENGTH)
    strength = (HIRES_STEPS + 0.5) / total  # diffusers runs int(total * strength) steps
    cover_w, cover_h = upscale_size(WIDTH, HEIGHT, width, height)
    sizes = {"original_size": (cover_h, cover_w), "target_size": (cover_h, cover_w)}
    return second(**common, image=image, num_inference_steps=total, strength=strength, generator=generators(batch),
                  output_type="np", **sizes).images  # fmt: skip


@pytest.mark.parametrize(
    ("upscaler", "sampler", "schedule", "width", "height", "batch"),
    [
        ("Latent", "Euler a", "default", 2 * WIDTH, 2 * HEIGHT, 2),
        ("Latent", "DDIM", "default", 64, 64, 1),  # covers 85x64, then the centre crop: time ids of 85x64
        ("Lanczos", "DPM++ 2M", "Karras", 2 * WIDTH, 2 * HEIGHT, 1),
    ],
)
def test_hires_fix_matches_diffusers(sdxl, tiny_sdxl, upscaler, sampler, schedule, width, height, batch):
    result = sdxl.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=batch,
                          width=WIDTH, height=HEIGHT, sampler=sampler, schedule=schedule, hires_width=width,
                          hires_height=height, hires_upscaler=upscaler, hires_steps=HIRES_STEPS,
                          hires_strength=STRENGTH)  # fmt: skip
    assert result.images.shape == (batch, height, width, 3)
    assert f"Hires upscaler: {upscaler}" in result.infotexts[0]
    assert_parity(result.images, diffusers_hires(tiny_sdxl, sampler, schedule, width, height, upscaler, batch))


def test_second_pass_time_ids_are_the_covering_size(sdxl, monkeypatch):
    """The time ids of every UNet call: the base size in the first pass, the covering size in the second."""
    unet = sdxl.backend.session("unet")
    seen, run = [], unet.run
    monkeypatch.setattr(unet, "run", lambda feeds, outputs=None: seen.append(feeds["time_ids"][0].copy()) or run(
        feeds, outputs))  # fmt: skip
    sdxl.txt2img("a cat", steps=2, seed=1, width=WIDTH, height=HEIGHT, sampler="Euler", hires_width=64,
                 hires_height=64, hires_steps=2, hires_strength=0.5)  # fmt: skip
    np.testing.assert_array_equal(seen, [[HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]] * 2 + [[64, 85, 0, 0, 64, 85]] * 2)
