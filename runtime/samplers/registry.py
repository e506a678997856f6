"""The sampler table: A1111 labels, their diffusers counterparts, and label parsing ("DPM++ 2M Karras")."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from runtime.errors import InvalidRequestError
from runtime.samplers import ancestral, discrete, multistep, ode, restart

# sdrt's first five (diffusers configurations where the sampler has one), then the rest of A1111 1.10's, which run on
# the k-diffusion path (schedules_kd) wherever diffusers has no such configuration.
SCHEDULE_TYPES: tuple[str, ...] = (
    "default",
    "Karras",
    "Exponential",
    "SGM Uniform",
    "Beta",
    "Uniform",
    "Polyexponential",
    "KL Optimal",
    "Align Your Steps",
    "Simple",
    "Normal",
    "DDIM",
)

# Schedule type -> diffusers config override (REFERENCE.md section 1).
_SCHEDULE_OVERRIDES: dict[str, dict] = {
    "default": {},
    "Karras": {"use_karras_sigmas": True},
    "Exponential": {"use_exponential_sigmas": True},
    "SGM Uniform": {"timestep_spacing": "trailing"},
    "Beta": {"use_beta_sigmas": True},
}
_SPACING_ONLY = ("default", "SGM Uniform")
_ALL = tuple(_SCHEDULE_OVERRIDES)  # every type with a diffusers configuration
_A1111 = SCHEDULE_TYPES[1:]  # A1111's, "Automatic" aside


def _kd_types(diffusers_types: tuple[str, ...]) -> tuple[str, ...]:
    """The A1111 schedule types a k-diffusion sampler runs on sdrt's k-diffusion path: those diffusers lacks."""
    return tuple(t for t in _A1111 if t not in diffusers_types)


# A1111's sampler options (its k-diffusion samplers' keyword arguments), with A1111's defaults.
A1111_OPTIONS: tuple[str, ...] = ("s_churn", "s_tmin", "s_tmax", "s_noise")
# Euler, Heun, DPM2; s_tmax None: no upper bound (inf, which JSON listings of the options cannot hold)
_CHURN = (("s_churn", 0.0), ("s_tmin", 0.0), ("s_tmax", None), ("s_noise", 1.0))
# Ancestral and SDE samplers: A1111's ancestral eta (option eta_ancestral; diffusers runs 1) and the fresh noise's
# multiplier.
_ANCESTRAL = (("eta", 1.0), ("s_noise", 1.0))


