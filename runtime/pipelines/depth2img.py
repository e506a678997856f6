"""depth2img: img2img for SD 2 depth's 5-channel UNet, which also sees the image's depth, as diffusers'
StableDiffusionDepth2ImgPipeline does it.

The depth (given, or estimated by the checkpoint's DPT) becomes one latent-size channel in [-1, 1] after the
latents, the same for the uncond and cond halves. Random draws are img2img's: each image's stream gives its VAE
posterior sample, then its noise; depth estimation draws nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..denoiser import Denoiser
from ..depth import depth_condition, estimate_depth
from ..errors import InvalidRequestError
from ..request import sampler_of
from ..rng import batch_randn
from ..samplers import make_schedule
from .common import decode_latents, encode_images, image_generators, run_sampler
from .conditioning import build_conditioning, schedule_steps
from .img2img import start_step

if TYPE_CHECKING:
    from ..api import StableDiffusion
    from ..request import Img2ImgRequest

DEPTH_CHANNELS = 5  # 4 latents + 1 depth


def depth2img(
    model: StableDiffusion,
    request: Img2ImgRequest,
    image: np.ndarray,  # float32 [1, 3, H, W] in [-1, 1] at the request's size
    depth_map: np.ndarray | None = None,  # float [H', W'] or [n, H', W'], any scale; None: the checkpoint's DPT
) -> np.ndarray:
    """Images float32 [B, H, W, 3] in [0, 1]."""
    info = model.info
    if info["unet_in_channels"] != DEPTH_CHANNELS:
        raise InvalidRequestError(f"depth2img needs a depth model (5 UNet input channels), not {info['variant']!r}")
    if depth_map is None:
        depth_map = estimate_depth(model, image)  # [1, S, S]
    scale = info["vae_scale_factor"]
    depth = depth_condition(depth_map, image.shape[2] // scale, image.shape[3] // scale, request.batch_size)
    spec, schedule_type = sampler_of(request)
    start = start_step(request.steps, request.strength)
    generators = image_generators(request.seed, request.batch_size)
    init_latents = encode_images(model, image, generators)  # [B, 4, h, w]: each stream's posterior sample first
    if start == request.steps:  # strength 0: nothing to denoise
        return decode_latents(model, init_latents)
    schedule = make_schedule(spec, schedule_type, info["scheduler_config"], request.steps).start_at(start)
    x = init_latents + batch_randn(generators, init_latents.shape[1:]) * np.float32(schedule.sigmas[0])
    steps = schedule_steps(spec.name, len(schedule.timesteps))
    conditioning = build_conditioning(
        model, request.prompt, request.negative_prompt, request.batch_size, request.cfg_scale, steps,
        request.emphasis, request.clip_skip,
    )  # fmt: skip
    denoiser = Denoiser(model.backend.session("unet"), conditioning, request.cfg_scale, info["prediction_type"])
    denoiser.extra_channels = np.concatenate([depth] * denoiser.copies)  # [N, 1, h, w]
    with model.progress(len(schedule.timesteps), "depth2img") as tick:
        denoiser.on_call = tick
        latents = run_sampler(spec, denoiser, x, schedule, generators, interrupted=model.interrupt_hook)
    return decode_latents(model, latents)
