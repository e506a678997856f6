"""Schedules equal diffusers' set_timesteps for every sampler x schedule type x config x prediction type."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest

from export.configs import SD15_SCHEDULER
from runtime.errors import InvalidRequestError
from runtime.samplers import SAMPLER_NAMES, SCHEDULE_TYPES, SPECS, make_schedule

torch = pytest.importorskip("torch", reason="the reference schedulers need torch and diffusers (export extras)")
diffusers = pytest.importorskip("diffusers", reason="the reference schedulers need diffusers (export extras)")

# SD 1.5's scheduler_config.json (PNDM) and an SD 2.x-like DDIM one.
SD15 = SD15_SCHEDULER


def sd2_ddim(spacing: str) -> dict:
    return {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": spacing,
    }


CONFIGS = {"sd15": SD15, "sd2-leading": sd2_ddim("leading"), "sd2-trailing": sd2_ddim("trailing")}
PREDICTIONS = ("epsilon", "v_prediction")


def config(name: str, prediction_type: str) -> dict:
    return {**CONFIGS[name], "prediction_type": prediction_type}


def reference_scheduler(spec, schedule_type: str, cfg: dict, steps: int):
    """The diffusers scheduler the spec mirrors, after set_timesteps."""
    if spec.diffusers_class == "DPMSolverSDEScheduler":
        pytest.importorskip("torchsde", reason="diffusers' DPMSolverSDEScheduler needs torchsde")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = getattr(diffusers, spec.diffusers_class)
        scheduler = cls.from_config(cfg, **spec.diffusers_kwargs(schedule_type))
        scheduler.set_timesteps(steps)
    return scheduler


def _ve(alpha_cumprod) -> np.ndarray:
    a = np.asarray(alpha_cumprod, dtype=np.float64)
    return np.sqrt((1 - a) / a)


def reference_tables(scheduler) -> dict[str, np.ndarray]:
    """sigmas [n+1], timesteps [n] (+ mid-point tables) of a diffusers scheduler, converted to sdrt's layout."""
    name = type(scheduler).__name__
    ts = scheduler.timesteps.numpy().astype(np.float64)
    if name in ("DDIMScheduler", "PNDMScheduler"):
        ac = scheduler.alphas_cumprod.numpy()
        final = float(scheduler.final_alpha_cumprod)
        mid_t = ts[1:2]
        if name == "PNDMScheduler":  # [t0, t1, t1, t2, ...]: the repeated t1 is the warm-up's second evaluation
            ts = np.concatenate([ts[:1], ts[2:]])
        ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        prev = ts.astype(np.int64) - ratio
        sigmas_to = _ve(np.where(prev >= 0, ac[np.maximum(prev, 0)], final))
        sigmas = np.concatenate([_ve(ac[ts.astype(np.int64)]), sigmas_to[-1:]])
        tables = {"sigmas": sigmas, "timesteps": ts, "sigmas_to": sigmas_to}
        if name == "PNDMScheduler":
            tables["timesteps_mid"] = mid_t
        return tables
    if name in ("DDPMScheduler", "LCMScheduler"):  # the next listed timestep, alphas_cumprod 1 after the last
        ac = scheduler.alphas_cumprod.numpy()
        return {"sigmas": np.append(_ve(ac[ts.astype(np.int64)]), 0.0), "timesteps": ts}
    sigmas = scheduler.sigmas.numpy().astype(np.float64)
    if name in ("HeunDiscreteScheduler", "DPMSolverSDEScheduler"):  # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]
        tables = {"sigmas": np.concatenate([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]]), "timesteps": ts[::2]}
        # Heun's second evaluation is at the next level; DPMSolverSDE's at the geometric midpoint
        mid = tables["sigmas"][1:-1]
        tables["sigmas_mid"] = mid if name.startswith("Heun") else np.sqrt(tables["sigmas"][:-2] * mid)
        tables["timesteps_mid"] = ts[1::2]
        return tables
    if name.startswith("KDPM2"):  # sigmas [s0, s1, s1, ..., sn, sn, sn], timesteps [t0, tm0, t1, tm1, ...]
        interp = scheduler.sigmas_interpol.numpy().astype(np.float64)
        tables = {"sigmas": np.concatenate([sigmas[:1], sigmas[1:-1:2]]), "timesteps": ts[::2]}
        # the second evaluation of step k reads sigmas_interpol[2k + 1] (KDPM2) or [2k] (ancestral)
        tables["sigmas_mid"] = interp[0:-2:2] if "Ancestral" in name else interp[1:-1:2]
        tables["timesteps_mid"] = ts[1::2]
        return tables
    return {"sigmas": sigmas, "timesteps": ts}


