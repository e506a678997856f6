"""Hires fix: the first pass, the upscalers and the second pass against independent references.

* Lanczos: equals doing it by hand with sdrt (txt2img at the base size, uint8 by truncation, one PIL Lanczos
  resize, img2img at the target size with fresh seeds) and diffusers (StableDiffusionPipeline, then
  StableDiffusionImg2ImgPipeline on the resized images with freshly seeded generators).
* Latent: the interpolation against torch's F.interpolate in float64 and float32; the whole pass against diffusers
  (the first pass's latents, interpolated by torch, given to the img2img pipeline as latents).
* The second pass runs `hires_steps` steps at the end of a schedule of int(hires_steps / strength) steps (A1111);
  diffusers gets that schedule length and a strength that starts at the same step.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from runtime.errors import InvalidRequestError
from runtime.pipelines.hires import (
    hires_parameters,
    hires_schedule,
    hires_target,
    upscale_latents,
    upscale_size,
)
from tests.conftest import needs_torch
from tests.runtime.test_txt2img_parity import CFG, HEIGHT, NEGATIVE, PROMPT, SEED, STEPS, WIDTH

HIRES_STEPS, STRENGTH = 6, 0.6  # a 10-step schedule (int(6 / 0.6)), its last 6 steps run
SAMPLER = "Euler a"  # ancestral: the second pass's noise continues each fresh stream


def assert_close(images, expected):
    """Tighter than the img2img parity bounds (measured: mean 2e-7, max 2e-6): rounding the first pass to uint8
    instead of truncating it, as A1111 does, already moves the Lanczos result by mean 6e-5, max 5e-4."""
    assert images.shape == expected.shape
    diff = np.abs(images.astype(np.float64) - expected)
    assert diff.mean() <= 1e-5 and diff.max() <= 2e-4, f"mean {diff.mean():.2e}, max {diff.max():.2e}"
    assert expected.std() > 0.01


# ---- sizes, steps and infotext -----------------------------------------------------------------------------------


def test_hires_target_as_a1111():
    assert hires_target(512, 768) == (1024, 1536)  # "Upscale by" 2 by default
    assert hires_target(512, 768, scale=1.5) == (768, 1152)
    assert hires_target(512, 768, resize_width=1024) == (1024, 1024 * 768 // 512)
    assert hires_target(512, 768, resize_height=1024) == (1024 * 512 // 768, 1024)
    assert hires_target(512, 768, scale=3, resize_width=1024, resize_height=1024) == (1024, 1024)


def test_upscale_size_covers_the_target():
    assert upscale_size(512, 768, 1024, 1536) == (1024, 1536)  # same aspect ratio: the target itself
    assert upscale_size(512, 768, 1024, 1024) == (1024, 1536)  # taller base: full width, crop rows
    assert upscale_size(768, 512, 1024, 1024) == (1536, 1024)  # wider base: full height, crop columns
    assert upscale_size(48, 32, 62, 41) == (62, 41)  # int() rounding of "Upscale by" 1.3 never crops


def test_hires_schedule_as_a1111_setup_img2img_steps():
    assert hires_schedule(20, 0.7) == (28, 8)  # int(20 / 0.7) = 28 steps, the last 20 run
    assert hires_schedule(6, 0.6) == (10, 4)
    assert hires_schedule(20, 1.0) == (20, 0)  # strength capped at 0.999: int(20 / 0.999) = 20
    assert hires_schedule(20, 0.0) == (20, 20)  # nothing runs


def test_infotext_keys_as_a1111():
    from runtime.output import format_parameters, parse_parameters

    params = {"Steps": 20, "Size": "512x512", **hires_parameters("Latent", 10, 0.7, scale=2.0)}
    text = format_parameters("a cat", "", params)
    assert text.endswith("Denoising strength: 0.7, Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent")
    assert parse_parameters(text)[2]["Hires upscale"] == "2"
    params = hires_parameters("Lanczos", 0, 0.5, scale=1.5)
    assert params == {
        "Denoising strength": 0.5,
        "Hires upscale": 1.5,
        "Hires steps": None,
        "Hires upscaler": "Lanczos",
    }
    text = format_parameters("a cat", "", hires_parameters("Lanczos", 0, 0.5, resize_width=1024))
    assert text.endswith("Denoising strength: 0.5, Hires resize: 1024x0, Hires upscaler: Lanczos")  # no "Hires steps"


def test_crop_latents_as_a1111_truncate():
    from runtime.pipelines.hires import crop_latents

    latents = np.arange(2 * 4 * 13 * 10, dtype=np.float32).reshape(2, 4, 13, 10)
    cut_h, cut_w = 13 - 8, 10 - 8  # A1111: samples[:, :, t_y // 2 : h - (t_y + 1) // 2, t_x // 2 : w - (t_x + 1) // 2]
    expected = latents[:, :, cut_h // 2 : 13 - (cut_h + 1) // 2, cut_w // 2 : 10 - (cut_w + 1) // 2]
    assert np.array_equal(crop_latents(latents, 8, 8), expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale": 0}, "hires scale must be a number > 0, not 0"),
        ({"scale": float("nan")}, "hires scale must be a number > 0"),
        ({"resize_width": -8}, "hires resize width must be an integer >= 0, not -8"),
    ],
)
def test_bad_hires_size(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        hires_target(512, 512, **options)


# ---- upscalers ---------------------------------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("mode", ["bilinear", "nearest", "nearest-exact"])
@pytest.mark.parametrize("size", [(12, 10), (9, 7), (4, 3), (6, 5)])
def test_upscale_latents_matches_torch(mode, size):
    import torch

    latents = np.random.default_rng(0).standard_normal((2, 4, 6, 5))
    for dtype, tolerance in ((np.float64, 1e-12), (np.float32, 1e-6)):
        x = latents.astype(dtype)
        expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=size, mode=mode).numpy()
        got = upscale_latents(x, *size, mode=mode)
        assert got.dtype == dtype and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)


def test_lanczos_upscale_is_one_resize_for_whole_scales():
    """A1111's hires Lanczos chain (resize_image with the Lanczos upscaler) is one Lanczos resize for whole scales."""
    from PIL import Image

    from runtime.upscalers import load_upscaler, resize_image

    lanczos = load_upscaler("Lanczos")
    pixels = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for size in ((96, 64), (72, 48), (48, 32), (24, 16)):
        expected = image.resize(size, resample=Image.Resampling.LANCZOS)
        assert np.array_equal(np.asarray(resize_image(lanczos, image, *size)), np.asarray(expected))
    assert resize_image(lanczos, image, 100, 60).size == (100, 60)  # enlarge to 100x66, floor to 96x64, then 100x60


