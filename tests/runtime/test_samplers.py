"""Loop parity: each sampler's sample() equals the diffusers scheduler loop driven by the same analytic UNet."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from runtime.errors import InvalidRequestError
from runtime.samplers import SAMPLER_NAMES, SCHEDULE_TYPES, SPECS, make_schedule, resolve_sampler, sample
from tests.runtime.test_schedules import SD15, config, reference_scheduler  # skips this module without diffusers

torch = pytest.importorskip("torch")
randn_tensor = pytest.importorskip("diffusers.utils.torch_utils").randn_tensor

SHAPE = (2, 4, 8, 8)  # [B, C, h, w]
SEEDS = (1, 2)


# alphas_cumprod of the SD configs (scaled_linear 0.00085..0.012, 1000 steps), float64, for the stand-in UNet.
ALPHAS_CUMPROD = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


def _alpha(t: float) -> float:
    """alphas_cumprod linearly interpolated at a (possibly fractional) timestep."""
    i0 = min(int(math.floor(t)), 998)
    w = t - i0
    return float((1 - w) * ALPHAS_CUMPROD[i0] + w * ALPHAS_CUMPROD[i0 + 1])


def unet_torch(x: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Analytic stand-in for the UNet: the exact eps of unit-Gaussian data, sqrt(1 - a_t) x, plus smooth nonlinear
    terms in x and t; as v when the config says v_prediction."""
    t = float(t)
    a = _alpha(t)
    mix = torch.roll(x, shifts=1, dims=1)
    eps = math.sqrt(1 - a) * x + 0.1 * torch.tanh(x) * math.cos(t / 150.0) + 0.05 * torch.sin(mix)
    if prediction_type == "epsilon":
        return eps
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return math.sqrt(a) * eps - math.sqrt(1 - a) * x0


def unet_numpy(x: np.ndarray, t: float, prediction_type: str) -> np.ndarray:
    a = _alpha(t)
    mix = np.roll(x, 1, axis=1)
    eps = math.sqrt(1 - a) * x + 0.1 * np.tanh(x) * math.cos(t / 150.0) + 0.05 * np.sin(mix)
    if prediction_type == "epsilon":
        return eps
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return math.sqrt(a) * eps - math.sqrt(1 - a) * x0


def ve_model(prediction_type: str):
    """model(x, sigma, t) -> denoised for a VE x: input scaling c_in = 1 / sqrt(sigma^2 + 1), eps or v output."""

    def model(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        c_in = 1.0 / math.sqrt(sigma**2 + 1.0)
        out = unet_numpy(x * c_in, t, prediction_type).astype(np.float32)
        if prediction_type == "epsilon":
            return x - sigma * out
        return x * (1.0 / (sigma**2 + 1.0)) - out * (sigma * c_in)  # v: c_skip x + c_out v

    return model


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in SEEDS]


def torch_noise(gens: list[torch.Generator]):
    def noise() -> np.ndarray:
        return randn_tensor(SHAPE, generator=gens, dtype=torch.float32).numpy()

    return noise


