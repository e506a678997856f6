"""Noise-level spacings (Karras, exponential, beta) and the sigma -> timestep map diffusers uses with them."""

from __future__ import annotations

import math

import numpy as np


def bounds(cfg: dict, in_sigmas: np.ndarray) -> tuple[float, float]:
    """(sigma_min, sigma_max): the config's values where set, else the ends of `in_sigmas` (descending)."""
    sigma_min = cfg.get("sigma_min")
    sigma_max = cfg.get("sigma_max")
    sigma_min = float(in_sigmas[-1]) if sigma_min is None else sigma_min
    sigma_max = float(in_sigmas[0]) if sigma_max is None else sigma_max
    return sigma_min, sigma_max


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """[n] float64 noise levels evenly spaced in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """[n] float64 noise levels evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """[n] float64 noise levels at the Beta(alpha, beta) quantiles of 1 - linspace(0, 1, n) (Lee et al. 2024,
    "Beta Sampling is All You Need")."""
    quantiles = [beta_ppf(p, alpha, beta) for p in 1 - np.linspace(0, 1, n)]
    return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles])


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of `sigmas`: linear interpolation in log sigma between neighbouring training
    levels, clamped to [0, T-1]. `log_sigmas` [T] ascending (float32 as diffusers keeps them)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # [n]
    dists = log_sigma[None, :] - log_sigmas[:, None]  # [T, n]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * (low_idx + 1)


def _betacf(x: float, a: float, b: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(x, a, b) / a
    return 1.0 - math.exp(log_front) * _betacf(1.0 - x, b, a) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """Inverse of `beta_cdf` in x (the Beta(a, b) quantile), by safeguarded Newton iteration."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    lo, hi, x = 0.0, 1.0, 0.5
    for _ in range(200):
        err = beta_cdf(x, a, b) - p
        if err > 0:
            hi = x
        else:
            lo = x
        pdf = math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))
        step = x - err / pdf
        x_new = step if lo < step < hi else 0.5 * (lo + hi)
        if abs(x_new - x) <= 1e-16 * max(x, 1e-300) or hi - lo < 1e-300:
            return x_new
        x = x_new
    return x


def converted_sigmas(
    cfg: dict, in_sigmas: np.ndarray, steps: int, karras_reads_config: bool = True
) -> np.ndarray | None:
    """Karras / exponential / beta levels between the ends of `in_sigmas` (descending), or None for none. The
    config's sigma_min / sigma_max override the ends, except for Karras in LMS and DPMSolverSDE (a diffusers quirk)."""
    lo, hi = bounds(cfg, in_sigmas)
    if cfg.get("use_karras_sigmas"):
        if not karras_reads_config:
            lo, hi = float(in_sigmas[-1]), float(in_sigmas[0])
        return karras_sigmas(lo, hi, steps)
    if cfg.get("use_exponential_sigmas"):
        return exponential_sigmas(lo, hi, steps)
    if cfg.get("use_beta_sigmas"):
        return beta_sigmas(lo, hi, steps)
    return None
