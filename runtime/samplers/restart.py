"""Samplers that step on their own grid, not the schedule's levels: Restart (A1111's) and DPM fast (k-diffusion's).

Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes") as A1111 runs it.

Heun steps down the schedule; at the level nearest 0.1 the sampler jumps back up to the level nearest 2 by adding
fresh noise (forward process), and walks down again on a Karras segment, once or twice. The plan below is A1111's
restart_sampler's for its automatic restart list: below 20 steps no restart (plain Heun); from 20 steps a segment
of 9 steps once, from 36 steps steps // 4 twice, with the main schedule re-spaced (Karras, between the schedule's
ends) so the model evaluations stay about the same.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.samplers.ancestral import ancestral_step
from runtime.samplers.ode import Callback, Model, Noise
from runtime.samplers.schedule import Schedule
from runtime.samplers.sigmas import karras_sigmas


def restart_plan(sigmas: list[float]) -> list[tuple[float, float, float, int]]:
    """[(sigma, sigma_next, renoise, main step index or -1)] of every Heun step: renoise is the noise level added
    before the step (sqrt(sigma^2 - previous sigma_next^2) where the walk jumps up, else 0); restart segment steps
    carry index -1."""
    steps = len(sigmas) - 1
    restart = None
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        main = steps - restart_steps * restart_times
        sigmas = karras_sigmas(sigmas[-2], sigmas[0], main).tolist() + [0.0]
        restart = (restart_steps + 1, restart_times, 2.0)
    levels = np.array(sigmas)
    at = int(np.argmin(np.abs(levels - 0.1)))  # the step landing there is followed by the restart
    pairs: list[tuple[float, float, int]] = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1], i))
        if restart is not None and i + 1 == at:
            segment_steps, times, restart_max = restart
            top = int(np.argmin(np.abs(levels - restart_max)))
            if top < at:
                segment = karras_sigmas(sigmas[at], sigmas[top], segment_steps).tolist()
                pairs += list(zip(segment[:-1], segment[1:], [-1] * (segment_steps - 1))) * times
    plan, last = [], None
    for sigma, sigma_next, index in pairs:
        renoise = (sigma**2 - last**2) ** 0.5 if last is not None and last < sigma else 0.0
        plan.append((sigma, sigma_next, renoise, index))
        last = sigma_next
    return plan


def sample_restart(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    s_noise: float = 1.0,
) -> np.ndarray:
    """Restart sampling (A1111's restart_sampler): Heun steps (Euler into sigma 0) along restart_plan, noise() drawn
    at each jump back up. `callback(i, x)` after each step of the main schedule (index i of the plan), not inside
    restart segments; with 20 steps or more the re-spaced main schedule has fewer than n steps."""
    plan = restart_plan(schedule.sigmas.tolist())
    levels = np.array([level for step in plan for level in step[:2]])
    times = schedule.sigma_to_t(np.maximum(levels, 1e-10)).tolist()  # [2k] timesteps of each (sigma, sigma_next)
    for k, (sigma, sigma_next, renoise, index) in enumerate(plan):
        if renoise:
            x = x + noise() * (s_noise * renoise)
        denoised = model(x, sigma, times[2 * k])
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigma_next, times[2 * k + 1])
            d_2 = (x_2 - denoised_2) / sigma_next
            x = x + (d + d_2) / 2 * dt
        if callback is not None and index >= 0:
            x = callback(index, x)
    return x


def _dpm_fast_steps(sigma_max: float, sigma_min: float, nfe: int, eta: float) -> list[tuple[int, float, float, float]]:
    """[(order, t, t_to, sigma_up)] of DPM-Solver-Fast (k-diffusion's dpm_solver_fast) with t = -log sigma: nfe // 3
    + 1 steps evenly spaced in t, order 3 but for the last one or two; eta > 0 lands each step at sigma_down and adds
    sigma_up of noise."""
    m = nfe // 3 + 1
    ts = np.linspace(-math.log(sigma_max), -math.log(sigma_min), m + 1).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    steps = []
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_to, sigma_up = t_next, 0.0
        if eta:
            sigma_down, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
            t_to = min(ts[-1], -math.log(sigma_down))
            sigma_up = (math.exp(-2 * t_next) - math.exp(-2 * t_to)) ** 0.5
        steps.append((order, t, t_to, sigma_up))
    return steps


def sample_dpm_fast(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> np.ndarray:
    """DPM-Solver-Fast (Lu et al. 2022, fixed step size; k-diffusion's sample_dpm_fast) over the schedule's range,
    sigmas[0] down to sigmas[-2], with as many model evaluations as steps. A1111 runs it with eta 1 (its ancestral
    eta): noise() once per solver step. `callback(i, x)` after each solver step (fewer than the schedule's)."""
    sigmas = schedule.sigmas.tolist()
    plan = _dpm_fast_steps(sigmas[0], sigmas[-2], len(sigmas) - 1, eta)
    levels = [math.exp(-t - r * (t_to - t)) for _, t, t_to, _ in plan for r in (0.0, 1 / 3, 1 / 2, 2 / 3)]
    times = schedule.sigma_to_t(np.array(levels)).tolist()  # [4k] UNet timesteps of each step's stages

    def eps(x_: np.ndarray, k: int, stage: int) -> np.ndarray:
        sigma = levels[4 * k + stage]
        return (x_ - model(x_, sigma, times[4 * k + stage])) / sigma

    for k, (order, t, t_to, sigma_up) in enumerate(plan):
        h, sigma_to = t_to - t, math.exp(-t_to)
        e = eps(x, k, 0)
        x_next = x - (sigma_to * math.expm1(h)) * e
        if order == 2:  # midpoint stage r1 = 1/2
            u1 = x - (levels[4 * k + 2] * math.expm1(h / 2)) * e
            x_next = x_next - (sigma_to * math.expm1(h)) * (eps(u1, k, 2) - e)
        elif order == 3:  # stages r1 = 1/3, r2 = 2/3
            r1, r2 = 1 / 3, 2 / 3
            u1 = x - (levels[4 * k + 1] * math.expm1(r1 * h)) * e
            e1 = eps(u1, k, 1)
            sigma_2 = levels[4 * k + 3]
            u2 = (
                x
                - (sigma_2 * math.expm1(r2 * h)) * e
                - (sigma_2 * r2 / r1 * (math.expm1(r2 * h) / (r2 * h) - 1)) * (e1 - e)
            )
            x_next = x_next - (sigma_to / r2 * (math.expm1(h) / h - 1)) * (eps(u2, k, 3) - e)
        x = x_next + noise() * (sigma_up * s_noise)
        if callback is not None:
            x = callback(k, x)
    return x


def sample_dpm_adaptive(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    accept_safety: float = 0.81,
) -> np.ndarray:
    """DPM-Solver-23 with adaptive step size (Lu et al. 2022; k-diffusion's sample_dpm_adaptive, order 3, an I
    controller): each try takes a second-order (r1 = 1/3) and a third-order step, the RMS of their difference in
    units of atol + rtol |x| over the whole batch sets the next step size, and a try is kept when the controller
    accepts it (then noise() with A1111's eta 1). The step count depends on the model's outputs: the one sampler
    here that reads its arrays on the host. `callback(i, x)` after each accepted step."""
    sigmas = schedule.sigmas.tolist()
    t, t_end = -math.log(sigmas[0]), -math.log(sigmas[-2])
    h, order = h_init, 1.5 if eta else 3
    x_prev, accepted = x, 0

    def eps(x_: np.ndarray, t_: float) -> np.ndarray:
        sigma = math.exp(-t_)
        return (x_ - model(x_, sigma, float(schedule.sigma_to_t(np.array([sigma]))[0]))) / sigma

    while t < t_end - 1e-5:
        t_next = min(t_end, t + h)
        t_to, sigma_up = t_next, 0.0
        if eta:
            sigma_down, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
            t_to = min(t_end, -math.log(sigma_down))
            sigma_up = (math.exp(-2 * t_next) - math.exp(-2 * t_to)) ** 0.5
        step = t_to - t
        sigma_to, sigma_1, sigma_2 = math.exp(-t_to), math.exp(-t - step / 3), math.exp(-t - 2 * step / 3)
        e = eps(x, t)
        e1 = eps(x - (sigma_1 * math.expm1(step / 3)) * e, t + step / 3)
        base = x - (sigma_to * math.expm1(step)) * e
        x_low = base - (sigma_to * 1.5 * math.expm1(step)) * (e1 - e)  # sigma_to / (2 r1), r1 = 1/3
        u2 = x - (sigma_2 * math.expm1(2 * step / 3)) * e
        u2 = u2 - (sigma_2 * 2 * (math.expm1(2 * step / 3) / (2 * step / 3) - 1)) * (e1 - e)
        x_high = base - (sigma_to * 1.5 * (math.expm1(step) / step - 1)) * (eps(u2, t + 2 * step / 3) - e)
        delta = np.maximum(atol, rtol * np.maximum(np.abs(x_low), np.abs(x_prev)))
        error = float(np.linalg.norm(((x_low - x_high) / delta).astype(np.float64)) / math.sqrt(x.size))
        inv_error = 1 / (error + 1e-8)
        factor = 1 + math.atan(inv_error ** (1 / order) - 1)  # I controller (icoeff 1), atan limiter
        if factor >= accept_safety:
            x_prev = x_low
            x = x_high + noise() * (sigma_up * s_noise)
            t = t_next
            if callback is not None:
                x = callback(accepted, x)
            accepted += 1
        h *= factor
    return x
