"""A1111's sampler options (s_churn, s_tmin, s_tmax, s_noise) against the k-diffusion package A1111 runs.

k-diffusion's samplers (k_diffusion/sampling.py of the PyPI package) run in float64 torch with the same denoiser (a
function of x and sigma) and the same noise sequence as sdrt's float32 numpy samplers. The package's __init__ imports
its training stack (torchvision, kornia, wandb, ...), so sampling.py is loaded on its own, with its one helper from
k_diffusion.utils (append_dims, a broadcast) supplied here.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from export.configs import SD15_SCHEDULER
from runtime.errors import InvalidRequestError
from runtime.rng import TorchGenerator, batch_randn
from runtime.samplers import SAMPLER_NAMES, SPECS, make_schedule, sample

torch = pytest.importorskip("torch")
SHAPE = (2, 4, 6, 6)  # [B, C, h, w]


@pytest.fixture(scope="module")
def kd():
    """k_diffusion.sampling, loaded from the installed package without running the package's __init__."""
    found = importlib.util.find_spec("k_diffusion")
    if found is None:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    pytest.importorskip("torchdiffeq", reason="k_diffusion.sampling imports torchdiffeq")
    pytest.importorskip("torchsde", reason="k_diffusion.sampling imports torchsde")
    folder = Path(next(iter(found.submodule_search_locations)))
    package = types.ModuleType("k_diffusion")
    package.__path__ = [str(folder)]
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, target_dims: x[(...,) + (None,) * (target_dims - x.ndim)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "k_diffusion", package)
        patch.setitem(sys.modules, "k_diffusion.utils", utils)
        spec = importlib.util.spec_from_file_location("k_diffusion.sampling", folder / "sampling.py")
        module = importlib.util.module_from_spec(spec)
        patch.setitem(sys.modules, "k_diffusion.sampling", module)
        spec.loader.exec_module(module)
    return module


def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
    """A smooth nonlinear denoiser of (x, sigma) in float64: the exact one for unit-Gaussian data plus a tanh term."""
    return x / (1.0 + sigma**2) + 0.2 * np.tanh(x) * sigma / (1.0 + sigma)


class Noise:
    """The same unit-normal sequence for both sides (seeded per-image streams, drawn as sdrt draws them)."""

    def __init__(self):
        self.streams = [TorchGenerator(s) for s in (21, 22)]
        self.drawn: list[np.ndarray] = []

    def __call__(self) -> np.ndarray:
        self.drawn.append(batch_randn(self.streams, SHAPE[1:]))
        return self.drawn[-1]


def run_both(kd, name: str, steps: int, **options):
    """(sdrt's x, k-diffusion's x, sdrt's model calls [(sigma, t)], draws each side made)."""
    spec = SPECS[name].with_options(**options)
    schedule = make_schedule(spec, "default", SD15_SCHEDULER, steps)
    x0 = batch_randn([TorchGenerator(1), TorchGenerator(2)], SHAPE[1:]) * np.float32(schedule.init_noise_sigma)
    calls = []

    def model(x, sigma, t):
        calls.append((sigma, t))
        return denoise(x.astype(np.float64), sigma).astype(np.float32)

    ours_noise, ref_noise = Noise(), Noise()
    ours = sample(spec, model, x0, schedule, ours_noise)

    def ref_model(x, sigma):
        return torch.from_numpy(denoise(x.numpy(), float(sigma[0])))

    def ref_draw(*_):
        return torch.from_numpy(ref_noise().astype(np.float64))

    if name == "DPM++ SDE":
        ref_draw = brownian_increments(ref_noise)

    kwargs = {k: (math.inf if v is None else v) for k, v in spec.options}
    if name in ("Euler", "Heun", "DPM2"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kd.torch, "randn_like", churn_draws(schedule.sigmas.tolist(), kwargs, ref_draw))
            ref = getattr(kd, KD[name])(
                ref_model, torch.from_numpy(x0.astype(np.float64)), _sigmas(schedule), **kwargs
            )
    else:
        fn = getattr(kd, KD[name])
        ref = fn(
            ref_model, torch.from_numpy(x0.astype(np.float64)), _sigmas(schedule), noise_sampler=ref_draw, **kwargs
        )
    return ours, ref.numpy(), calls, (len(ours_noise.drawn), len(ref_noise.drawn))


