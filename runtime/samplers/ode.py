"""Deterministic single-step ODE samplers in k-diffusion form: x = x0 + sigma * eps, d = (x - denoised) / sigma.

`model(x, sigma, t) -> denoised`; `noise()` is never called here.

Every sampler takes `callback(i, x) -> x`, called once after each step i = 0..n-1 with x at sigmas[i + 1] (VE); the
x it returns is the one the sampler continues from (4-channel inpainting blends the known latents back in there, as
diffusers' pipeline does between scheduler.step calls). Multistep state (old_denoised, ...) is kept as it is.

Euler, Heun and DPM2 take A1111's (k-diffusion's) churn options s_churn, s_tmin, s_tmax, s_noise (Karras et al.
2022, Algorithm 2): a step whose level lies in [s_tmin, s_tmax] first raises x from sigma to
sigma_hat = sigma (1 + gamma), gamma = min(s_churn / n, sqrt(2) - 1), adding noise() * s_noise *
sqrt(sigma_hat^2 - sigma^2), and evaluates the model at sigma_hat (its timestep by the schedule's sigma_to_t). That
is the only place they call noise(): once per churned step, before the step's first model evaluation, so each image's
seeded stream is drawn in step order. s_churn 0 (the default) draws nothing and changes no bit of the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from runtime.samplers.schedule import Schedule

Model = Callable[[np.ndarray, float, float], np.ndarray]
Noise = Callable[[], np.ndarray]
Callback = Callable[[int, np.ndarray], np.ndarray]  # (step i, x at sigmas[i + 1]) -> x to continue from


def churn_tables(
    schedule: Schedule, s_churn: float, s_tmin: float, s_tmax: float | None
) -> tuple[list[float], list[float], list[float]]:
    """Per step (sigma_hat, its UNet timestep, churn noise level sqrt(sigma_hat^2 - sigma^2)); without churn at step i
    (gamma 0) these are sigmas[i], timesteps[i] and 0. s_tmax None: no upper bound."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    n = len(timesteps)
    s_tmax = math.inf if s_tmax is None else s_tmax
    gamma = min(s_churn / n, 2**0.5 - 1) if n else 0.0
    churned = [gamma > 0 and s_tmin <= sigmas[i] <= s_tmax for i in range(n)]
    sigma_hats = [sigmas[i] * (gamma + 1) if churned[i] else sigmas[i] for i in range(n)]
    t_hats = list(timesteps)
    if any(churned):
        at = schedule.sigma_to_t(np.array(sigma_hats)).tolist()
        t_hats = [at[i] if churned[i] else timesteps[i] for i in range(n)]
    ups = [(sigma_hats[i] ** 2 - sigmas[i] ** 2) ** 0.5 if churned[i] else 0.0 for i in range(n)]
    return sigma_hats, t_hats, ups


def sample_euler(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
) -> np.ndarray:
    """Euler method on the probability-flow ODE (Karras et al. 2022, Algorithm 2; churn as k-diffusion's
    sample_euler)."""
    sigmas = schedule.sigmas.tolist()
    sigma_hats, t_hats, ups = churn_tables(schedule, s_churn, s_tmin, s_tmax)
    for i in range(len(t_hats)):
        if ups[i]:
            x = x + noise() * s_noise * ups[i]
        denoised = model(x, sigma_hats[i], t_hats[i])
        d = (x - denoised) / sigma_hats[i]
        x = x + d * (sigmas[i + 1] - sigma_hats[i])
        if callback is not None:
            x = callback(i, x)
    return x


