"""upscale: the SD x4 upscaler, as diffusers' StableDiffusionUpscalePipeline runs it.

The low-resolution image is noised to `noise_level` by the checkpoint's low-res (DDPM) schedule and fed, unscaled,
as 3 more UNet channels after the latents, which have the low-res image's size; the noise level is also the UNet's
class label. The VAE (4x per latent pixel, scaling factor 0.08333 from its config) decodes the 4x image.
Random draws as diffusers with one generator per image: the low-res noise comes from the first image's stream
only (diffusers noises the one image once), then each stream draws its image's latents.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..denoiser import Denoiser
from ..errors import InvalidRequestError
from ..request import sampler_of
from ..rng import TorchGenerator, batch_randn
from ..samplers import make_schedule
from ..samplers.config import alphas_cumprod, resolve_config
from .common import decode_latents, image_generators, run_sampler
from .conditioning import build_conditioning, schedule_steps

if TYPE_CHECKING:
    from ..api import StableDiffusion
    from ..request import Txt2ImgRequest


def upscale(model: StableDiffusion, request: Txt2ImgRequest, low_res: np.ndarray, noise_level: int) -> np.ndarray:
    """Images float32 [B, f h, f w, 3] in [0, 1] (f: the VAE's scale factor, 4); low_res: float32 [1, 3, h, w] in
    [-1, 1]; noise_level: 0 .. the checkpoint's max_noise_level. The request's width and height are not read."""
    info = model.info
    _check(info, low_res, noise_level)
    spec, schedule_type = sampler_of(request)
    schedule = make_schedule(spec, schedule_type, info["scheduler_config"], request.steps)
    batch = request.batch_size
    generators = image_generators(request.seed, batch)
    noised = noise_low_res(info["low_res_scheduler_config"], low_res, noise_level, generators[0])  # [1, 3, h, w]
    shape = (info["latent_channels"], *low_res.shape[2:])  # [4, h, w]: latents at the low-res size
    x = batch_randn(generators, shape) * np.float32(schedule.init_noise_sigma)  # [B, 4, h, w]
    conditioning = build_conditioning(
        model, request.prompt, request.negative_prompt, batch, request.cfg_scale,
        schedule_steps(spec.name, request.steps), request.emphasis, request.clip_skip,
    )  # fmt: skip
    denoiser = Denoiser(model.backend.session("unet"), conditioning, request.cfg_scale, info["prediction_type"])
    rows = denoiser.copies * batch
    denoiser.extra_channels = np.repeat(noised, rows, axis=0)  # [N, 3, h, w]
    denoiser.extra_feeds = {"class_labels": np.full(rows, noise_level, dtype=np.int64)}  # [N]
    with model.progress(len(schedule.timesteps), "upscale") as tick:
        denoiser.on_call = tick
        latents = run_sampler(spec, denoiser, x, schedule, generators, interrupted=model.interrupt_hook)
    return decode_latents(model, latents)


def noise_low_res(
    scheduler_config: dict, low_res: np.ndarray, noise_level: int, generator: TorchGenerator
) -> np.ndarray:
    """DDPMScheduler.add_noise(low_res, noise, noise_level) in float32: sqrt(a) x + sqrt(1 - a) noise, where
    a = alphas_cumprod[noise_level] of the low-res schedule and the noise is the generator's next draw."""
    a = alphas_cumprod(resolve_config("DDPMScheduler", scheduler_config, {}))[noise_level]  # float32
    noise = generator.randn(low_res.shape[1:])[None]  # [1, 3, h, w]
    return (np.sqrt(a) * low_res.astype(np.float32) + np.sqrt(np.float32(1.0) - a) * noise).astype(np.float32)


def _check(info: dict, low_res: np.ndarray, noise_level: int) -> None:
    if info.get("low_res_scheduler_config") is None or not info.get("unet_num_class_embeds"):
        raise InvalidRequestError(f"upscale needs an x4 upscaler model, not a {info['variant']!r} one")
    top = info["max_noise_level"]
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, np.integer)) or not 0 <= noise_level <= top:
        raise InvalidRequestError(f"noise level must be an integer from 0 to {top}, not {noise_level!r}")
    multiple = info["latent_size_multiple"]
    if low_res.shape[2] % multiple or low_res.shape[3] % multiple:
        raise InvalidRequestError(
            f"the low-resolution image must have sides that are multiples of {multiple} for this model, "
            f"not {low_res.shape[3]}x{low_res.shape[2]}"
        )
