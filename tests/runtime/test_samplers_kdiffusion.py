"""The k-diffusion path (A1111's schedule types and samplers diffusers lacks) against k-diffusion itself.

Schedules: k-diffusion's own DiscreteSchedule (Uniform) and get_sigmas_* functions over the model's training levels,
and A1111's modules/sd_schedulers.py formulas for the others, transcribed below in torch. Samplers: k-diffusion's
sample_* functions driven by k-diffusion's DiscreteEpsDDPMDenoiser around the analytic UNet of test_samplers (so
the timestep lookup is k-diffusion's too), with the same noise stream sdrt draws from; float64 on that side.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import InvalidRequestError
from runtime.samplers import SAMPLER_NAMES, SCHEDULE_TYPES, SPECS, make_schedule, resolve_sampler, sample
from runtime.samplers.schedules_kd import kdiffusion_schedule
from tests.runtime.test_samplers import SHAPE, generators, torch_noise, unet_numpy, ve_model
from tests.runtime.test_schedules import SD15

torch = pytest.importorskip("torch")
if importlib.util.find_spec("k_diffusion") is None:
    pytest.skip("the k-diffusion package is not installed (the oracle of these tests)", allow_module_level=True)


def _load_kdiffusion() -> tuple[types.ModuleType, types.ModuleType]:
    """k_diffusion.sampling and .external, loaded from the installed package's files under a private name: the
    package's __init__ imports training extras (skimage, torchvision) that these two modules never use. Their one
    use of k_diffusion.utils, append_dims, is given here; nothing is left in sys.modules."""
    folder = Path(importlib.util.find_spec("k_diffusion").origin).parent
    package, utils = types.ModuleType("_kd_oracle"), types.ModuleType("_kd_oracle.utils")
    package.__path__ = []
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    package.utils = utils
    names = {"_kd_oracle": package, "_kd_oracle.utils": utils}
    loaded = []
    try:
        sys.modules.update(names)
        for name in ("sampling", "external"):
            spec = importlib.util.spec_from_file_location(f"_kd_oracle.{name}", folder / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            setattr(package, name, module)
            loaded.append(module)
    finally:
        for name in [*names, "_kd_oracle.sampling", "_kd_oracle.external"]:
            sys.modules.pop(name, None)
    return loaded[0], loaded[1]


K_SAMPLING, K_EXTERNAL = _load_kdiffusion()
ALPHAS_CUMPROD = torch.from_numpy(
    np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
).float()  # SD 1.5's scaled_linear betas, float32 as the ldm model keeps them


class _Unet:
    """The analytic eps model of test_samplers, called as k-diffusion calls the inner model: (x, t [B])."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = unet_numpy(x.numpy().astype(np.float32), float(t[0]), "epsilon").astype(np.float64)
        return torch.from_numpy(eps)


def kdiffusion_denoiser():
    return K_EXTERNAL.DiscreteEpsDDPMDenoiser(_Unet(), ALPHAS_CUMPROD, quantize=False)


# --- schedules: A1111's formulas (modules/sd_schedulers.py), on k-diffusion's DiscreteSchedule ---------------------

