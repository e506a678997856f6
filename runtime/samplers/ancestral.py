"""Ancestral and SDE samplers: each step lands below the target level, then adds fresh noise back up to it.

`noise()` is called exactly where the matching diffusers scheduler draws `randn_tensor` (also where the draw is
multiplied by 0, e.g. the last step of Euler a), so seeded runs consume the generator stream identically. DPM++ 2S a
(k-diffusion only) and DPM++ SDE (a torchsde Brownian tree in diffusers) document their own draws.

Each takes A1111's (k-diffusion's) `s_noise`, the multiplier of the fresh noise: x += noise() * s_noise * sigma_up.
The default 1 skips the multiplication, so the result is bit for bit the one without the option. And each takes
A1111's ancestral `eta` (its option eta_ancestral, 1 by default; diffusers' schedulers run eta 1): sigma_up is eta
times the full ancestral noise level (k-diffusion's get_ancestral_step), 0 gives the deterministic step.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.samplers.ode import Callback, Model, Noise
from runtime.samplers.schedule import Schedule


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_to^2 (k-diffusion's get_ancestral_step)."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def _scaled(noise: Noise, s_noise: float) -> Noise:
    """noise() times s_noise (k-diffusion's order: draw * s_noise, then * sigma_up); noise itself for 1."""
    if s_noise == 1.0:
        return noise
    return lambda: noise() * s_noise


def _midpoints(schedule: Schedule, steps: list[tuple[float, float]], eta: float) -> tuple[list[float], list[float]]:
    """The second evaluation's levels and timesteps of DPM2 a / DPM++ 2S a: sqrt(sigma * sigma_down), the log-space
    midpoint towards sigma_down. The schedule's tables hold them for eta 1; another eta moves sigma_down, and the
    midpoints follow (timesteps by the schedule's sigma_to_t, as k-diffusion evaluates any level)."""
    if eta == 1.0:
        return schedule.sigmas_mid.tolist(), schedule.timesteps_mid.tolist()
    sigmas = schedule.sigmas.tolist()
    mids = [math.sqrt(sigma * down) for sigma, (down, _) in zip(sigmas, steps)]
    timesteps = schedule.sigma_to_t(np.maximum(np.array(mids), 1e-10)).tolist()
    return mids, [t if mid > 0 else 0.0 for t, mid in zip(timesteps, mids)]


def sample_euler_ancestral(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    s_noise: float = 1.0,
    eta: float = 1.0,
) -> np.ndarray:
    """Euler ancestral (k-diffusion's sample_euler_ancestral): Euler to sigma_down, noise of sigma_up."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    steps = [ancestral_step(sigmas[i], sigmas[i + 1], eta) for i in range(len(timesteps))]
    noise = _scaled(noise, s_noise)
    for i, (sigma_down, sigma_up) in enumerate(steps):
        denoised = model(x, sigmas[i], timesteps[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigma_down - sigmas[i])
        x = x + noise() * sigma_up
        if callback is not None:
            x = callback(i, x)
    return x


def sample_dpm_2_ancestral(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    s_noise: float = 1.0,
    eta: float = 1.0,
) -> np.ndarray:
    """DPM-Solver-2 to sigma_down plus noise of sigma_up (k-diffusion's sample_dpm_2_ancestral).
    One callback per full step: diffusers' scheduler takes two step() calls here (interleaved timesteps), so its
    pipeline would also blend after the half step."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    steps = [ancestral_step(sigmas[i], sigmas[i + 1], eta) for i in range(len(timesteps))]
    sigmas_mid, timesteps_mid = _midpoints(schedule, steps, eta)
    noise = _scaled(noise, s_noise)
    for i, (sigma_down, sigma_up) in enumerate(steps):
        denoised = model(x, sigmas[i], timesteps[i])
        d = (x - denoised) / sigmas[i]
        if sigma_down == 0:  # last step: Euler into sigma 0, no noise drawn
            x = x + d * (sigma_down - sigmas[i])
        else:
            x_2 = x + d * (sigmas_mid[i] - sigmas[i])
            denoised_2 = model(x_2, sigmas_mid[i], timesteps_mid[i])
            d_2 = (x_2 - denoised_2) / sigmas_mid[i]
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise() * sigma_up
        if callback is not None:
            x = callback(i, x)
    return x


def sample_dpmpp_2s_ancestral(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    s_noise: float = 1.0,
    eta: float = 1.0,
) -> np.ndarray:
    """DPM-Solver++(2S) ancestral, k-diffusion's sample_dpmpp_2s_ancestral (r = 1/2): a two-stage
    exponential-integrator step to sigma_down (midpoint sqrt(sigma * sigma_down)), then noise of sigma_up."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    steps = [ancestral_step(sigmas[i], sigmas[i + 1], eta) for i in range(len(timesteps))]
    sigmas_mid, timesteps_mid = _midpoints(schedule, steps, eta)
    noise = _scaled(noise, s_noise)
    for i, (sigma_down, sigma_up) in enumerate(steps):
        denoised = model(x, sigmas[i], timesteps[i])
        if sigma_down == 0:
            x = denoised + (x - denoised) * (sigma_down / sigmas[i])  # Euler into sigma 0
        else:
            # with t = -log(sigma), h = t_next - t: x_2 = (sigma_mid / sigma) x - expm1(-h / 2) denoised
            x_2 = (sigmas_mid[i] / sigmas[i]) * x + (1 - sigmas_mid[i] / sigmas[i]) * denoised
            denoised_2 = model(x_2, sigmas_mid[i], timesteps_mid[i])
            x = (sigma_down / sigmas[i]) * x + (1 - sigma_down / sigmas[i]) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise() * sigma_up
        if callback is not None:
            x = callback(i, x)
    return x


def sample_dpmpp_sde(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    s_noise: float = 1.0,
    eta: float = 1.0,
) -> np.ndarray:
    """DPM-Solver++ SDE, k-diffusion's sample_dpmpp_sde (r = 1/2), as diffusers' DPMSolverSDEScheduler (eta 1).

    Brownian noise without a Brownian tree: per step two draws z1, z2 (noise() twice); the normalised increment
    over [sigma_mid, sigma] is z1, the one over [sigma_next, sigma] is (sqrt(sigma - sigma_mid) z1 +
    sqrt(sigma_mid - sigma_next) z2) / sqrt(sigma - sigma_next): exactly a Brownian motion's joint law, fully
    determined by the seeded noise stream (so deterministic per seed, also per image with per-image generators).
    The last step (to sigma 0) is Euler and draws nothing."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    sigmas_mid, timesteps_mid = schedule.sigmas_mid.tolist(), schedule.timesteps_mid.tolist()
    for i in range(len(timesteps)):
        sigma, sigma_mid, sigma_next = sigmas[i], sigmas_mid[i], sigmas[i + 1]
        denoised = model(x, sigma, timesteps[i])
        if sigma_next == 0:  # last step: Euler into sigma 0, no noise drawn
            x = denoised + (x - denoised) * (sigma_next / sigma)
            if callback is not None:
                x = callback(i, x)
            continue
        down_1, up_1 = ancestral_step(sigma, sigma_mid, eta)
        z1 = noise()
        x_2 = (down_1 / sigma) * x + (1 - down_1 / sigma) * denoised + (z1 * s_noise if s_noise != 1 else z1) * up_1
        denoised_2 = model(x_2, sigma_mid, timesteps_mid[i])
        down_2, up_2 = ancestral_step(sigma, sigma_next, eta)
        z2 = noise()
        w = (math.sqrt(sigma - sigma_mid) * z1 + math.sqrt(sigma_mid - sigma_next) * z2) / math.sqrt(
            sigma - sigma_next
        )
        x = (down_2 / sigma) * x + (1 - down_2 / sigma) * denoised_2 + (w * s_noise if s_noise != 1 else w) * up_2
        if callback is not None:
            x = callback(i, x)
    return x
