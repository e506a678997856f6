"""SDXL fine-tune styles against diffusers' StableDiffusionXLPipeline: a v-prediction model, and Turbo-style few-step
sampling (trailing timestep spacing, 1 to 4 steps, CFG off), on a copy of the tiny SDXL checkpoint whose scheduler
config says so (prediction_type "v_prediction", timestep_spacing "trailing"), as such fine-tunes publish it.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import needs_torch
from tests.runtime.test_sdxl_parity import HEIGHT, WIDTH
from tests.runtime.test_txt2img_parity import NEGATIVE, PROMPT, SEED, assert_parity

pytestmark = needs_torch


@pytest.fixture(scope="module")
def vpred_trailing(tiny_sdxl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-v") / "tiny-sdxl-v-trailing"
    shutil.copytree(tiny_sdxl, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="v_prediction", timestep_spacing="trailing")
    config_path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def models(vpred_trailing, tmp_path_factory):
    import diffusers

    import runtime

    sd = runtime.load(vpred_trailing, engines_dir=tmp_path_factory.mktemp("engines"))
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(vpred_trailing, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return sd, pipe, pipe.scheduler.config  # the checkpoint's scheduler config, which each case's scheduler reads


@pytest.mark.parametrize(
    ("sampler", "schedule", "steps", "cfg"),
    [
        ("Euler a", "default", 1, 1.0),  # Turbo: one step, no guidance
        ("Euler a", "default", 4, 1.0),
        ("DPM++ 2M", "Karras", 6, 5.0),  # a v-prediction fine-tune with guidance
    ],
)
def test_vpred_and_few_step_match_diffusers(models, sampler, schedule, steps, cfg):
    import diffusers
    import torch

    from runtime.samplers import resolve_sampler

    sd, pipe, config = models
    assert sd.info["prediction_type"] == "v_prediction"
    spec, schedule_type = resolve_sampler(sampler, schedule)
    scheduler = getattr(diffusers, spec.diffusers_class)
    pipe.scheduler = scheduler.from_config(config, **spec.diffusers_kwargs(schedule_type))
    negative = NEGATIVE if cfg > 1 else None
    generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(2)]
    reference = pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg,
                     num_images_per_prompt=2, generator=generators, height=HEIGHT, width=WIDTH,
                     output_type="np").images  # fmt: skip
    result = sd.txt2img(PROMPT, negative_prompt=negative or "", steps=steps, cfg_scale=cfg, seed=SEED, batch_size=2,
                        width=WIDTH, height=HEIGHT, sampler=sampler, schedule=schedule)  # fmt: skip
    assert_parity(result.images, reference)
