"""depth2img: img2img for SD 2 depth's 5-channel UNet, which also sees the image's depth, as diffusers'
StableDiffusionDepth2ImgPipeline does it.

The depth (given, or estimated by the checkpoint's DPT) becomes one latent-size channel in [-1, 1] after the
latents, the same for the uncond and cond halves. Random draws are img2img's: each image's stream gives its VAE
posterior sample, then its noise; depth estimation draws nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..depth import depth_condition, estimate_depth
from ..errors import InvalidRequestError
from .common import decode_latents, encode_images, image_generators
from .img2img import denoise_latents, start_step

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
    generators = image_generators(request.seed, request.batch_size)
    init_latents = encode_images(model, image, generators)  # [B, 4, h, w]: each stream's posterior sample first
    start = start_step(request.steps, request.strength)
    latents = denoise_latents(model, request, init_latents, generators, request.steps, start, "depth2img", depth)
    return decode_latents(model, latents)
