"""Schedules of the VP-native diffusers classes with integer timesteps (DDIM, PLMS, DDPM, LCM, DPM-Solver, UniPC),
converted to VE levels sigma = sqrt((1 - a) / a); each builder mirrors the class's set_timesteps and its quirks."""

from __future__ import annotations

import numpy as np

from runtime.errors import InvalidRequestError
from runtime.samplers import sigmas as spacing
from runtime.samplers.config import alphas_cumprod, training_sigmas
from runtime.samplers.schedule import (
    Schedule,
    check_sigmas,
    check_timesteps,
    clip_range,
    integer_timesteps,
    solver_timesteps,
    vp_to_ve,
)


def ddim(cfg: dict, steps: int) -> Schedule:
    """DDIMScheduler: integer timesteps; step i goes from alphas_cumprod[t_i] to alphas_cumprod[t_i - T // n] (or
    final_alpha_cumprod below 0). With "trailing"/"linspace" spacing and n not dividing T that target differs from
    t_{i+1}: diffusers then hands the UNet a sample from one level labelled with the next timestep; `sigmas_to`
    keeps the target so the sampler reproduces that exactly."""
    ac = alphas_cumprod(cfg)
    timesteps = integer_timesteps(cfg, steps)
    check_timesteps(timesteps, cfg, steps, "DDIM")
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else ac[0]
    prev = timesteps - cfg["num_train_timesteps"] // steps
    alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final)
    sigmas_to = vp_to_ve(alpha_prev)
    sigmas = np.concatenate([vp_to_ve(ac[timesteps]), sigmas_to[-1:]])
    check_sigmas(sigmas[:-1], steps, "DDIM")
    clip = clip_range(cfg)
    init = float(np.sqrt(1 + sigmas[0] ** 2))
    return Schedule(sigmas, timesteps.astype(np.float64), init, sigmas_to=sigmas_to, clip_denoised=clip)


