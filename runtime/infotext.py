"""A1111's generation parameters ("infotext") of a generated image: the keys and values the A1111 web UI writes for
the same settings, so that its PNG Info and "send to" buttons read sdrt's images (runtime.output writes the text)."""

from __future__ import annotations

from . import __version__
from .output import format_parameters
from .request import InpaintRequest, Txt2ImgRequest


def generation_parameters(request: Txt2ImgRequest, model: dict, backend: str, precision: str) -> dict:
    """The parameters every mode writes (a mode adds its own: denoising strength, mask blur, ...); `model`: the
    model's keys (model_parameters)."""
    return {
        "Steps": request.steps,
        "Sampler": request.sampler,
        "Schedule type": None if request.schedule == "default" else request.schedule,
        "CFG scale": request.cfg_scale,
        "Seed": request.seed,
        "Size": f"{request.width}x{request.height}",
        **model,
        **variation_seed(request, 0),
        "Seed resize from": "{}x{}".format(*request.seed_resize_from) if request.seed_resize_from else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,  # A1111 writes it from 2 on
        **sampler_option_parameters(request),
        "Backend": backend,
        "Precision": None if precision == "fp32" else precision,
        "Version": f"sdrt {__version__}",
    }


def model_parameters(info: dict, key: str, name: str) -> dict:
    """A1111's `Model hash`/`Model` (a single file's sha256[:10] and stem; else the artifact key's hash and the
    model's name) and `VAE hash`/`VAE` (an override)."""
    source = info.get("source") or {}
    return {
        "Model hash": source.get("model_hash") or key.rsplit("-", 1)[-1],
        "Model": source.get("model") or name,
        "VAE hash": source.get("vae_hash"),
        "VAE": source.get("vae"),
    }


def image_infotexts(request: Txt2ImgRequest, parameters: dict, seeds: list[int]) -> list[str]:
    """The infotext of each image of a batch: its own seed and variation seed."""
    per_image = [dict(parameters, Seed=seed, **variation_seed(request, i)) for i, seed in enumerate(seeds)]
    return [format_parameters(request.prompt, request.negative_prompt, p) for p in per_image]


def noise_factor(request) -> dict:
    """A1111's "Noise multiplier" (initial_noise_multiplier), written when it is not 1."""
    return {"Noise multiplier": request.noise_multiplier} if request.noise_multiplier != 1 else {}


def mask_blur(request: InpaintRequest) -> dict:
    """ "Mask blur" (A1111's key) when x and y agree, else "Mask blur x" and "Mask blur y"."""
    blur_y = request.mask_blur if request.mask_blur_y is None else request.mask_blur_y
    if blur_y == request.mask_blur:
        return {"Mask blur": request.mask_blur}
    return {"Mask blur x": request.mask_blur, "Mask blur y": blur_y}


def variation_seed(request: Txt2ImgRequest, index: int) -> dict:
    """A1111's "Variation seed" (subseed + index) and "Variation seed strength", when a variation is applied."""
    if not request.subseed_strength:
        return {}
    return {"Variation seed": request.subseed + index, "Variation seed strength": request.subseed_strength}


def sampler_option_parameters(request: Txt2ImgRequest) -> dict:
    """A1111's infotext keys for the sampler options a request sets away from their defaults."""
    from .request import SAMPLER_OPTION_DEFAULTS, sampler_of
    from .samplers import SPECS

    spec = sampler_of(request)[0]
    options = dict(spec.options)
    keys = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
    written = {key: options[name] for name, key in keys.items()
               if name in options and options[name] != SAMPLER_OPTION_DEFAULTS[name]}  # fmt: skip
    # eta as A1111 writes it: "Eta DDIM" away from DDIM's 0, "Eta" away from the ancestral samplers' 1
    if "eta" in options and options["eta"] != dict(SPECS[spec.name].options)["eta"]:
        written["Eta DDIM" if spec.name == "DDIM" else "Eta"] = options["eta"]
    return written
