"""Translation between A1111 API bodies and runtime.serving calls: fields in, `{images, parameters, info}` out."""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, PngImagePlugin

from .. import __version__
from ..admission import PromptLimits, check_prompt_text
from ..errors import InvalidRequestError
from ..output import parse_parameters, read_parameters, to_uint8
from ..request import INPAINTING_FILLS
from ..rng import random_seed
from ..samplers import SCHEDULE_TYPES, resolve_sampler
from . import fields
from .schemas import GenerationBody, Img2ImgBody, Txt2ImgBody

RESIZE_MODES = {0: "just resize", 1: "crop and resize", 2: "resize and fill", 3: "just resize"}  # 3: latent upscale
SCHEDULER_NAMES = {t: "automatic" if t == "default" else t.lower().replace(" ", "_") for t in SCHEDULE_TYPES}
SCHEDULER_LABELS = {t: "Automatic" if t == "default" else t for t in SCHEDULE_TYPES}
# what A1111 1.10's /schedulers says of each (its modules/sd_schedulers.py table); the rest: no rho, no alias
SCHEDULER_FACTS = {
    "Karras": {"default_rho": 7.0},
    "Polyexponential": {"default_rho": 1.0},
    "SGM Uniform": {"aliases": ["SGMUniform"], "need_inner_model": True},
    **{t: {"need_inner_model": True} for t in ("Uniform", "Simple", "Normal", "DDIM", "Beta")},
}
LATENT_UPSCALERS = ("Latent", "Latent (nearest)", "Latent (nearest-exact)")  # A1111's latent upscale modes


@dataclass
class Limits:
    """What the server accepts; anything beyond is a 422 (the body, prompt and memory limits: 413). The memory budget
    is the model's (StableDiffusion.memory_budget); the prompt limits go to the model too (prompt_limits)."""

    max_side: int = 2048  # width and height
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter
    max_body_bytes: int = 32 * 2**20
    max_image_bytes: int = 16 * 2**20  # one decoded base64 image
    max_image_pixels: int = 4096 * 4096
    request_timeout: float | None = None  # seconds per request (None: no limit)
    max_prompt_chars: int = PromptLimits.max_chars  # each of prompt and negative prompt, checked first
    max_prompt_chunks: int = PromptLimits.max_chunks  # 75-token chunks per prompt text
    max_and_terms: int = PromptLimits.max_and_terms  # AND sub-prompts of a prompt

    def prompt_limits(self) -> PromptLimits:
        return PromptLimits(self.max_prompt_chars, self.max_prompt_chunks, self.max_and_terms)


@dataclass(frozen=True)
class Call:
    """One runtime.serving submission: StableDiffusion.<mode>(*args, **options)."""

    mode: str
    args: tuple
    options: dict


def check_limits(body: GenerationBody, limits: Limits) -> None:
    for name in ("width", "height"):
        if getattr(body, name) > limits.max_side:
            raise InvalidRequestError(f"{name} must be at most {limits.max_side}, not {getattr(body, name)}")
    if body.steps > limits.max_steps:
        raise InvalidRequestError(f"steps must be at most {limits.max_steps}, not {body.steps}")
    if body.batch_size * body.n_iter > limits.max_images:
        raise InvalidRequestError(
            f"batch_size * n_iter must be at most {limits.max_images}, not {body.batch_size * body.n_iter}"
        )
    check_prompt_text(body.prompt or "", body.negative_prompt or "", limits.prompt_limits())  # tokens: on submit
    hires = (getattr(body, "hr_prompt", "") or "", getattr(body, "hr_negative_prompt", "") or "")  # txt2img only
    check_prompt_text(*hires, limits.prompt_limits(), "hires ")
    if getattr(body, "enable_hr", False):
        _check_hires_limits(body, limits)


