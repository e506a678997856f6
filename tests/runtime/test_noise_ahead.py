"""Noise drawn ahead on a worker (runtime.rng.NoiseAhead) equals drawing it inline, bit for bit, in stream order.

The reference is the inline draw itself (batch_randn on fresh streams of the same seeds), which test_rng checks
against torch. Besides the arrays, the real streams must end where inline drawing leaves them, so whatever draws
after sampling (hires fix, a second pass) is unchanged.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from export.configs import SD15_SCHEDULER
from runtime.denoiser import Denoiser
from runtime.errors import InvalidRequestError
from runtime.pipelines.common import run_sampler
from runtime.pipelines.conditioning import Conditioning
from runtime.rng import NoiseAhead, TorchGenerator, batch_randn, noise_source
from runtime.samplers import SPECS, make_schedule, sample

SEEDS = (11, 12)


def _streams() -> list[TorchGenerator]:
    return [TorchGenerator(s) for s in SEEDS]


def _wait_until(condition, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "the worker did not draw ahead"
        time.sleep(0.001)


@pytest.mark.parametrize("shape", [(4, 8, 8), (3,), (17,)])  # the block path, the cached scalar path, a tail
def test_draws_ahead_equal_inline_draws(shape) -> None:
    inline, real = _streams(), _streams()
    noise = NoiseAhead(real, shape, depth=2)
    noise.model_running(True)
    _wait_until(lambda: noise._results.qsize() == 2)  # two draws made before anyone asked
    assert np.array_equal(real[0].randn(5), TorchGenerator(SEEDS[0]).randn(5))  # the real streams were not used
    real[0].restore(TorchGenerator(SEEDS[0]).state())
    for _ in range(5):
        noise.model_running(False)
        assert np.array_equal(noise(), batch_randn(inline, shape))
        noise.model_running(True)
    noise.close()
    for ours, reference in zip(real, inline):  # the streams continue exactly after the 5 draws taken
        assert np.array_equal(ours.randn(shape), reference.randn(shape))


def test_closing_before_any_draw_leaves_the_streams_untouched() -> None:
    real = _streams()
    noise = NoiseAhead(real, (4, 8, 8))
    noise.model_running(True)
    _wait_until(lambda: noise._results.qsize() == 2)
    noise.close()
    assert all(np.array_equal(g.randn(16), TorchGenerator(s).randn(16)) for g, s in zip(real, SEEDS))


def test_a_draw_nobody_permitted_still_arrives() -> None:
    """Called while model_running is False (no UNet call in between): it draws on demand instead of waiting."""
    inline, real = _streams(), _streams()
    with noise_source(real, (4, 4, 4)) as noise:
        assert np.array_equal(noise(), batch_randn(inline, (4, 4, 4)))
    with pytest.raises(InvalidRequestError):
        NoiseAhead(real, (2, -1))
    with pytest.raises(InvalidRequestError):
        NoiseAhead([], (4, 4))


class SlowUnet:
    """A session that takes 2 ms (the worker draws meanwhile) and depends on its inputs."""

    def run(self, feeds, outputs=None):
        time.sleep(0.002)
        out = np.tanh(feeds["sample"]) * 0.5 + feeds["timestep"][:, None, None, None] / 2000
        return {"noise_pred": out.astype(np.float32)}


def _denoiser() -> Denoiser:
    text = np.zeros((4, 77, 8), np.float32)  # uncond and cond rows of 2 images
    conditioning = Conditioning([text], np.zeros(1, np.int64), np.ones(1, np.float32), True)
    return Denoiser(SlowUnet(), conditioning, 7.0, "epsilon")


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE"])
def test_sampling_with_noise_ahead_is_bit_identical(name: str) -> None:
    """run_sampler (noise drawn ahead, worker paced by the denoiser) against sample() with inline draws."""
    spec = SPECS[name]
    schedule = make_schedule(spec, "default", SD15_SCHEDULER, 6)
    x = batch_randn(_streams(), (4, 8, 8)) * np.float32(schedule.init_noise_sigma)
    real, inline = _streams(), _streams()
    for g in real + inline:  # the streams' position after the initial latents
        g.randn((4, 8, 8))
    ahead = run_sampler(spec, _denoiser(), x, schedule, real)
    expected = schedule.latents(sample(spec, _denoiser(), x, schedule, lambda: batch_randn(inline, (4, 8, 8))))
    assert np.array_equal(ahead, expected)
    assert all(np.array_equal(a.randn(20), b.randn(20)) for a, b in zip(real, inline))


def test_interrupted_sampling_leaves_the_streams_after_the_steps_it_ran() -> None:
    spec = SPECS["Euler a"]  # one draw per step
    schedule = make_schedule(spec, "default", SD15_SCHEDULER, 8)
    real, inline = _streams(), _streams()
    x = np.ones((2, 4, 8, 8), np.float32)
    steps = []
    run_sampler(spec, _denoiser(), x, schedule, real, callback=lambda i, x: steps.append(i) or x,
                interrupted=lambda: len(steps) == 3)  # fmt: skip
    for _ in range(3):
        batch_randn(inline, (4, 8, 8))
    assert all(np.array_equal(a.randn(20), b.randn(20)) for a, b in zip(real, inline))
