"""Samplers native to the discrete VP chain (DDIM, PLMS, DDPM, LCM), written in VE form.

With a = alphas_cumprod = 1 / (1 + sigma^2), x_vp = sqrt(a) x, eps = (x - denoised) / sigma. A step lands on
`schedule.targets()[i]` and is re-expressed at sigmas[i+1] (x_vp is kept: x *= sqrt((1 + s_{i+1}^2) / (1 + s_to^2))),
which differs from 1 only where diffusers labels a sample with a timestep other than the one it stepped to.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.samplers.ode import Callback, Model, Noise
from runtime.samplers.schedule import Schedule


def _relabel(schedule: Schedule) -> list[float]:
    """[n] factor re-expressing a VE sample at the step's target level as one at sigmas[i+1] (same x_vp)."""
    targets = schedule.targets()
    return np.sqrt((1 + schedule.sigmas[1:] ** 2) / (1 + targets**2)).tolist()


def sample_ddim(
    model: Model, x: np.ndarray, schedule: Schedule, noise: Noise, eta: float = 0.0, callback: Callback | None = None
) -> np.ndarray:
    """DDIM (Song et al. 2020, eq. 12): x_to = denoised + sigma_down * eps + sigma_up * z, where in VE form
    sigma_up = eta * sqrt(var / a_to) with var = (1 - a_to) / (1 - a) * (1 - a / a_to); eta 0 is Euler in VE."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    a = 1 / (1 + schedule.sigmas[:-1] ** 2)
    a_to = 1 / (1 + schedule.targets() ** 2)
    variance = (1 - a_to) / (1 - a) * (1 - a / a_to)
    sigma_up = eta * np.sqrt(variance / a_to)
    sigma_down = np.sqrt((1 - a_to) / a_to - sigma_up**2).tolist()
    sigma_up, relabel = sigma_up.tolist(), _relabel(schedule)
    clip = schedule.clip_denoised
    for i in range(len(timesteps)):
        denoised = model(x, sigmas[i], timesteps[i])
        eps = (x - denoised) / sigmas[i]
        if clip != np.inf:
            denoised = np.clip(denoised, -clip, clip)
        x = denoised + sigma_down[i] * eps
        if eta > 0:
            x = x + sigma_up[i] * noise()
        if relabel[i] != 1.0:
            x = x * relabel[i]
        if callback is not None:
            x = callback(i, x)
    return x


def sample_ddpm(
    model: Model, x: np.ndarray, schedule: Schedule, noise: Noise, callback: Callback | None = None
) -> np.ndarray:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 7: posterior mean + sqrt(beta_tilde) noise, fixed_small),
    over the listed timesteps; in VE form x_next = w_denoised * denoised + w_x * x + sigma_noise * z."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    a, a_prev = 1 / (1 + schedule.sigmas[:-1] ** 2), 1 / (1 + schedule.sigmas[1:] ** 2)
    beta = 1 - a / a_prev  # beta of the strided chain
    w_denoised = (beta / (1 - a)).tolist()  # sqrt(a_prev) beta / (1 - a), divided by sqrt(a_prev)
    w_x = (np.sqrt(a / a_prev) * (1 - a_prev) / (1 - a) * np.sqrt(a / a_prev)).tolist()
    variance = np.maximum((1 - a_prev) / (1 - a) * beta, 1e-20)
    sigma_noise = np.sqrt(variance / a_prev).tolist()
    noise_steps, clip = schedule.options["noise_steps"], schedule.clip_denoised
    for i in range(len(timesteps)):
        denoised = model(x, sigmas[i], timesteps[i])
        if clip != np.inf:
            denoised = np.clip(denoised, -clip, clip)
        x = w_denoised[i] * denoised + w_x[i] * x
        if noise_steps[i]:
            x = x + sigma_noise[i] * noise()
        if callback is not None:
            x = callback(i, x)
    return x


def sample_lcm(
    model: Model, x: np.ndarray, schedule: Schedule, noise: Noise, callback: Callback | None = None
) -> np.ndarray:
    """Latent consistency model multistep sampling (Luo et al. 2023): consistency output
    c_out * denoised + c_skip * x_vp, re-noised to the next level except after the last step."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    c_skip, c_out = schedule.options["c_skip"], schedule.options["c_out"]
    c_skip_ve = [c / math.sqrt(1 + s**2) for c, s in zip(c_skip, sigmas)]  # x_vp = x / sqrt(1 + sigma^2)
    clip = schedule.clip_denoised
    n = len(timesteps)
    for i in range(n):
        denoised = model(x, sigmas[i], timesteps[i])
        if clip != np.inf:
            denoised = np.clip(denoised, -clip, clip)
        x = c_out[i] * denoised + c_skip_ve[i] * x
        if i != n - 1:
            x = x + sigmas[i + 1] * noise()
        if callback is not None:
            x = callback(i, x)
    return x