def _check_hires_limits(body: Txt2ImgBody, limits: Limits) -> None:
    """The hires fix's final size and second-pass steps stay within the limits the first pass has."""
    from ..pipelines.hires import hires_target

    try:
        target = hires_target(body.width, body.height, body.hr_scale, body.hr_resize_x, body.hr_resize_y)
    except InvalidRequestError:
        return  # a malformed hires option: the runtime's check names it
    for name, value in zip(("width", "height"), target):
        if value > limits.max_side:
            raise InvalidRequestError(f"the hires fix's {name} must be at most {limits.max_side}, not {value}")
    if body.hr_second_pass_steps > limits.max_steps:
        steps = body.hr_second_pass_steps
        raise InvalidRequestError(f"hr_second_pass_steps must be at most {limits.max_steps}, not {steps}")


def _schedule(scheduler: str | None) -> str | None:
    """A1111's scheduler name or label -> sdrt's schedule type (None: the sampler label's or the default)."""
    if scheduler is None:
        return None
    wanted = scheduler.strip().lower()
    if wanted in ("automatic", "default", ""):
        return None
    for schedule, name in SCHEDULER_NAMES.items():
        aliases = [a.lower() for a in SCHEDULER_FACTS.get(schedule, {}).get("aliases", [])]
        if wanted in (name, schedule.lower(), *aliases):
            return schedule
    raise InvalidRequestError(f"unknown scheduler {scheduler!r}; valid: {', '.join(SCHEDULER_NAMES.values())}")


def _common_options(body: GenerationBody, settings: dict) -> dict:
    """The sdrt request fields of an A1111 body (prompts and seed handled by the caller); `settings`: the server's
    settings with the body's override_settings (fields.effective_settings)."""
    sampler = body.sampler_name or body.sampler_index
    schedule = _schedule(body.scheduler)
    spec, _ = resolve_sampler(sampler, schedule)
    options = dict(
        steps=body.steps, cfg_scale=body.cfg_scale, width=body.width, height=body.height, sampler=sampler,
        schedule=schedule, batch_size=body.batch_size, clip_skip=settings["CLIP_stop_at_last_layers"],
    )  # fmt: skip
    if "eta" in spec.option_names:  # A1111 gives eta to the samplers that use it only, by default eta_ddim for DDIM
        default = settings["eta_ddim"] if spec.name == "DDIM" else settings["eta_ancestral"]  # and eta_ancestral
        options["eta"] = default if body.eta is None else body.eta
    for name in ("s_churn", "s_tmin", "s_tmax", "s_noise"):  # the body's, refused where the sampler takes none
        value = getattr(body, name)
        if value is None and name in spec.option_names:  # else the setting, for the samplers that use it
            value = settings[name]
        if value is not None:
            options[name] = value
    if body.subseed_strength:
        options.update(subseed_strength=body.subseed_strength)
    if body.seed_resize_from_w > 0 and body.seed_resize_from_h > 0:
        options["seed_resize_from"] = (body.seed_resize_from_w, body.seed_resize_from_h)
    return options


def _iterations(body: GenerationBody, mode: str, args: tuple, options: dict) -> list[Call]:
    """n_iter batches of batch_size images; the seeds (and subseeds) run on across batches as A1111's all_seeds do."""
    seed = body.seed if body.seed != -1 else random_seed()
    subseed = (body.subseed if body.subseed != -1 else random_seed()) if body.subseed_strength else None
    calls = []
    for k in range(body.n_iter):
        call_options = dict(options, seed=seed + k * body.batch_size)
        if subseed is not None:
            call_options["subseed"] = subseed + k * body.batch_size
        calls.append(Call(mode, args, call_options))
    return calls


def _prepare(body: GenerationBody, limits: Limits, state) -> tuple[str, dict]:
    """Checks and options every generation body shares: limits, refused fields, settings, styles and tags."""
    check_limits(body, limits)
    model = getattr(getattr(state, "service", None), "model", None)
    served = model_title(model) if model is not None else ""
    if model is not None:
        fields.refuse_unsupported(body, served, model)
        settings = fields.effective_settings(body, state, model, served)
    else:
        settings = dict(fields.DEFAULT_SETTINGS)
    prompt, negative, comments = fields.prepare_prompts(body, model, getattr(state, "styles", ()))
    body._prompts, body._comments = (prompt, negative), comments  # for response(): A1111 reports the styled prompts
    options = _common_options(body, settings)
    options["negative_prompt"] = negative
    return prompt, options, settings


