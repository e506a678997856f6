"""SDXL img2img parity: sdrt (onnxruntime) against diffusers' StableDiffusionXLImg2ImgPipeline on the tiny SDXL
checkpoint: same folder, seeds (one CPU torch.Generator per image: posterior sample, then noise) and scheduler config.

The init image is given at the output size, so diffusers' preprocessing does not resample it and both take the
generation size as SDXL's original and target size. Tolerances as for txt2img (assert_parity).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.runtime.test_txt2img_parity import NEGATIVE, PROMPT, SEED, assert_parity

pytestmark = needs_torch

WIDTH, HEIGHT = 64, 48
STEPS, CFG = 6, 6.0


def init_image(width: int = WIDTH, height: int = HEIGHT):
    """A smooth, deterministic RGB test image."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.4 * np.sin(x / 5.0) * np.cos(y / 7.0)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def diffusers_pipe(pipeline_class: str, folder, sampler: str, schedule: str, **config):
    """diffusers' `pipeline_class` on `folder` with the sampler's scheduler on the checkpoint's scheduler config."""
    import diffusers

    from runtime.samplers import resolve_sampler

    spec, schedule_type = resolve_sampler(sampler, schedule)
    pipe = getattr(diffusers, pipeline_class).from_pretrained(folder, **config)
    pipe.set_progress_bar_config(disable=True)
    scheduler_class = getattr(diffusers, spec.diffusers_class)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **spec.diffusers_kwargs(schedule_type))
    return pipe


def generators(batch: int):
    import torch

    return [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, shared_engines):
    import runtime

    return runtime.load(tiny_sdxl, engines_dir=shared_engines)


@pytest.mark.parametrize(
    ("sampler", "schedule", "strength", "batch"),
    [
        ("DPM++ 2M", "Karras", 0.6, 2),
        ("Euler a", "default", 0.75, 1),
        ("DDIM", "default", 0.5, 2),
        ("UniPC", "default", 1.0, 1),
    ],
)
def test_img2img_matches_diffusers(sdxl, tiny_sdxl, sampler, schedule, strength, batch):
    result = sdxl.img2img(
        PROMPT,
        init_image(),
        strength=strength,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        cfg_scale=CFG,
        seed=SEED,
        batch_size=batch,
        sampler=sampler,
        schedule=schedule,
    )
    assert (result.request.width, result.request.height) == (WIDTH, HEIGHT)
    pipe = diffusers_pipe("StableDiffusionXLImg2ImgPipeline", tiny_sdxl, sampler, schedule, add_watermarker=False)
    expected = pipe(
        PROMPT,
        image=init_image(),
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        num_images_per_prompt=batch,
        generator=generators(batch),
        output_type="np",
    ).images
    assert_parity(result.images, expected)


def test_time_ids_follow_the_generation_size_and_aesthetic_scores():
    """Base models: (h, w, 0, 0, h, w) on every row; a refiner: (h, w, 0, 0, score), 2.5 on the uncond half and 6 on
    the cond half (diffusers' Img2Img defaults, A1111's sdxl_refiner_low/high_aesthetic_score)."""
    from runtime.pipelines.sdxl import sdxl_time_ids

    base = sdxl_time_ids({"sdxl": {}}, 48, 64, 4, guided=True)
    np.testing.assert_array_equal(base, [[48, 64, 0, 0, 48, 64]] * 4)
    refiner = sdxl_time_ids({"sdxl": {"requires_aesthetics_score": True}}, 48, 64, 4, guided=True)
    np.testing.assert_array_equal(refiner, [[48, 64, 0, 0, 2.5]] * 2 + [[48, 64, 0, 0, 6.0]] * 2)
    unguided = sdxl_time_ids({"sdxl": {"requires_aesthetics_score": True}}, 48, 64, 2, guided=False)
    np.testing.assert_array_equal(unguided, [[48, 64, 0, 0, 6.0]] * 2)