# ---- the whole fix -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(tiny_sd1, shared_engines):
    import runtime

    return runtime.load(tiny_sd1, engines_dir=shared_engines)


def base_request(sd, batch=2):
    from runtime.request import Txt2ImgRequest, validate_txt2img

    request = Txt2ImgRequest(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        cfg_scale=CFG,
        seed=SEED,
        batch_size=batch,
        width=WIDTH,
        height=HEIGHT,
        sampler=SAMPLER,
    )
    return validate_txt2img(request, sd.info)


def diffusers_pipelines(folder):
    import diffusers

    from runtime.samplers import resolve_sampler

    spec, schedule_type = resolve_sampler(SAMPLER)
    base = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    scheduler_class = getattr(diffusers, spec.diffusers_class)
    base.scheduler = scheduler_class.from_config(base.scheduler.config, **spec.diffusers_kwargs(schedule_type))
    base.set_progress_bar_config(disable=True)
    second = diffusers.StableDiffusionImg2ImgPipeline(**base.components)
    second.set_progress_bar_config(disable=True)
    return base, second


def generators(batch):
    import torch

    return [torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)]


def diffusers_hires(folder, width, height, init, first_output, batch=2):
    """diffusers' first pass (output_type `first_output`), init(its images) -> the img2img `image`, the second pass."""
    base, second = diffusers_pipelines(folder)
    common = {"guidance_scale": CFG, "num_images_per_prompt": 1}
    prompts = {"prompt": [PROMPT] * batch, "negative_prompt": [NEGATIVE] * batch}
    size = {"width": WIDTH, "height": HEIGHT}
    first = base(
        **prompts, **common, **size, num_inference_steps=STEPS, generator=generators(batch), output_type=first_output
    )
    total, start = hires_schedule(HIRES_STEPS, STRENGTH)
    strength = 1.0 if start == 0 else (HIRES_STEPS + 0.5) / total  # diffusers runs int(total * strength) steps
    image = init(first.images, width, height)
    kwargs = {"num_inference_steps": total, "strength": strength, "output_type": "np", "generator": generators(batch)}
    return second(**prompts, **common, image=image, **kwargs).images


def resized_uint8(images, width, height):
    """A1111's Lanczos hires input: (255 * x).astype(uint8) (truncation), then a PIL Lanczos resize."""
    from PIL import Image

    pixels = (np.float32(255) * images).astype(np.uint8)
    return [Image.fromarray(p).resize((width, height), resample=Image.Resampling.LANCZOS) for p in pixels]


