"""Deterministic single-step ODE samplers in k-diffusion form: x = x0 + sigma * eps, d = (x - denoised) / sigma.

`model(x, sigma, t) -> denoised`; `noise()` is never called here.

Every sampler takes `callback(i, x) -> x`, called once after each step i = 0..n-1 with x at sigmas[i + 1] (VE); the
x it returns is the one the sampler continues from (4-channel inpainting blends the known latents back in there, as
diffusers' pipeline does between scheduler.step calls). Multistep state (old_denoised, ...) is kept as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from runtime.samplers.schedule import Schedule

Model = Callable[[np.ndarray, float, float], np.ndarray]
Noise = Callable[[], np.ndarray]
Callback = Callable[[int, np.ndarray], np.ndarray]  # (step i, x at sigmas[i + 1]) -> x to continue from


def sample_euler(
    model: Model, x: np.ndarray, schedule: Schedule, noise: Noise, callback: Callback | None = None
) -> np.ndarray:
    """Euler method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    for i in range(len(timesteps)):
        denoised = model(x, sigmas[i], timesteps[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            x = callback(i, x)
    return x


def sample_heun(
    model: Model, x: np.ndarray, schedule: Schedule, noise: Noise, callback: Callback | None = None
) -> np.ndarray:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); Euler for the last step to sigma 0.
    One callback per full step: diffusers' scheduler takes two step() calls here (interleaved timesteps), so its
    pipeline would also blend after the half step."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    sigmas_mid, timesteps_mid = schedule.sigmas_mid.tolist(), schedule.timesteps_mid.tolist()
    clip = schedule.clip_denoised  # diffusers' clip_sample (off for SD configs)
    for i in range(len(timesteps)):
        denoised = model(x, sigmas[i], timesteps[i])
        if clip != np.inf:
            denoised = np.clip(denoised, -clip, clip)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
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
    model: Model, x: np.ndarray, schedule: Schedule, noise: Noise, callback: Callback | None = None
) -> np.ndarray:
    """DPM-Solver-2 in k-diffusion's form (Lu et al. 2022, midpoint in log sigma; Karras et al. 2022 notation).
    One callback per full step: diffusers' scheduler takes two step() calls here (interleaved timesteps), so its
    pipeline would also blend after the half step."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    sigmas_mid, timesteps_mid = schedule.sigmas_mid.tolist(), schedule.timesteps_mid.tolist()
    for i in range(len(timesteps)):
        denoised = model(x, sigmas[i], timesteps[i])
        d = (x - denoised) / sigmas[i]
        if sigmas[i + 1] == 0:  # last step: Euler into sigma 0
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            x_2 = x + d * (sigmas_mid[i] - sigmas[i])
            denoised_2 = model(x_2, sigmas_mid[i], timesteps_mid[i])
            d_2 = (x_2 - denoised_2) / sigmas_mid[i]
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
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
