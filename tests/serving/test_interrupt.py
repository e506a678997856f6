"""Service.interrupt() as A1111's interrupt: sampling stops after the current step and the request returns the
images of the steps done, equal to diffusers' StableDiffusionPipeline stopped by `pipe._interrupt` at that step.

The interrupt comes from the job's own progress callback (in the worker thread), so the step it lands on is exact.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.serving.conftest import SIZE

pytestmark = needs_torch

PROMPT, NEGATIVE = "a photo of a cat", "blurry"
SEED, STEPS, CFG, STOP = 11, 8, 6.0, 3  # STOP: steps done before the interrupt takes effect


def diffusers_interrupted(folder, sampler: str, stop: int | None) -> np.ndarray:
    """diffusers' pipeline with callback_on_step_end setting pipe._interrupt after step `stop` (None: never)."""
    import diffusers
    import torch

    from runtime.samplers import resolve_sampler

    spec, schedule_type = resolve_sampler(sampler)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    scheduler_class = getattr(diffusers, spec.diffusers_class)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **spec.diffusers_kwargs(schedule_type))

    def on_step_end(pipeline, i, t, tensors):
        if stop is not None and i + 1 == stop:
            pipeline._interrupt = True
        return tensors

    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE,
               width=SIZE, generator=torch.Generator("cpu").manual_seed(SEED), callback_on_step_end=on_step_end,
               output_type="np")  # fmt: skip
    return out.images


@pytest.fixture(scope="module")
def references(tiny_sd1):
    cache = {}

    def get(sampler: str, stop: int | None) -> np.ndarray:
        if (sampler, stop) not in cache:
            cache[sampler, stop] = diffusers_interrupted(tiny_sd1, sampler, stop)
        return cache[sampler, stop]

    return get


def _interrupted_run(service, sampler: str, stop: int):
    """A txt2img request that interrupts the service from its own progress callback at step `stop`."""

    def callback(progress) -> None:
        if progress.step == stop:
            assert service.interrupt() == 1

    return service.submit("txt2img", PROMPT, negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, cfg_scale=CFG,
                          width=SIZE, height=SIZE, sampler=sampler, callback=callback).result(60)  # fmt: skip


@pytest.mark.parametrize("batching", [True, False], ids=["batched", "alone"])
@pytest.mark.parametrize("sampler", ["Euler", "DDIM", "DPM++ 2M"])
def test_interrupt_matches_diffusers(tiny_model, references, sampler, batching):
    from runtime.serving import Service, ServiceConfig

    with Service(tiny_model, ServiceConfig(batching=batching)) as service:
        result = _interrupted_run(service, sampler, STOP)
        assert service.counts["interrupted"] == 1
    reference = references(sampler, STOP)
    diff = np.abs(result.images.astype(np.float64) - reference.astype(np.float64))
    assert diff.mean() <= 2e-5 and diff.max() <= 1e-3, f"mean {diff.mean():.2e}, max {diff.max():.2e}"
    assert np.abs(reference - references(sampler, None)).mean() > 1e-3  # the interrupt changed the image
    assert result.interrupted and f"Steps: {STEPS}," in result.infotexts[0]  # A1111 keeps the requested steps


def test_no_interrupt_is_unchanged(service, tiny_model):
    """Nothing running: interrupt() is a no-op returning 0, and a later request is the plain API's image."""
    assert service.interrupt() == 0
    options = dict(negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, cfg_scale=CFG, width=SIZE, height=SIZE)
    result = service.txt2img(PROMPT, **options)
    assert not result.interrupted
    assert np.array_equal(result.images, tiny_model.txt2img(PROMPT, **options).images)


def test_interrupt_of_part_of_a_batch_changes_nothing(tiny_model):
    """A batch stops only when every request in it is interrupted: interrupting one leaves all images as they are."""
    from runtime.serving import Service

    options = dict(negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, width=SIZE, height=SIZE)
    jobs = []

    def interrupt_first(progress) -> None:
        if progress.step == 2:
            assert jobs[0].interrupt()

    with Service(tiny_model) as service:
        with service._cond:  # hold the worker so both requests are queued before it takes a batch
            jobs.append(service.submit("txt2img", PROMPT, seed=SEED, **options))
            jobs.append(service.submit("txt2img", PROMPT, seed=SEED + 5, callback=interrupt_first, **options))
        first, second = jobs
        results = [first.result(60), second.result(60)]
        assert service.counts["batches"] == 1 and service.counts["batched_requests"] == 2
    for seed, result in zip((SEED, SEED + 5), results):
        assert np.array_equal(result.images, tiny_model.txt2img(PROMPT, seed=seed, **options).images)
