"""txt2img: noise -> sampler -> VAE decoder, as diffusers' StableDiffusionPipeline does it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..denoiser import Denoiser
from ..request import sampler_of
from ..samplers import make_schedule
from .common import decode_latents, image_generators, run_sampler
from .conditioning import Conditioning, build_conditioning, schedule_steps
from .sdxl import is_sdxl, sdxl_feeds
from .variation import initial_noise

if TYPE_CHECKING:
    from ..api import StableDiffusion
    from ..request import Txt2ImgRequest
    from ..rng import TorchGenerator


def txt2img(model: StableDiffusion, request: Txt2ImgRequest) -> np.ndarray:
    """Images float32 [B, H, W, 3] in [0, 1] for a validated request."""
    if model.info["unet_in_channels"] == 9:
        return _inpainting_model_txt2img(model, request)
    return decode_latents(model, txt2img_latents(model, request))


def txt2img_latents(model: StableDiffusion, request: Txt2ImgRequest) -> np.ndarray:
    """Noise -> sampler for a regular (4-channel) model: the latents [B, 4, h, w] the VAE decodes."""
    spec, _ = sampler_of(request)
    conditioning = build_conditioning(
        model,
        request.prompt,
        request.negative_prompt,
        request.batch_size,
        request.cfg_scale,
        schedule_steps(spec.name, request.steps),
        request.emphasis,
        request.clip_skip,
    )
    generators = image_generators(request.seed, request.batch_size)
    return sample_latents(model, request, conditioning, generators, interrupted=model.interrupt_hook)


def sample_latents(
    model: StableDiffusion,
    request: Txt2ImgRequest,
    conditioning: Conditioning,
    generators: list[TorchGenerator],
    callback: Callable[[int, np.ndarray], np.ndarray] | None = None,
    interrupted: Callable[[], bool] | None = None,
) -> np.ndarray:
    """Each generator's initial noise -> the request's sampler (its steps, size and CFG scale) with `conditioning`,
    whose rows follow the generators; the latents [len(generators), 4, h, w] the VAE decodes. runtime.serving's
    batches share it, with rows of several requests."""
    info = model.info
    spec, schedule_type = sampler_of(request)
    family = "sdxl" if is_sdxl(info) else "sd1"  # Align Your Steps: SDXL's table, else SD 1.x's
    schedule = make_schedule(spec, schedule_type, info["scheduler_config"], request.steps, family=family)
    scale = info["vae_scale_factor"]
    shape = (info["latent_channels"], request.height // scale, request.width // scale)  # [4, h, w]
    x = initial_noise(request, generators, shape) * np.float32(schedule.init_noise_sigma)  # [B, 4, h, w]
    extra = sdxl_feeds(info, conditioning, request.height, request.width)  # SDXL's time_ids [N, 6], else None
    unet = model.backend.session("unet")
    denoiser = Denoiser(unet, conditioning, request.cfg_scale, info["prediction_type"], extra_feeds=extra)
    with model.progress(len(schedule.timesteps), "sampling") as tick:
        denoiser.on_call = tick
        return run_sampler(spec, denoiser, x, schedule, generators, callback, interrupted)


def _inpainting_model_txt2img(model: StableDiffusion, request: Txt2ImgRequest) -> np.ndarray:
    """An inpainting (9-channel) model generating from text, as the A1111 web UI runs it: the whole image
    masked, the masked image empty (0 in [-1, 1]), full strength."""
    from ..request import Img2ImgRequest
    from .inpaint import inpaint

    fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    scale = model.info["vae_scale_factor"]
    empty = np.zeros((1, 3, request.height, request.width), dtype=np.float32)  # [1, 3, H, W]
    mask = np.ones((1, 1, request.height // scale, request.width // scale), dtype=np.float32)  # [1, 1, h, w]
    return inpaint(model, Img2ImgRequest(**fields, strength=1.0), empty, empty, mask)