def run_diffusers(spec, schedule_type: str, cfg: dict, steps: int, begin: int | None = None, init=None):
    """The pipeline's loop: latents = randn * init_noise_sigma (or img2img add_noise), scale_model_input, step."""
    scheduler = reference_scheduler(spec, schedule_type, cfg, steps)
    gens = generators()
    latents = randn_tensor(SHAPE, generator=gens, dtype=torch.float32)
    timesteps = scheduler.timesteps
    if begin is None:
        latents = latents * scheduler.init_noise_sigma
    elif spec.diffusers_class == "PNDMScheduler":
        # The pipeline's slice of PNDM's [t0, t1, t1, t2, ...] drops the warm-up's repeated entry (a diffusers
        # bug, see schedules._pndm); step PNDM through a correct restart [t_k, t_k+1, t_k+1, t_k+2, ...] instead.
        full = timesteps[2:] if len(timesteps) > 2 else timesteps
        base = torch.cat([timesteps[:1], full])  # t0, t1, ..., t_{n-1}
        timesteps = torch.cat([base[begin : begin + 2], base[begin + 1 :]])
        latents = scheduler.add_noise(torch.from_numpy(init), latents, timesteps[:1].repeat(SHAPE[0]))
    else:  # img2img: the pipeline's get_timesteps + prepare_latents
        timesteps = timesteps[begin * scheduler.order :]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin * scheduler.order)
        latents = scheduler.add_noise(torch.from_numpy(init), latents, timesteps[:1].repeat(SHAPE[0]))
    # DDIM's eta (diffusers' ancestral schedulers take none: they run eta 1); A1111's churn options stay at defaults
    step_kwargs = {k: v for k, v in spec.options if k == "eta" and spec.diffusers_class == "DDIMScheduler"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            out = unet_torch(model_input, t, cfg["prediction_type"])
            extra = {"generator": gens} if spec.stochastic or step_kwargs.get("eta") else {}
            latents = scheduler.step(out, t, latents, **step_kwargs, **extra).prev_sample
    return latents.numpy()


def run_ours(spec, schedule_type: str, cfg: dict, steps: int, begin: int | None = None, init=None):
    schedule = make_schedule(spec, schedule_type, cfg, steps)
    noise = torch_noise(generators())
    if begin is None:
        x = noise() * schedule.init_noise_sigma
    else:
        schedule = schedule.start_at(begin)
        x = init + noise() * schedule.sigmas[0]
    x = sample(spec, ve_model(cfg["prediction_type"]), x, schedule, noise)
    assert x.dtype == np.float32
    latents = schedule.latents(x)
    if schedule.vp_output:
        np.testing.assert_allclose(latents, x / math.sqrt(1 + schedule.sigmas[-1] ** 2), rtol=1e-6)
    return latents


def assert_parity(name: str, schedule_type: str, cfg: dict, steps: int, **kwargs) -> None:
    spec = SPECS[name]
    ours = run_ours(spec, schedule_type, cfg, steps, **kwargs)
    ref = run_diffusers(spec, schedule_type, cfg, steps, **kwargs)
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=f"{name} {schedule_type} steps={steps}")


PARITY = [
    (name, schedule_type)
    for name in SAMPLER_NAMES
    for schedule_type in SCHEDULE_TYPES
    if SPECS[name].on_diffusers(schedule_type) and SPECS[name].matches_diffusers
]


@pytest.mark.parametrize("name,schedule_type", PARITY)
def test_loop_matches_diffusers(name: str, schedule_type: str) -> None:
    """SD 1.5 config, epsilon: 10 steps, and 13 for multistep samplers (lower-order final steps below 15)."""
    for steps in (10, 13) if name in MULTISTEP else (10,):
        assert_parity(name, schedule_type, config("sd15", "epsilon"), steps)


V_PARITY = [(n, t) for n, t in PARITY if t in ("default", "Karras")]


@pytest.mark.parametrize("name,schedule_type", V_PARITY)
def test_loop_matches_diffusers_v_prediction(name: str, schedule_type: str) -> None:
    """SD 2-like DDIM config ("leading"), v_prediction."""
    assert_parity(name, schedule_type, config("sd2-leading", "v_prediction"), 10)


@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if SPECS[n].matches_diffusers])
def test_single_step_matches_diffusers(name: str) -> None:
    assert_parity(name, "default", config("sd15", "epsilon"), 1)


MULTISTEP = {"DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "UniPC", "LMS", "PLMS"}


@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if SPECS[n].matches_diffusers])
def test_trailing_spacing_matches_diffusers(name: str) -> None:
    """SD2-like DDIM config with "trailing" spacing, 7 steps (does not divide 1000: DDIM's relabelling quirk)."""
    assert_parity(name, "default", config("sd2-trailing", "v_prediction"), 7)


@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if SPECS[n].matches_diffusers])
def test_img2img_start_at_matches_diffusers(name: str) -> None:
    """start_at(k) + init + noise * sigmas[0] equals diffusers' add_noise + set_begin_index + sliced timesteps."""
    init = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    assert_parity(name, "default", config("sd15", "epsilon"), 10, begin=4, init=init)


def test_ddim_eta_matches_diffusers() -> None:
    spec = SPECS["DDIM"].with_options(eta=0.7)
    assert spec.stochastic and not SPECS["DDIM"].stochastic
    with pytest.raises(InvalidRequestError, match="no option 'gamma'"):
        SPECS["DDIM"].with_options(gamma=1.0)
    cfg = config("sd15", "epsilon")
    ours = run_ours(spec, "default", cfg, 10)
    ref = run_diffusers(spec, "default", cfg, 10)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["Euler", "DPM++ 2M", "UniPC"])