AYS_SD1 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def a1111_reference(schedule_type: str, n: int, family: str = "sd1") -> np.ndarray:
    model = kdiffusion_denoiser()
    sigma_min, sigma_max = float(model.sigmas[0]), float(model.sigmas[-1])
    zero = torch.zeros(1)
    if schedule_type == "Uniform":
        return model.get_sigmas(n).numpy()
    if schedule_type == "Karras":
        return K_SAMPLING.get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0).numpy()
    if schedule_type == "Exponential":
        return K_SAMPLING.get_sigmas_exponential(n, sigma_min, sigma_max).numpy()
    if schedule_type == "Polyexponential":
        return K_SAMPLING.get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=1.0).numpy()
    if schedule_type in ("SGM Uniform", "Normal"):
        start, end = model.sigma_to_t(torch.tensor(sigma_max)), model.sigma_to_t(torch.tensor(sigma_min))
        sgm = schedule_type == "SGM Uniform"
        ts = torch.linspace(start, end, n + 1)[:-1] if sgm else torch.linspace(start, end, n)
        return torch.cat([torch.stack([model.t_to_sigma(t) for t in ts]), zero]).numpy()
    if schedule_type == "KL Optimal":
        alpha_min, alpha_max = torch.arctan(torch.tensor(sigma_min)), torch.arctan(torch.tensor(sigma_max))
        idx = torch.arange(n + 1)
        return torch.tan(idx / n * alpha_min + (1.0 - idx / n) * alpha_max).numpy()
    if schedule_type == "Align Your Steps":
        table = AYS_SDXL if family == "sdxl" else AYS_SD1
        if n == len(table):
            return np.array(table + [0.0])
        xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
        return np.append(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1], 0.0)
    if schedule_type == "Simple":
        stride = len(model.sigmas) / n
        return np.array([float(model.sigmas[-(1 + int(x * stride))]) for x in range(n)] + [0.0])
    if schedule_type == "DDIM":
        stride, x, levels = max(len(model.sigmas) // n, 1), 1, []
        while x < len(model.sigmas):
            levels.append(float(model.sigmas[x]))
            x += stride
        return np.array(levels[::-1] + [0.0])
    if schedule_type == "Beta":
        ppf = pytest.importorskip("scipy.stats").beta.ppf
        quantiles = [ppf(p, 0.6, 0.6) for p in 1 - np.linspace(0, 1, n)]
        return np.array([sigma_min + q * (sigma_max - sigma_min) for q in quantiles] + [0.0])
    raise AssertionError(schedule_type)


KD_TYPES = [t for t in SCHEDULE_TYPES if t != "default"]


@pytest.mark.parametrize("schedule_type", KD_TYPES)
def test_schedule_matches_a1111(schedule_type: str) -> None:
    """The k-diffusion path's levels and timesteps for each A1111 type (Euler a runs all but SGM Uniform there)."""
    assert schedule_type == "SGM Uniform" or not SPECS["Euler a"].on_diffusers(schedule_type)
    model = kdiffusion_denoiser()
    for steps in (1, 7, 10, 11, 30):
        if schedule_type in ("Polyexponential", "Exponential", "Karras", "Beta") and steps == 1:
            continue  # linspace over one point: A1111 ends at sigma_max then 0, as sdrt does (checked below)
        ours = kdiffusion_schedule("plain", schedule_type, "EulerDiscreteScheduler", SD15, steps)
        ref = a1111_reference(schedule_type, steps)
        where = f"{schedule_type} steps={steps}"
        np.testing.assert_allclose(ours.sigmas, ref, rtol=2e-5, atol=1e-6, err_msg=where)
        assert ours.init_noise_sigma == pytest.approx(float(ref[0]), rel=2e-5)
        t_ref = model.sigma_to_t(torch.from_numpy(ref[:-1]).float()).numpy()
        np.testing.assert_allclose(ours.timesteps, np.where(ref[:-1] > 0, t_ref, 0), atol=2e-3, err_msg=where)
        assert ours.steps == len(ref) - 1 and not ours.vp_output


def test_align_your_steps_tables_by_family() -> None:
    spec = SPECS["Euler"]
    for family, table in (("sd1", AYS_SD1), ("sd2", AYS_SD1), ("sdxl", AYS_SDXL)):
        exact = make_schedule(spec, "Align Your Steps", SD15, 11, family=family)
        np.testing.assert_allclose(exact.sigmas, table + [0.0], rtol=1e-12)
        ours = make_schedule(spec, "Align Your Steps", SD15, 25, family=family)
        np.testing.assert_allclose(ours.sigmas, a1111_reference("Align Your Steps", 25, family), rtol=1e-12)
    with pytest.raises(InvalidRequestError, match="model family"):
        make_schedule(spec, "Align Your Steps", SD15, 10, family="sd3")


def test_discard_penultimate_sigma() -> None:
    """DPM2 / DPM2 a / DPM++ 3M SDE on the k-diffusion path: A1111 asks for steps + 1 levels and drops the
    next-to-last; DPM++ 3M SDE's "default" is A1111's Automatic for it, Exponential."""
    ref = a1111_reference("Uniform", 11)
    ours = make_schedule(SPECS["DPM2"], "Uniform", SD15, 10)
    np.testing.assert_allclose(ours.sigmas, np.concatenate([ref[:-2], ref[-1:]]), rtol=2e-5)
    ref = a1111_reference("Exponential", 11)
    ours = make_schedule(SPECS["DPM++ 3M SDE"], "default", SD15, 10)
    np.testing.assert_allclose(ours.sigmas, np.concatenate([ref[:-2], ref[-1:]]), rtol=2e-5)


# --- samplers against k-diffusion's ----------------------------------------------------------------------------


def run_kdiffusion(function: str, schedule, **kwargs) -> np.ndarray:
    """k-diffusion's sample_<function> over the schedule's sigmas, noise from the same seeded streams as sdrt's."""
    noise = torch_noise(generators())
    x = torch.from_numpy(noise().astype(np.float64)) * float(schedule.sigmas[0])
    sigmas = torch.from_numpy(schedule.sigmas)

    def noise_sampler(sigma, sigma_next):
        return torch.from_numpy(noise().astype(np.float64))

    fn = getattr(K_SAMPLING, f"sample_{function}")
    if "noise_sampler" in inspect.signature(fn).parameters:
        kwargs["noise_sampler"] = noise_sampler
    return fn(kdiffusion_denoiser(), x, sigmas, disable=True, **kwargs).numpy()


def run_sdrt(name: str, schedule_type: str, steps: int) -> tuple[np.ndarray, object]:
    spec, schedule_type = resolve_sampler(name, schedule_type)
    schedule = make_schedule(spec, schedule_type, SD15, steps)
    noise = torch_noise(generators())
    x = sample(spec, ve_model("epsilon"), noise() * schedule.init_noise_sigma, schedule, noise)
    return schedule.latents(x), schedule


SAMPLER_CASES = [
    ("Euler", "Align Your Steps", "euler", {}),
    ("Euler a", "Karras", "euler_ancestral", {}),
    ("DDIM", "Karras", "euler", {}),  # DDIM with eta 0 is Euler on the VE ODE
    ("Heun", "KL Optimal", "heun", {}),
    ("LMS", "Uniform", "lms", {}),
    ("DPM2", "Simple", "dpm_2", {}),
    ("DPM2 a", "Normal", "dpm_2_ancestral", {}),
    ("DPM++ 2S a", "Polyexponential", "dpmpp_2s_ancestral", {}),
    ("DPM++ 2M", "Align Your Steps", "dpmpp_2m", {}),
    ("DPM++ 2M", "KL Optimal", "dpmpp_2m", {}),
    ("DPM++ 2M SDE", "DDIM", "dpmpp_2m_sde", {}),
    ("DPM++ 2M SDE Heun", "Align Your Steps", "dpmpp_2m_sde", {"solver_type": "heun"}),
    ("DPM++ 3M SDE", "default", "dpmpp_3m_sde", {}),  # A1111's: Exponential, next-to-last level dropped
    ("DPM++ 3M SDE", "Karras", "dpmpp_3m_sde", {}),
    ("DPM++ 3M SDE", "KL Optimal", "dpmpp_3m_sde", {}),  # ends above 0: the last step is a third-order one
]


@pytest.mark.parametrize("name,schedule_type,function,kwargs", SAMPLER_CASES)
def test_sampler_matches_kdiffusion(name: str, schedule_type: str, function: str, kwargs: dict) -> None:
    ours, schedule = run_sdrt(name, schedule_type, 10)
    ref = run_kdiffusion(function, schedule, **kwargs)
    assert np.isfinite(ref).all()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=f"{name} {schedule_type}")


