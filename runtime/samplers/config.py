"""Scheduler configs as diffusers reads them, and the training noise levels they define.

`resolve_config` fills a checkpoint's scheduler_config.json dict the way `DiffusersClass.from_config(cfg, **overrides)`
does: the class defaults below, overwritten by the keys of the config the class knows, overwritten by the overrides.
`alphas_cumprod` reproduces diffusers' float32 arithmetic bit for bit (torch's fused linspace, a cumulative product
accumulated in float64), so schedules derived from it match to the last ulp or so.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.errors import InvalidRequestError

_COMMON = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "timestep_spacing": "linspace",
    "rescale_betas_zero_snr": False,
}
_THRESHOLD = {"thresholding": False}
_SIGMA_TYPES = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_KDIFF_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}
_DPM = {
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "lambda_min_clipped": -math.inf,
    "variance_type": None,
    **_THRESHOLD,
}

# The __init__ defaults (of the keys sdrt reads) of each diffusers scheduler class, diffusers 0.42.
CLASS_DEFAULTS: dict[str, dict] = {
    "DDIMScheduler": {
        **_COMMON,
        **_THRESHOLD,
        "timestep_spacing": "leading",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
    },
    "PNDMScheduler": {**_COMMON, "timestep_spacing": "leading", "skip_prk_steps": False, "set_alpha_to_one": False},
    "EulerDiscreteScheduler": {
        **_COMMON,
        **_SIGMA_TYPES,
        "final_sigmas_type": "zero",
        "timestep_type": "discrete",
        "interpolation_type": "linear",
    },
    "EulerAncestralDiscreteScheduler": {**_COMMON},
    "HeunDiscreteScheduler": {
        **_COMMON,
        **_SIGMA_TYPES,
        **_KDIFF_BETAS,
        "clip_sample": False,
        "clip_sample_range": 1.0,
    },
    "LMSDiscreteScheduler": {**_COMMON, **_SIGMA_TYPES},
    "KDPM2DiscreteScheduler": {**_COMMON, **_SIGMA_TYPES, **_KDIFF_BETAS},
    "KDPM2AncestralDiscreteScheduler": {**_COMMON, **_SIGMA_TYPES, **_KDIFF_BETAS},
    "DPMSolverMultistepScheduler": {**_COMMON, **_SIGMA_TYPES, **_DPM},
    "DPMSolverSinglestepScheduler": {**_COMMON, **_SIGMA_TYPES, **_DPM, "lower_order_final": False},
    "DPMSolverSDEScheduler": {**_COMMON, **_SIGMA_TYPES, **_KDIFF_BETAS, "noise_sampler_seed": None},
    "UniPCMultistepScheduler": {
        **_COMMON,
        **_SIGMA_TYPES,
        **_THRESHOLD,
        "solver_order": 2,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "solver_p": None,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
    },
    "LCMScheduler": {
        **_COMMON,
        **_KDIFF_BETAS,
        **_THRESHOLD,
        "beta_schedule": "scaled_linear",
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "timestep_spacing": "leading",
        "timestep_scaling": 10.0,
    },
    "DDPMScheduler": {
        **_COMMON,
        **_THRESHOLD,
        "timestep_spacing": "leading",
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
    },
}
# Keys diffusers reads with hasattr(config, ...) whatever the class: they survive from_config as hidden config.
_HIDDEN_KEYS = ("sigma_min", "sigma_max")

# Settings of a config sdrt does not implement, with the value that is supported.
_UNSUPPORTED = {
    "rescale_betas_zero_snr": False,
    "thresholding": False,
    "timestep_type": "discrete",
    "interpolation_type": "linear",
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "variance_type": None,
    "solver_p": None,
    "disable_corrector": [],
    "predict_x0": True,
}


def resolve_config(class_name: str, scheduler_config: dict, overrides: dict) -> dict:
    """The effective config of `class_name.from_config(scheduler_config, **overrides)`; raises on unsupported
    settings."""
    defaults = CLASS_DEFAULTS[class_name]
    cfg = dict(defaults)
    cfg["sigma_min"] = cfg["sigma_max"] = None
    for key, value in scheduler_config.items():
        if key in defaults or key in _HIDDEN_KEYS:
            cfg[key] = value
    cfg.update(overrides)
    for key, supported in _UNSUPPORTED.items():
        if key not in defaults or cfg[key] == supported:
            continue
        if class_name == "DDPMScheduler" and key == "variance_type" and cfg[key] == "fixed_small":
            continue
        raise InvalidRequestError(f"scheduler config {key}={cfg[key]!r} is not supported by sdrt's samplers")
    if cfg["prediction_type"] not in ("epsilon", "v_prediction"):
        raise InvalidRequestError(
            f"scheduler config prediction_type={cfg['prediction_type']!r} is not supported (epsilon, v_prediction)"
        )
    return cfg


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) bit for bit: a float32 step and one fused multiply-add per
    element, from the start for the first half and from the end for the second."""
    start32, end32 = np.float32(start), np.float32(end)
    step = float((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    head = float(start32) + step * idx
    tail = float(end32) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, head, tail).astype(np.float32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Betas of the squaredcos_cap_v2 schedule (Nichol & Dhariwal 2021), as float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return np.array(betas, dtype=np.float32)


def alphas_cumprod(cfg: dict) -> np.ndarray:
    """[num_train_timesteps] float32 cumulative products of (1 - beta), exactly as diffusers builds them."""
    n = int(cfg["num_train_timesteps"])
    schedule = cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
    elif schedule == "linear":
        betas = _torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif schedule == "scaled_linear":
        betas = _torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise InvalidRequestError(
            f"scheduler config beta_schedule={schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)"
        )
    alphas = np.float32(1.0) - betas
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)  # torch accumulates float cumprod in double


def training_sigmas(cfg: dict) -> np.ndarray:
    """[num_train_timesteps] float32 VE noise levels sqrt((1 - a) / a), ascending with the timestep."""
    ac = alphas_cumprod(cfg)
    return np.sqrt((np.float32(1.0) - ac) / ac)