def _check_option(sampler: str, name: str, value: object) -> float | None:
    """A number >= 0 (s_tmax may be inf or None, no bound); eta at most 1."""
    if name == "s_tmax" and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{sampler} option {name} must be a number, not {value!r}")
    value = float(value)
    if not value >= 0 or (math.isinf(value) and name != "s_tmax") or (name == "eta" and value > 1):
        bound = "between 0 and 1" if name == "eta" else "finite and >= 0" if name != "s_tmax" else ">= 0"
        raise InvalidRequestError(f"{sampler} option {name} must be {bound}, not {value!r}")
    return value


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # A1111 label
    description: str  # one line, names the algorithm / paper
    diffusers_class: str  # the diffusers scheduler it reproduces (or is closest to)
    sample_fn: Callable  # sample_x(model, x, schedule, noise, **options) -> x
    config_overrides: tuple[tuple[str, object], ...] = ()  # always passed to from_config (e.g. algorithm_type)
    schedule_types: tuple[str, ...] = _ALL  # schedule types this sampler accepts
    options: tuple[tuple[str, object], ...] = ()  # keyword options of sample_fn (eta, s_noise, ...)
    stochastic: bool = False  # calls noise() (ancestral / SDE)
    matches_diffusers: bool = True  # False: no exact diffusers counterpart (see description)
    schedule_variant: str | None = None  # sdrt's own schedule builder on top of diffusers_class's config
    aliases: tuple[str, ...] = ()  # A1111's aliases of the label (k_euler_a, ...); resolve_sampler accepts them
    # The k-diffusion path (schedules_kd): the schedule types run there, the per-step tables sample_fn reads
    # ("plain", "heun", "dpm2", "dpm2a", "2s", "sde", "lms", "multistep", "multistep_heun"), A1111's own schedule
    # type for "default"
    # of a sampler diffusers lacks (then "default" runs there too), and A1111's discard_next_to_last_sigma.
    kd_schedule_types: tuple[str, ...] = ()
    kd_tables: str = "plain"
    kd_default: str | None = None
    discard_penultimate: bool = False

    @property
    def accepted_schedule_types(self) -> tuple[str, ...]:
        """Every schedule type the sampler runs: the diffusers ones, then the k-diffusion path's."""
        return self.schedule_types + tuple(t for t in self.kd_schedule_types if t not in self.schedule_types)

    def on_diffusers(self, schedule_type: str) -> bool:
        """Whether `schedule_type` runs as diffusers' diffusers_class with diffusers_kwargs (else k-diffusion's)."""
        return self.kd_default is None and schedule_type in self.schedule_types

    def check_schedule_type(self, schedule_type: str) -> None:
        if schedule_type not in self.accepted_schedule_types:
            raise InvalidRequestError(
                f"schedule type {schedule_type!r} is not available for {self.name}; "
                f"choose one of: {', '.join(self.accepted_schedule_types)}"
            )

    @property
    def option_names(self) -> tuple[str, ...]:
        """The options with_options accepts (e.g. ("s_churn", "s_tmin", "s_tmax", "s_noise") for Euler)."""
        return tuple(name for name, _ in self.options)

    def with_options(self, **options: object) -> SamplerSpec:
        """A copy with sample_fn keyword options changed, e.g. SPECS["DDIM"].with_options(eta=0.5) (then stochastic:
        DDIM draws noise() at every step, as diffusers' DDIMScheduler.step(eta=...) does), or A1111's
        SPECS["Euler"].with_options(s_churn=1.0) (then stochastic: churned steps draw noise()). An option the sampler
        does not take, or a value out of range, raises InvalidRequestError naming it."""
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            takes = ", ".join(self.option_names) or "none"
            raise InvalidRequestError(f"{self.name} has no option {unknown[0]!r} (it takes: {takes})")
        checked = {name: _check_option(self.name, name, value) for name, value in options.items()}
        merged = {**dict(self.options), **checked}
        stochastic = self.stochastic or bool(merged.get("eta")) or bool(merged.get("s_churn"))
        return dataclasses.replace(self, options=tuple(merged.items()), stochastic=stochastic)

    def diffusers_kwargs(self, schedule_type: str) -> dict:
        """Overrides for `DiffusersClass.from_config(cfg, **kwargs)` giving this sampler's reference scheduler."""
        if schedule_type not in self.schedule_types:
            raise InvalidRequestError(
                f"schedule type {schedule_type!r} is not available for {self.name}; "
                f"choose one of: {', '.join(self.schedule_types)}"
            )
        return {**dict(self.config_overrides), **_SCHEDULE_OVERRIDES[schedule_type]}