ETA_CASES = [
    ("Euler a", "default", "euler_ancestral", {}, 0.5),  # on diffusers' schedule: its eta is 1, k-diffusion's any
    ("Euler a", "Karras", "euler_ancestral", {}, 0.0),
    ("DPM2 a", "default", "dpm_2_ancestral", {}, 0.3),  # the midpoints move with sigma_down
    ("DPM++ 2S a", "Karras", "dpmpp_2s_ancestral", {}, 0.6),
    ("DPM++ 2M SDE", "Simple", "dpmpp_2m_sde", {}, 0.4),  # k-diffusion's orders (diffusers' differ at the end)
    ("DPM++ 2M SDE Heun", "Normal", "dpmpp_2m_sde", {"solver_type": "heun"}, 0.7),
    ("DPM++ 2M SDE", "Align Your Steps", "dpmpp_2m_sde", {}, 0.0),  # eta 0: k-diffusion draws no noise at all
    ("DPM++ 3M SDE", "default", "dpmpp_3m_sde", {}, 0.5),
]


@pytest.mark.parametrize("name,schedule_type,function,kwargs,eta", ETA_CASES)
def test_ancestral_eta_matches_kdiffusion(name: str, schedule_type: str, function: str, kwargs: dict, eta) -> None:
    """A1111 passes its ancestral eta (option eta_ancestral, 1 by default) to every k-diffusion sampler that takes
    one; k-diffusion's sample_* with that eta is the reference."""
    spec, schedule_type = resolve_sampler(name, schedule_type)
    spec = spec.with_options(eta=eta)
    schedule = make_schedule(spec, schedule_type, SD15, 10)
    noise = torch_noise(generators())
    ours = schedule.latents(sample(spec, ve_model("epsilon"), noise() * schedule.init_noise_sigma, schedule, noise))
    ref = run_kdiffusion(function, schedule, eta=eta, **kwargs)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5, err_msg=f"{name} {schedule_type} eta={eta}")
    eta_1 = run_kdiffusion(function, schedule, eta=1.0, **kwargs)
    assert np.abs(ref - eta_1).max() > 1e-3  # the option changes the image


