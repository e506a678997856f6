"""A1111's schedule types on the k-diffusion path: noise levels from the model's training sigmas by A1111's formulas
(its modules/sd_schedulers.py), UNet timesteps by k-diffusion's sigma_to_t, and each sampler's per-step tables.

This is the path for every sampler x schedule combination diffusers has no configuration for (Euler a Karras, DDIM
Karras, anything with Align Your Steps, ...) and for the samplers that exist only in k-diffusion (DPM++ 3M SDE, ...).
As in A1111: x starts at unit noise * sigmas[0], the sampler returns the VE x at sigmas[-1] as the latents (also
when KL Optimal ends above 0), and the schedule is sigmas only: the UNet sees sigma_to_t(sigma), fractional.
"""

from __future__ import annotations

import functools

import numpy as np

from runtime.errors import InvalidRequestError
from runtime.samplers import sigmas as spacing
from runtime.samplers.ancestral import ancestral_step
from runtime.samplers.config import resolve_config, training_sigmas
from runtime.samplers.ode import lms_coefficients
from runtime.samplers.schedule import Schedule, check_steps

# Align Your Steps (Sabour et al. 2024) 10-step tables as A1111 ships them; SD 2.x uses the SD 1.x one there.
AYS_SIGMAS = {
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}
FAMILIES = ("sd1", "sd2", "sdxl")