def _solver_sigmas(cfg: dict, steps: int, leading_base_is_train: bool) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas [n+1] float32, timesteps [n] int64) of DPMSolverMultistep / UniPC."""
    ac = alphas_cumprod(cfg)
    train = training_sigmas(cfg)
    t_train = cfg["num_train_timesteps"]
    last_timestep = t_train
    if not leading_base_is_train:  # DPM-Solver drops the timesteps whose log-SNR is below lambda_min_clipped
        lambdas = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
        last_timestep = t_train - int(np.searchsorted(lambdas[::-1], cfg["lambda_min_clipped"]))
    leading_base = t_train if leading_base_is_train else last_timestep
    timesteps = solver_timesteps(cfg, steps, last_timestep, leading_base)
    converted = spacing.converted_sigmas(cfg, train[::-1], steps)
    if converted is not None:
        sigmas = converted
        timesteps = spacing.sigma_to_t(sigmas, np.log(train))
        if cfg.get("use_karras_sigmas") and cfg["beta_schedule"] != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)  # torch .to(int64) truncates the unrounded (exponential, beta) ones
    else:
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
    if cfg["final_sigmas_type"] == "sigma_min":
        # UniPC ends converted schedules at their own last level, DPM-Solver always at the training sigma_min
        last = float(sigmas[-1]) if (leading_base_is_train and converted is not None) else float(train[0])
    else:
        last = 0.0
    return np.concatenate([sigmas, [last]]).astype(np.float32), timesteps


def _multistep_orders(
    steps: int, solver_order: int, lower_order_final: bool, final_first_order: bool, below: int = 15
) -> np.ndarray:
    """Order used at each step of DPMSolverMultistep / UniPC from a fresh start: warm-up, and with
    lower_order_final at most the number of steps left when there are fewer than `below` steps."""
    orders = np.minimum(np.arange(1, steps + 1), solver_order)
    if lower_order_final and steps < below:
        orders = np.minimum(orders, np.arange(steps, 0, -1))
    if final_first_order:
        orders[-1] = 1
    return orders


def dpm_multistep(cfg: dict, steps: int) -> Schedule:
    sigmas, timesteps = _solver_sigmas(cfg, steps, leading_base_is_train=False)
    sigmas = sigmas.astype(np.float64)
    check_sigmas(sigmas[:-1], steps, "DPM-Solver")
    final_first = cfg["euler_at_final"] or cfg["final_sigmas_type"] == "zero"
    orders = _multistep_orders(steps, cfg["solver_order"], cfg["lower_order_final"], final_first)
    return Schedule(
        sigmas,
        timesteps.astype(np.float64),
        float(np.sqrt(1 + sigmas[0] ** 2)),
        orders=orders,
        options={"solver_type": cfg["solver_type"]},
    )


def unipc(cfg: dict, steps: int) -> Schedule:
    """UniPCMultistepScheduler: DPM-Solver-like timesteps ("leading" divides num_train_timesteps), lower order at
    the end whatever the step count."""
    sigmas, timesteps = _solver_sigmas(cfg, steps, leading_base_is_train=True)
    sigmas = sigmas.astype(np.float64)
    check_sigmas(sigmas[:-1], steps, "UniPC")
    orders = _multistep_orders(steps, cfg["solver_order"], cfg["lower_order_final"], False, below=steps + 1)
    options = {"solver_type": cfg["solver_type"]}
    return Schedule(
        sigmas, timesteps.astype(np.float64), float(np.sqrt(1 + sigmas[0] ** 2)), orders=orders, options=options
    )


def pndm(cfg: dict, steps: int) -> Schedule:
    """PNDMScheduler with skip_prk_steps (PLMS): diffusers evaluates [t0, t1, t1, t2, ...]; the repeated t1 is the
    first step's second evaluation (a trapezoid warm-up). Warm-up tables are kept for every step, since a partial
    run warms up again: sigmas_mid = the predictor's level, timesteps_mid = t_{i+1}, coeffs[:, 0] = the level the
    correction starts from (alphas_cumprod[t_{i+1} + T // n], sigmas[i] unless the spacing is uneven).
    start_at(k) is a fresh PLMS run from step k. (diffusers' img2img slices [t0, t1, t1, t2, ...] at k, which
    starts at t_{k-1} and loses the warm-up's repeated entry: its first multistep evaluation then sees a sample
    at t_k's level labelled t_{k+1}. sdrt does not reproduce that.)"""
    if not cfg["skip_prk_steps"]:
        raise InvalidRequestError("PLMS needs skip_prk_steps=True (the PRK warm-up of PNDM is not implemented)")
    ac = alphas_cumprod(cfg)
    t_train = cfg["num_train_timesteps"]
    timesteps = integer_timesteps(cfg, steps)
    check_timesteps(timesteps, cfg, steps, "PLMS")
    ratio = t_train // steps
    final = np.float32(1.0) if cfg["set_alpha_to_one"] else ac[0]
    prev = timesteps - ratio
    sigmas_to = vp_to_ve(np.where(prev >= 0, ac[np.maximum(prev, 0)], final))
    sigmas = np.concatenate([vp_to_ve(ac[timesteps]), sigmas_to[-1:]])
    check_sigmas(sigmas[:-1], steps, "PLMS")
    mid_t = np.append(timesteps[1:], 0).astype(np.float64)
    warmup_from = np.append(vp_to_ve(ac[np.minimum(timesteps[1:] + ratio, t_train - 1)]), 0.0)[:, None]  # [n, 1]
    options = {"combine": "v" if cfg["prediction_type"] == "v_prediction" else "eps"}
    return Schedule(
        sigmas,
        timesteps.astype(np.float64),
        float(np.sqrt(1 + sigmas[0] ** 2)),
        sigmas_to=sigmas_to,
        sigmas_mid=sigmas_to,
        timesteps_mid=mid_t,
        coeffs=warmup_from,
        options=options,
    )


def ddpm(cfg: dict, steps: int) -> Schedule:
    """DDPMScheduler: each step goes to the next listed timestep (alphas_cumprod 1 after the last), noise is drawn
    where t > 0 (options["noise_steps"])."""
    ac = alphas_cumprod(cfg)
    timesteps = integer_timesteps(cfg, steps)
    check_timesteps(timesteps, cfg, steps, "DDPM")
    sigmas = np.append(vp_to_ve(ac[timesteps]), 0.0)
    check_sigmas(sigmas, steps, "DDPM")
    options = {"noise_steps": (timesteps > 0).tolist()}
    init = float(np.sqrt(1 + sigmas[0] ** 2))
    return Schedule(sigmas, timesteps.astype(np.float64), init, clip_denoised=clip_range(cfg), options=options)


def lcm(cfg: dict, steps: int) -> Schedule:
    """LCMScheduler: `steps` of the original_inference_steps-point LCM grid (timestep_spacing is ignored), the
    boundary-condition scalings in options; the last step returns the consistency output (sigma 0)."""
    original = cfg["original_inference_steps"]
    if steps > original:
        raise InvalidRequestError(f"steps must be at most original_inference_steps={original} for LCM, got {steps}")
    ac = alphas_cumprod(cfg)
    k = cfg["num_train_timesteps"] // original
    origin = (np.arange(1, original + 1) * k - 1)[::-1]
    timesteps = origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]
    sigmas = np.append(vp_to_ve(ac[timesteps]), 0.0)
    scaled = timesteps * cfg["timestep_scaling"]
    options = {"c_skip": (0.25 / (scaled**2 + 0.25)).tolist(), "c_out": (scaled / np.sqrt(scaled**2 + 0.25)).tolist()}
    init = float(np.sqrt(1 + sigmas[0] ** 2))
    return Schedule(sigmas, timesteps.astype(np.float64), init, clip_denoised=clip_range(cfg), options=options)
