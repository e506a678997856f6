"""Multistep samplers: reuse the denoised outputs of earlier steps (local state, never hidden counters).

The per-step order comes from `schedule.orders` (warm-up and lower-order final steps exactly as diffusers runs them).
VP-native solvers are written in VE form: with lambda = -log(sigma), a data-prediction DPM-Solver++ step
x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) D in VP variables is x_t = (sigma_t / sigma_s) x_s - expm1(-h) D.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.samplers.ode import Callback, Model, Noise
from runtime.samplers.schedule import Schedule


def _log_snr_steps(sigmas: list[float]) -> tuple[list[float], list[float]]:
    """(h_i, ratio_i): log-SNR increments lambda_{i+1} - lambda_i and sigma_{i+1} / sigma_i, inf and 0 at sigma 0."""
    hs = [math.log(s / s_next) if s_next > 0 else math.inf for s, s_next in zip(sigmas[:-1], sigmas[1:])]
    return hs, [s_next / s for s, s_next in zip(sigmas[:-1], sigmas[1:])]


def _dpmpp_2m_tables(schedule: Schedule) -> tuple[list[float], list[float], list[float]]:
    """Per step (sigma ratio, weight of denoised, weight of denoised - old_denoised) of DPM-Solver++(2M)."""
    hs, ratios = _log_snr_steps(schedule.sigmas.tolist())
    heun = schedule.options.get("solver_type") == "heun"
    w_denoised, w_diff = [], []
    for i, (h, order) in enumerate(zip(hs, schedule.orders.tolist())):
        phi_1 = -math.expm1(-h)  # 1 - e^-h; 1 at sigma_next = 0
        w_denoised.append(phi_1)
        if order == 1:
            w_diff.append(0.0)
            continue
        r = hs[i - 1] / h  # D1 = (denoised - old_denoised) / r
        w_diff.append((1.0 - phi_1 / h if heun else 0.5 * phi_1) / r)
    return ratios, w_denoised, w_diff


def sample_dpmpp_2m(
    model: Model, x: np.ndarray, schedule: Schedule, noise: Noise, callback: Callback | None = None
) -> np.ndarray:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2; midpoint, or heun by solver_type)."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    ratios, w_denoised, w_diff = _dpmpp_2m_tables(schedule)
    old_denoised = None
    for i in range(len(timesteps)):
        denoised = model(x, sigmas[i], timesteps[i])
        x = ratios[i] * x + w_denoised[i] * denoised
        if w_diff[i]:
            x = x + w_diff[i] * (denoised - old_denoised)
        old_denoised = denoised
        if callback is not None:
            x = callback(i, x)
    return x


def sample_dpmpp_2m_sde(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    s_noise: float = 1.0,
    eta: float = 1.0,
) -> np.ndarray:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, "DPM-Solver++", SDE variant), as diffusers' sde-dpmsolver++ (eta 1):
    x_t = (sigma_t / sigma_s) e^-eta h x + (1 - e^-(1+eta)h) D + sigma_t sqrt(1 - e^-2 eta h) s_noise z, noise every
    step (s_noise, eta: A1111's, k-diffusion's noise multiplier and ancestral eta; 1 by default; eta 0 draws none,
    as k-diffusion's sample_dpmpp_2m_sde)."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    hs, ratios = _log_snr_steps(sigmas)
    heun = schedule.options.get("solver_type") == "heun"
    w_x, w_denoised, w_diff, w_noise = [], [], [], []
    for i, (h, order) in enumerate(zip(hs, schedule.orders.tolist())):
        h_eta = h * (1 + eta)
        phi = -math.expm1(-h_eta)  # 1 - e^-(1+eta)h; 1 at sigma_next = 0
        w_x.append(ratios[i] * math.exp(-h * eta) if ratios[i] else 0.0)
        w_denoised.append(phi)
        w_noise.append(sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise if ratios[i] else 0.0)
        r = hs[i - 1] / h if order > 1 else 1.0  # D1 = (denoised - old_denoised) / r
        w_diff.append(0.0 if order == 1 else (1 - phi / h_eta if heun else 0.5 * phi) / r)
    old_denoised = None
    for i in range(len(timesteps)):
        denoised = model(x, sigmas[i], timesteps[i])
        x = w_x[i] * x + w_denoised[i] * denoised
        if w_diff[i]:
            x = x + w_diff[i] * (denoised - old_denoised)
        if eta:
            x = x + w_noise[i] * noise()
        old_denoised = denoised
        if callback is not None:
            x = callback(i, x)
    return x


def sample_dpmpp_3m_sde(
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
    s_noise: float = 1.0,
    eta: float = 1.0,
) -> np.ndarray:
    """DPM-Solver++(3M) SDE, k-diffusion's sample_dpmpp_3m_sde: a third-order multistep data-prediction update from
    the last three denoised outputs (orders 1, 2, 3 while they accumulate), plus noise
    sigma_next sqrt(1 - e^-2 eta h) s_noise z (A1111's ancestral eta, 1 by default; 0 draws none); the step into
    sigma 0 returns denoised and draws nothing."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    hs, _ = _log_snr_steps(sigmas)
    denoised_1 = denoised_2 = None
    for i in range(len(timesteps)):
        denoised = model(x, sigmas[i], timesteps[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h_eta = hs[i] * (1 + eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1  # the order-2 weight; phi_2 / h_eta - 1/2 the order-3 one
            x = math.exp(-h_eta) * x + -math.expm1(-h_eta) * denoised
            if denoised_2 is not None:
                r0, r1 = hs[i - 1] / hs[i], hs[i - 2] / hs[i]
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif denoised_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (hs[i - 1] / hs[i])
            if eta:
                x = x + noise() * (sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta * hs[i])) * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        if callback is not None:
            x = callback(i, x)
    return x


def _unipc_rhos(rks: list[float], hh: float, b_h: float, order: int, corrector: bool) -> list[float]:
    """UniPC's rho coefficients (Zhao et al. 2023, Algorithm B(h)): solve R rho = b, R_ij = r_j^i."""
    rks = np.array(rks + [1.0])
    h_phi_k, factorial, b = math.expm1(hh) / hh - 1, 1, []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.stack([rks ** (i - 1) for i in range(1, order + 1)])
    if corrector:
        return [0.5] if order == 1 else np.linalg.solve(R, np.array(b)).tolist()
    if order == 2:
        return [0.5]
    return np.linalg.solve(R[:-1, :-1], np.array(b[:-1])).tolist()


def _unipc_update(lambdas: list[float], s: int, t: int, order: int, bh2: bool, corrector: bool) -> dict[int, float]:
    """Weights of one UniPC update from step s to level t, {step index: weight of its denoised}, using the outputs
    of steps s, s - 1, ..., s - order + 1 (the corrector also the new output at t, keyed t). In VE form:
    x_t = (sigma_t / sigma_s) x_s + sum_k weights[k] * denoised_k."""
    h = lambdas[t] - lambdas[s]  # inf into sigma 0
    hh = -h  # data prediction (predict_x0)
    h_phi_1 = math.expm1(hh)  # -1 into sigma 0
    b_h = math.expm1(hh) if bh2 else hh
    weights = {s: -h_phi_1}
    hist = range(s - 1, s - order, -1)
    rks = [(lambdas[k] - lambdas[s]) / h for k in hist]
    if not rks and not corrector:
        return weights
    rhos = _unipc_rhos(rks, hh, b_h, order, corrector)
    for rho, rk, k in zip(rhos, rks, hist):
        weights[k] = weights.get(k, 0.0) - b_h * rho / rk
        weights[s] += b_h * rho / rk
    if corrector:
        weights[t] = -b_h * rhos[-1]
        weights[s] += b_h * rhos[-1]
    return weights


def sample_unipc(
    model: Model, x: np.ndarray, schedule: Schedule, noise: Noise, callback: Callback | None = None
) -> np.ndarray:
    """UniPC (Zhao et al. 2023): UniP predictor + UniC corrector on data predictions, B(h) = e^h - 1 (bh2) or h.

    As in diffusers, the corrector at step i + 1 redoes step i from last_x, so an x returned by `callback` reaches
    the result only through the model evaluation at step i + 1 (and as the output after the last step)."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    n = len(timesteps)
    lambdas = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    orders = schedule.orders.tolist()
    bh2 = schedule.options.get("solver_type", "bh2") == "bh2"
    predictors = [_unipc_update(lambdas, i, i + 1, orders[i], bh2, False) for i in range(n)]
    correctors = [None] + [_unipc_update(lambdas, i - 1, i, orders[i - 1], bh2, True) for i in range(1, n)]
    ratios = [sigmas[i + 1] / sigmas[i] for i in range(n)]
    keep = max(orders, default=1) + 1
    outputs: dict[int, np.ndarray] = {}
    last_x = None
    for i in range(n):
        denoised = model(x, sigmas[i], timesteps[i])
        outputs[i] = denoised
        if correctors[i] is not None:  # UniC: redo the last step with the new output
            x = (sigmas[i] / sigmas[i - 1]) * last_x
            for k, w in correctors[i].items():
                x = x + w * outputs[k]
        outputs.pop(i - keep, None)  # later updates read at most the last `keep` outputs
        last_x = x
        x = ratios[i] * x
        for k, w in predictors[i].items():
            x = x + w * outputs[k]
        if callback is not None:
            x = callback(i, x)
    return x
