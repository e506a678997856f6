"""Which A1111 request fields and settings sdrt honours, which it refuses by name, and the server-wide settings.

Every field of A1111's txt2img/img2img bodies either changes the result as A1111 defines it or, set to anything but
its default, is refused with a 422 naming the field and why. Only fields with no effect on the images (saving,
comments, send_images, force_task_id) are accepted silently. Settings (POST /sdapi/v1/options, override_settings)
follow the same rule: those sdrt applies are kept per server and used by later requests; a few that change nothing
here are accepted; any other key is refused by name.
"""

from __future__ import annotations

import logging
import math

from ..errors import InvalidRequestError
from ..prompts.extra_networks import RE_EXTRA_NETWORK, lora_tag
from ..styles import apply_styles

logger = logging.getLogger(__name__)

# settings sdrt applies, with A1111's defaults (s_tmax 0: no upper bound)
DEFAULT_SETTINGS = {"CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0, "eta_ancestral": 1.0,
                    "initial_noise_multiplier": 1.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0,
                    "s_noise": 1.0}  # fmt: skip
# settings accepted because they change nothing here, each with the only value that keeps it so (None: any value)
NO_EFFECT_SETTINGS = {"samples_format": "png", "show_progressbar": None, "live_previews_enable": None,
                      "samples_save": None, "grid_save": None, "save_images_add_number": None, "save_to_dirs": None,
                      "outdir_samples": None, "outdir_txt2img_samples": None, "outdir_img2img_samples": None,
                      "enable_pnginfo": True, "sd_vae": None, "sd_lora": None}  # fmt: skip


def settings_of(state) -> dict:
    """The server's settings (app.state.settings), made with A1111's defaults on first use."""
    if getattr(state, "settings", None) is None:
        state.settings = dict(DEFAULT_SETTINGS)
    return state.settings


def _number(key: str, value, low: float, high: float, integer: bool = False) -> float | int:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not (math.isfinite(value) and low <= value <= high):
        what = "an integer" if integer else "a number"
        raise InvalidRequestError(f"{key} must be {what} between {low:g} and {high:g}, not {value!r}")
    return value


def check_setting(key: str, value, model, served: str) -> object:
    """A setting's value as sdrt applies it; InvalidRequestError naming the key when it cannot be honoured."""
    if key == "sd_model_checkpoint":
        check_checkpoint(key, value, model, served)
        return None
    if key == "CLIP_stop_at_last_layers":
        return _number(key, value, 1, model.info["text_num_layers"], integer=True)
    if key in ("eta_ddim", "eta_ancestral"):
        return float(_number(key, value, 0, 1))
    if key == "initial_noise_multiplier":
        return float(_number(key, value, 0, 10))
    if key in ("s_churn", "s_tmin", "s_tmax", "s_noise"):
        return float(_number(key, value, 0, math.inf if key == "s_tmax" else 1e6))
    if key in NO_EFFECT_SETTINGS:
        wanted = NO_EFFECT_SETTINGS[key]
        if wanted is not None and value != wanted:
            raise FieldError(key, f"only {wanted!r} is supported by this server, not {value!r}")
        if key == "sd_vae" and value not in ("Automatic", "None", None, (model.info.get("source") or {}).get("vae")):
            raise FieldError(key, f"this server serves one VAE, not {value!r}")
        return None
    raise FieldError(key, "this setting is not supported by this server")


def check_checkpoint(key: str, wanted, model, served: str) -> None:
    """A checkpoint name (A1111's title "name [hash]", file name or hash) must be the served one."""
    from .a1111 import model_hash

    if not names_checkpoint(wanted, model, served, {model_hash(model)}):
        raise FieldError(key, f"this server serves only {served!r}, not {wanted!r}")


def names_checkpoint(wanted, model, title: str, hashes: set[str]) -> bool:
    """Whether `wanted` names `model` as A1111 clients send a checkpoint: its title "name [hash]", its name, its file
    name (with or without folders and suffix) or one of its `hashes`."""
    text = str(wanted).strip()
    name, _, tag = text.partition(" [")
    if tag and tag.rstrip("]") not in hashes:
        name = ""  # another checkpoint of the same name
    stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0] if "." in name else name
    return text == title or text in hashes or model.name in (name, stem)


NO_REFINER = (None, "", "None", "none")  # refiner_checkpoint values A1111 reads as no refiner


def refiner_of(body, model) -> tuple[object, float] | None:
    """(the served refiner, the switch) when a body's refiner_checkpoint names the refiner served beside `model`
    (serve --refiner) and refiner_switch_at < 1; None when it runs no refiner: no refiner_checkpoint, the served
    model itself (A1111 skips a refiner that is the loaded model), or a switch at 1 or later (A1111 never hands
    over then). FieldError naming the field otherwise."""
    from .a1111 import model_hash, model_title

    wanted = body.refiner_checkpoint
    if wanted in NO_REFINER:
        return None
    refiner = getattr(model, "refiner", None)
    if refiner is not None and names_checkpoint(wanted, refiner, model_title(refiner), _hashes(refiner)):
        pass
    elif names_checkpoint(wanted, model, model_title(model), {model_hash(model)}):
        return None
    elif refiner is None:
        _refuse("refiner_checkpoint", f"no refiner is served (serve --refiner MODEL), not {wanted!r}")
    else:
        _refuse("refiner_checkpoint", f"this server's refiner is {model_title(refiner)!r}, not {wanted!r}")
    switch = body.refiner_switch_at
    if switch is None:  # A1111 then hands over at the first step: the refiner alone, which sdrt does not run
        _refuse("refiner_switch_at", "give the fraction of the schedule after which the refiner runs, in (0, 1] "
                                     "(A1111's UI default: 0.8)")  # fmt: skip
    if not (math.isfinite(switch) and switch > 0):
        _refuse("refiner_switch_at", f"must be a number in (0, 1], not {switch!r}")
    if switch >= 1:
        return None
    if not hasattr(body, "enable_hr"):
        _refuse("refiner_checkpoint", "the refiner runs with txt2img only on this server")
    return refiner, float(switch)