def txt2img_calls(body: Txt2ImgBody, limits: Limits, state=None) -> list[Call]:
    """The runtime calls of a txt2img body; `state`: the app's state (service, settings, styles)."""
    prompt, options, _ = _prepare(body, limits, state)
    model = getattr(getattr(state, "service", None), "model", None)
    refiner = fields.refiner_of(body, model) if model is not None else None
    if refiner is not None:  # the served refiner takes over at the switch (runs alone: never batched)
        options.update(refiner=refiner[0], refiner_switch_at=refiner[1])
    if body.enable_hr:
        options.update(hires_upscaler=body.hr_upscaler or "Latent", hires_steps=body.hr_second_pass_steps)
        options["hires_strength"] = 0.7 if body.denoising_strength is None else body.denoising_strength
        if body.hr_resize_x or body.hr_resize_y:
            options.update(hires_width=body.hr_resize_x, hires_height=body.hr_resize_y)
        else:
            options["hires_scale"] = body.hr_scale
        options.update(hires_prompt=body.hr_prompt or None, hires_negative_prompt=body.hr_negative_prompt or None)
        options.update(hires_sampler=body.hr_sampler_name, hires_schedule=_hires_schedule(body.hr_scheduler))
    return _iterations(body, "txt2img", (prompt,), options)


def _hires_schedule(scheduler: str | None) -> str | None:
    """hr_scheduler: None or "Use same scheduler" keeps the first pass's; "Automatic" is the sampler's default."""
    if scheduler in (None, "", "Use same scheduler"):
        return None
    return _schedule(scheduler) or "default"


def img2img_calls(body: Img2ImgBody, limits: Limits, state=None) -> list[Call]:
    """The runtime calls of an img2img body (inpaint when it has a mask)."""
    prompt, options, settings = _prepare(body, limits, state)
    if not body.init_images:
        raise InvalidRequestError("img2img needs init_images (a list with one base64 image)")
    if body.resize_mode not in RESIZE_MODES:
        raise InvalidRequestError(f"resize_mode must be one of {sorted(RESIZE_MODES)}, not {body.resize_mode}")
    image = decode_image(body.init_images[0], limits, "init_images[0]")
    options.update(strength=body.denoising_strength, resize_mode=RESIZE_MODES[body.resize_mode])
    multiplier = body.initial_noise_multiplier
    options["noise_multiplier"] = settings["initial_noise_multiplier"] if multiplier is None else multiplier
    if body.mask is None:
        return _iterations(body, "img2img", (prompt, image), options)
    mask = decode_image(body.mask, limits, "mask").convert("L")
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur_x, blur_y = (body.mask_blur_x, body.mask_blur_y) if body.mask_blur is None else (body.mask_blur,) * 2
    options.update(mask_blur=blur_x, mask_blur_y=blur_y, inpainting_fill=INPAINTING_FILLS[body.inpainting_fill])
    options.update(inpaint_full_res=body.inpaint_full_res, inpaint_full_res_padding=body.inpaint_full_res_padding)
    return _iterations(body, "inpaint", (prompt, image, mask), options)


def decode_bytes(data: str, limits: Limits, what: str = "image") -> bytes:
    """The bytes of a base64 string (optionally a data: URL); InvalidRequestError when too large or malformed."""
    if not isinstance(data, str) or not data:
        raise InvalidRequestError(f"{what} must be a non-empty base64 string")
    if data.startswith(("http://", "https://")):
        raise InvalidRequestError(f"{what}: image URLs are not fetched by this server; send the image as base64")
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if len(data) * 3 // 4 > 2 * limits.max_image_bytes:  # before copying it (whitespace may pad it a little)
        raise InvalidRequestError(f"{what} is larger than {limits.max_image_bytes} bytes")
    data = "".join(data.split())  # line breaks and spaces, which A1111's decoder skips
    if len(data) * 3 // 4 > limits.max_image_bytes:
        raise InvalidRequestError(f"{what} is larger than {limits.max_image_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what} is not valid base64") from None


