"""The image side of inpaint and outpaint: masks, A1111's "only masked" crop and paste-back, outpaint canvases.

These take PIL images and a validated request, prepare the model inputs, and call the inpaint pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..images import (
    crop_for_inpaint,
    extend_canvas,
    fill_masked,
    load_mask,
    mask_to_latent_mask,
    masked_image_input,
    paste_back,
    read_mask,
    resize_image,
    to_model_input,
)
from ..output import to_uint8
from .inpaint import inpaint

if TYPE_CHECKING:
    from ..api import StableDiffusion
    from ..request import InpaintRequest

logger = logging.getLogger(__name__)


def run_inpaint(model: StableDiffusion, request: InpaintRequest, image: Image.Image) -> np.ndarray:
    """Inpaint `image` (any size) per the request; images float32 [B, H, W, 3] in [0, 1]."""
    mask = read_mask(request.mask)
    if mask.size != image.size:
        logger.warning("the mask is %dx%d but the image is %dx%d: resizing the mask", *mask.size, *image.size)
        mask = mask.resize(image.size, Image.Resampling.LANCZOS)
    width, height = request.width, request.height
    if request.inpaint_full_res:
        full_mask = load_mask(mask, image.width, image.height, "just resize", *_blur(request))
        crop = crop_for_inpaint(image, full_mask, width, height, request.inpaint_full_res_padding)
        if crop is not None:
            image_crop, mask_crop, region = crop
            generated = inpaint_at_size(model, request, image_crop, mask_crop)  # [B, height, width, 3]
            pasted = [paste_back(image, Image.fromarray(g), region, full_mask) for g in to_uint8(generated)]
            return np.stack([np.asarray(p, dtype=np.float32) / 255 for p in pasted])
        logger.warning("the mask is blank: inpainting the whole image instead of a crop")
    resized = resize_image(image, width, height, request.resize_mode)
    return inpaint_at_size(
        model, request, resized, load_mask(mask, width, height, request.resize_mode, *_blur(request))
    )


def _blur(request: InpaintRequest) -> tuple[int, int | None]:
    """The mask blur along x and y (A1111's mask_blur_x / mask_blur_y)."""
    return request.mask_blur, request.mask_blur_y


def inpaint_at_size(
    model: StableDiffusion, request: InpaintRequest, image: Image.Image, mask: Image.Image, label: str = "inpaint"
) -> np.ndarray:
    """Inpaint an image and mask already at the generation size."""
    scale = model.info["vae_scale_factor"]
    if getattr(request, "inpainting_fill", "original") != "original":  # A1111 fills the pixels for 0, 2 and 3
        image = fill_masked(image, mask)
    latent_mask = mask_to_latent_mask(mask, image.width // scale, image.height // scale)  # [1, 1, h, w]
    return inpaint(model, request, to_model_input(image), masked_image_input(image, mask), latent_mask, label)


def run_outpaint(
    model: StableDiffusion, request: InpaintRequest, image: Image.Image, extend: tuple[int, int, int, int]
) -> np.ndarray:
    """Extend the canvas by (left, right, top, bottom) pixels, inpaint the new area, keep the original pixels."""
    canvas, mask = extend_canvas(image, *extend)
    request = replace(request, width=canvas.width, height=canvas.height, mask=mask)
    generation_mask = load_mask(mask, canvas.width, canvas.height, "just resize", *_blur(request))
    images = inpaint_at_size(model, request, canvas, generation_mask, "outpaint")  # [B, H, W, 3]
    known = np.asarray(mask) == 0  # [H, W]: the original image's pixels
    images[:, known] = np.asarray(canvas, dtype=np.float32)[known] / 255
    return images
