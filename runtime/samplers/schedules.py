"""make_schedule's engine: diffusers' set_timesteps for each scheduler class, converted to VE noise levels.

This file holds the k-diffusion-style classes (float timesteps, VE sigmas: Euler, Heun, LMS, KDPM2, DPMSolverSDE)
and the dispatch; schedules_vp.py the VP-native ones. Each builder mirrors its class's float32 roundings and quirks
(noted inline), so sigmas and timesteps equal the diffusers scheduler's after set_timesteps.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np

from runtime.samplers import schedules_vp
from runtime.samplers import sigmas as spacing
from runtime.samplers.ancestral import ancestral_step
from runtime.samplers.config import resolve_config, training_sigmas
from runtime.samplers.ode import lms_coefficients
from runtime.samplers.schedule import Schedule, check_steps, clip_range, f32, spaced_timesteps


def _init_noise_sigma(cfg: dict, sigmas32: np.ndarray) -> float:
    """k-diffusion-style classes: sigma_max, or sqrt(sigma_max^2 + 1) with "leading" spacing (a diffusers quirk)."""
    sigma_max = float(np.max(sigmas32))
    return sigma_max if cfg["timestep_spacing"] in ("linspace", "trailing") else float(np.sqrt(sigma_max**2 + 1))


def _kdiffusion(
    cfg: dict, steps: int, round_converted: bool = False, karras_reads_config: bool = True
) -> tuple[np.ndarray, np.ndarray, float]:
    """(sigmas [n+1] float64 before diffusers' float32 rounding, timesteps [n] float32 or float64, init_noise_sigma)
    of Euler, Euler a, Heun, LMS, KDPM2(a) and DPMSolverSDE: sigmas interpolated at float timesteps, or converted
    (Karras, ...) with timesteps from sigma_to_t (`round_converted`: KDPM2 rounds the Karras ones)."""
    train = training_sigmas(cfg)
    timesteps = spaced_timesteps(cfg, steps)
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    converted = spacing.converted_sigmas(cfg, sigmas, steps, karras_reads_config)
    if converted is not None:
        sigmas = converted
        timesteps = spacing.sigma_to_t(sigmas, np.log(train))
        if round_converted and cfg.get("use_karras_sigmas"):
            timesteps = timesteps.round()
    last = float(train[0]) if cfg.get("final_sigmas_type") == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]])
    return sigmas, timesteps, _init_noise_sigma(cfg, sigmas.astype(np.float32))


def _sigma_to_t(cfg: dict) -> Callable[[np.ndarray], np.ndarray]:
    """Timesteps of arbitrary levels (churn's sigma_hat), by log-sigma interpolation of the training levels."""
    return functools.partial(spacing.sigma_to_t, log_sigmas=np.log(training_sigmas(cfg)))


def _euler(cfg: dict, steps: int) -> Schedule:
    sigmas, timesteps, init = _kdiffusion(cfg, steps)
    vp_output = cfg.get("final_sigmas_type", "zero") == "zero"
    return Schedule(f32(sigmas), f32(timesteps), init, vp_output=vp_output, sigma_to_t=_sigma_to_t(cfg))


def _heun(cfg: dict, steps: int) -> Schedule:
    """HeunDiscreteScheduler: the second evaluation of step i is at (sigma_{i+1}, t_{i+1}); Euler into sigma 0."""
    sigmas, timesteps, init = _kdiffusion(cfg, steps)
    sigmas, timesteps = f32(sigmas), f32(timesteps)
    mid_t = np.append(timesteps[1:], 0.0)
    mid = {"sigmas_mid": sigmas[1:], "timesteps_mid": mid_t}
    return Schedule(sigmas, timesteps, init, **mid, clip_denoised=clip_range(cfg), sigma_to_t=_sigma_to_t(cfg))


def _mid_timesteps(cfg: dict, sigmas_mid: np.ndarray) -> np.ndarray:
    return spacing.sigma_to_t(sigmas_mid, np.log(training_sigmas(cfg)))


def _kdpm2(cfg: dict, steps: int) -> Schedule:
    """KDPM2DiscreteScheduler: midpoint sigma exp(mean(log sigma_i, log sigma_{i+1})) (float32), timestep from
    sigma_to_t; timesteps stay float64 for converted (Karras, ...) schedules, float32 otherwise."""
    sigmas64, timesteps, init = _kdiffusion(cfg, steps, round_converted=True)
    sigmas32 = sigmas64.astype(np.float32)
    log_s = np.log(sigmas32[:-1])
    with np.errstate(divide="ignore"):
        log_next = np.log(sigmas32[1:])
    with np.errstate(invalid="ignore"):
        mid = np.exp(log_s - (log_s - log_next) * np.float32(0.5)).astype(np.float64)  # torch's lerp at weight 0.5
    return _with_midpoints(cfg, sigmas32, timesteps, init, mid)


def _with_midpoints(cfg: dict, sigmas32: np.ndarray, timesteps: np.ndarray, init: float, mid: np.ndarray) -> Schedule:
    """A KDPM2 schedule with its midpoint sigmas and their timesteps (the last midpoint is unused: Euler into 0)."""
    mid[-1] = 0.0
    mid_t = _mid_timesteps(cfg, mid)
    mid_t[-1] = 0.0
    if timesteps.dtype == np.float32:
        mid_t = f32(mid_t)
    sigmas, timesteps = f32(sigmas32), timesteps.astype(np.float64)
    return Schedule(sigmas, timesteps, init, sigmas_mid=mid, timesteps_mid=mid_t, sigma_to_t=_sigma_to_t(cfg))


def _kdpm2_ancestral(cfg: dict, steps: int) -> Schedule:
    """KDPM2AncestralDiscreteScheduler: the midpoint lies between sigma_i and sigma_down (float32), and the last
    step is plain Euler."""
    sigmas64, timesteps, init = _kdiffusion(cfg, steps, round_converted=True)
    sigmas32 = sigmas64.astype(np.float32)
    s, s_next = sigmas32[:-1], sigmas32[1:]
    sigma_up = np.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
    sigma_down = np.sqrt(s_next**2 - sigma_up**2)
    with np.errstate(divide="ignore"):
        log_s, log_down = np.log(s), np.log(sigma_down)
    with np.errstate(invalid="ignore"):
        mid = np.exp(log_down - (log_down - log_s) * np.float32(0.5)).astype(np.float64)  # torch's lerp at 0.5
    return _with_midpoints(cfg, sigmas32, timesteps, init, mid)


def _lms(cfg: dict, steps: int) -> Schedule:
    sigmas, timesteps, init = _kdiffusion(cfg, steps, karras_reads_config=False)
    sigmas = f32(sigmas)
    return Schedule(sigmas, f32(timesteps), init, coeffs=lms_coefficients(sigmas))


def _dpm_sde(cfg: dict, steps: int) -> Schedule:
    """DPMSolverSDEScheduler: float64 timesteps, midpoint sqrt(sigma_i sigma_{i+1}) with its sigma_to_t timestep
    (computed from the levels before their float32 rounding, as diffusers does)."""
    sigmas64, timesteps, init = _kdiffusion(cfg, steps, karras_reads_config=False)
    sigmas = f32(sigmas64)
    mid = np.sqrt(sigmas[:-1] * sigmas[1:])  # exp(-(t + (t_next - t) / 2)) with t = -log sigma; 0 for the last
    mid_t = np.append(_mid_timesteps(cfg, np.sqrt(sigmas64[:-2] * sigmas64[1:-1])), 0.0)
    return Schedule(sigmas, timesteps.astype(np.float64), init, sigmas_mid=mid, timesteps_mid=mid_t)


def _dpmpp_2s(cfg: dict, steps: int) -> Schedule:
    """DPM++ 2S a: EulerDiscreteScheduler's sigmas / timesteps; midpoint sqrt(sigma * sigma_down) of the ancestral
    step, its timestep by sigma_to_t (float32, like Euler's), as k-diffusion and A1111 evaluate it."""
    base = _euler(cfg, steps)
    s = base.sigmas.tolist()
    downs = np.array([ancestral_step(s[i], s[i + 1])[0] for i in range(steps)])
    mid = np.sqrt(base.sigmas[:-1] * downs)
    mid_t = f32(_mid_timesteps(cfg, mid))
    mid_t[downs == 0] = 0.0
    return Schedule(base.sigmas, base.timesteps, base.init_noise_sigma, sigmas_mid=mid, timesteps_mid=mid_t,
                    sigma_to_t=base.sigma_to_t)  # fmt: skip


BUILDERS: dict[str, Callable[[dict, int], Schedule]] = {
    "DDIMScheduler": schedules_vp.ddim,
    "PNDMScheduler": schedules_vp.pndm,
    "DDPMScheduler": schedules_vp.ddpm,
    "LCMScheduler": schedules_vp.lcm,
    "DPMSolverMultistepScheduler": schedules_vp.dpm_multistep,
    "UniPCMultistepScheduler": schedules_vp.unipc,
    "EulerDiscreteScheduler": _euler,
    "EulerAncestralDiscreteScheduler": _euler,
    "HeunDiscreteScheduler": _heun,
    "KDPM2DiscreteScheduler": _kdpm2,
    "KDPM2AncestralDiscreteScheduler": _kdpm2_ancestral,
    "LMSDiscreteScheduler": _lms,
    "DPMSolverSDEScheduler": _dpm_sde,
}
VARIANTS: dict[str, Callable[[dict, int], Schedule]] = {"dpmpp_2s": _dpmpp_2s}
VP_SAMPLES = (
    "DDIMScheduler",
    "PNDMScheduler",
    "DDPMScheduler",
    "LCMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
)  # classes whose samples between steps are VP (Schedule.vp_samples)


def build_schedule(
    class_name: str, scheduler_config: dict, overrides: dict, steps: int, variant: str | None = None
) -> Schedule:
    """Resolve the config as `class_name.from_config(scheduler_config, **overrides)` and run its set_timesteps
    (or sdrt's `variant` of it, e.g. "dpmpp_2s")."""
    cfg = resolve_config(class_name, scheduler_config, overrides)
    check_steps(steps, cfg["num_train_timesteps"])
    if variant:
        return VARIANTS[variant](cfg, steps)
    return dataclasses.replace(BUILDERS[class_name](cfg, steps), vp_samples=class_name in VP_SAMPLES)
