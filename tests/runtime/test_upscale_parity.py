"""x4 upscaler parity: sdrt against diffusers' StableDiffusionUpscalePipeline on the tiny x4 checkpoint.

Batch 2 (seeds s, s + 1, one generator per image: the low-res noise from the first, then each image's latents),
10 steps, CFG 6, Euler and the checkpoint's own DDIM (v-prediction): mean absolute difference <= 5e-5 and
max <= 2e-3 on float images in [0, 1]. The low-res noising is checked on its own against DDPMScheduler.add_noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.runtime.test_txt2img_parity import CFG, NEGATIVE, PROMPT, SEED, STEPS

pytestmark = needs_torch

LOW_WIDTH, LOW_HEIGHT = 12, 8  # the output is 48 x 32
NOISE_LEVEL = 40
CASES = [("Euler", "default"), ("DDIM", "default")]


def low_res_image():
    from PIL import Image

    y, x = np.mgrid[0:LOW_HEIGHT, 0:LOW_WIDTH]
    rgb = np.stack([x / LOW_WIDTH, y / LOW_HEIGHT, 0.5 + 0.4 * np.sin(x / 2.0) * np.cos(y / 3.0)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def reference(folder, sampler, schedule, noise_level=NOISE_LEVEL, batch=2):
    import diffusers
    import torch

    from runtime.samplers import resolve_sampler

    spec, schedule_type = resolve_sampler(sampler, schedule)
    pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    scheduler_class = getattr(diffusers, spec.diffusers_class)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **spec.diffusers_kwargs(schedule_type))
    return pipe(
        PROMPT,
        image=low_res_image(),
        noise_level=noise_level,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        num_images_per_prompt=batch,
        generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)],
        output_type="np",
    ).images


def generate(sd, sampler, schedule, noise_level=NOISE_LEVEL, low_res=None):
    from runtime.images import to_model_input
    from runtime.pipelines.upscale import upscale
    from runtime.request import Txt2ImgRequest

    request = Txt2ImgRequest(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=2,
        sampler=sampler, schedule=schedule,
    )  # fmt: skip
    return upscale(sd, request, to_model_input(low_res or low_res_image()), noise_level)


def assert_close(images, expected):
    assert images.shape == expected.shape == (2, 4 * LOW_HEIGHT, 4 * LOW_WIDTH, 3)
    diff = np.abs(images.astype(np.float64) - expected)
    assert diff.mean() <= 5e-5 and diff.max() <= 2e-3, f"mean {diff.mean():.2e}, max {diff.max():.2e}"
    assert expected.std() > 0.01


@pytest.fixture(scope="module")
def engines(shared_engines):
    return shared_engines  # the session's exports of the tiny checkpoints (tests/conftest.py)


@pytest.fixture(scope="module")
def upscaler(tiny_x4_upscaler, engines):
    import runtime

    return runtime.load(tiny_x4_upscaler, engines_dir=engines)


@pytest.mark.parametrize(("sampler", "schedule"), CASES)
def test_upscale_matches_diffusers(tiny_x4_upscaler, upscaler, sampler, schedule):
    assert_close(generate(upscaler, sampler, schedule), reference(tiny_x4_upscaler, sampler, schedule))


def test_torch_backend_matches_diffusers(tiny_x4_upscaler):
    import runtime

    sd = runtime.load(tiny_x4_upscaler, backend="torch")
    assert_close(generate(sd, "DDIM", "default", 250), reference(tiny_x4_upscaler, "DDIM", "default", 250))


def test_the_model_facts(upscaler):
    info = upscaler.info
    assert info["variant"] == "upscale-x4" and info["pipeline_class"] == "StableDiffusionUpscalePipeline"
    assert info["vae_scaling_factor"] == 0.08333 and info["vae_scale_factor"] == 4
    assert info["max_noise_level"] == 350 and info["unet_num_class_embeds"] == 1000
    assert info["prediction_type"] == "v_prediction"


def test_low_res_noise_is_ddpms_add_noise(tiny_x4_upscaler, upscaler):
    import torch
    from diffusers import DDPMScheduler

    from runtime.pipelines.upscale import noise_low_res
    from runtime.rng import TorchGenerator

    scheduler = DDPMScheduler.from_pretrained(tiny_x4_upscaler, subfolder="low_res_scheduler")
    image = np.random.default_rng(0).uniform(-1, 1, (1, 3, 8, 12)).astype(np.float32)
    for level in (0, 20, 350):
        noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(7))
        expected = scheduler.add_noise(torch.from_numpy(image), noise, torch.tensor([level])).numpy()
        got = noise_low_res(upscaler.info["low_res_scheduler_config"], image, level, TorchGenerator(7))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("noise_level", "low_res", "message"),
    [
        (351, None, "noise level must be an integer from 0 to 350, not 351"),
        (-1, None, "noise level must be an integer from 0 to 350, not -1"),
        (2.5, None, "noise level must be an integer"),
        (20, (10, 8), "multiples of 4 for this model, not 10x8"),
    ],
)
def test_bad_upscale_input(upscaler, noise_level, low_res, message):
    from runtime.errors import InvalidRequestError

    image = low_res_image().resize(low_res) if low_res else None
    with pytest.raises(InvalidRequestError, match=message):
        generate(upscaler, "DDIM", "default", noise_level, image)


def test_upscale_needs_an_upscaler(tiny_sd1, engines):
    import runtime
    from runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="upscale needs an x4 upscaler model, not a 'sd' one"):
        generate(runtime.load(tiny_sd1, engines_dir=engines), "DDIM", "default")
