"""runtime.serving.Service: many threads, one worker; batched requests equal their single-request images.

The reference of every image is StableDiffusion.txt2img called directly for that one request (the pipeline the
parity tests hold against diffusers); the service must give each caller exactly that image.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runtime.errors import InvalidRequestError, RequestCancelled, RequestTimeout, ServiceClosed
from runtime.serving import Service, ServiceConfig
from tests.conftest import needs_torch
from tests.serving.conftest import OPTIONS, SIZE

pytestmark = needs_torch

LONG_PROMPT = ", ".join(f"word{i}" for i in range(90))  # two 75-token chunks: a different UNet text length


def _requests(n: int) -> list[dict]:
    """n requests that differ in every per-row field: prompt, negative prompt, seed and batch size."""
    return [
        dict(prompt=f"a photo of thing {i}", negative_prompt="blurry" if i % 3 else "", seed=100 + 7 * i,
             batch_size=1 + (i % 4 == 1))
        for i in range(n)
    ]  # fmt: skip


def _single(model, request: dict) -> np.ndarray:
    options = {**OPTIONS, **request}  # the request's own settings win
    return model.txt2img(options.pop("prompt"), **options).images


def _gate():
    """A progress callback that holds the worker at the first step until released (deterministic queueing)."""
    entered, release = threading.Event(), threading.Event()

    def callback(progress) -> None:
        entered.set()
        release.wait(30)

    return callback, entered, release


def test_concurrent_requests_are_batched_and_each_gets_its_own_images(tiny_model):
    requests = _requests(10) + [dict(prompt=LONG_PROMPT, seed=5, negative_prompt="", batch_size=1)]
    expected = [_single(tiny_model, r) for r in requests]
    with Service(tiny_model, ServiceConfig(max_batch_images=16)) as service:
        callback, entered, release = _gate()
        blocker = service.submit("txt2img", "hold", callback=callback, seed=1, **OPTIONS)
        assert entered.wait(30)
        jobs = [service.submit("txt2img", r["prompt"], **{k: v for k, v in r.items() if k != "prompt"}, **OPTIONS)
                for r in requests]  # fmt: skip
        release.set()
        results = [job.result(60) for job in jobs]
        blocker.result(60)
        counts = dict(service.counts)
    for request, result, reference in zip(requests, results, expected):
        assert result.seeds == [request["seed"] + i for i in range(request["batch_size"])]
        assert result.images.shape == reference.shape
        np.testing.assert_allclose(result.images, reference, rtol=0, atol=1e-5)
        assert result.infotexts[0].startswith(request["prompt"])
    assert counts["batches"] == 2 and counts["batched_requests"] == 12  # the blocker, then all eleven at once
    assert counts["completed"] == 12


def test_a_request_alone_is_bit_identical_to_the_api(tiny_model, service):
    request = _requests(2)[1]  # batch size 2, a negative prompt
    result = service.txt2img(request["prompt"], **{k: v for k, v in request.items() if k != "prompt"}, **OPTIONS)
    assert np.array_equal(result.images, _single(tiny_model, request))
    direct = tiny_model.txt2img(request["prompt"], **{k: v for k, v in request.items() if k != "prompt"}, **OPTIONS)
    assert result.infotexts == direct.infotexts


def test_many_threads_no_loss_no_duplicates(tiny_model, service):
    requests = _requests(12)
    expected = {r["seed"]: _single(tiny_model, r) for r in requests}

    def call(request):
        return service.txt2img(request["prompt"], **{k: v for k, v in request.items() if k != "prompt"}, **OPTIONS)

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(call, requests))
    assert len(results) == len(requests)
    for request, result in zip(requests, results):
        np.testing.assert_allclose(result.images, expected[request["seed"]], rtol=0, atol=1e-5)
    firsts = {result.images[0].tobytes() for result in results}
    assert len(firsts) == len(requests)  # no two callers got the same image


def test_settings_that_differ_are_never_batched(tiny_model):
    with Service(tiny_model) as service:
        callback, entered, release = _gate()
        blocker = service.submit("txt2img", "hold", callback=callback, seed=1, **OPTIONS)
        assert entered.wait(30)
        a = service.submit("txt2img", "a", seed=1, **OPTIONS)
        b = service.submit("txt2img", "b", seed=2, **dict(OPTIONS, cfg_scale=3.0))
        c = service.submit("txt2img", "c", seed=3, **dict(OPTIONS, sampler="Euler"))
        release.set()
        for job in (blocker, a, b, c):
            job.result(60)
        assert service.counts["batches"] == 4
    reference = _single(tiny_model, dict(prompt="b", seed=2, cfg_scale=3.0))
    np.testing.assert_allclose(b.result().images, reference, rtol=0, atol=1e-5)


def test_batching_switch_off_runs_each_request_alone(tiny_model):
    with Service(tiny_model, ServiceConfig(batching=False)) as service:
        jobs = [service.submit("txt2img", f"p{i}", seed=i, **OPTIONS) for i in range(3)]
        for job in jobs:
            job.result(60)
        assert service.counts["batches"] == 3 and service.counts["batched_requests"] == 3


def test_progress_reports_every_step_with_a_preview(tiny_model, service):
    seen = []
    result = service.txt2img("progress", seed=3, callback=seen.append, preview=True, **dict(OPTIONS, steps=5))
    assert [p.step for p in seen] == [1, 2, 3, 4, 5]
    assert all(p.steps == 5 for p in seen)
    latent = SIZE // tiny_model.info["vae_scale_factor"]
    assert seen[0].preview.shape == (1, 4, latent, latent)  # this request's rows of the sampler's x
    assert result.images.shape == (1, SIZE, SIZE, 3)


def test_progress_of_unbatched_modes(tiny_model, service):
    from PIL import Image

    seen = []
    image = Image.fromarray(np.full((SIZE, SIZE, 3), 128, dtype=np.uint8))
    service.img2img("img2img", image, seed=3, strength=1.0, callback=seen.append, **OPTIONS)
    assert [p.step for p in seen] == [1, 2, 3]


def test_cancel_a_queued_request(service):
    callback, entered, release = _gate()
    blocker = service.submit("txt2img", "hold", callback=callback, seed=1, **OPTIONS)
    assert entered.wait(30)
    ran = []
    queued = service.submit("txt2img", "never", seed=2, callback=ran.append, **OPTIONS)
    assert queued.cancel()
    release.set()
    with pytest.raises(RequestCancelled):
        queued.result(30)
    blocker.result(30)
    assert ran == []  # it never reached the device


def test_cancel_a_running_request_and_keep_serving(service):
    holder = {}

    def cancel_at_second_step(progress):
        if progress.step == 2:
            holder["job"].cancel()

    holder["job"] = service.submit("txt2img", "stop me", seed=1, callback=cancel_at_second_step,
                                   **dict(OPTIONS, steps=50))  # fmt: skip
    with pytest.raises(RequestCancelled):
        holder["job"].result(30)
    assert holder["job"].step == 2  # stopped there, not at the end
    assert service.txt2img("after", seed=2, **OPTIONS).images.shape == (1, SIZE, SIZE, 3)


def test_cancelling_one_request_leaves_its_batch_mates_alone(tiny_model, service):
    callback, entered, release = _gate()
    blocker = service.submit("txt2img", "hold", callback=callback, seed=1, **OPTIONS)
    assert entered.wait(30)
    holder = {}
    kept = service.submit("txt2img", "kept", seed=8, **OPTIONS)
    holder["job"] = service.submit("txt2img", "dropped", seed=9, callback=lambda p: holder["job"].cancel(), **OPTIONS)
    release.set()
    blocker.result(30)
    with pytest.raises(RequestCancelled):
        holder["job"].result(30)
    np.testing.assert_allclose(kept.result(30).images, _single(tiny_model, dict(prompt="kept", seed=8)), atol=1e-5)


def test_timeouts_while_running_and_while_queued(service):
    slow = service.submit("txt2img", "slow", seed=1, timeout=0.3, callback=lambda p: time.sleep(0.1),
                          **dict(OPTIONS, steps=40))  # fmt: skip
    with pytest.raises(RequestTimeout):
        slow.result()
    callback, entered, release = _gate()
    blocker = service.submit("txt2img", "hold", callback=callback, seed=1, **OPTIONS)
    assert entered.wait(30)
    queued = service.submit("txt2img", "late", seed=2, timeout=0.2, **OPTIONS)
    start = time.monotonic()
    with pytest.raises(RequestTimeout):
        queued.result()
    assert time.monotonic() - start < 5
    release.set()
    blocker.result(30)
    assert service.txt2img("after", seed=3, **OPTIONS).images.shape == (1, SIZE, SIZE, 3)


def test_bad_requests_raise_typed_errors_in_the_caller(service):
    with pytest.raises(InvalidRequestError, match="unknown sampler"):
        service.submit("txt2img", "x", sampler="Nope")
    with pytest.raises(InvalidRequestError, match="bad txt2img option"):
        service.submit("txt2img", "x", colour="red")
    with pytest.raises(InvalidRequestError, match="width"):
        service.submit("txt2img", "x", width=60, height=64)
    with pytest.raises(InvalidRequestError, match="unknown mode"):
        service.submit("paint", "x")
    with pytest.raises(InvalidRequestError, match="timeout"):
        service.submit("txt2img", "x", timeout=-1)


def test_errors_raised_on_the_worker_reach_their_caller(service):
    with pytest.raises(InvalidRequestError, match="clip skip"):
        service.txt2img("x", seed=1, clip_skip=50, **OPTIONS)  # only the text encoder knows its depth
    assert service.txt2img("after", seed=3, **OPTIONS).images.shape == (1, SIZE, SIZE, 3)


def test_shutdown_drains_or_cancels(tiny_model):
    service = Service(tiny_model)
    jobs = [service.submit("txt2img", f"p{i}", seed=i, **OPTIONS) for i in range(3)]
    service.close(drain=True)
    assert all(job.result(0).images.shape == (1, SIZE, SIZE, 3) for job in jobs)
    with pytest.raises(ServiceClosed):
        service.submit("txt2img", "late", seed=1, **OPTIONS)

    service = Service(tiny_model)
    callback, entered, release = _gate()
    running = service.submit("txt2img", "hold", callback=callback, seed=1, **OPTIONS)
    assert entered.wait(30)
    queued = service.submit("txt2img", "queued", seed=2, **OPTIONS)
    closer = threading.Thread(target=service.close, kwargs={"drain": False})
    closer.start()
    for job in (running, queued):
        with pytest.raises(RequestCancelled):
            job.result(30)
    release.set()
    closer.join(30)
    assert not closer.is_alive()
