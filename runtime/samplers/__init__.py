"""Numpy samplers named like the A1111 web UI, each reproducing a diffusers scheduler in k-diffusion (VE) form.

spec, schedule_type = resolve_sampler("DPM++ 2M Karras")
schedule = make_schedule(spec, schedule_type, scheduler_config, steps)
x = unit_noise * schedule.init_noise_sigma
x = sample(spec, model, x, schedule, noise)          # model(x, sigma, t) -> denoised
latents = schedule.latents(x)                         # x / sqrt(1 + sigmas[-1]^2), see Schedule.latents

A1111's sampler options: spec.with_options(s_churn=..., s_tmin=..., s_tmax=..., s_noise=...) for the samplers whose
k-diffusion function takes them (spec.option_names lists what a sampler accepts; others raise InvalidRequestError).
"""

from __future__ import annotations

import numpy as np

from runtime.samplers.ode import Callback, Model, Noise
from runtime.samplers.registry import A1111_OPTIONS, SAMPLER_NAMES, SCHEDULE_TYPES, SPECS, SamplerSpec, resolve_sampler
from runtime.samplers.schedule import Schedule
from runtime.samplers.schedules import build_schedule
from runtime.samplers.schedules_kd import kdiffusion_schedule

__all__ = [
    "A1111_OPTIONS",
    "SAMPLER_NAMES",
    "SCHEDULE_TYPES",
    "SPECS",
    "SamplerSpec",
    "Schedule",
    "make_schedule",
    "resolve_sampler",
    "sample",
]


def make_schedule(
    spec: SamplerSpec, schedule_type: str, scheduler_config: dict, steps: int, family: str = "sd1"
) -> Schedule:
    """The step tables of `spec` for `steps` steps, mirroring diffusers' set_timesteps of spec.diffusers_class built
    with from_config(scheduler_config, **spec.diffusers_kwargs(schedule_type)), or, for a schedule type diffusers
    lacks (spec.on_diffusers false), A1111's k-diffusion schedule (schedules_kd; `family` "sd1", "sd2" or "sdxl"
    picks the Align Your Steps table). Bad steps or an unavailable schedule type -> InvalidRequestError."""
    spec.check_schedule_type(schedule_type)
    if spec.on_diffusers(schedule_type):
        overrides = spec.diffusers_kwargs(schedule_type)
        return build_schedule(spec.diffusers_class, scheduler_config, overrides, steps, spec.schedule_variant)
    kd_type = spec.kd_default if schedule_type == "default" else schedule_type
    return kdiffusion_schedule(
        spec.kd_tables, kd_type, spec.diffusers_class, scheduler_config, steps, spec.discard_penultimate, family
    )


def sample(
    spec: SamplerSpec,
    model: Model,
    x: np.ndarray,
    schedule: Schedule,
    noise: Noise,
    callback: Callback | None = None,
) -> np.ndarray:
    """Run `spec`'s sampler from x (VE, at schedule.sigmas[0]) through every step; returns float32 x at sigmas[-1].
    x is cast to float32 first (e.g. `init + noise * schedule.sigmas[0]` is float64 by numpy's promotion).
    `callback(i, x) -> x`, if given, runs after each step i = 0..n-1 on x at sigmas[i + 1] and replaces it (see
    runtime.samplers.ode)."""
    x = np.asarray(x, dtype=np.float32)
    return spec.sample_fn(model, x, schedule, noise, callback=callback, **dict(spec.options))
