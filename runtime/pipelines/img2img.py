"""img2img: encode the init image, noise it to the strength's start step, denoise, decode (diffusers' order)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..denoiser import Denoiser
from ..request import sampler_of
from ..rng import batch_randn
from ..samplers import make_schedule
from .common import decode_latents, encode_images, image_generators, run_sampler
from .conditioning import build_conditioning, schedule_steps

if TYPE_CHECKING:
    from ..api import StableDiffusion
    from ..request import Img2ImgRequest


def start_step(steps: int, strength: float) -> int:
    """The first step img2img runs: the last int(steps * strength) steps of the schedule run (diffusers)."""
    return steps - min(int(steps * strength), steps)


def img2img(model: StableDiffusion, request: Img2ImgRequest, image: np.ndarray) -> np.ndarray:
    """Images float32 [B, H, W, 3] in [0, 1]; image: float32 [1, 3, H, W] in [-1, 1] at the request's size."""
    info = model.info
    spec, schedule_type = sampler_of(request)
    start = start_step(request.steps, request.strength)
    generators = image_generators(request.seed, request.batch_size)
    init_latents = encode_images(model, image, generators)  # [B, 4, h, w]: draws each stream's posterior sample first
    if start == request.steps:  # strength 0: nothing to denoise
        return decode_latents(model, init_latents)
    schedule = make_schedule(spec, schedule_type, info["scheduler_config"], request.steps).start_at(start)
    x = init_latents + batch_randn(generators, init_latents.shape[1:]) * np.float32(schedule.sigmas[0])
    calls = schedule_steps(spec.name, len(schedule.timesteps))
    conditioning = build_conditioning(
        model,
        request.prompt,
        request.negative_prompt,
        request.batch_size,
        request.cfg_scale,
        calls,
        request.emphasis,
        request.clip_skip,
    )
    denoiser = Denoiser(model.backend.session("unet"), conditioning, request.cfg_scale, info["prediction_type"])
    with model.progress(len(schedule.timesteps), "img2img") as tick:
        denoiser.on_call = tick
        latents = run_sampler(spec, denoiser, x, schedule, generators)
    return decode_latents(model, latents)