_DPMPP = (("algorithm_type", "dpmsolver++"), ("solver_order", 2))
_SPECS: tuple[SamplerSpec, ...] = (
    SamplerSpec(
        "DDIM",
        "DDIM, denoising diffusion implicit models (Song et al. 2020); eta 0 deterministic, eta > 0 adds noise",
        "DDIMScheduler",
        discrete.sample_ddim,
        schedule_types=_SPACING_ONLY,
        options=(("eta", 0.0),),
        aliases=("ddim",),
        kd_schedule_types=_kd_types(_SPACING_ONLY),
    ),
    SamplerSpec(
        "PLMS",
        "PLMS, pseudo linear multistep (Liu et al. 2022, PNDM without the Runge-Kutta warm-up)",
        "PNDMScheduler",
        discrete.sample_plms,
        config_overrides=(("skip_prk_steps", True),),
        schedule_types=_SPACING_ONLY,
        aliases=("plms",),
    ),
    SamplerSpec(
        "Euler",
        "Euler method on the probability-flow ODE (Karras et al. 2022, 'Elucidating the design space')",
        "EulerDiscreteScheduler",
        ode.sample_euler,
        options=_CHURN,
        aliases=("k_euler",),
        kd_schedule_types=_kd_types(_ALL),
    ),
    SamplerSpec(
        "Euler a",
        "Euler ancestral: Euler step to sigma_down plus fresh noise up to the next level (k-diffusion)",
        "EulerAncestralDiscreteScheduler",
        ancestral.sample_euler_ancestral,
        schedule_types=_SPACING_ONLY,
        options=_ANCESTRAL,
        stochastic=True,
        aliases=("k_euler_a", "k_euler_ancestral"),
        kd_schedule_types=_kd_types(_SPACING_ONLY),
    ),
    SamplerSpec(
        "Heun",
        "Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1)",
        "HeunDiscreteScheduler",
        ode.sample_heun,
        options=_CHURN,
        aliases=("k_heun",),
        kd_schedule_types=_kd_types(_ALL),
        kd_tables="heun",
    ),
    SamplerSpec(
        "LMS",
        "Linear multistep, order 4, in sigma (k-diffusion's sample_lms)",
        "LMSDiscreteScheduler",
        ode.sample_lms,
        aliases=("k_lms",),
        kd_schedule_types=_kd_types(_ALL),
        kd_tables="lms",
    ),
    SamplerSpec(
        "DPM2",
        "DPM-Solver-2, midpoint in log sigma (Lu et al. 2022; k-diffusion's sample_dpm_2)",
        "KDPM2DiscreteScheduler",
        ode.sample_dpm_2,
        options=_CHURN,
        aliases=("k_dpm_2",),
        kd_schedule_types=_kd_types(_ALL),
        kd_tables="dpm2",
        discard_penultimate=True,
    ),
    SamplerSpec(
        "DPM2 a",
        "DPM-Solver-2 ancestral: DPM-Solver-2 to sigma_down plus fresh noise (k-diffusion's sample_dpm_2_ancestral)",
        "KDPM2AncestralDiscreteScheduler",
        ancestral.sample_dpm_2_ancestral,
        options=_ANCESTRAL,
        stochastic=True,
        aliases=("k_dpm_2_a",),
        kd_schedule_types=_kd_types(_ALL),
        kd_tables="dpm2a",
        discard_penultimate=True,
    ),
    SamplerSpec(
        "DPM++ 2M",
        "DPM-Solver++(2M), second-order multistep data-prediction solver (Lu et al. 2022)",
        "DPMSolverMultistepScheduler",
        multistep.sample_dpmpp_2m,
        config_overrides=_DPMPP,
        aliases=("k_dpmpp_2m",),
        kd_schedule_types=_kd_types(_ALL),
        kd_tables="multistep",
    ),
    SamplerSpec(
        "DPM++ 2M SDE",
        "DPM-Solver++(2M) SDE, second-order multistep stochastic solver (Lu et al. 2022), noise every step",
        "DPMSolverMultistepScheduler",
        multistep.sample_dpmpp_2m_sde,
        config_overrides=(("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2)),
        options=_ANCESTRAL,
        stochastic=True,
        aliases=("k_dpmpp_2m_sde",),
        kd_schedule_types=_kd_types(_ALL),
        kd_tables="multistep",
    ),
    SamplerSpec(
        "DPM++ 2M SDE Heun",
        "DPM-Solver++(2M) SDE with the Heun-type second-order term (Lu et al. 2022; k-diffusion's sample_dpmpp_2m_sde "
        "with solver_type heun), noise every step",
        "DPMSolverMultistepScheduler",
        multistep.sample_dpmpp_2m_sde,
        config_overrides=(("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2), ("solver_type", "heun")),
        options=_ANCESTRAL,
        stochastic=True,
        aliases=("k_dpmpp_2m_sde_heun",),
        kd_schedule_types=_kd_types(_ALL),
        kd_tables="multistep_heun",
    ),
    SamplerSpec(
        "DPM++ 3M SDE",
        "DPM-Solver++(3M) SDE, third-order multistep stochastic solver (k-diffusion's sample_dpmpp_3m_sde); A1111's "
        "schedule (Exponential, next-to-last level dropped); no diffusers counterpart",
        "DPMSolverMultistepScheduler",
        multistep.sample_dpmpp_3m_sde,
        schedule_types=("default",),
        options=_ANCESTRAL,
        stochastic=True,
        matches_diffusers=False,
        aliases=("k_dpmpp_3m_sde",),
        kd_schedule_types=_A1111,
        kd_default="Exponential",
        discard_penultimate=True,
    ),
    SamplerSpec(
        "Restart",
        "Restart sampling (Xu et al. 2023): Heun steps with A1111's automatic restart segments (from 20 steps), "
        "renoised from the seeded stream; A1111's schedule (Karras); no diffusers counterpart",
        "EulerDiscreteScheduler",
        restart.sample_restart,
        schedule_types=("default",),
        options=(),  # A1111 passes no s_* option to its restart sampler
        stochastic=True,
        matches_diffusers=False,
        aliases=("restart",),
        kd_schedule_types=_A1111,
        kd_default="Karras",
    ),
    SamplerSpec(
        "DPM fast",
        "DPM-Solver-Fast (Lu et al. 2022; k-diffusion's sample_dpm_fast): orders 3, 3, ..., evenly spaced in log "
        "sigma over the model's range, one model evaluation per step; A1111's eta 1 (ancestral); no diffusers "
        "counterpart",
        "DPMSolverSinglestepScheduler",
        restart.sample_dpm_fast,
        schedule_types=("default",),
        options=(("eta", 1.0), ("s_noise", 1.0)),
        stochastic=True,
        matches_diffusers=False,
        aliases=("k_dpm_fast",),
        kd_default="Uniform",
    ),
    SamplerSpec(
        "DPM adaptive",
        "DPM-Solver-23 with adaptive step size (Lu et al. 2022; k-diffusion's sample_dpm_adaptive) over the model's "
        "sigma range; the step count follows the error estimate, not the steps asked for; A1111's eta 1",
        "DPMSolverSinglestepScheduler",
        restart.sample_dpm_adaptive,
        schedule_types=("default",),
        options=(("eta", 1.0),),  # A1111 passes s_noise to DPM fast, not to DPM adaptive
        stochastic=True,
        matches_diffusers=False,
        aliases=("k_dpm_ad",),
        kd_default="Uniform",
    ),
    SamplerSpec(
        "DPM++ 2S a",
        "DPM-Solver++(2S) ancestral, k-diffusion's sample_dpmpp_2s_ancestral on EulerDiscreteScheduler's sigmas "
        "(no exact diffusers counterpart; DPMSolverSinglestepScheduler is closest)",
        "EulerDiscreteScheduler",
        ancestral.sample_dpmpp_2s_ancestral,
        options=_ANCESTRAL,
        stochastic=True,
        matches_diffusers=False,
        schedule_variant="dpmpp_2s",
        aliases=("k_dpmpp_2s_a",),
        kd_schedule_types=_kd_types(_ALL),
        kd_tables="2s",
    ),
    SamplerSpec(
        "DPM++ SDE",
        "DPM-Solver++ SDE (k-diffusion's sample_dpmpp_sde) on DPMSolverSDEScheduler's schedule; Brownian noise "
        "from two seeded draws per step instead of a torchsde Brownian tree",
        "DPMSolverSDEScheduler",
        ancestral.sample_dpmpp_sde,
        options=_ANCESTRAL,
        stochastic=True,
        matches_diffusers=False,
        aliases=("k_dpmpp_sde",),
        kd_schedule_types=_kd_types(_ALL),
        kd_tables="sde",
    ),
    SamplerSpec(
        "UniPC",
        "UniPC, unified predictor-corrector, order 2, B(h) = e^h - 1 (Zhao et al. 2023)",
        "UniPCMultistepScheduler",
        multistep.sample_unipc,
        aliases=("unipc",),
    ),
    SamplerSpec(
        "LCM",
        "Latent consistency model multistep sampling (Luo et al. 2023); needs an LCM-distilled UNet or LoRA",
        "LCMScheduler",
        discrete.sample_lcm,
        schedule_types=("default",),
        stochastic=True,
        aliases=("k_lcm",),
    ),
    SamplerSpec(
        "DDPM",
        "DDPM ancestral sampling over strided timesteps (Ho et al. 2020), fixed_small variance",
        "DDPMScheduler",
        discrete.sample_ddpm,
        schedule_types=_SPACING_ONLY,
        stochastic=True,
    ),
)

SPECS: dict[str, SamplerSpec] = {spec.name: spec for spec in _SPECS}
SAMPLER_NAMES: tuple[str, ...] = tuple(SPECS)
_ALIASES: dict[str, SamplerSpec] = {alias.lower(): spec for spec in _SPECS for alias in spec.aliases}


def _names_line() -> str:
    return ", ".join(SAMPLER_NAMES)


def resolve_sampler(name: str, schedule_type: str | None = None) -> tuple[SamplerSpec, str]:
    """'DPM++ 2M Karras' -> (spec, 'Karras'); case-insensitive. An unknown name, a schedule type the sampler
    lacks, or a label suffix that conflicts with `schedule_type` raises InvalidRequestError."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequestError(f"sampler name must be a non-empty string; valid names: {_names_line()}")
    label = " ".join(name.split()).lower()
    types = {t.lower(): t for t in SCHEDULE_TYPES}
    spec, suffix = _ALIASES.get(label), None
    for candidate in sorted(SPECS.values(), key=lambda s: -len(s.name)):  # "DPM++ 2M SDE" before "DPM++ 2M"
        base = candidate.name.lower()
        if spec is not None:
            break
        if label == base:
            spec = candidate
            break
        if label.startswith(base + " ") and label[len(base) + 1 :] in types:
            spec, suffix = candidate, types[label[len(base) + 1 :]]
            break
    if spec is None:
        raise InvalidRequestError(f"unknown sampler {name!r}; valid names: {_names_line()}")
    if schedule_type is not None:
        requested = types.get(" ".join(str(schedule_type).split()).lower())
        if requested is None:
            raise InvalidRequestError(
                f"unknown schedule type {schedule_type!r}; valid types: {', '.join(SCHEDULE_TYPES)}"
            )
        if suffix is not None and requested != suffix:
            raise InvalidRequestError(
                f"sampler label {name!r} names schedule type {suffix!r} but schedule type {requested!r} was given"
            )
        suffix = suffix or requested
    schedule = suffix or "default"
    spec.check_schedule_type(schedule)
    return spec, schedule