def upscaled_latents(latents, width, height):
    """A1111's "Latent": bilinear F.interpolate to the covering size, then the centre crop (truncate_x/y)."""
    import torch

    scale = WIDTH // latents.shape[3]  # the tiny VAE's scale factor
    cover_w, cover_h = upscale_size(WIDTH, HEIGHT, width, height)
    up = torch.nn.functional.interpolate(latents, size=(cover_h // scale, cover_w // scale), mode="bilinear")
    cut_w, cut_h = (cover_w - width) // scale, (cover_h - height) // scale
    return up[:, :, cut_h // 2 : up.shape[2] - (cut_h + 1) // 2, cut_w // 2 : up.shape[3] - (cut_w + 1) // 2]


@needs_torch
def test_lanczos_equals_sdrt_by_hand(sd):
    from runtime.pipelines.hires import hires_fix

    images = hires_fix(sd, base_request(sd), 2 * WIDTH, 2 * HEIGHT, "Lanczos", HIRES_STEPS, STRENGTH)
    first = sd.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=2,
                       width=WIDTH, height=HEIGHT, sampler=SAMPLER).images  # fmt: skip
    total, start = hires_schedule(HIRES_STEPS, STRENGTH)
    by_hand = []
    for i, image in enumerate(resized_uint8(first, 2 * WIDTH, 2 * HEIGHT)):  # image i: its own fresh stream
        result = sd.img2img(PROMPT, image, negative_prompt=NEGATIVE, steps=total, strength=(HIRES_STEPS + 0.5) / total,
                            cfg_scale=CFG, seed=SEED + i, sampler=SAMPLER)  # fmt: skip
        assert result.request.steps - int(total * result.request.strength) == start
        by_hand.append(result.images[0])
    assert_close(images, np.stack(by_hand))


@needs_torch
def test_lanczos_matches_diffusers(sd, tiny_sd1):
    from runtime.pipelines.hires import hires_fix

    images = hires_fix(sd, base_request(sd), 2 * WIDTH, 2 * HEIGHT, "Lanczos", HIRES_STEPS, STRENGTH)
    assert_close(images, diffusers_hires(tiny_sd1, 2 * WIDTH, 2 * HEIGHT, resized_uint8, "np"))


@needs_torch
@pytest.mark.parametrize(("width", "height"), [(2 * WIDTH, 2 * HEIGHT), (64, 64)])  # 64x64: upscale to 96x64, crop
def test_latent_matches_diffusers(sd, tiny_sd1, width, height):
    from runtime.pipelines.hires import hires_fix

    images = hires_fix(sd, base_request(sd), width, height, "Latent", HIRES_STEPS, STRENGTH)
    assert images.shape == (2, height, width, 3)
    assert_close(images, diffusers_hires(tiny_sd1, width, height, upscaled_latents, "latent"))


@needs_torch
def test_second_pass_request(sd):
    from runtime.pipelines.hires import second_pass_request

    base = base_request(sd)
    request = second_pass_request(base, 96, 64, 0, 0.5)
    assert (request.width, request.height, request.steps, request.strength) == (96, 64, STEPS, 0.5)  # 0: base steps
    assert (request.prompt, request.negative_prompt, request.seed) == (PROMPT, NEGATIVE, SEED)
    assert request.sampler == SAMPLER
    assert second_pass_request(base, 96, 64, 4, 0.5).steps == 4


@needs_torch
def test_zero_strength_runs_no_second_pass(sd):
    from runtime.pipelines.hires import hires_fix

    unet = sd.backend.session("unet")
    calls = []
    original = unet.run
    unet.run = lambda feeds, outputs=None: calls.append(1) or original(feeds, outputs)
    try:
        images = hires_fix(sd, base_request(sd, batch=1), 96, 64, "Latent", HIRES_STEPS, 0.0)
    finally:
        del unet.run
    assert len(calls) == STEPS and images.shape == (1, 64, 96, 3)  # Euler a: one UNet call per first-pass step


@needs_torch
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((96, 64, "ESRGAN", 6, 0.6), "unknown hires upscaler 'ESRGAN'; choose one of: Latent, "),
        ((96, 64, "Latent", -1, 0.6), "hires steps must be an integer between 0 and 1000, not -1"),
        ((96, 64, "Latent", 6, 1.5), "hires strength must be a number between 0 and 1, not 1.5"),
        ((100, 64, "Latent", 6, 0.6), "hires size: width must be a multiple of 8, not 100"),
        ((96, 64, "Latent", 100, 0.05), "hires steps 100 at strength 0.05 need a 2000-step schedule, more than"),
    ],
)
def test_bad_hires_options(sd, arguments, message):
    from runtime.pipelines.hires import hires_fix

    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        hires_fix(sd, base_request(sd, batch=1), *arguments)
