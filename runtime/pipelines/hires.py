"""Hires fix, as the A1111 web UI's txt2img runs it: txt2img at a base size, upscale, img2img at the target size.

Sources followed (no code taken from them): A1111 `modules/processing.py` (StableDiffusionProcessingTxt2Img:
calculate_target_resolution, sample_hr_pass, create_infotext), `modules/upscaler.py` (Upscaler.upscale,
UpscalerLanczos), `modules/images.py` (resize_image), `modules/sd_samplers_common.py` (setup_img2img_steps),
`modules/rng.py` (ImageRNG) and `modules/shared.py` (latent_upscale_modes).

* Upscalers: "Latent" is torch's `F.interpolate(latents, mode="bilinear", antialias=False)` (align_corners False),
  "Latent (nearest)" and "Latent (nearest-exact)" the nearest modes, all in numpy here. Any other name is an image
  upscaler of runtime.upscalers ("Lanczos", "Nearest", "None", or a model file of the model's upscaler_dir by A1111's
  name or file stem): the images are decoded, turned into uint8 by truncation as A1111 does (`(255 *
  x).astype(uint8)`, not rounding), resized through A1111's resize_image chain with that upscaler, and encoded again.
* Seeds: A1111's second pass builds a new ImageRNG from the same seeds, so each image's stream starts again from
  seed + i (it does not continue the first pass's stream). sdrt does the same; the Lanczos pass then is exactly
  sdrt's (and diffusers') img2img of the upscaled image: the VAE posterior sample, then the noise, from the fresh
  stream. (A1111 draws the posterior sample from torch's global generator instead, which cannot be reproduced.)
* Steps: A1111's second pass runs exactly `hires_steps` steps (0: the first pass's steps), the last ones of a
  schedule of int(hires_steps / min(strength, 0.999)) steps (setup_img2img_steps with explicit steps). A hires
  strength of 0 runs none.
* A target whose aspect ratio differs from the base size's is reached as A1111 does it: upscale to cover the
  target, then crop the latents around the centre.
* SDXL: the second pass's time ids are those A1111 builds its hires conditioning with (calculate_hr_conds:
  SdConditioning of width hr_upscale_to_x, height hr_upscale_to_y; sd_models_xl.get_learned_conditioning): the
  covering size as original and target size, crop (0, 0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import InvalidRequestError
from ..images import to_model_input
from ..request import MAX_SIDE, MAX_STEPS, Img2ImgRequest, check_size
from ..upscalers import find_upscaler, list_upscalers, resize_image
from .common import decode_latents, encode_images, image_generators
from .extras import model_upscaler
from .img2img import denoise_latents
from .txt2img import txt2img_latents

if TYPE_CHECKING:
    from ..api import StableDiffusion
    from ..request import Txt2ImgRequest

LATENT_MODES = {"Latent": "bilinear", "Latent (nearest)": "nearest", "Latent (nearest-exact)": "nearest-exact"}
HIRES_UPSCALERS = (*LATENT_MODES, "Lanczos")  # and every upscaler of runtime.upscalers (the model's upscaler_dir)
DEFAULT_SCALE = 2.0  # A1111's hr_scale default


def hires_fix(
    model: StableDiffusion,
    base_request: Txt2ImgRequest,
    target_width: int,
    target_height: int,
    upscaler: str,
    hires_steps: int,
    hires_strength: float,
    second_pass: dict | None = None,
    refiner: StableDiffusion | None = None,
    switch_at: float = 0.8,
) -> np.ndarray:
    """Images float32 [B, target_height, target_width, 3] in [0, 1]; base_request: a validated txt2img request at
    the base (first pass) size. hires_steps 0: as many as the base request's steps. Interrupted during the first
    pass (model.interrupt_hook): its images at the base size, without the second pass. `second_pass`: request
    fields the second pass changes (A1111's hr_prompt, hr_negative_prompt, hr_sampler_name, hr_scheduler as prompt,
    negative_prompt, sampler, schedule; see hires_overrides). `refiner`: an SDXL refiner taking the second pass over at
    `switch_at` (runtime.pipelines.refiner.refined_second_pass; the first pass runs on the base alone)."""
    check_hires(model.info, base_request, target_width, target_height, upscaler, hires_steps, hires_strength)
    image_upscaler = None if upscaler in LATENT_MODES else _image_upscaler(model, upscaler)  # before any work
    scale = model.info["vae_scale_factor"]
    latents = txt2img_latents(model, base_request)  # [B, 4, h, w]
    if model.interrupt_hook is not None and model.interrupt_hook():  # as A1111: no second pass after an interrupt
        return decode_latents(model, latents)  # [B, H, W, 3] at the base size
    cover_w, cover_h = upscale_size(base_request.width, base_request.height, target_width, target_height)
    generators = image_generators(base_request.seed, base_request.batch_size)  # re-seeded, as A1111's second pass
    if image_upscaler is not None:
        pixels = truncate_uint8(decode_latents(model, latents))  # [B, H, W, 3]
        resized = [to_model_input(resize_image(image_upscaler, Image.fromarray(p), cover_w, cover_h)) for p in pixels]
        init_latents = encode_images(model, np.concatenate(resized), generators)  # [B, 4, cover_h / f, cover_w / f]
    else:
        init_latents = upscale_latents(latents, cover_h // scale, cover_w // scale, LATENT_MODES[upscaler])
    init_latents = crop_latents(init_latents, target_height // scale, target_width // scale)  # [B, 4, h', w']
    request = second_pass_request(base_request, target_width, target_height, hires_steps, hires_strength)
    request = dataclasses.replace(request, **(second_pass or {}))
    total, start = hires_schedule(request.steps, hires_strength)
    size = (cover_h, cover_w)  # SDXL's original and target size: A1111's hr_upscale_to_y/x (before the crop)
    if refiner is not None:  # A1111's hires_fix_refiner_pass "second pass"
        from .refiner import refined_second_pass

        return refined_second_pass(model, refiner, switch_at, request, init_latents, generators, total, start, size)
    latents = denoise_latents(model, request, init_latents, generators, total, start, "hires fix", size=size)
    return decode_latents(model, latents)


def _image_upscaler(model: StableDiffusion, name: str):
    """The runtime.upscalers upscaler `name` of the model's upscaler folder; unknown: the hires choices named. The
    folder is read only until the upscaler is loaded (then model_upscaler has it)."""
    if name not in model.upscalers:
        try:
            find_upscaler(name, model.upscaler_dir)
        except InvalidRequestError:
            names = [*LATENT_MODES, *(entry.name for entry in list_upscalers(model.upscaler_dir))]
            raise InvalidRequestError(f"unknown hires upscaler {name!r}; choose one of: {', '.join(names)}") from None
    return model_upscaler(model, name)


def hires_target(
    width: int, height: int, scale: float | None = None, resize_width: int = 0, resize_height: int = 0
) -> tuple[int, int]:
    """The final size A1111 makes of a base size and "Upscale by" (scale) or "Resize width/height to" (resize_*;
    0 = follow the other side's aspect ratio; both 0 = use scale, default 2)."""
    for name, value in (("hires resize width", resize_width), ("hires resize height", resize_height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequestError(f"{name} must be an integer >= 0, not {value!r}")
    if resize_width == 0 and resize_height == 0:
        scale = DEFAULT_SCALE if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise InvalidRequestError(f"hires scale must be a number > 0, not {scale!r}")
        if max(width, height) * scale > MAX_SIDE:  # before int(): 1e308 would overflow
            raise InvalidRequestError(f"hires scale {scale!r} makes a side larger than {MAX_SIDE} pixels")
        return int(width * scale), int(height * scale)
    if resize_height == 0:
        return resize_width, resize_width * height // width
    if resize_width == 0:
        return resize_height * width // height, resize_height
    return resize_width, resize_height


def upscale_size(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """The size the first pass is upscaled to: the target when the aspect ratios agree, else the base's aspect
    ratio covering the target (A1111's hr_upscale_to_x/y; the latents are then cropped to the target)."""
    if width / height < target_width / target_height:
        cover = target_width, target_width * height // width
    else:
        cover = target_height * width // height, target_height
    return max(cover[0], target_width), max(cover[1], target_height)  # int() rounding of "Upscale by" never crops


def crop_latents(latents: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop [B, C, h, w] -> [B, C, height, width], the odd cell off the end (A1111's truncate_x/y)."""
    cut_h, cut_w = latents.shape[2] - height, latents.shape[3] - width
    return latents[:, :, cut_h // 2 : cut_h // 2 + height, cut_w // 2 : cut_w // 2 + width]


def hires_schedule(steps: int, strength: float) -> tuple[int, int]:
    """(schedule length, first step) of the second pass: `steps` steps run, the last of a schedule of
    int(steps / min(strength, 0.999)) (A1111's setup_img2img_steps with explicit steps); strength 0 runs none."""
    if strength <= 0:
        return steps, steps
    total = int(steps / min(strength, 0.999))
    return total, total - steps


def second_pass_request(
    base_request: Txt2ImgRequest, width: int, height: int, hires_steps: int, hires_strength: float
) -> Img2ImgRequest:
    """The img2img request of the second pass: the base request at the target size, with its steps and strength."""
    fields = {f.name: getattr(base_request, f.name) for f in dataclasses.fields(base_request)}
    fields.update(width=width, height=height, steps=hires_steps or base_request.steps, strength=hires_strength)
    return Img2ImgRequest(**fields)


def check_hires(
    info: dict,
    base_request: Txt2ImgRequest,
    target_width: int,
    target_height: int,
    upscaler: str,
    hires_steps: int,
    hires_strength: float,
) -> None:
    """Raise InvalidRequestError unless the hires options suit the model and the (validated) base request."""
    if not isinstance(upscaler, str) or not upscaler:
        raise InvalidRequestError(f"the hires upscaler must be a name ({', '.join(HIRES_UPSCALERS)}, ...)")
    if isinstance(hires_steps, bool) or not isinstance(hires_steps, int) or not 0 <= hires_steps <= MAX_STEPS:
        raise InvalidRequestError(f"hires steps must be an integer between 0 and {MAX_STEPS}, not {hires_steps!r}")
    strength = hires_strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise InvalidRequestError(f"hires strength must be a number between 0 and 1, not {strength!r}")
    try:
        check_size(target_width, target_height, info)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"hires size: {e}") from None
    if info["unet_in_channels"] != info["latent_channels"]:
        channels = info["unet_in_channels"]
        raise InvalidRequestError(f"hires fix needs a plain 4-channel UNet; this model's takes {channels} channels")
    total, _ = hires_schedule(hires_steps or base_request.steps, strength)
    limit = info["scheduler_config"].get("num_train_timesteps", 1000)  # diffusers' default
    if total > limit:
        raise InvalidRequestError(
            f"hires steps {hires_steps or base_request.steps} at strength {strength} need a {total}-step schedule, "
            f"more than the model's {limit}; raise the hires strength or lower the hires steps"
        )


def hires_overrides(
    base_request: Txt2ImgRequest,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    sampler: str | None = None,
    schedule: str | None = None,
) -> tuple[dict, dict]:
    """(second-pass request fields, infotext entries) of A1111's hr_prompt, hr_negative_prompt, hr_sampler_name and
    hr_scheduler: None or "" (A1111's "Use same ...") keep the first pass's; a sampler without a schedule keeps the
    first pass's schedule type unless its label names one. Infotext as A1111 writes it: "Hires prompt" and "Hires
    negative prompt" when they differ from the first pass's, "Hires sampler" and "Hires schedule type" when set."""
    from ..request import sampler_of

    fields, params = {}, {}
    for name, value, key in (("prompt", prompt, "Hires prompt"), ("negative_prompt", negative_prompt,
                                                                    "Hires negative prompt")):  # fmt: skip
        if not isinstance(value, (str, type(None))):
            raise InvalidRequestError(f"hires {name.replace('_', ' ')} must be text, not {value!r}")
        if value and value != getattr(base_request, name):
            fields[name], params[key] = value, value
    same = {None, "", "Use same sampler", "Use same scheduler"}
    if sampler not in same or schedule not in same:
        wanted = base_request.sampler if sampler in same else sampler
        try:  # InvalidRequestError for an unknown sampler or schedule type
            wanted_schedule = base_request.schedule if schedule in same else schedule
            probe = dataclasses.replace(base_request, sampler=wanted, schedule=wanted_schedule)
            spec, schedule_type = sampler_of(probe)
        except InvalidRequestError:
            if schedule not in same:
                raise  # the first pass's schedule type may not suit the hires sampler: then its label's or default
            spec, schedule_type = sampler_of(dataclasses.replace(probe, schedule=None))
        fields.update(sampler=spec.name, schedule=schedule_type)
        if sampler not in same:
            params["Hires sampler"] = spec.name
        if schedule not in same:
            params["Hires schedule type"] = schedule_type
    return fields, params


def hires_parameters(
    upscaler: str,
    hires_steps: int,
    hires_strength: float,
    scale: float | None = None,
    resize_width: int = 0,
    resize_height: int = 0,
) -> dict:
    """The infotext entries A1111 adds for a hires fix, in its order ("Size" stays the first pass's size).

    "Hires upscale" when sized by scale (an integral scale written as an integer, as A1111's UI sends it), else
    "Hires resize" as `WxH` with 0 for a side that follows the aspect ratio; "Hires steps" only when not 0."""
    params: dict = {"Denoising strength": hires_strength}
    if resize_width or resize_height:
        params["Hires resize"] = f"{resize_width}x{resize_height}"
    else:
        scale = DEFAULT_SCALE if scale is None else scale
        params["Hires upscale"] = int(scale) if float(scale).is_integer() else scale
    params["Hires steps"] = hires_steps or None
    params["Hires upscaler"] = upscaler
    return params


# ---- upscalers ---------------------------------------------------------------------------------------------------


def upscale_latents(latents: np.ndarray, height: int, width: int, mode: str = "bilinear") -> np.ndarray:
    """torch's F.interpolate(latents, size=(height, width), mode=mode) without antialias, align_corners False:
    [B, C, h, w] -> [B, C, height, width], same dtype (bilinear weights applied in float64)."""
    if mode == "bilinear":
        x = latents.astype(np.float64)
        i0, i1, lam = _linear_taps(latents.shape[2], height)
        x = x[:, :, i0] * (1 - lam)[:, None] + x[:, :, i1] * lam[:, None]  # [B, C, height, w]
        i0, i1, lam = _linear_taps(latents.shape[3], width)
        x = x[:, :, :, i0] * (1 - lam) + x[:, :, :, i1] * lam  # [B, C, height, width]
        return x.astype(latents.dtype)
    if mode not in ("nearest", "nearest-exact"):
        raise InvalidRequestError(f"unknown latent upscale mode {mode!r}")
    rows = _nearest_taps(latents.shape[2], height, exact=mode == "nearest-exact")
    cols = _nearest_taps(latents.shape[3], width, exact=mode == "nearest-exact")
    return np.ascontiguousarray(latents[:, :, rows][:, :, :, cols])


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weight of the second one, as torch's linear upsampling (half-pixel centres, source
    positions below 0 clamped to 0, the last index repeated at the far edge)."""
    source = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, np.clip(source - i0, 0.0, 1.0)


def _nearest_taps(size_in: int, size_out: int, exact: bool) -> np.ndarray:
    """torch's nearest source index, computed in float32 as torch does: floor(i * scale), or for nearest-exact
    floor((i + 0.5) * scale), clamped to the last index."""
    scale = np.float32(size_in) / np.float32(size_out)
    position = np.arange(size_out, dtype=np.float32) + np.float32(0.5 if exact else 0.0)
    return np.minimum(np.floor(position * scale).astype(np.int64), size_in - 1)


def truncate_uint8(images: np.ndarray) -> np.ndarray:
    """float [B, H, W, 3] in [0, 1] -> uint8 by truncation, as A1111 turns decoded samples into PIL images."""
    return (np.float32(255.0) * images.astype(np.float32)).astype(np.uint8)


# ---- first pass --------------------------------------------------------------------------------------------------
