"""Generation requests: frozen dataclasses, validated once at the boundary (API, CLI, later HTTP)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .errors import InvalidRequestError
from .prompts import check_emphasis_mode
from .rng import random_seed
from .samplers import SamplerSpec, resolve_sampler

DEFAULT_SAMPLER = "DPM++ 2M Karras"
MAX_BATCH_SIZE = 64
MAX_SIDE = 4096
MAX_STEPS = 1000


@dataclass(frozen=True)
class Txt2ImgRequest:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int | None = None  # None or -1: a random seed, recorded in the result
    batch_size: int = 1  # image i uses seed + i
    width: int | None = None  # None: the model's native size
    height: int | None = None
    sampler: str = DEFAULT_SAMPLER  # A1111 label; a schedule suffix ("DPM++ 2M Karras") is accepted
    schedule: str | None = None  # "default" (the checkpoint's), "Karras", ...; None: the label's suffix or default
    eta: float | None = None  # DDIM's noise multiplier (0: deterministic); None: the sampler's default
    emphasis: str = "Original"  # A1111 emphasis mode: "Original", "No norm", "Ignore", "None"
    clip_skip: int = 1  # 1: the text encoder's last layer; n: its n-th layer from the end


@dataclass(frozen=True)
class Img2ImgRequest(Txt2ImgRequest):
    init_image: object = None  # a path or a PIL image; resized to width x height by resize_mode
    strength: float = 0.75  # denoising strength in [0, 1]: the fraction of the schedule that runs
    resize_mode: str = "just resize"  # "just resize", "crop and resize", "resize and fill" (A1111's modes)


@dataclass(frozen=True)
class InpaintRequest(Img2ImgRequest):
    mask: object = None  # a path or a PIL image; white = repaint
    mask_blur: int = 4  # Gaussian blur of the mask, in pixels (A1111's default 4)
    inpaint_full_res: bool = False  # A1111's "only masked": generate a crop around the mask at full size
    inpaint_full_res_padding: int = 32  # pixels of context around the mask for inpaint_full_res


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise InvalidRequestError(f"{name} must be between {low} and {high}, not {value}")
    return value


def size_multiple(model: dict) -> int:
    """Image sides must be multiples of this: 8, and whatever the VAE and the UNet's downsampling need."""
    return max(8, model["vae_scale_factor"] * model["latent_size_multiple"])


def check_size(width: int, height: int, model: dict) -> None:
    """Sizes must be multiples of 8 and divide evenly through the VAE and the UNet's downsampling."""
    multiple = size_multiple(model)
    for name, value in (("width", width), ("height", height)):
        _check_int(name, value, 8, MAX_SIDE)
        if value % 8:
            raise InvalidRequestError(f"{name} must be a multiple of 8, not {value}")
        if value % multiple:
            raise InvalidRequestError(f"{name} must be a multiple of {multiple} for this model, not {value}")


def validate_txt2img(request: Txt2ImgRequest, model: dict) -> Txt2ImgRequest:
    """Check every field against the model's facts and fill in the defaults; return the concrete request."""
    if not isinstance(request.prompt, str) or not isinstance(request.negative_prompt, str):
        raise InvalidRequestError("prompt and negative prompt must be text")
    _check_int("steps", request.steps, 1, MAX_STEPS)
    _check_int("batch size", request.batch_size, 1, MAX_BATCH_SIZE)
    _check_int("clip skip", request.clip_skip, 1, model["text_num_layers"])
    check_emphasis_mode(request.emphasis)
    cfg = request.cfg_scale
    if isinstance(cfg, bool) or not isinstance(cfg, (int, float)) or not math.isfinite(cfg) or not 0 <= cfg <= 100:
        raise InvalidRequestError(f"cfg scale must be a number between 0 and 100, not {cfg!r}")
    native = model["unet_sample_size"] * model["vae_scale_factor"]
    width = native if request.width is None else request.width
    height = native if request.height is None else request.height
    check_size(width, height, model)
    seed, seed_max = request.seed, 2**64 - 1 - request.batch_size
    if isinstance(seed, int) and not isinstance(seed, bool) and not -1 <= seed <= seed_max:
        raise InvalidRequestError(f"seed must be -1 (random) or between 0 and {seed_max}, not {seed}")
    if seed is None or seed == -1:
        seed = random_seed()
    _check_int("seed", seed, 0, seed_max)
    spec, schedule = sampler_of(request)
    return replace(request, width=width, height=height, seed=seed, sampler=spec.name, schedule=schedule)


def sampler_of(request: Txt2ImgRequest) -> tuple[SamplerSpec, str]:
    """The sampler spec (with the request's options) and schedule type a request names."""
    spec, schedule = resolve_sampler(request.sampler, request.schedule)
    eta = request.eta
    if eta is not None:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise InvalidRequestError(f"eta must be a number between 0 and 1, not {eta!r}")
        if "eta" not in dict(spec.options):
            raise InvalidRequestError(f"eta applies to DDIM only, not to {spec.name}")
        spec = spec.with_options(eta=float(eta))
    return spec, schedule


def validate_img2img(request: Img2ImgRequest, model: dict, image_size: tuple[int, int]) -> Img2ImgRequest:
    """validate_txt2img plus strength and resize mode; width/height default to the init image's size, rounded
    down to the model's size multiple."""
    from .images import RESIZE_MODES

    strength = request.strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise InvalidRequestError(f"strength must be a number between 0 and 1, not {strength!r}")
    if request.resize_mode not in RESIZE_MODES:
        raise InvalidRequestError(
            f"unknown resize mode {request.resize_mode!r}; choose one of: {', '.join(RESIZE_MODES)}"
        )
    multiple = size_multiple(model)
    width = request.width or max(multiple, image_size[0] // multiple * multiple)
    height = request.height or max(multiple, image_size[1] // multiple * multiple)
    return validate_txt2img(replace(request, width=width, height=height), model)


def validate_inpaint(request: InpaintRequest, model: dict, image_size: tuple[int, int]) -> InpaintRequest:
    """validate_img2img plus the mask options."""
    _check_int("mask blur", request.mask_blur, 0, 256)
    _check_int("inpaint full res padding", request.inpaint_full_res_padding, 0, MAX_SIDE)
    if request.mask is None:
        raise InvalidRequestError("inpainting needs a mask (white = repaint)")
    return validate_img2img(request, model, image_size)
