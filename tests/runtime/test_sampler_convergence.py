"""Convergence against exact probability-flow ODE solutions (float64, no model, no diffusers).

* Single-point data (denoised = x0): the ODE solution is linear in sigma, x(sigma) = x0 + sigma * z, so every
  deterministic sampler is exact and every sampler that ends at sigma 0 returns x0.
* Gaussian data x0 ~ N(mu, s^2): denoised = mu + s^2 / (s^2 + sigma^2) (x - mu), and the ODE solution is
  x(sigma) = mu + (x_T - mu) sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2)). The error at the end of a Karras schedule
  shrinks like N^-order; the fitted log-log slope must reach the sampler's order.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from export.configs import SD15_SCHEDULER
from runtime.samplers import SPECS, make_schedule, sample
from runtime.samplers.ode import lms_coefficients
from runtime.samplers.schedule import Schedule
from runtime.samplers.sigmas import karras_sigmas

SD15 = SD15_SCHEDULER
MU, S = 0.3, 0.5
SIGMA_MAX, SIGMA_END = 14.6, 0.05

# Global order of each deterministic sampler on a smooth (Karras) grid ending above 0, and why.
ORDERS = {
    "Euler": 1.0,  # Euler
    "DDIM": 1.0,  # eta 0: Euler in VE form
    "Heun": 2.0,
    "DPM2": 2.0,
    "DPM++ 2M": 2.0,  # second order after a first-order warm-up step (local error h^2 once)
    "LMS": 4.0,  # AB4 in sigma with exact weights (warm-up steps sit where the flow is nearly linear: 3.7 measured)
    "PLMS": 2.0,  # trapezoid warm-up, then AB 2-4 with uniform-step weights on a non-uniform sigma grid
    "UniPC": 3.0,  # UniP-2 + UniC: order 3 (Zhao et al. 2023, Theorem 3.1)
}


def gaussian_denoiser(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
    return MU + (S**2 / (S**2 + sigma**2)) * (x - MU)


def exact(x_start: np.ndarray, sigma_start: float, sigma_end: float) -> np.ndarray:
    return MU + (x_start - MU) * math.sqrt((S**2 + sigma_end**2) / (S**2 + sigma_start**2))


def grid_schedule(name: str, sigmas: np.ndarray) -> Schedule:
    """A schedule over arbitrary levels (no trailing 0) with the tables each sampler reads, built from the levels
    alone (independent of make_schedule)."""
    n = len(sigmas) - 1
    timesteps = np.linspace(999, 0, n)  # unused by the analytic denoiser
    base = Schedule(sigmas, timesteps, float(sigmas[0]))
    warmup = np.minimum(np.arange(1, n + 1), 2)
    if name == "Heun":
        return dataclasses.replace(base, sigmas_mid=sigmas[1:], timesteps_mid=timesteps)
    if name == "DPM2":
        return dataclasses.replace(base, sigmas_mid=np.sqrt(sigmas[:-1] * sigmas[1:]), timesteps_mid=timesteps)
    if name == "LMS":
        return dataclasses.replace(base, coeffs=lms_coefficients(sigmas))
    if name in ("DPM++ 2M", "UniPC"):
        return dataclasses.replace(
            base, orders=warmup, options={"solver_type": "midpoint" if "DPM" in name else "bh2"}
        )
    if name == "PLMS":
        tables = {"sigmas_mid": sigmas[1:], "timesteps_mid": timesteps, "coeffs": sigmas[:-1, None]}
        return dataclasses.replace(base, **tables, options={"combine": "eps"})
    return base


def run(name: str, sigmas: np.ndarray, x: np.ndarray) -> np.ndarray:
    spec = SPECS[name]
    return spec.sample_fn(gaussian_denoiser, x, grid_schedule(name, sigmas), None, **dict(spec.options))


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_error_shrinks_at_the_advertised_order(name: str) -> None:
    z = np.random.default_rng(0).standard_normal(256)
    x_start = MU + z * math.sqrt(S**2 + SIGMA_MAX**2)
    steps = np.array([24, 48, 96, 192])
    errors = []
    for n in steps:
        sigmas = karras_sigmas(SIGMA_END, SIGMA_MAX, n + 1)
        x = run(name, sigmas, x_start.copy())
        errors.append(np.max(np.abs(x - exact(x_start, SIGMA_MAX, SIGMA_END))))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    margin = 0.5 if name == "LMS" else 0.25
    assert slope > ORDERS[name] - margin, f"{name}: error slope {slope:.2f}, errors {errors}"
    assert np.all(np.diff(errors) < 0)


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_single_point_data_is_exact(name: str) -> None:
    """denoised = x0: the ODE path is a straight line in sigma and every deterministic sampler follows it."""
    x0 = np.linspace(-1, 1, 64)
    z = np.random.default_rng(1).standard_normal(64)
    sigmas = karras_sigmas(SIGMA_END, SIGMA_MAX, 8)
    x = SPECS[name].sample_fn(lambda x, s, t: x0, x0 + SIGMA_MAX * z, grid_schedule(name, sigmas), None)
    np.testing.assert_allclose(x, x0 + SIGMA_END * z, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_sampler_lands_on_single_point_data(name: str) -> None:
    """Real schedules (ending at 0 or at final_alpha_cumprod), stochastic samplers included: the final latent is x0
    (up to the last level's noise, sigma_end * eps, for schedules that end above 0)."""
    spec = SPECS[name]
    x0 = np.linspace(-1, 1, 2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
    rng = np.random.default_rng(2)
    schedule = make_schedule(spec, "default", SD15, 12)
    z = rng.standard_normal(x0.shape).astype(np.float32)

    def noise() -> np.ndarray:
        return rng.standard_normal(x0.shape).astype(np.float32)

    x = sample(spec, lambda x, s, t: x0, x0 + z * schedule.init_noise_sigma, schedule, noise)
    if name in ("DPM fast", "DPM adaptive"):  # k-diffusion stops these at the smallest sigma, with its noise
        np.testing.assert_allclose(x, x0, atol=1e-4 + 5 * schedule.sigmas[-2])
        return
    latents = x / math.sqrt(1 + schedule.sigmas[-1] ** 2)
    atol = 1e-4 + 1.5 * schedule.sigmas[-1] * (1 if spec.stochastic else np.abs(z).max())
    np.testing.assert_allclose(latents, x0 / math.sqrt(1 + schedule.sigmas[-1] ** 2), atol=atol)