def open_image(raw: bytes, limits: Limits, what: str = "image") -> Image.Image:
    """Decode image bytes (pixel count checked before the pixels are read); InvalidRequestError if unreadable."""
    unreadable = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
    try:
        image = Image.open(io.BytesIO(raw))
    except unreadable as exc:
        raise InvalidRequestError(f"{what} is not a readable image: {exc}") from None
    if image.width * image.height > limits.max_image_pixels:
        raise InvalidRequestError(f"{what} has more than {limits.max_image_pixels} pixels")
    try:
        image.load()
    except unreadable as exc:
        raise InvalidRequestError(f"{what} is not a readable image: {exc}") from None
    return image


def decode_image(data: str, limits: Limits, what: str = "image") -> Image.Image:
    """A base64 image -> an RGB (or RGBA, for masks with alpha) PIL image."""
    image = open_image(decode_bytes(data, limits, what), limits, what)
    return image.convert("RGBA" if image.mode in ("RGBA", "LA", "PA") else "RGB")


def encode_png(image, infotext: str) -> str:
    """float [H, W, 3] in [0, 1] -> base64 PNG with the infotext as its "parameters" text chunk (as the CLI saves)."""
    pnginfo = PngImagePlugin.PngInfo()
    pnginfo.add_text("parameters", infotext)
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buffer, format="PNG", pnginfo=pnginfo)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def response(
    body: GenerationBody, results: list, model, extra_keys: dict | None = None, job_timestamp: str | None = None
) -> dict:
    """A1111's {images, parameters, info} for the results of a body's calls (in n_iter order); `job_timestamp`: when
    the first call started (as /progress showed it), by default now."""
    images = [encode_png(img, text) for r in results for img, text in zip(r.images, r.infotexts)]
    seeds = [s for r in results for s in r.seeds]
    infotexts = [t for r in results for t in r.infotexts]
    first = results[0].request
    parameters = body.model_dump()
    if isinstance(body, Img2ImgBody):  # as A1111 does: the request's images are not echoed back
        parameters.update(init_images=None, mask=None)
    source = model.info.get("source") or {}
    prompt, negative = getattr(body, "_prompts", None) or (body.prompt, body.negative_prompt)
    subseeds = [r.request.subseed + i if r.request.subseed_strength else -1 for r in results
                for i in range(len(r.seeds))]  # fmt: skip
    resize = first.seed_resize_from or (-1, -1)
    info = {
        "prompt": prompt, "all_prompts": [prompt] * len(seeds),
        "negative_prompt": negative, "all_negative_prompts": [negative] * len(seeds),
        "seed": seeds[0], "all_seeds": seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
        "subseed_strength": first.subseed_strength, "width": first.width, "height": first.height,
        "sampler_name": first.sampler, "comments": "".join(f"{c}\n" for c in getattr(body, "_comments", [])),
        "cfg_scale": first.cfg_scale, "steps": first.steps, "batch_size": first.batch_size,
        "restore_faces": False, "face_restoration_model": None, "sd_model_name": model.name,
        "sd_model_hash": model_hash(model), "sd_vae_name": source.get("vae"), "sd_vae_hash": source.get("vae_hash"),
        "seed_resize_from_w": resize[0], "seed_resize_from_h": resize[1],
        "denoising_strength": results[0].parameters.get("Denoising strength"),  # img2img's, or hires fix's
        "extra_generation_params": extra_keys or _refiner_keys(results[0].parameters),
        "index_of_first_image": 0, "infotexts": infotexts, "styles": body.styles or [],
        "job_timestamp": job_timestamp or time.strftime("%Y%m%d%H%M%S"), "clip_skip": first.clip_skip,
        "is_using_inpainting_conditioning": model.info["unet_in_channels"] == 9, "version": f"sdrt {__version__}",
    }  # fmt: skip
    return {"images": images if body.send_images else [], "parameters": parameters, "info": json.dumps(info)}