def test_final_sigma_min_matches_diffusers(name: str) -> None:
    """final_sigmas_type="sigma_min": the last level stays > 0 (Euler returns VE x there, the solvers VP x)."""
    cfg = {**config("sd15", "epsilon"), "final_sigmas_type": "sigma_min"}
    assert make_schedule(SPECS[name], "Karras", cfg, 10).sigmas[-1] > 0
    assert_parity(name, "Karras", cfg, 10)
    assert_parity(name, "default", cfg, 10)


@pytest.mark.parametrize("name", ["DDIM", "Heun", "DDPM", "LCM"])
def test_clip_sample_matches_diffusers(name: str) -> None:
    cfg = {**config("sd15", "epsilon"), "clip_sample": True, "clip_sample_range": 0.5}
    assert make_schedule(SPECS[name], "default", cfg, 10).clip_denoised == 0.5
    assert_parity(name, "default", cfg, 10)


@pytest.mark.parametrize(
    "label,schedule_type,expected",
    [
        ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),
        ("dpm++ 2m  karras", None, ("DPM++ 2M", "Karras")),
        ("Euler a", None, ("Euler a", "default")),
        ("EULER", "exponential", ("Euler", "Exponential")),
        ("DPM++ 2M Karras", "Karras", ("DPM++ 2M", "Karras")),
    ],
)
def test_resolve_sampler(label: str, schedule_type, expected) -> None:
    spec, resolved = resolve_sampler(label, schedule_type)
    assert (spec.name, resolved) == expected


@pytest.mark.parametrize(
    "label,schedule_type,message",
    [
        ("Euler b", None, "unknown sampler 'Euler b'; valid names: DDIM, PLMS, Euler, Euler a"),
        ("", None, "non-empty"),
        ("DPM++ 2M Karras", "Exponential", "names schedule type 'Karras' but schedule type 'Exponential'"),
        ("Euler", "Cosine", "unknown schedule type 'Cosine'; valid types: default, Karras"),
        ("PLMS Karras", None, "schedule type 'Karras' is not available for PLMS; choose one of: default, SGM Uniform"),
    ],
)
def test_resolve_sampler_errors(label: str, schedule_type, message: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_sampler(label, schedule_type)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_registry_is_complete() -> None:
    for spec in SPECS.values():
        assert spec.description and "\n" not in spec.description
        assert "default" in spec.schedule_types
    assert make_schedule(SPECS["Euler"], "default", SD15, 3).steps == 3


@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if SPECS[n].stochastic and SPECS[n].matches_diffusers])
def test_noise_draws_match_diffusers(name: str) -> None:
    """noise() is called exactly as often as diffusers' scheduler.step calls randn_tensor (also draws scaled by 0)."""
    import importlib
    from unittest import mock

    spec = SPECS[name]
    cfg = config("sd15", "epsilon")
    module = importlib.import_module(type(reference_scheduler(spec, "default", cfg, 3)).__module__)
    with mock.patch.object(module, "randn_tensor", wraps=module.randn_tensor) as draws:
        run_diffusers(spec, "default", cfg, 9)
    calls = []
    schedule = make_schedule(spec, "default", cfg, 9)
    base = torch_noise(generators())

    def noise() -> np.ndarray:
        calls.append(1)
        return base()

    sample(spec, ve_model("epsilon"), base() * schedule.init_noise_sigma, schedule, noise)
    assert len(calls) == draws.call_count


