"""The per-step callback of every sampler: called once per step after it, x at sigmas[i + 1], its return value is
what the sampler continues from (numpy only: an analytic model, no diffusers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from export.configs import SD15_SCHEDULER
from runtime.samplers import SAMPLER_NAMES, SPECS, make_schedule, sample

# DPM fast and DPM adaptive take their own steps between the model's largest and smallest sigma (k-diffusion's
# DPM-Solver-Fast and adaptive solver, as A1111 runs them), not the schedule's levels: their callbacks follow those
# steps (their results are checked against k-diffusion's samplers in test_samplers_kdiffusion.py)
OWN_STEPS = ("DPM fast", "DPM adaptive")
ON_LEVELS = [name for name in SAMPLER_NAMES if name not in OWN_STEPS]
SHAPE = (2, 4, 32, 32)  # [B, C, h, w]; 8192 values per step for the statistical level check
STEPS = 6


def model(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
    """A smooth nonlinear stand-in denoiser (any x -> denoised; no relation to a real UNet needed)."""
    return (x / math.sqrt(1 + sigma**2) + 0.1 * np.tanh(x) * math.cos(t / 150.0)).astype(np.float32)


def seeded_noise(seed: int = 0):
    rng = np.random.default_rng(seed)

    def noise() -> np.ndarray:
        return rng.standard_normal(SHAPE).astype(np.float32)

    return noise


def run(name: str, schedule, x: np.ndarray, callback=None, model_=model, seed: int = 0) -> np.ndarray:
    return sample(SPECS[name], model_, x, schedule, seeded_noise(seed), callback=callback)


def start(schedule) -> np.ndarray:
    return np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32) * schedule.init_noise_sigma


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_identity_callback_is_bit_identical(name: str) -> None:
    schedule = make_schedule(SPECS[name], "default", SD15_SCHEDULER, STEPS)
    x = start(schedule)
    plain = run(name, schedule, x)
    np.testing.assert_array_equal(run(name, schedule, x, callback=lambda i, x: x), plain)
    np.testing.assert_array_equal(run(name, schedule, x, callback=lambda i, x: x + 0), plain)  # a fresh copy


@pytest.mark.parametrize("steps", [1, STEPS])
@pytest.mark.parametrize("name", ON_LEVELS)
def test_callback_runs_once_per_step_and_feeds_the_next_step(name: str, steps: int) -> None:
    """i = 0..n-1 in order, and the x the callback returns is exactly the x of the next model evaluation."""
    schedule = make_schedule(SPECS[name], "default", SD15_SCHEDULER, steps)
    evaluated: list[np.ndarray] = []
    seen: list[tuple[int, int, np.ndarray]] = []  # (i, model calls so far, x returned)

    def recording_model(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        evaluated.append(x)
        return model(x, sigma, t)

    def callback(i: int, x: np.ndarray) -> np.ndarray:
        x = x + 0  # a new array: the sampler must continue from the returned one
        seen.append((i, len(evaluated), x))
        return x

    out = run(name, schedule, start(schedule), callback=callback, model_=recording_model)
    assert [i for i, _, _ in seen] == list(range(steps))
    for _, calls, x in seen[:-1]:
        assert evaluated[calls] is x
    assert out is seen[-1][2]


@pytest.mark.parametrize("name", ON_LEVELS)
def test_callback_sees_x_at_the_next_level(name: str) -> None:
    """denoised = x0 (single-point data): x - x0 = z * sigmas[i + 1] exactly for deterministic samplers, and has
    standard deviation sigmas[i + 1] for stochastic ones (the marginal of the forward process)."""
    spec = SPECS[name]
    schedule = make_schedule(spec, "default", SD15_SCHEDULER, STEPS)
    x0 = np.linspace(-1, 1, math.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    z = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    seen: dict[int, np.ndarray] = {}

    def callback(i: int, x: np.ndarray) -> np.ndarray:
        seen[i] = x
        return x

    run(name, schedule, x0 + z * schedule.sigmas[0], callback=callback, model_=lambda x, s, t: x0)
    assert sorted(seen) == list(range(STEPS))
    for i, x in seen.items():
        level = schedule.sigmas[i + 1]
        if not spec.stochastic or level == 0:
            np.testing.assert_allclose(x, x0 + z * level, rtol=0, atol=1e-4, err_msg=f"step {i}")
        else:
            assert abs(np.std(x - x0) / level - 1) < 0.05, f"step {i}: std {np.std(x - x0)}, level {level}"


# Single-step samplers: no state carries over between steps, so a replaced x is a fresh start from there.
SINGLE_STEP = ["Euler", "Heun", "DPM2", "DDIM", "Euler a", "DPM2 a"]
DRAWS_PER_STEP = {"Euler a": 1, "DPM2 a": 1}  # noise() calls of a step that does not end at sigma 0


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("name", SINGLE_STEP)
def test_replacing_x_restarts_a_single_step_sampler(name: str, k: int) -> None:
    """A callback returning y at step k == the sampler started from y at schedule.start_at(k + 1) (with the noise
    stream advanced by the draws of steps 0..k)."""
    schedule = make_schedule(SPECS[name], "default", SD15_SCHEDULER, STEPS)
    y = np.random.default_rng(4).standard_normal(SHAPE).astype(np.float32) * np.float32(schedule.sigmas[k + 1])
    replaced = run(name, schedule, start(schedule), callback=lambda i, x: y if i == k else x)
    noise = seeded_noise()
    for _ in range(DRAWS_PER_STEP.get(name, 0) * (k + 1)):
        noise()
    restarted = sample(SPECS[name], model, y, schedule.start_at(k + 1), noise)
    np.testing.assert_array_equal(replaced, restarted)


def test_euler_replaced_before_the_last_step_returns_the_denoised_of_y() -> None:
    """Hand-computed: the last Euler step into sigma 0 from y is x = y + (y - D(y)) / s * (0 - s) = D(y)."""
    schedule = make_schedule(SPECS["Euler"], "default", SD15_SCHEDULER, STEPS)
    y = np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32)
    out = run("Euler", schedule, start(schedule), callback=lambda i, x: y if i == STEPS - 2 else x)
    expected = model(y, schedule.sigmas[-2], schedule.timesteps[-1])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_replacing_x_keeps_multistep_state() -> None:
    """DPM++ 2M: after a replaced x the next step still uses old_denoised of the step before (diffusers keeps its
    model_outputs across a pipeline's latent blend), so it is the hand-computed 2M update, not a fresh Euler step."""
    schedule = make_schedule(SPECS["DPM++ 2M"], "default", SD15_SCHEDULER, STEPS)
    k = 2
    y = np.random.default_rng(6).standard_normal(SHAPE).astype(np.float32) * np.float32(schedule.sigmas[k + 1])
    seen: dict[int, np.ndarray] = {}
    evaluated: list[np.ndarray] = []

    def recording_model(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        evaluated.append(model(x, sigma, t))
        return evaluated[-1]

    def callback(i: int, x: np.ndarray) -> np.ndarray:
        seen[i] = y if i == k else x
        return seen[i]

    run("DPM++ 2M", schedule, start(schedule), callback=callback, model_=recording_model)
    s, s_next, s_prev = schedule.sigmas[k + 1], schedule.sigmas[k + 2], schedule.sigmas[k]
    h, h_last = math.log(s / s_next), math.log(s_prev / s)
    denoised, old_denoised = evaluated[k + 1], evaluated[k]  # D(y) and the denoised of step k
    r = h_last / h
    d_prime = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised  # Lu et al. 2022, Algorithm 2
    expected = (s_next / s) * y - math.expm1(-h) * d_prime
    np.testing.assert_allclose(seen[k + 1], expected, rtol=1e-5, atol=1e-5)