def t_to_sigma(t: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Noise levels at fractional timesteps: linear interpolation in log sigma (k-diffusion's DiscreteSchedule)."""
    t = np.asarray(t, dtype=np.float64)
    low = np.floor(t).astype(np.int64)
    high = np.ceil(t).astype(np.int64)
    w = t - low
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


def _loglinear(table: tuple[float, ...], n: int) -> np.ndarray:
    """[n] levels interpolated linearly in log sigma over a descending table (A1111's loglinear_interp)."""
    xs = np.linspace(0, 1, len(table))
    ys = np.log(np.array(table[::-1]))
    return np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()


def a1111_sigmas(schedule_type: str, train: np.ndarray, n: int, family: str = "sd1") -> np.ndarray:
    """[m + 1] float64 noise levels of A1111's `schedule_type` for n steps over the training levels `train` [T]
    (ascending, float32); m = n except for "DDIM" (every T // n-th level from 1: m = ceil((T - 1) / (T // n)))."""
    log_sigmas = np.log(train.astype(np.float64))
    sigma_min, sigma_max = float(train[0]), float(train[-1])
    t_max = len(train) - 1
    zero = [0.0]
    if schedule_type in ("Uniform", "Normal"):  # Normal: linspace(t(sigma_max), t(sigma_min), n) = the same ramp
        return np.append(t_to_sigma(np.linspace(t_max, 0, n), log_sigmas), zero)
    if schedule_type == "SGM Uniform":
        return np.append(t_to_sigma(np.linspace(t_max, 0, n + 1)[:-1], log_sigmas), zero)
    if schedule_type == "Karras":
        return np.append(spacing.karras_sigmas(sigma_min, sigma_max, n), zero)
    if schedule_type in ("Exponential", "Polyexponential"):  # polyexponential at A1111's default rho 1
        return np.append(spacing.exponential_sigmas(sigma_min, sigma_max, n), zero)
    if schedule_type == "KL Optimal":  # ends at sigma_min, not 0
        ramp = np.arange(n + 1) / n
        return np.tan(ramp * np.arctan(sigma_min) + (1 - ramp) * np.arctan(sigma_max))
    if schedule_type == "Align Your Steps":
        table = AYS_SIGMAS["sdxl" if family == "sdxl" else "sd1"]
        levels = np.array(table) if n == len(table) else _loglinear(table, n)
        return np.append(levels, zero)
    if schedule_type == "Simple":
        stride = len(train) / n
        return np.append(train[[-(1 + int(i * stride)) for i in range(n)]].astype(np.float64), zero)
    if schedule_type == "DDIM":
        stride = max(len(train) // n, 1)
        return np.append(train[1::stride][::-1].astype(np.float64), zero)
    if schedule_type == "Beta":
        return np.append(spacing.beta_sigmas(sigma_min, sigma_max, n), zero)
    raise InvalidRequestError(f"unknown schedule type {schedule_type!r}")


def _timesteps(levels: np.ndarray, log_train: np.ndarray) -> np.ndarray:
    """UNet timesteps of levels (0 where the level is 0: never evaluated there)."""
    return np.where(levels > 0, spacing.sigma_to_t(levels, log_train), 0.0)


def _tables(kind: str, sigmas: np.ndarray, log_train: np.ndarray) -> dict:
    """The per-step tables `kind` of sampler reads besides sigmas / timesteps (see SamplerSpec.kd_tables)."""
    s, s_next = sigmas[:-1], sigmas[1:]
    if kind == "heun":
        return {"sigmas_mid": s_next.copy(), "timesteps_mid": _timesteps(s_next, log_train)}
    if kind in ("dpm2", "dpm2a", "2s"):
        downs = np.array([ancestral_step(a, b)[0] for a, b in zip(s.tolist(), s_next.tolist())])
        to = s_next if kind == "dpm2" else downs
        with np.errstate(divide="ignore"):
            mid = np.where(to > 0, np.exp((np.log(s) + np.log(np.maximum(to, 1e-300))) / 2), 0.0)
        return {"sigmas_mid": mid, "timesteps_mid": _timesteps(mid, log_train)}
    if kind == "sde":
        mid = np.sqrt(s * s_next)
        return {"sigmas_mid": mid, "timesteps_mid": _timesteps(mid, log_train)}
    if kind == "lms":
        return {"coeffs": lms_coefficients(sigmas)}
    if kind in ("multistep", "multistep_heun"):  # k-diffusion: first order at the start and into sigma 0
        orders = np.full(len(s), 2, dtype=np.int64)
        orders[0] = 1
        orders[s_next == 0] = 1
        return {"orders": orders, "options": {"solver_type": "heun" if kind == "multistep_heun" else "midpoint"}}
    return {}


def kdiffusion_schedule(
    kind: str,
    schedule_type: str,
    class_name: str,
    scheduler_config: dict,
    steps: int,
    discard_penultimate: bool = False,
    family: str = "sd1",
) -> Schedule:
    """The Schedule A1111 runs its k-diffusion sampler of `kind` on: A1111's `schedule_type` levels over the training
    sigmas of `scheduler_config` (read as `class_name` reads it), for `steps` steps (`discard_penultimate`: one more
    level, then the next-to-last dropped, as A1111 does for DPM2, DPM2 a and DPM++ 3M SDE)."""
    if family not in FAMILIES:
        raise InvalidRequestError(f"model family must be one of {', '.join(FAMILIES)}, not {family!r}")
    cfg = resolve_config(class_name, scheduler_config, {})
    check_steps(steps, cfg["num_train_timesteps"])
    train = training_sigmas(cfg)
    sigmas = a1111_sigmas(schedule_type, train, steps + 1 if discard_penultimate else steps, family)
    if discard_penultimate:
        sigmas = np.concatenate([sigmas[:-2], sigmas[-1:]])
    if np.any(np.diff(sigmas) >= 0):
        raise InvalidRequestError(f"steps={steps} is too many for the {schedule_type} schedule (noise levels repeat)")
    log_train = np.log(train)
    timesteps = _timesteps(sigmas[:-1], log_train)
    sigma_to_t = functools.partial(spacing.sigma_to_t, log_sigmas=log_train)
    tables = _tables(kind, sigmas, log_train)
    return Schedule(sigmas, timesteps, float(sigmas[0]), vp_output=False, sigma_to_t=sigma_to_t, **tables)