def _kdiffusion_2s_ancestral(model, x: torch.Tensor, sigmas: list, sigmas_t, noise) -> torch.Tensor:
    """Reference: k-diffusion's sample_dpmpp_2s_ancestral (eta 1, r 1/2), in torch float64, written from its
    formulas (t = -log sigma, exponential-integrator stages), with sdrt's timestep lookup for the UNet."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma, sigmas_t(sigma))
        sigma_up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        if sigma_down == 0:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (math.exp(-s) / math.exp(-t)) * x - math.expm1(-0.5 * h) * denoised
            denoised_2 = model(x_2, math.exp(-s), sigmas_t(math.exp(-s)))
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * denoised_2
        if sigma_next > 0:
            x = x + torch.from_numpy(noise()).double() * sigma_up
    return x


def test_dpmpp_2s_ancestral_matches_kdiffusion() -> None:
    from runtime.samplers.config import resolve_config, training_sigmas
    from runtime.samplers.sigmas import sigma_to_t

    spec = SPECS["DPM++ 2S a"]
    cfg = config("sd15", "epsilon")
    schedule = make_schedule(spec, "Karras", cfg, 10)
    log_sigmas = np.log(training_sigmas(resolve_config("EulerDiscreteScheduler", cfg, {})))
    ve = ve_model("epsilon")

    def model_t(x: torch.Tensor, sigma: float, t: float) -> torch.Tensor:
        return torch.from_numpy(ve(x.float().numpy(), sigma, t).astype(np.float64))

    def sigmas_t(sigma: float) -> float:
        return float(np.float32(sigma_to_t(np.array([sigma]), log_sigmas)[0]))

    noise = torch_noise(generators())
    x0 = noise() * schedule.init_noise_sigma
    ref = _kdiffusion_2s_ancestral(model_t, torch.from_numpy(x0).double(), schedule.sigmas.tolist(), sigmas_t, noise)
    noise = torch_noise(generators())
    noise()
    ours = sample(spec, ve, x0, schedule, noise)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-5)


def test_dpmpp_sde_is_deterministic_per_seed_and_per_image() -> None:
    spec = SPECS["DPM++ SDE"]
    cfg = config("sd15", "epsilon")
    schedule = make_schedule(spec, "Karras", cfg, 8)
    model = ve_model("epsilon")

    def run(seeds: tuple[int, int]) -> np.ndarray:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch_noise(gens)
        return sample(spec, model, noise() * schedule.init_noise_sigma, schedule, noise)

    a, b, c = run((1, 2)), run((1, 2)), run((1, 3))
    assert np.array_equal(a, b)
    assert np.array_equal(a[0], c[0]) and not np.allclose(a[1], c[1])


@pytest.mark.parametrize("name", [n for n in SAMPLER_NAMES if SPECS[n].stochastic and n != "LCM"])
def test_stochastic_samplers_sample_the_data_distribution(name: str) -> None:
    """Gaussian data N(mu, s^2) with its exact denoiser: the samples end with mean mu and std s (checks every noise
    scale, including DPM++ SDE's Brownian increments). First-order ancestral samplers under-disperse by O(1/steps)
    (Euler a: std -12% at 40 steps, -2.5% at 300), hence the step count."""
    mu, s = 0.3, 0.5
    spec = SPECS[name]
    schedule = make_schedule(spec, "default", SD15, 300)
    rng = np.random.default_rng(3)
    shape = (1, 4, 64, 64)  # 16384 samples

    def noise() -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    def model(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        return mu + (s**2 / (s**2 + sigma**2)) * (x - mu)

    x = sample(spec, model, noise() * schedule.init_noise_sigma, schedule, noise)
    latents = x / math.sqrt(1 + schedule.sigmas[-1] ** 2)
    assert abs(latents.mean() - mu) < 0.02
    assert abs(latents.std() / s - 1) < 0.04, latents.std()


def test_dpmpp_sde_matches_diffusers_given_the_same_brownian_increments() -> None:
    """diffusers' DPMSolverSDEScheduler with its Brownian tree swapped for sdrt's increments (z1, then
    (sqrt(s - s_mid) z1 + sqrt(s_mid - s_next) z2) / sqrt(s - s_next)): identical loops otherwise."""
    pytest.importorskip("torchsde", reason="diffusers' DPMSolverSDEScheduler needs torchsde")
    spec = SPECS["DPM++ SDE"]
    cfg = config("sd15", "epsilon")
    scheduler = reference_scheduler(spec, "Karras", cfg, 8)
    noise = torch_noise(generators())
    state: dict = {}

    def increments(sigma, sigma_to) -> torch.Tensor:
        sigma, sigma_to = float(sigma), float(sigma_to)
        if "z1" not in state:
            state.update(z1=noise(), mid=sigma_to)
            return torch.from_numpy(state["z1"])
        z1, mid = state.pop("z1"), state.pop("mid")
        z2 = noise()
        w = (math.sqrt(sigma - mid) * z1 + math.sqrt(mid - sigma_to) * z2) / math.sqrt(sigma - sigma_to)
        return torch.from_numpy(w.astype(np.float32))

    latents = torch.from_numpy(noise()) * scheduler.init_noise_sigma
    scheduler.noise_sampler = increments
    for t in scheduler.timesteps:
        out = unet_torch(scheduler.scale_model_input(latents, t), t, "epsilon")
        latents = scheduler.step(out, t, latents).prev_sample
    ours = run_ours(spec, "Karras", cfg, 8)
    np.testing.assert_allclose(ours, latents.numpy(), rtol=1e-5, atol=1e-5)