def sample_heun(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
) -> np.ndarray:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1; churn as k-diffusion's sample_heun); Euler for
    the last step to sigma 0. One callback per full step: diffusers' scheduler takes two step() calls here
    (interleaved timesteps), so its pipeline would also blend after the half step."""
    sigmas = schedule.sigmas.tolist()
    sigmas_mid, timesteps_mid = schedule.sigmas_mid.tolist(), schedule.timesteps_mid.tolist()
    sigma_hats, t_hats, ups = churn_tables(schedule, s_churn, s_tmin, s_tmax)
    clip = schedule.clip_denoised  # diffusers' clip_sample (off for SD configs)
    for i in range(len(t_hats)):
        if ups[i]:
            x = x + noise() * s_noise * ups[i]
        denoised = model(x, sigma_hats[i], t_hats[i])
        if clip != np.inf:
            denoised = np.clip(denoised, -clip, clip)
        d = (x - denoised) / sigma_hats[i]
        dt = sigmas[i + 1] - sigma_hats[i]
        if sigmas[i + 1] == 0:  # last step: Euler into sigma 0
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas_mid[i], timesteps_mid[i])
            if clip != np.inf:
                denoised_2 = np.clip(denoised_2, -clip, clip)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
        if callback is not None:
            x = callback(i, x)
    return x


def sample_dpm_2(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float | None = None,
    s_noise: float = 1.0,
) -> np.ndarray:
    """DPM-Solver-2 in k-diffusion's form (Lu et al. 2022, midpoint in log sigma; Karras et al. 2022 notation; churn
    as k-diffusion's sample_dpm_2, the midpoint then taken from sigma_hat). One callback per full step: diffusers'
    scheduler takes two step() calls here (interleaved timesteps), so its pipeline would also blend after the half
    step."""
    sigmas = schedule.sigmas.tolist()
    sigmas_mid, timesteps_mid = schedule.sigmas_mid.tolist(), schedule.timesteps_mid.tolist()
    sigma_hats, t_hats, ups = churn_tables(schedule, s_churn, s_tmin, s_tmax)
    churned = [i for i, up in enumerate(ups) if up and sigmas[i + 1] > 0]
    if churned:  # the midpoint of a churned step lies between sigma_hat and sigma_next
        mids = [math.exp((math.log(sigma_hats[i]) + math.log(sigmas[i + 1])) / 2) for i in churned]
        mid_ts = schedule.sigma_to_t(np.array(mids)).tolist()
        for i, mid, mid_t in zip(churned, mids, mid_ts):
            sigmas_mid[i], timesteps_mid[i] = mid, mid_t
    for i in range(len(t_hats)):
        if ups[i]:
            x = x + noise() * s_noise * ups[i]
        denoised = model(x, sigma_hats[i], t_hats[i])
        d = (x - denoised) / sigma_hats[i]
        if sigmas[i + 1] == 0:  # last step: Euler into sigma 0
            x = x + d * (sigmas[i + 1] - sigma_hats[i])
        else:
            x_2 = x + d * (sigmas_mid[i] - sigma_hats[i])
            denoised_2 = model(x_2, sigmas_mid[i], timesteps_mid[i])
            d_2 = (x_2 - denoised_2) / sigmas_mid[i]
            x = x + d_2 * (sigmas[i + 1] - sigma_hats[i])
        if callback is not None:
            x = callback(i, x)
    return x


def lms_coefficients(sigmas: np.ndarray, max_order: int = 4) -> np.ndarray:
    """[n, max_order] linear-multistep weights: row i integrates, from sigma_i to sigma_{i+1}, the Lagrange basis
    polynomials through the last min(i + 1, max_order) levels (column j weights the derivative of step i - j).
    Gauss-Legendre with max_order points is exact for these polynomials (degree < max_order); diffusers
    integrates the same polynomials numerically (scipy quad)."""
    nodes, weights = np.polynomial.legendre.leggauss(max_order)
    levels = sigmas.tolist()
    table = np.zeros((len(levels) - 1, max_order))
    for i in range(len(levels) - 1):
        order = min(i + 1, max_order)
        half, mid = (levels[i + 1] - levels[i]) / 2, (levels[i + 1] + levels[i]) / 2
        taus = [mid + half * node for node in nodes.tolist()]
        for j in range(order):
            total = 0.0
            for tau, w in zip(taus, weights.tolist()):
                basis = 1.0
                for k in range(order):
                    if k != j:
                        basis *= (tau - levels[i - k]) / (levels[i - j] - levels[i - k])
                total += w * basis
            table[i, j] = half * total
    return table


def sample_lms(
    model: Model, x: np.ndarray, schedule: Schedule, noise: Noise, callback: Callback | None = None
) -> np.ndarray:
    """Linear multistep (Adams-Bashforth in sigma, order up to 4), k-diffusion's sample_lms."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    coeffs = schedule.coeffs.tolist()  # [n][4], weights of d_i, d_{i-1}, ...
    order = len(coeffs[0]) if coeffs else 0
    ds: list[np.ndarray] = []
    for i in range(len(timesteps)):
        denoised = model(x, sigmas[i], timesteps[i])
        ds.insert(0, (x - denoised) / sigmas[i])
        del ds[order:]
        for coeff, d in zip(coeffs[i], ds):  # after start_at() fewer derivatives than weights: zip truncates
            x = x + coeff * d
        if callback is not None:
            x = callback(i, x)
    return x