def test_dpmpp_sde_eta_matches_kdiffusion() -> None:
    """DPM++ SDE: k-diffusion's sample_dpmpp_sde with eta, its two noise draws per step given as sdrt combines its
    z1, z2 (the increments of one Brownian path over [sigma_mid, sigma] and [sigma_next, sigma])."""
    spec = SPECS["DPM++ SDE"].with_options(eta=0.5)
    schedule = make_schedule(spec, "Karras", SD15, 8)
    noise = torch_noise(generators())
    ours = schedule.latents(sample(spec, ve_model("epsilon"), noise() * schedule.init_noise_sigma, schedule, noise))
    noise = torch_noise(generators())
    x = torch.from_numpy(noise().astype(np.float64)) * float(schedule.sigmas[0])
    pending = []

    def noise_sampler(sigma, sigma_next):
        if not pending:  # first stage, over [sigma_mid, sigma]
            pending.append(noise().astype(np.float64))
            return torch.from_numpy(pending[0])
        sigma, sigma_next = float(sigma), float(sigma_next)
        sigma_mid = math.sqrt(sigma * sigma_next)
        z1, z2 = pending.pop(), noise().astype(np.float64)
        w = (math.sqrt(sigma - sigma_mid) * z1 + math.sqrt(sigma_mid - sigma_next) * z2) / math.sqrt(
            sigma - sigma_next
        )
        return torch.from_numpy(w)

    ref = K_SAMPLING.sample_dpmpp_sde(
        kdiffusion_denoiser(), x, torch.from_numpy(schedule.sigmas), disable=True, eta=0.5, noise_sampler=noise_sampler
    ).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_every_a1111_combination_runs() -> None:
    """Every sampler x schedule type the registry accepts builds a schedule and samples finite latents (3 steps)."""
    model = ve_model("epsilon")
    for name in SAMPLER_NAMES:
        spec = SPECS[name]
        for schedule_type in spec.accepted_schedule_types:
            schedule = make_schedule(spec, schedule_type, SD15, 3)
            noise = torch_noise(generators())
            x = sample(spec, model, noise() * schedule.init_noise_sigma, schedule, noise)
            assert x.shape == SHAPE and np.isfinite(x).all(), (name, schedule_type)


