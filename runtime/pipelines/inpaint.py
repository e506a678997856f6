"""inpaint: repaint the masked part of an image, as diffusers' StableDiffusionInpaintPipeline (and for SDXL models
StableDiffusionXLInpaintPipeline, whose steps are the same plus the UNet's time ids) does.

Two kinds of model. A 9-channel inpainting UNet sees the latents, the latent-size mask and the masked
image's latents. A regular 4-channel UNet gets the known region blended back after every step:
x = (1 - m) (init + sigma_next noise) + m x. Per image, the stream draws as diffusers does: the init
image's posterior sample (4-channel models, or strength < 1), the noise, then the masked image's
posterior sample; the two posterior samples come from the first image's stream only and are shared by the
batch (diffusers encodes the one image once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..denoiser import Denoiser
from ..request import sampler_of
from ..rng import TorchGenerator
from ..samplers import make_schedule
from .common import decode_latents, encode_images, image_generators, run_sampler
from .conditioning import build_conditioning, schedule_steps
from .img2img import start_step
from .sdxl import is_sdxl, sdxl_feeds
from .variation import initial_noise

if TYPE_CHECKING:
    from ..api import StableDiffusion
    from ..request import Img2ImgRequest


def inpaint(
    model: StableDiffusion,
    request: Img2ImgRequest,
    image: np.ndarray,  # float32 [1, 3, H, W] in [-1, 1]
    masked_image: np.ndarray,  # float32 [1, 3, H, W]: image with the repainted pixels zeroed
    latent_mask: np.ndarray,  # float32 [1, 1, h, w] of 0/1: 1 = repaint
    label: str = "inpaint",  # the progress bar's
) -> np.ndarray:
    """Images float32 [B, H, W, 3] in [0, 1] (not composited: the unmasked part is the model's too)."""
    info = model.info
    spec, schedule_type = sampler_of(request)
    start = min(start_step(request.steps, request.strength), request.steps - 1)  # at least one step runs
    family = "sdxl" if is_sdxl(info) else "sd1"  # Align Your Steps' table
    schedule = make_schedule(spec, schedule_type, info["scheduler_config"], request.steps, family=family)
    schedule = schedule.start_at(start)
    full_strength = request.strength == 1.0
    nine_channels = info["unet_in_channels"] == 9
    generators = image_generators(request.seed, request.batch_size)
    batch = request.batch_size
    image_latents = None
    if not nine_channels or not full_strength:  # diffusers encodes the one image with the first stream only
        image_latents = np.repeat(encode_images(model, image, generators[:1]), batch, axis=0)  # [B, 4, h, w]
        image_latents = fill_latents(getattr(request, "inpainting_fill", "original"), image_latents, latent_mask,
                                     request.seed)  # fmt: skip
    noise = initial_noise(request, generators, (info["latent_channels"], *latent_mask.shape[2:]))  # [B, 4, h, w]
    factor = np.float32(getattr(request, "noise_multiplier", 1.0))  # A1111's initial_noise_multiplier
    if full_strength:
        x = noise * factor * np.float32(schedule.init_noise_sigma)
    else:
        x = image_latents + noise * factor * np.float32(schedule.sigmas[0])
    masked_latents = np.repeat(encode_images(model, masked_image, generators[:1]), batch, axis=0)  # both kinds

    steps = schedule_steps(spec.name, len(schedule.timesteps))
    conditioning = build_conditioning(
        model, request.prompt, request.negative_prompt, request.batch_size, request.cfg_scale, steps,
        request.emphasis, request.clip_skip,
    )  # fmt: skip
    scale = info["vae_scale_factor"]
    extra = sdxl_feeds(info, conditioning, latent_mask.shape[2] * scale, latent_mask.shape[3] * scale)  # SDXL's
    unet = model.backend.session("unet")
    denoiser = Denoiser(unet, conditioning, request.cfg_scale, info["prediction_type"], extra_feeds=extra)
    callback = None
    if nine_channels:
        mask = np.repeat(latent_mask, batch, axis=0)  # [B, 1, h, w]
        extra = np.concatenate([mask, masked_latents], axis=1)  # [B, 5, h, w]
        denoiser.extra_channels = np.concatenate([extra] * denoiser.copies)  # [N, 5, h, w]
    else:
        callback = _blend_known(image_latents, noise, latent_mask, schedule.sigmas)
    with model.progress(len(schedule.timesteps), label) as tick:
        denoiser.on_call = tick
        latents = run_sampler(spec, denoiser, x, schedule, generators, callback, model.interrupt_hook)
    if not nine_channels:  # diffusers' last blend uses the clean init latents, in latent space
        latents = (1 - latent_mask) * image_latents + latent_mask * latents
    return decode_latents(model, latents)


def fill_latents(fill: str, latents: np.ndarray, latent_mask: np.ndarray, seed: int) -> np.ndarray:
    """A1111's latent masked content: "latent noise" puts fresh noise of seed + i (a new stream, not the image's)
    under the mask of image i, "latent nothing" zeros; "fill" and "original" keep the latents [B, 4, h, w]."""
    if fill == "latent noise":
        noise = np.stack([TorchGenerator(seed + i).randn(latents.shape[1:]) for i in range(len(latents))])
        return latents * (1 - latent_mask) + noise * latent_mask
    if fill == "latent nothing":
        return latents * (1 - latent_mask)
    return latents


def _blend_known(init: np.ndarray, noise: np.ndarray, mask: np.ndarray, sigmas: np.ndarray):
    """The 4-channel step callback: after step i, the known region is the init latents noised to sigma_{i+1}."""
    last = len(sigmas) - 2
    keep = (1 - mask).astype(np.float32)  # [1, 1, h, w]: 1 where the image is kept

    def blend(i: int, x: np.ndarray) -> np.ndarray:
        if i == last:  # the final blend happens on the latents, after the sampler
            return x
        return keep * (init + noise * np.float32(sigmas[i + 1])) + mask * x

    return blend
