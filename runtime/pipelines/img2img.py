"""img2img: encode the init image, noise it to the strength's start step, denoise, decode (diffusers' order)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..denoiser import Denoiser
from ..request import sampler_of
from ..rng import TorchGenerator
from ..samplers import make_schedule
from .common import decode_latents, encode_images, image_generators, run_sampler
from .conditioning import build_conditioning, schedule_steps
from .sdxl import is_sdxl, sdxl_feeds
from .variation import initial_noise

if TYPE_CHECKING:
    from ..api import StableDiffusion
    from ..request import Img2ImgRequest, Txt2ImgRequest


def start_step(steps: int, strength: float) -> int:
    """The first step img2img runs: the last int(steps * strength) steps of the schedule run (diffusers)."""
    return steps - min(int(steps * strength), steps)


def img2img(model: StableDiffusion, request: Img2ImgRequest, image: np.ndarray) -> np.ndarray:
    """Images float32 [B, H, W, 3] in [0, 1]; image: float32 [1, 3, H, W] in [-1, 1] at the request's size."""
    generators = image_generators(request.seed, request.batch_size)
    init_latents = encode_images(model, image, generators)  # [B, 4, h, w]: draws each stream's posterior sample first
    start = start_step(request.steps, request.strength)
    return decode_latents(model, denoise_latents(model, request, init_latents, generators, request.steps, start))


def denoise_latents(
    model: StableDiffusion,
    request: Txt2ImgRequest,
    init_latents: np.ndarray,
    generators: list[TorchGenerator],
    steps: int,
    start: int,
    label: str = "img2img",
    extra_channels: np.ndarray | None = None,
    size: tuple[int, int] | None = None,
    noised: bool = False,
) -> np.ndarray:
    """Noise init_latents [B, 4, h, w] to step `start` of a `steps`-step schedule with the next draw of each image's
    stream, then sample to the end; return the latents the VAE decodes. start == steps: nothing runs.

    The request gives the sampler, prompts, CFG scale, emphasis and clip skip (its steps and size are not read).
    extra_channels [B, c, h, w]: UNet input channels after the latents (depth2img's depth), the same for the uncond
    and cond copies of each image. size: SDXL's (height, width) micro-conditioning (None: the latents' size in
    pixels, as diffusers' StableDiffusionXLImg2ImgPipeline takes it). noised: init_latents are already the sampler's
    x at step `start` (VE, a refiner's hand-off): no noise is added or drawn."""
    if start == steps:  # strength 0: nothing to denoise
        return init_latents
    info = model.info
    spec, schedule_type = sampler_of(request)
    family = "sdxl" if is_sdxl(info) else "sd1"  # Align Your Steps' table
    schedule = make_schedule(spec, schedule_type, info["scheduler_config"], steps, family=family).start_at(start)
    x = init_latents
    if not noised:
        noise = initial_noise(request, generators, init_latents.shape[1:])  # [B, 4, h, w]
        x = init_latents + noise * np.float32(schedule.sigmas[0] * getattr(request, "noise_multiplier", 1.0))
    conditioning = build_conditioning(
        model,
        request.prompt,
        request.negative_prompt,
        len(init_latents),
        request.cfg_scale,
        schedule_steps(spec.name, len(schedule.timesteps)),
        request.emphasis,
        request.clip_skip,
    )
    scale = info["vae_scale_factor"]
    height, width = size or (init_latents.shape[2] * scale, init_latents.shape[3] * scale)
    extra = sdxl_feeds(info, conditioning, height, width)  # SDXL's time_ids, else None
    unet = model.backend.session("unet")
    denoiser = Denoiser(unet, conditioning, request.cfg_scale, info["prediction_type"], extra_feeds=extra)
    if extra_channels is not None:
        denoiser.extra_channels = np.concatenate([extra_channels] * denoiser.copies)  # [N, c, h, w]
    with model.progress(len(schedule.timesteps), label) as tick:
        denoiser.on_call = tick
        return run_sampler(spec, denoiser, x, schedule, generators, interrupted=model.interrupt_hook)