def _refiner_keys(parameters: dict) -> dict:
    """The refiner's infotext entries, which A1111 also reports in extra_generation_params."""
    return {key: parameters[key] for key in ("Refiner", "Refiner switch at") if key in parameters}


def png_info(data: str, limits: Limits) -> dict:
    """A1111's png-info: the infotext, the image's other text items, and the parsed parameters."""
    raw = decode_bytes(data, limits)
    with open_image(raw, limits) as image:
        items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
    text = read_parameters(io.BytesIO(raw)) or ""  # the PNG chunk, or JPEG/WebP EXIF UserComment
    parameters: dict = {}
    if text:
        prompt, negative, fields = parse_parameters(text)
        parameters = {"Prompt": prompt, "Negative prompt": negative, **fields}
    return {"info": text, "items": items, "parameters": parameters}


def model_hash(model) -> str:
    """A1111's short hash of the served checkpoint (a single file's sha256[:10]; a folder's content hash)."""
    source = model.info.get("source") or {}
    return source.get("model_hash") or model.key.rsplit("-", 1)[-1]


def model_title(model) -> str:
    """The checkpoint's A1111 title, "name [hash]" (what sd_model_checkpoint holds)."""
    return f"{model.name} [{model_hash(model)}]"


def sd_models(model) -> list[dict]:
    """GET /sdapi/v1/sd-models: the served checkpoint, and the refiner served beside it (serve --refiner)."""
    served = [model, *([model.refiner] if getattr(model, "refiner", None) is not None else [])]
    return [{"title": model_title(m), "model_name": m.name, "hash": model_hash(m), "sha256": None,
             "filename": str(m.info.get("path", m.name)), "config": None} for m in served]  # fmt: skip


def options(model, state=None) -> dict:
    """GET /sdapi/v1/options: the settings A1111 clients read, as this server applies them (POST /sdapi/v1/options
    and override_settings with override_settings_restore_afterwards false change them)."""
    source = model.info.get("source") or {}
    settings = fields.settings_of(state) if state is not None else dict(fields.DEFAULT_SETTINGS)
    return {
        "sd_model_checkpoint": model_title(model),
        "sd_checkpoint_hash": model_hash(model),
        "sd_vae": source.get("vae") or "Automatic",
        **settings,
        "samples_format": "png",
        "sd_lora": "None",
        "live_previews_enable": False,
    }


def set_options(body: dict, state) -> None:
    """POST /sdapi/v1/options: the settings sdrt applies are kept for later requests; one checkpoint is served, so
    asking for another is a 422 naming the one served; a setting sdrt cannot honour is a 422 naming it (nothing is
    applied then)."""
    model = state.service.model
    fields.apply_settings(fields.settings_of(state), body, model, model_title(model))


def loras(model) -> list[dict]:
    """GET /sdapi/v1/loras: the LoRA files of the model's LoRA folder (--lora-dir), by name as prompts use them."""
    from ..lora.files import LORA_SUFFIXES, PICKLE_SUFFIXES

    folder = getattr(model, "lora_dir", None)
    if folder is None or not Path(folder).is_dir():
        return []
    allowed = LORA_SUFFIXES if model.lora_allow_pickle else tuple(s for s in LORA_SUFFIXES if s not in PICKLE_SUFFIXES)
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in allowed)
    return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in files]


def _width(embedding) -> int:
    """A1111's shape of an embedding: its vector width, both encoders' together for an SDXL one (768 + 1280)."""
    second = embedding.vec_2 if embedding.vec_2 is not None and embedding.vec_2 is not embedding.vec else None
    return int(embedding.vec.shape[1] + (0 if second is None else second.shape[1]))


def embeddings(model) -> dict:
    """GET /sdapi/v1/embeddings: loaded textual inversions ({name: {shape, vectors, ...}}) and skipped ones."""
    loaded = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": _width(e),
                     "vectors": e.vectors} for name, e in model.embeddings.embeddings.items()}  # fmt: skip
    skipped = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": width, "vectors": 0}
               for name, width in model.embeddings.skipped.items()}  # fmt: skip
    return {"loaded": loaded, "skipped": skipped}
