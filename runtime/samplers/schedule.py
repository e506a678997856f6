"""The per-request step tables every sampler reads (`Schedule`) and the timestep spacings diffusers uses."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from runtime.errors import InvalidRequestError


def _table():  # an empty per-step table: the sampler does not use it
    return field(default_factory=lambda: np.zeros(0))


@dataclass(frozen=True, eq=False)
class Schedule:
    """Noise levels and UNet timesteps of one request, in VE form (x = x0 + sigma * eps).

    Tables of length n are per step (options entries too); `start_at` slices every one of them.
    """

    sigmas: np.ndarray  # [n+1] float64 levels the sampler steps through; last 0, or > 0 (final_alpha_cumprod)
    timesteps: np.ndarray  # [n] float64 UNet timestep at step i, exactly as diffusers passes it
    init_noise_sigma: float  # unit noise * this = starting x (VE)
    sigmas_to: np.ndarray = _table()  # [n] level step i lands on, when diffusers' step differs from sigmas[i+1]
    sigmas_mid: np.ndarray = _table()  # [n] second-evaluation level of two-stage samplers (Heun, DPM2, PLMS warm-up)
    timesteps_mid: np.ndarray = _table()  # [n] its UNet timestep
    orders: np.ndarray = _table()  # [n] int, order of the multistep update at step i (1 at a fresh start)
    coeffs: np.ndarray = _table()  # [n, k] per-step coefficients fixed by the whole schedule (LMS)
    clip_denoised: float = np.inf  # clamp denoised to +-this (clip_sample of DDIM, DDPM, LCM); inf = off
    options: dict = field(default_factory=dict)  # per-scheduler constants (solver variant, LCM scalings ...)
    vp_output: bool = True  # diffusers returns x / sqrt(1 + sigmas[-1]^2); False: the VE x itself (see latents)
    vp_samples: bool = False  # diffusers' scheduler keeps x / sqrt(1 + sigma^2) between steps (DDIM, DPM-Solver ...)
    # [k] levels -> [k] UNet timesteps by the model's training levels (k-diffusion-style classes): churned levels
    sigma_to_t: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def latents(self, x: np.ndarray) -> np.ndarray:
        """The latents diffusers would return from sample()'s x: x / sqrt(1 + sigmas[-1]^2) (x itself when the last
        level is 0), except EulerDiscreteScheduler with final_sigmas_type="sigma_min", which returns VE x."""
        if not self.vp_output or self.sigmas[-1] == 0:
            return x
        return x * np.float32(1 / np.sqrt(1 + self.sigmas[-1] ** 2))

    def latents_after(self, i: int, x: np.ndarray) -> np.ndarray:
        """The latents diffusers holds after step i (sampling stopped there, its `_interrupt`) from the sampler's x
        at sigmas[i + 1]: x / sqrt(1 + sigmas[i + 1]^2) for the VP-native schedulers, else the VE x itself."""
        if i + 1 >= self.steps:
            return self.latents(x)
        if not self.vp_samples:
            return x
        return x * np.float32(1 / np.sqrt(1 + self.sigmas[i + 1] ** 2))

    def targets(self) -> np.ndarray:
        """[n] the level each step lands on (`sigmas_to` where set, else sigmas[1:])."""
        return self.sigmas_to if len(self.sigmas_to) else self.sigmas[1:]

    def start_at(self, index: int) -> Schedule:
        """Steps index..n-1 only (img2img), as diffusers' set_begin_index(index * scheduler.order) runs them:
        multistep samplers restart their warm-up, per-step coefficient tables keep their full-schedule values."""
        if not 0 <= index < self.steps:
            raise InvalidRequestError(f"start step {index} is outside the schedule's {self.steps} steps")
        sliced = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray) and len(value):
                sliced[f.name] = value[index:]
        if len(self.orders):
            warmup = np.arange(1, self.steps - index + 1)
            sliced["orders"] = np.minimum(self.orders[index:], warmup)
        options = {k: v[index:] if _per_step(v, self.steps) else v for k, v in self.options.items()}
        return dataclasses.replace(self, **sliced, options=options)


def _per_step(value, steps: int) -> bool:
    """Whether an options entry is a per-step table (LCM's scalings, DDPM's noise switch): a list or array of n."""
    return isinstance(value, (list, tuple, np.ndarray)) and len(value) == steps


def check_steps(steps: int, num_train_timesteps: int) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or not 1 <= steps <= num_train_timesteps:
        raise InvalidRequestError(f"steps must be an integer from 1 to {num_train_timesteps}, got {steps!r}")


def spaced_timesteps(cfg: dict, steps: int) -> np.ndarray:
    """[steps] descending timesteps of the k-diffusion-style schedulers (Euler, Heun, LMS, KDPM2, ...), float32
    as diffusers keeps them (Table 2 of Lin et al. 2023, "Common Diffusion Noise Schedules ... are Flawed")."""
    t_train = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, t_train - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = t_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + np.float32(cfg["steps_offset"])
    if spacing == "trailing":
        return np.arange(t_train, 0, -t_train / steps).round().astype(np.float32) - np.float32(1)
    raise InvalidRequestError(f"scheduler config timestep_spacing={spacing!r} is not supported")


def integer_timesteps(cfg: dict, steps: int) -> np.ndarray:
    """[steps] descending int64 timesteps of DDIM / DDPM (and PNDM's base grid, reversed)."""
    t_train = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, t_train - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, steps) * (t_train // steps)).round()[::-1].astype(np.int64) + cfg["steps_offset"]
    if spacing == "trailing":
        return np.round(np.arange(t_train, 0, -t_train / steps)).astype(np.int64) - 1
    raise InvalidRequestError(f"scheduler config timestep_spacing={spacing!r} is not supported")


def solver_timesteps(cfg: dict, steps: int, last_timestep: int, leading_base: int) -> np.ndarray:
    """[steps] int64 timesteps of the multistep solvers (DPM-Solver, UniPC): steps + 1 points, the last dropped.
    `leading_base` is what the class divides for "leading" (DPM-Solver: last_timestep, UniPC: num_train_timesteps)."""
    t_train = cfg["num_train_timesteps"]
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = leading_base // (steps + 1)
        return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
    if spacing == "trailing":
        return np.arange(last_timestep, 0, -t_train / steps).round().astype(np.int64) - 1
    raise InvalidRequestError(f"scheduler config timestep_spacing={spacing!r} is not supported")


def vp_to_ve(alphas_cumprod: np.ndarray) -> np.ndarray:
    """VE noise levels sqrt((1 - a) / a) of VP cumulative alphas, float64."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - a) / a)


def check_timesteps(timesteps: np.ndarray, cfg: dict, steps: int, name: str) -> None:
    if np.any(timesteps >= cfg["num_train_timesteps"]) or np.any(timesteps < 0):
        raise InvalidRequestError(
            f"steps={steps} is too many for {name} with this model's scheduler config (timesteps leave "
            f"0..{cfg['num_train_timesteps'] - 1}); use fewer steps"
        )


def check_sigmas(sigmas: np.ndarray, steps: int, name: str) -> None:
    if np.any(np.diff(sigmas) >= 0):
        raise InvalidRequestError(
            f"steps={steps} is too many for {name} with this model's scheduler config (noise levels repeat); "
            "use fewer steps"
        )


def f32(values: np.ndarray) -> np.ndarray:
    """float64 copy of values rounded to float32 (what diffusers keeps in its float32 tensors)."""
    return np.asarray(values).astype(np.float32).astype(np.float64)


def clip_range(cfg: dict) -> float:
    """diffusers' clip_sample as a clamp bound for denoised (inf: off)."""
    return cfg["clip_sample_range"] if cfg.get("clip_sample") else np.inf