def _hashes(model) -> set[str]:
    """A checkpoint's hashes as A1111 clients may send them: its title's and its infotexts' (the key's)."""
    from .a1111 import model_hash

    return {model_hash(model), model.key.rsplit("-", 1)[-1]}


def apply_settings(settings: dict, changes: dict, model, served: str) -> dict:
    """Check every key of `changes` first (nothing is applied when one is refused), then store those sdrt applies."""
    if not isinstance(changes, dict):
        raise InvalidRequestError("settings must be a JSON object of setting names and values")
    checked = {key: check_setting(key, value, model, served) for key, value in changes.items()}
    settings.update({key: value for key, value in checked.items() if key in DEFAULT_SETTINGS})
    return settings


def effective_settings(body, state, model, served: str) -> dict:
    """The server's settings with the body's override_settings; with override_settings_restore_afterwards false,
    the overrides also become the server's (as A1111 leaves them set)."""
    server = settings_of(state) if state is not None else dict(DEFAULT_SETTINGS)
    overrides = body.override_settings or {}
    merged = apply_settings(dict(server), overrides, model, served)
    if overrides and body.override_settings_restore_afterwards is False:
        apply_settings(server, overrides, model, served)
    return merged


# ---- fields ------------------------------------------------------------------------------------------------------


class FieldError(InvalidRequestError):
    """A request field (or setting) that cannot be honoured; `field` names it (the 422's loc)."""

    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}")
        self.field = field


def _refuse(field: str, why: str) -> None:
    raise FieldError(field, why)


def refuse_unsupported(body, served_checkpoint: str, model) -> None:
    """InvalidRequestError naming the first field set to something sdrt cannot honour (its default passes)."""
    if body.restore_faces:
        _refuse("restore_faces", "face restoration is not available on this server")
    if body.tiling:
        _refuse("tiling", "tiling (seamless images) is not supported")
    if body.s_min_uncond not in (None, 0, 0.0):
        _refuse("s_min_uncond", "skipping the unconditional pass at low sigmas is not supported; use 0")
    refiner_of(body, model)  # a refiner it cannot run: refused by field
    if body.firstpass_image is not None:
        _refuse("firstpass_image", "a given first-pass image is not supported")
    if body.script_name not in (None, "", "None"):
        _refuse("script_name", "scripts are not available on this server (GET /sdapi/v1/scripts lists none)")
    for name in body.alwayson_scripts or {}:
        _refuse(f"alwayson_scripts.{name}", "scripts (ControlNet, ADetailer, ...) are not available on this server")
    if body.infotext not in (None, ""):
        _refuse("infotext", "reading settings from an infotext is not supported; send them as fields")
    _refuse_txt2img(body, served_checkpoint, model)
    _refuse_img2img(body)


def _refuse_txt2img(body, served: str, model) -> None:
    if not hasattr(body, "enable_hr"):
        return
    if body.firstphase_width or body.firstphase_height:
        _refuse("firstphase_width" if body.firstphase_width else "firstphase_height",
                "a legacy field; set width/height and hr_scale or hr_resize_x/y")  # fmt: skip
    if body.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        check_checkpoint("hr_checkpoint_name", body.hr_checkpoint_name, model, served)


def _refuse_img2img(body) -> None:
    if not hasattr(body, "init_images"):
        return
    if body.init_images and len(body.init_images) > 1:
        _refuse("init_images", f"one init image per request is supported, not {len(body.init_images)}")
    if body.mask_round is False and body.mask is not None:
        _refuse("mask_round", "a soft (unrounded) latent mask is not supported; the mask is rounded at 0.5")
    if body.latent_mask is not None:
        _refuse("latent_mask", "a separate latent mask is not supported")
    if body.inpainting_fill not in (0, 1, 2, 3):
        _refuse("inpainting_fill", f"must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), "
                                   f"not {body.inpainting_fill}")  # fmt: skip


# ---- prompts -----------------------------------------------------------------------------------------------------


def prepare_prompts(body, model, styles) -> tuple[str, str, list[str]]:
    """(prompt, negative prompt, comments) as A1111 runs a body: its styles applied; with disable_extra_networks,
    every `<kind:...>` tag removed; a `<lora:name>` tag naming no LoRA of the server's folder removed with a comment
    ("Networks not found: name"), as A1111 warns and generates without it."""
    prompt, negative = body.prompt or "", body.negative_prompt or ""
    if body.styles:
        prompt, negative = apply_styles(prompt, negative, body.styles, styles or ())
    if body.disable_extra_networks:
        return RE_EXTRA_NETWORK.sub("", prompt), negative, []
    missing: list[str] = []

    def drop_missing(match) -> str:
        if match.group(1) != "lora":
            return match.group(0)
        name = lora_tag(match.group(2).split(":")).name
        if _find(model, name):
            return match.group(0)
        missing.append(name)
        return ""

    prompt = RE_EXTRA_NETWORK.sub(drop_missing, prompt)
    if missing:
        logger.warning("Networks not found: %s", ", ".join(missing))
        return prompt, negative, [f"Networks not found: {', '.join(missing)}"]
    return prompt, negative, []


def _find(model, name: str) -> bool:
    from ..errors import LoraError
    from ..lora.requests import find_lora

    try:
        find_lora(name, getattr(model, "lora_dir", None), getattr(model, "lora_allow_pickle", False))
    except LoraError:
        return False
    return True