def reference_init_noise_sigma(scheduler, sigma_0: float) -> float:
    """init_noise_sigma in VE: diffusers' value, times sqrt(1 + sigma_0^2) for the VP-native classes."""
    init = float(scheduler.init_noise_sigma)
    vp_native = type(scheduler).__name__ in (
        "DDIMScheduler",
        "PNDMScheduler",
        "DDPMScheduler",
        "LCMScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "UniPCMultistepScheduler",
    )
    return init * float(np.sqrt(1 + sigma_0**2)) if vp_native else init


CASES = [
    (name, schedule_type)
    for name, schedule_type in itertools.product(SAMPLER_NAMES, SCHEDULE_TYPES)
    if SPECS[name].on_diffusers(schedule_type)
]  # the k-diffusion path's types: tests/runtime/test_samplers_kdiffusion.py


# diffusers' KDPM2 set_timesteps costs ~10 ms per step (torch scalars in a Python loop): a smaller grid there.
_SLOW = ("DPM2", "DPM2 a")


def _grid(name: str):
    if name in _SLOW:
        return itertools.product(("sd15", "sd2-trailing"), (1, 7))
    return itertools.product(CONFIGS, (1, 7, 10, 25))


@pytest.mark.parametrize("name,schedule_type", CASES)
def test_schedule_matches_diffusers(name: str, schedule_type: str) -> None:
    """The prediction type does not enter set_timesteps (checked in test_prediction_type_leaves_timesteps), so one
    reference per config and step count serves both prediction types."""
    spec = SPECS[name]
    for cfg_name, steps in _grid(name):
        scheduler = reference_scheduler(spec, schedule_type, config(cfg_name, "epsilon"), steps)
        ref = reference_tables(scheduler)
        init = reference_init_noise_sigma(scheduler, float(ref["sigmas"][0]))
        for prediction in PREDICTIONS:
            ours = make_schedule(spec, schedule_type, config(cfg_name, prediction), steps)
            where = f"{name} {schedule_type} {cfg_name} {prediction} steps={steps}"
            np.testing.assert_allclose(ours.sigmas, ref["sigmas"], rtol=2e-6, atol=0, err_msg=where)
            np.testing.assert_allclose(ours.timesteps, ref["timesteps"], rtol=0, atol=1e-3, err_msg=where)
            for key in ("sigmas_to", "sigmas_mid", "timesteps_mid"):
                if key in ref:
                    ours_table = getattr(ours, key) if len(getattr(ours, key)) else ours.sigmas[1:]
                    ours_table = ours_table[: len(ref[key])]  # the last step's mid-point is unused (Euler into 0)
                    atol = 1e-3 if key == "timesteps_mid" else 0
                    np.testing.assert_allclose(ours_table, ref[key], rtol=2e-6, atol=atol, err_msg=f"{where} {key}")
            assert ours.init_noise_sigma == pytest.approx(init, rel=1e-6), where


def test_prediction_type_leaves_timesteps() -> None:
    for name in ("Euler", "DDIM", "DPM++ 2M", "UniPC"):
        eps = reference_scheduler(SPECS[name], "default", config("sd2-leading", "epsilon"), 9)
        v = reference_scheduler(SPECS[name], "default", config("sd2-leading", "v_prediction"), 9)
        assert torch.equal(eps.timesteps, v.timesteps)
        assert torch.equal(torch.as_tensor(eps.init_noise_sigma), torch.as_tensor(v.init_noise_sigma))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_unsupported_schedule_types_raise(name: str) -> None:
    spec = SPECS[name]
    for schedule_type in set(SCHEDULE_TYPES) - set(spec.accepted_schedule_types):
        with pytest.raises(InvalidRequestError, match="not available for"):
            make_schedule(spec, schedule_type, SD15, 10)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_step_counts_raise(steps) -> None:
    with pytest.raises(InvalidRequestError, match="steps must be an integer from 1 to 1000"):
        make_schedule(SPECS["Euler"], "default", SD15, steps)