def churn_draws(sigmas: list[float], options: dict, draw):
    """k-diffusion's churn calls torch.randn_like at every step and uses the draw only where gamma > 0; sdrt draws
    only there (so the defaults leave the seeded streams untouched). The reference's step-k call gets the next draw
    where step k churns (s_churn > 0 and s_tmin <= sigma_k <= s_tmax), zeros elsewhere (multiplied by nothing)."""
    steps = iter(range(len(sigmas) - 1))

    def randn_like(x: torch.Tensor) -> torch.Tensor:
        sigma = sigmas[next(steps)]
        if options["s_churn"] > 0 and options["s_tmin"] <= sigma <= options["s_tmax"]:
            return draw()
        return torch.zeros_like(x)

    return randn_like


def brownian_increments(noise: Noise):
    """k-diffusion's noise_sampler(sigma, sigma_to) fed sdrt's documented increments: z1 over [sigma_mid, sigma], then
    (sqrt(sigma - sigma_mid) z1 + sqrt(sigma_mid - sigma_next) z2) / sqrt(sigma - sigma_next) over the whole step
    (the joint law of a Brownian motion's two nested increments)."""
    state: dict = {}

    def draw(sigma, sigma_to) -> torch.Tensor:
        sigma, sigma_to = float(sigma), float(sigma_to)
        if "z1" not in state:
            state.update(z1=noise().astype(np.float64), mid=sigma_to)
            return torch.from_numpy(state["z1"])
        z1, mid = state.pop("z1"), state.pop("mid")
        z2 = noise().astype(np.float64)
        return torch.from_numpy(
            (math.sqrt(sigma - mid) * z1 + math.sqrt(mid - sigma_to) * z2) / math.sqrt(sigma - sigma_to)
        )

    return draw


def _sigmas(schedule) -> torch.Tensor:
    return torch.from_numpy(schedule.sigmas.astype(np.float64))


KD = {
    "Euler": "sample_euler",
    "Heun": "sample_heun",
    "DPM2": "sample_dpm_2",
    "Euler a": "sample_euler_ancestral",
    "DPM2 a": "sample_dpm_2_ancestral",
    "DPM++ 2S a": "sample_dpmpp_2s_ancestral",
    "DPM++ 2M SDE": "sample_dpmpp_2m_sde",
    "DPM++ SDE": "sample_dpmpp_sde",
}
CHURN = [
    ("Euler", {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 8.0, "s_noise": 1.003}),  # churns only in [0.5, 8]
    ("Heun", {"s_churn": 1.0}),
    ("DPM2", {"s_churn": 1.5, "s_noise": 0.97, "s_tmin": 0.2}),
]


@pytest.mark.parametrize(("name", "options"), CHURN)
def test_churn_matches_kdiffusion(kd, name: str, options: dict) -> None:
    ours, ref, calls, (ours_draws, ref_draws) = run_both(kd, name, 10, **options)
    assert ours_draws == ref_draws > 0  # one draw per churned step, in the same order
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ 2M SDE", "DPM++ SDE"])
def test_s_noise_matches_kdiffusion(kd, name: str) -> None:
    ours, ref, _, (ours_draws, ref_draws) = run_both(kd, name, 8, s_noise=0.9)
    assert ref_draws <= ours_draws <= ref_draws + 1  # sdrt also draws where diffusers multiplies the draw by 0
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5)
    default, _, _, _ = run_both(kd, name, 8)
    assert not np.allclose(default, ours, rtol=1e-3, atol=1e-3)  # the multiplier changes the image