def _plms_tables(schedule: Schedule) -> tuple[list[float], list[float]]:
    """(from-level, to-level) of each step's transfer: sigmas[i] -> targets()[i]."""
    return schedule.sigmas[:-1].tolist(), schedule.targets().tolist()


def sample_plms(
    model: Model, x: np.ndarray, schedule: Schedule, noise: Noise, callback: Callback | None = None
) -> np.ndarray:
    """PLMS, pseudo linear multistep (Liu et al. 2022, "PNDM", skip_prk_steps): Adams-Bashforth on the model
    output with the DDIM transfer (in VE form x_to = x + (sigma_to - sigma) * eps); the first step is a trapezoid
    (Heun) step, then orders 2, 3, 4 reuse the first evaluation of step 0 and the later ones.

    Like diffusers, a v-prediction model's raw v outputs are what gets combined (options["combine"] == "v"),
    converted to eps with the sample being moved; eps models combine eps."""
    sigmas, timesteps = schedule.sigmas.tolist(), schedule.timesteps.tolist()
    froms, tos = _plms_tables(schedule)
    relabel = _relabel(schedule)
    sigma_2, t_2, sigma_from = (
        schedule.sigmas_mid[0].item(),
        schedule.timesteps_mid[0].item(),
        schedule.coeffs[0, 0].item(),
    )
    combine_v = schedule.options.get("combine") == "v"

    def output(x_: np.ndarray, denoised_: np.ndarray, sigma: float) -> np.ndarray:
        eps = (x_ - denoised_) / sigma
        return eps if not combine_v else (eps - sigma * denoised_) * (1 / math.sqrt(1 + sigma**2))  # v

    def transfer(x_: np.ndarray, sigma: float, sigma_to: float, out: np.ndarray) -> np.ndarray:
        if combine_v:  # eps = alpha v + sigma_vp x_vp at the from-level
            c = 1 / math.sqrt(1 + sigma**2)
            out = c * out + (sigma * c * c) * x_
        return x_ + (sigma_to - sigma) * out

    outs: list[np.ndarray] = []
    for i in range(len(timesteps)):
        denoised = model(x, sigmas[i], timesteps[i])
        out = output(x, denoised, sigmas[i])
        outs = (outs + [out])[-4:]
        if i == 0 and len(timesteps) > 1:  # warm-up: Euler predictor, then the averaged output from sigma_from
            x_2 = transfer(x, sigmas[0], tos[0], out)
            out_2 = output(x_2, model(x_2, sigma_2, t_2), sigma_2)
            x = x * math.sqrt((1 + sigma_from**2) / (1 + sigmas[0] ** 2))
            x = transfer(x, sigma_from, sigmas[1], (out + out_2) / 2)
            if callback is not None:
                x = callback(i, x)
            continue
        if len(outs) == 1:
            combined = out
        elif len(outs) == 2:
            combined = (3 * outs[-1] - outs[-2]) / 2
        elif len(outs) == 3:
            combined = (23 * outs[-1] - 16 * outs[-2] + 5 * outs[-3]) / 12
        else:
            combined = (55 * outs[-1] - 59 * outs[-2] + 37 * outs[-3] - 9 * outs[-4]) / 24
        x = transfer(x, froms[i], tos[i], combined)
        if relabel[i] != 1.0:
            x = x * relabel[i]
        if callback is not None:
            x = callback(i, x)
    return x