def test_steps_that_repeat_timesteps_raise() -> None:
    with pytest.raises(InvalidRequestError, match="too many"):  # leading + steps_offset pushes t past 999
        make_schedule(SPECS["DDIM"], "default", SD15, 1000)
    with pytest.raises(InvalidRequestError, match="noise levels repeat"):  # linspace over 1001 points repeats
        make_schedule(SPECS["DPM++ 2M"], "default", SD15, 1000)


def test_unsupported_config_raises() -> None:
    with pytest.raises(InvalidRequestError, match="rescale_betas_zero_snr"):
        make_schedule(SPECS["Euler"], "default", {**SD15, "rescale_betas_zero_snr": True}, 10)
    with pytest.raises(InvalidRequestError, match="prediction_type"):
        make_schedule(SPECS["Euler"], "default", {**SD15, "prediction_type": "sample"}, 10)
    with pytest.raises(InvalidRequestError, match="beta_schedule"):
        make_schedule(SPECS["Euler"], "default", {**SD15, "beta_schedule": "quadratic"}, 10)


def test_config_sigma_bounds_and_linear_betas() -> None:
    """sigma_min / sigma_max in the config bound Karras levels; linear betas and class defaults fill the rest."""
    for cfg in ({**SD15, "sigma_min": 0.1, "sigma_max": 10.0}, {"num_train_timesteps": 1000}):
        for name in ("Euler", "DPM++ 2M"):
            ours = make_schedule(SPECS[name], "Karras", cfg, 12)
            ref = reference_tables(reference_scheduler(SPECS[name], "Karras", cfg, 12))
            np.testing.assert_allclose(ours.sigmas, ref["sigmas"], rtol=2e-6)
            np.testing.assert_allclose(ours.timesteps, ref["timesteps"], atol=1e-3)


def test_alphas_cumprod_bit_exact() -> None:
    from runtime.samplers.config import alphas_cumprod, resolve_config

    for cfg in (SD15, {"beta_schedule": "linear"}, {"beta_schedule": "squaredcos_cap_v2"}):
        ref = diffusers.DDIMScheduler.from_config(cfg).alphas_cumprod.numpy()
        ours = alphas_cumprod(resolve_config("DDIMScheduler", cfg, {}))
        assert np.array_equal(ours, ref)


def test_beta_quantiles_match_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    from runtime.samplers.sigmas import beta_ppf

    ps = np.linspace(0, 1, 101)
    ours = np.array([beta_ppf(p, 0.6, 0.6) for p in ps])
    np.testing.assert_allclose(ours, scipy_stats.beta.ppf(ps, 0.6, 0.6), rtol=1e-12, atol=1e-15)


def test_start_at_slices_tables_and_restarts_warmup() -> None:
    schedule = make_schedule(SPECS["DPM++ 2M"], "Karras", SD15, 20)
    part = schedule.start_at(5)
    assert part.steps == 15
    np.testing.assert_array_equal(part.sigmas, schedule.sigmas[5:])
    np.testing.assert_array_equal(part.timesteps, schedule.timesteps[5:])
    assert part.orders.tolist() == [1] + [2] * 13 + [1]
    with pytest.raises(InvalidRequestError, match="outside"):
        schedule.start_at(20)


def test_start_at_slices_per_step_options() -> None:
    """img2img's partial schedule keeps each step's constants with its timestep: LCM's boundary scalings
    (c_skip = sd^2 / ((10 t)^2 + sd^2), c_out = 10 t / sqrt((10 t)^2 + sd^2), sd = 0.5, timestep_scaling 10) and
    DDPM's "draw noise where t > 0"."""
    lcm = make_schedule(SPECS["LCM"], "default", SD15, 8).start_at(3)
    scaled = lcm.timesteps * 10.0
    np.testing.assert_allclose(lcm.options["c_skip"], 0.25 / (scaled**2 + 0.25), rtol=1e-12)
    np.testing.assert_allclose(lcm.options["c_out"], scaled / np.sqrt(scaled**2 + 0.25), rtol=1e-12)
    config = dict(SD15, steps_offset=0, timestep_spacing="leading")  # the last timestep is 0: no noise there
    ddpm = make_schedule(SPECS["DDPM"], "default", config, 10)
    part = ddpm.start_at(4)
    assert ddpm.timesteps[-1] == 0 and len(part.options["noise_steps"]) == part.steps == 6
    assert list(part.options["noise_steps"]) == (part.timesteps > 0).tolist()
