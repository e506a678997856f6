"""runtime.rng against torch's own CPU generator (the independent reference) and diffusers' randn_tensor."""

from __future__ import annotations

import time

import numpy as np
import pytest

from runtime.errors import InvalidRequestError
from runtime.rng import TorchGenerator, batch_randn, random_seed

torch = pytest.importorskip("torch")

TOL = 1e-5  # torch computes Box-Muller in float32, we in float64: measured max 1.5e-6
SEEDS = [0, 1, 42, 1234, 2**31 - 1, 2**32 - 1, 2**32, 2**32 + 5, 2**63 - 1, 2**64 - 1, -1, -(2**63)]
SHAPES = [(1,), (2,), (3,), (15,), (16,), (17,), (31,), (32,), (33,), (100,), (4, 64, 64), (2, 4, 60, 44), (4, 9, 7)]


def _torch_randn(generator: torch.Generator, shape) -> np.ndarray:
    return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and b.dtype == np.float32
    return float(np.abs(a - b).max()) if a.size else 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_randn_matches_torch_for_every_shape(seed: int) -> None:
    for shape in SHAPES:
        expected = _torch_randn(torch.Generator("cpu").manual_seed(seed), shape)
        assert _max_diff(expected, TorchGenerator(seed).randn(shape)) <= TOL, shape


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, -5])
def test_successive_calls_mixing_sizes_keep_matching(seed: int) -> None:
    # n < 16 uses the scalar path with the cached second normal; n >= 16 the block path, which leaves the cache
    sizes = [1, 3, 17, 1, 1, 2, 16, 5, (2, 50), 1, 15, 33, 1, (1, 4, 8, 8), 7]
    reference, ours = torch.Generator("cpu").manual_seed(seed), TorchGenerator(seed)
    for size in sizes:
        assert _max_diff(_torch_randn(reference, size), ours.randn(size)) <= TOL, size


def test_empty_and_scalar_like_shapes() -> None:
    g = TorchGenerator(3)
    assert g.randn((0,)).shape == (0,)
    assert g.randn((2, 0, 5)).shape == (2, 0, 5)
    reference = torch.Generator("cpu").manual_seed(3)
    _torch_randn(reference, (0,))
    assert _max_diff(_torch_randn(reference, 4), g.randn(4)) <= TOL


def test_seed_range_follows_torch_manual_seed() -> None:
    # torch: low 32 bits of the seed; negatives are two's complement; outside [-2**63, 2**64) is an error
    assert np.array_equal(TorchGenerator(2**32 + 5).randn(20), TorchGenerator(5).randn(20))
    assert np.array_equal(TorchGenerator(-1).randn(20), TorchGenerator(2**32 - 1).randn(20))
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError):
            torch.Generator("cpu").manual_seed(bad)
        with pytest.raises(InvalidRequestError, match="out of range"):
            TorchGenerator(bad)
    for bad in (1.5, True, "3"):
        with pytest.raises(InvalidRequestError, match="integer"):
            TorchGenerator(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="negative"):
        TorchGenerator(0).randn((2, -1))


def test_batch_randn_matches_diffusers_randn_tensor() -> None:
    from diffusers.utils.torch_utils import randn_tensor

    seeds = [42, 43, 2**32 + 44]
    shape = (len(seeds), 4, 24, 20)
    expected = randn_tensor(shape, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).numpy()
    got = batch_randn([TorchGenerator(s) for s in seeds], shape[1:])
    assert _max_diff(expected, got) <= TOL
    with pytest.raises(InvalidRequestError):
        batch_randn([], (4, 8, 8))


def test_batch_randn_streams_continue_like_an_ancestral_step() -> None:
    from diffusers.utils.torch_utils import randn_tensor

    reference = [torch.Generator("cpu").manual_seed(s) for s in (1, 2)]
    ours = [TorchGenerator(s) for s in (1, 2)]
    for _ in range(3):  # latents, then per-step noise from the same streams
        expected = randn_tensor((2, 4, 8, 8), generator=reference).numpy()
        assert _max_diff(expected, batch_randn(ours, (4, 8, 8))) <= TOL


def test_random_seed_is_a_fresh_valid_seed() -> None:
    seeds = {random_seed() for _ in range(20)}
    assert len(seeds) > 15
    assert all(0 <= s < 2**32 for s in seeds)
    for s in list(seeds)[:3]:
        torch.Generator("cpu").manual_seed(s)


def test_sd_latent_noise_is_fast() -> None:
    g = TorchGenerator(0)
    g.randn((1, 4, 128, 128))
    start = time.perf_counter()
    for _ in range(10):
        g.randn((1, 4, 128, 128))
    per_call = (time.perf_counter() - start) / 10
    assert per_call < 0.02  # ~2.5 ms measured; loose bound for a shared 2-core CPU
