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
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3


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
    eta: float | None = None  # noise multiplier: DDIM's (default 0), the ancestral/SDE samplers' (default 1)
    emphasis: str = "Original"  # A1111 emphasis mode: "Original", "No norm", "Ignore", "None"
    clip_skip: int = 1  # 1: the text encoder's last layer; n: its n-th layer from the end
    # A1111's variation seed: each image's noise is slerped towards the noise of subseed + i by subseed_strength
    # (0: none; None or -1: a random subseed); seed_resize_from (width, height): the noise is made at that size and
    # placed centred in the image's noise (runtime.pipelines.variation)
    # A1111's sampler options (k-diffusion's churn and noise multipliers); None: the sampler's default. A value other
    # than the default for a sampler that does not use it is refused.
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None  # None or 0: no upper bound (A1111's 0 = inf)
    s_noise: float | None = None
    subseed: int | None = None
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None


@dataclass(frozen=True)
class Img2ImgRequest(Txt2ImgRequest):
    init_image: object = None  # a path or a PIL image; resized to width x height by resize_mode
    strength: float = 0.75  # denoising strength in [0, 1]: the fraction of the schedule that runs
    resize_mode: str = "just resize"  # "just resize", "crop and resize", "resize and fill" (A1111's modes)
    noise_multiplier: float = 1.0  # A1111's initial_noise_multiplier: the initial noise is scaled by it


@dataclass(frozen=True)
class InpaintRequest(Img2ImgRequest):
    mask: object = None  # a path or a PIL image; white = repaint
    mask_blur: int = 4  # Gaussian blur of the mask, in pixels (A1111's default 4): along x, and y unless mask_blur_y
    mask_blur_y: int | None = None  # A1111's mask_blur_y: the blur along y (None: mask_blur)
    inpainting_fill: str = "original"  # A1111's masked content: "fill", "original", "latent noise", "latent nothing"
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
    for name, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in JSON): no tokenizer can read it
                raise InvalidRequestError(f"{name} is not valid Unicode text ({exc.reason} at {exc.start})") from None
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
    request = replace(request, width=width, height=height, seed=seed, sampler=spec.name, schedule=schedule)
    return _validate_variation(request, seed_max)


def _validate_variation(request: Txt2ImgRequest, seed_max: int) -> Txt2ImgRequest:
    """Variation seed fields: strength in [0, 1]; a random subseed for None or -1 when the strength is not 0;
    seed_resize_from (w, h) in pixels, or None (also when it is the request's own size)."""
    strength = request.subseed_strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise InvalidRequestError(f"subseed strength must be a number between 0 and 1, not {strength!r}")
    subseed = request.subseed
    if strength and (subseed is None or subseed == -1):
        subseed = random_seed()
    if subseed is not None:  # kept without strength: the request is recorded as given
        _check_int("subseed", subseed, -1, seed_max)
    resize = request.seed_resize_from
    if resize is not None:
        if not isinstance(resize, (tuple, list)) or len(resize) != 2:
            raise InvalidRequestError(f"seed resize from must be (width, height), not {resize!r}")
        for name, value in zip(("seed resize from width", "seed resize from height"), resize):
            _check_int(name, value, 8, MAX_SIDE)
        resize = (resize[0], resize[1])
        if resize == (request.width, request.height):
            resize = None
    return replace(request, subseed=subseed, subseed_strength=float(strength), seed_resize_from=resize)


def sampler_of(request: Txt2ImgRequest) -> tuple[SamplerSpec, str]:
    """The sampler spec (with the request's options) and schedule type a request names."""
    spec, schedule = resolve_sampler(request.sampler, request.schedule)
    eta = request.eta
    if eta is not None:
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise InvalidRequestError(f"eta must be a number between 0 and 1, not {eta!r}")
        if "eta" not in dict(spec.options):
            raise InvalidRequestError(f"eta applies to DDIM and the ancestral and SDE samplers, not to {spec.name}")
        spec = spec.with_options(eta=float(eta))
    return with_sampler_options(spec, request), schedule


SAMPLER_OPTION_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": None, "s_noise": 1.0}  # A1111's defaults


def with_sampler_options(spec: SamplerSpec, request: Txt2ImgRequest) -> SamplerSpec:
    """`spec` with the request's s_churn/s_tmin/s_tmax/s_noise; a default value the sampler does not take is dropped,
    any other value it does not take is an InvalidRequestError naming the option and the sampler."""
    options = {}
    for name, default in SAMPLER_OPTION_DEFAULTS.items():
        value = getattr(request, name)
        if name == "s_tmax" and (value == 0 or value == math.inf):
            value = None  # A1111: 0 (and inf) mean no upper bound
        if value is None or (value == default and name not in spec.option_names):
            continue
        if name not in spec.option_names:
            takes = ", ".join(n for n in spec.option_names if n in SAMPLER_OPTION_DEFAULTS) or "none of them"
            raise InvalidRequestError(f"{name} does not apply to the {spec.name} sampler (it takes: {takes})")
        options[name] = value
    return spec.with_options(**options) if options else spec


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
    factor = request.noise_multiplier
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor <= 10:
        raise InvalidRequestError(f"noise multiplier must be a number between 0 and 10, not {factor!r}")
    multiple = size_multiple(model)
    width = request.width or max(multiple, image_size[0] // multiple * multiple)
    height = request.height or max(multiple, image_size[1] // multiple * multiple)
    return validate_txt2img(replace(request, width=width, height=height), model)


def validate_inpaint(request: InpaintRequest, model: dict, image_size: tuple[int, int]) -> InpaintRequest:
    """validate_img2img plus the mask options."""
    _check_int("mask blur", request.mask_blur, 0, 256)
    if request.mask_blur_y is not None:
        _check_int("mask blur y", request.mask_blur_y, 0, 256)
    _check_int("inpaint full res padding", request.inpaint_full_res_padding, 0, MAX_SIDE)
    if request.mask is None:
        raise InvalidRequestError("inpainting needs a mask (white = repaint)")
    if request.inpainting_fill not in INPAINTING_FILLS:
        raise InvalidRequestError(
            f"unknown inpainting fill {request.inpainting_fill!r}; choose one of: {', '.join(INPAINTING_FILLS)}"
        )
    return validate_img2img(request, model, image_size)