def test_churned_levels_get_diffusers_timesteps() -> None:
    """The UNet timestep at sigma_hat is diffusers' (and k-diffusion's) log-sigma interpolation of the training
    levels; unchurned steps keep the scheduler's own timesteps."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER)
    scheduler.set_timesteps(12)
    ac = scheduler.alphas_cumprod.numpy().astype(np.float64)
    log_sigmas = np.log(((1 - ac) / ac) ** 0.5)
    spec = SPECS["Euler"].with_options(s_churn=3.0, s_tmin=1.0)
    schedule = make_schedule(spec, "default", SD15_SCHEDULER, 12)
    calls = []
    sample(spec, lambda x, s, t: calls.append((s, t)) or x * 0, np.ones(SHAPE, np.float32), schedule, Noise())
    gamma = min(3.0 / 12, 2**0.5 - 1)
    for i, (sigma, t) in enumerate(calls):
        level = float(scheduler.sigmas[i])
        if level >= 1.0:
            assert sigma == pytest.approx(level * (1 + gamma), rel=1e-6)
            assert t == pytest.approx(float(scheduler._sigma_to_t(np.array(sigma), log_sigmas)), rel=1e-5)
        else:
            assert sigma == pytest.approx(level, rel=1e-6) and t == float(scheduler.timesteps[i])


def test_default_options_draw_nothing_and_change_no_bit() -> None:
    """A1111's defaults (explicit or not) evaluate the model exactly at the scheduler's own levels and timesteps, draw
    nothing for the ODE samplers, and give the same bits; s_churn with an empty [s_tmin, s_tmax] too."""
    defaults = {"s_churn": 0, "s_tmin": 0, "s_tmax": math.inf, "s_noise": 1}
    x = np.linspace(-3, 3, math.prod(SHAPE), dtype=np.float32).reshape(SHAPE) * np.float32(10)
    for name in ("Euler", "Heun", "DPM2", "Euler a", "DPM++ SDE", "DPM++ 2M SDE"):
        spec = SPECS[name]
        variants = [spec.with_options(**{k: v for k, v in defaults.items() if k in spec.option_names})]
        if "s_churn" in spec.option_names:
            variants.append(spec.with_options(s_churn=5.0, s_tmin=100.0, s_tmax=200.0))  # no level in range
        schedule = make_schedule(spec, "default", SD15_SCHEDULER, 6)
        runs = []
        for variant in [spec, *variants]:
            calls, noise = [], Noise()

            def model(x, s, t, calls=calls):
                calls.append((s, t))
                return (x / np.float32(1 + s * s) + np.float32(t / 5000)).astype(np.float32)

            runs.append((sample(variant, model, x, schedule, noise), calls, len(noise.drawn)))
        (expected, calls, draws), *others = runs
        for result, other_calls, other_draws in others:
            assert np.array_equal(result, expected) and other_calls == calls and other_draws == draws
        if not spec.stochastic:
            assert draws == 0
            assert [s for s, _ in calls[:: 1 if name == "Euler" else 2]] == schedule.sigmas[:-1].tolist()
            assert [t for _, t in calls[:: 1 if name == "Euler" else 2]] == schedule.timesteps.tolist()


def test_options_each_sampler_accepts() -> None:
    churn = ("s_churn", "s_tmin", "s_tmax", "s_noise")
    expected = {"Euler": churn, "Heun": churn, "DPM2": churn, "DDIM": ("eta",)}
    stochastic = ("Euler a", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE")
    expected |= {n: ("eta", "s_noise") for n in stochastic}  # A1111's sampler_extra_params (s_noise for these)
    expected |= {"DPM fast": ("eta", "s_noise"), "DPM adaptive": ("eta",)}  # and eta where k-diffusion takes it
    for name in SAMPLER_NAMES:
        assert SPECS[name].option_names == expected.get(name, ()), name
    assert (
        SPECS["Euler"].with_options(s_churn=1.0).stochastic and not SPECS["Euler"].with_options(s_noise=2).stochastic
    )


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("Euler a", {"s_churn": 1.0}, "Euler a has no option 's_churn' \\(it takes: eta, s_noise\\)"),
        ("UniPC", {"s_noise": 1.0}, "UniPC has no option 's_noise' \\(it takes: none\\)"),
        ("Euler", {"s_churn": -1.0}, "Euler option s_churn must be finite and >= 0"),
        ("Euler", {"s_noise": math.nan}, "s_noise must be finite and >= 0"),
        ("Euler", {"s_tmin": math.inf}, "s_tmin must be finite"),
        ("Heun", {"s_tmax": "big"}, "Heun option s_tmax must be a number"),
        ("DDIM", {"eta": 1.5}, "eta must be between 0 and 1"),
    ],
)
def test_bad_options_are_refused_by_name(name: str, options: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SPECS[name].with_options(**options)