@pytest.mark.parametrize(
    "label,schedule_type,expected",
    [
        ("Euler a Karras", None, ("Euler a", "Karras")),
        ("DDIM Karras", None, ("DDIM", "Karras")),
        ("DPM++ 2M", "Align Your Steps", ("DPM++ 2M", "Align Your Steps")),
        ("Euler kl optimal", None, ("Euler", "KL Optimal")),
        ("k_euler_a", None, ("Euler a", "default")),
        ("K_DPMPP_2M", "karras", ("DPM++ 2M", "Karras")),
    ],
)
def test_resolve_new_labels_and_aliases(label: str, schedule_type, expected) -> None:
    spec, resolved = resolve_sampler(label, schedule_type)
    assert (spec.name, resolved) == expected
    assert math.isfinite(make_schedule(spec, resolved, SD15, 5).init_noise_sigma)


def a1111_restart(model, x: torch.Tensor, sigmas: torch.Tensor, noise) -> torch.Tensor:
    """A1111's restart_sampler (modules/sd_samplers_extra.py) with its automatic restart list, transcribed in torch
    on k-diffusion's get_sigmas_karras and to_d; renoising draws from `noise`."""
    s_in = x.new_ones([x.shape[0]])

    def heun_step(x, old, new):
        d = K_SAMPLING.to_d(x, old, model(x, old * s_in))
        dt = new - old
        if new == 0:
            return x + d * dt
        x_2 = x + d * dt
        d_2 = K_SAMPLING.to_d(x_2, new, model(x_2, new * s_in))
        return x + (d + d_2) / 2 * dt

    steps = sigmas.shape[0] - 1
    restart_list = {}
    if steps >= 20:
        restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        main = steps - restart_steps * restart_times
        sigmas = K_SAMPLING.get_sigmas_karras(main, sigmas[-2].item(), sigmas[0].item()).double()
        restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            n, times, top = restart_list[i + 1]
            max_idx = int(torch.argmin(abs(sigmas - top), dim=0))
            if max_idx < i + 1:
                segment = K_SAMPLING.get_sigmas_karras(n, sigmas[i + 1].item(), sigmas[max_idx].item())[:-1]
                step_list.extend(list(zip(segment[:-1].double(), segment[1:].double())) * times)
    last = None
    for old, new in step_list:
        if last is None:
            last = old
        elif last < old:
            x = x + torch.from_numpy(noise().astype(np.float64)) * (old**2 - last**2) ** 0.5
        x = heun_step(x, old, new)
        last = new
    return x


@pytest.mark.parametrize("steps", [10, 20, 40])
def test_restart_matches_a1111(steps: int) -> None:
    """No restart below 20 steps, one 9-step restart segment from 20, two steps // 4 ones from 36."""
    ours, schedule = run_sdrt("Restart", "default", steps)
    np.testing.assert_allclose(schedule.sigmas, a1111_reference("Karras", steps), rtol=2e-5)
    noise = torch_noise(generators())
    x = torch.from_numpy(noise().astype(np.float64)) * float(schedule.sigmas[0])
    ref = a1111_restart(kdiffusion_denoiser(), x, torch.from_numpy(schedule.sigmas), noise).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps,eta", [(10, 1.0), (9, 1.0), (5, 0.0)])
def test_dpm_fast_matches_kdiffusion(steps: int, eta: float) -> None:
    """A1111 calls sample_dpm_fast with the model's training range, n = steps and its ancestral eta (1)."""
    spec = SPECS["DPM fast"] if eta == 1.0 else SPECS["DPM fast"].with_options(eta=eta)
    schedule = make_schedule(spec, "default", SD15, steps)
    noise = torch_noise(generators())
    ours = sample(spec, ve_model("epsilon"), noise() * schedule.init_noise_sigma, schedule, noise)
    model = kdiffusion_denoiser()
    sigma_min, sigma_max = float(model.sigmas[0]), float(model.sigmas[-1])
    assert schedule.sigmas[0] == pytest.approx(sigma_max) and schedule.sigmas[-2] == pytest.approx(sigma_min)
    noise = torch_noise(generators())
    x = torch.from_numpy(noise().astype(np.float64)) * sigma_max

    def noise_sampler(sigma, sigma_next):
        return torch.from_numpy(noise().astype(np.float64))

    ref = K_SAMPLING.sample_dpm_fast(
        model, x, sigma_min, sigma_max, steps, disable=True, eta=eta, noise_sampler=noise_sampler
    ).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_dpm_adaptive_matches_kdiffusion(eta: float) -> None:
    """Same accepted and rejected tries as k-diffusion's (its step-size controller reads the same errors)."""
    spec = SPECS["DPM adaptive"].with_options(eta=eta)
    schedule = make_schedule(spec, "default", SD15, 10)
    noise = torch_noise(generators())
    ours = sample(spec, ve_model("epsilon"), noise() * schedule.init_noise_sigma, schedule, noise)
    model = kdiffusion_denoiser()
    sigma_min, sigma_max = float(model.sigmas[0]), float(model.sigmas[-1])
    noise = torch_noise(generators())
    x = torch.from_numpy(noise().astype(np.float64)) * sigma_max

    def noise_sampler(sigma, sigma_next):
        return torch.from_numpy(noise().astype(np.float64))

    ref, info = K_SAMPLING.sample_dpm_adaptive(
        model, x, sigma_min, sigma_max, disable=True, eta=eta, noise_sampler=noise_sampler, return_info=True
    )
    assert info["n_accept"] > 5
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-5)


# --- end to end on the tiny SD1 checkpoint: sdrt's txt2img against diffusers' UNet and VAE under k-diffusion ------


def kdiffusion_txt2img(folder, function: str, sigmas: np.ndarray, **kwargs) -> np.ndarray:
    """The tiny checkpoint's diffusers text encoder, UNet (guided on eps, uncond first) and VAE, sampled by
    k-diffusion's sample_<function> from the same per-image seeded streams: float images [B, H, W, 3]."""
    import diffusers
    from diffusers.utils.torch_utils import randn_tensor

    from tests.runtime.test_txt2img_parity import CFG, HEIGHT, NEGATIVE, PROMPT, SEED, WIDTH

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 2, True, NEGATIVE)
    embeddings = torch.cat([uncond, cond])  # [2B, 77, D]
    gens = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(2)]
    shape = (2, pipe.unet.config.in_channels, HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor)

    def guided_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = pipe.unet(torch.cat([x, x]).float(), t[0].float(), encoder_hidden_states=embeddings).sample
        eps_uncond, eps_cond = out.double().chunk(2)
        return eps_uncond + CFG * (eps_cond - eps_uncond)

    model = K_EXTERNAL.DiscreteEpsDDPMDenoiser(guided_eps, pipe.scheduler.alphas_cumprod, quantize=False)
    x = randn_tensor(shape, generator=gens, dtype=torch.float32).double() * float(sigmas[0])

    def noise_sampler(sigma, sigma_next):
        return randn_tensor(shape, generator=gens, dtype=torch.float32).double()

    with torch.no_grad():
        latents = getattr(K_SAMPLING, f"sample_{function}")(
            model, x, torch.from_numpy(sigmas), disable=True, noise_sampler=noise_sampler, **kwargs
        )
        image = pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


# one case: each costs ~25 s on two shared cores (the numpy tests above cover the other samplers and schedules)
@pytest.mark.parametrize("sampler,schedule,function", [("DPM++ 3M SDE", "default", "dpmpp_3m_sde")])
def test_txt2img_matches_kdiffusion(tiny_sd1, shared_engines, sampler: str, schedule: str, function: str) -> None:
    import runtime
    from tests.runtime.test_txt2img_parity import CFG, HEIGHT, NEGATIVE, PROMPT, SEED, WIDTH, assert_parity

    sd = runtime.load(tiny_sd1, backend="onnxruntime", engines_dir=shared_engines)
    kwargs = dict(negative_prompt=NEGATIVE, steps=10, cfg_scale=CFG, seed=SEED, batch_size=2, width=WIDTH)
    result = sd.txt2img(PROMPT, height=HEIGHT, sampler=sampler, schedule=schedule, **kwargs)
    spec, schedule_type = resolve_sampler(sampler, schedule)
    sigmas = make_schedule(spec, schedule_type, sd.info["scheduler_config"], 10).sigmas
    assert_parity(result.images, kdiffusion_txt2img(tiny_sd1, function, sigmas))
