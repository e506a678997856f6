"""The server under faults and load: interrupts, a client that goes away, timeouts, 200 fuzzed bad requests, body
limits and 64 concurrent requests; after each, a valid request is still served.

A "slow device" fixture makes every UNet call take 20 ms (the session's run wrapped for the test), so a
generation is reliably in flight when the fault arrives.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runtime.output import to_uint8
from tests.conftest import needs_torch
from tests.serving.conftest import SIZE, detail_text, needs_server
from tests.serving.test_server import BODY, _pixels

pytestmark = [needs_torch, needs_server]

LONG = dict(BODY, steps=100)  # 2 s or more on the slow device


@pytest.fixture
def slow_device(tiny_model, monkeypatch):
    unet = tiny_model.backend.session("unet")
    run = unet.run

    def slow_run(*args, **kwargs):
        time.sleep(0.02)
        return run(*args, **kwargs)

    monkeypatch.setattr(unet, "run", slow_run)


def _wait_for_step(client, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/sdapi/v1/progress").json()["state"]["sampling_step"] < 1:
        assert time.monotonic() < deadline, "generation never started"
        time.sleep(0.02)


def _idle(service, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = service.status()
        if status["running"] == 0 and status["queued"] == 0:
            return True
        time.sleep(0.02)
    return False


def _assert_serving(client) -> None:
    response = client.post("/sdapi/v1/txt2img", json=BODY)
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 1


def test_interrupt_during_generation(client, service, slow_device):
    outcome = {}

    def generate():
        outcome["response"] = client.post("/sdapi/v1/txt2img", json=LONG)

    thread = threading.Thread(target=generate)
    start = time.monotonic()
    thread.start()
    _wait_for_step(client)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(30)
    response = outcome["response"]
    assert response.status_code == 200, response.text  # A1111: the images of the steps done, not an error
    assert time.monotonic() - start < 0.02 * 100 * 2  # stopped well before its 100 steps (2 UNet calls each)
    data = response.json()
    info = json.loads(data["info"])
    assert len(data["images"]) == 1 and info["steps"] == 100 and info["all_seeds"] == [LONG["seed"]]
    assert "Steps: 100," in info["infotexts"][0]  # the requested steps, as A1111 writes them
    assert service.counts["interrupted"] >= 1
    _assert_serving(client)


def test_interrupt_skips_the_remaining_iterations(client, service, slow_device):
    """n_iter calls that run one after another (hires fix runs alone): an interrupt during the first answers with
    its images only, as A1111 skips the remaining iterations."""
    outcome = {}
    body = dict(LONG, n_iter=3, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2)

    def generate():
        outcome["response"] = client.post("/sdapi/v1/txt2img", json=body)

    thread = threading.Thread(target=generate)
    thread.start()
    _wait_for_step(client)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(30)
    response = outcome["response"]
    assert response.status_code == 200, response.text
    data = response.json()
    assert len(data["images"]) == 1 and json.loads(data["info"])["all_seeds"] == [LONG["seed"]]
    assert _pixels(data["images"][0]).shape == (SIZE, SIZE, 3)  # no second pass after an interrupt
    assert _idle(service)
    _assert_serving(client)


def test_client_disconnect_cancels_its_generation(server, client, service, slow_device):
    import httpx

    cancelled = service.counts["cancelled"]
    with httpx.Client(base_url=server[0], timeout=httpx.Timeout(60, read=0.5)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/sdapi/v1/txt2img", json=LONG)
    assert _idle(service, timeout=3)  # far less than the 4+ s the generation needs: it was cancelled
    assert service.counts["cancelled"] > cancelled
    _assert_serving(client)


def test_request_timeout(server, client, slow_device):
    limits = server[1].state.limits
    limits.request_timeout = 0.3
    try:
        response = client.post("/sdapi/v1/txt2img", json=LONG)
    finally:
        limits.request_timeout = None
    assert response.status_code == 408 and "0.3 s" in response.json()["detail"]
    _assert_serving(client)


def test_body_limits(server, client):
    limits = server[1].state.limits
    big = json.dumps(dict(BODY, prompt="x" * (limits.max_body_bytes + 10))).encode()
    response = client.post("/sdapi/v1/txt2img", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    chunks = (big[i : i + 2**20] for i in range(0, len(big), 2**20))  # no Content-Length: counted while read
    response = client.post("/sdapi/v1/txt2img", content=chunks, headers={"content-type": "application/json"})
    assert response.status_code == 413
    limits.max_image_bytes, saved = 1000, limits.max_image_bytes
    try:
        image = base64.b64encode(bytes(4000)).decode()
        response = client.post("/sdapi/v1/img2img", json=dict(BODY, init_images=[image]))
    finally:
        limits.max_image_bytes = saved
    assert response.status_code == 422 and "larger than" in detail_text(response)
    _assert_serving(client)


BAD_BODIES = [
    (b"{", "JSON"), (b"[1, 2]", "dictionary"), (b"", "Field required"), (b"\xff\xfe\x00", "parsing the body"),
    (json.dumps(dict(BODY, steps="many")).encode(), "steps"), (json.dumps(dict(BODY, sampler_name="Nope")).encode(),
    "unknown sampler"), (json.dumps(dict(BODY, scheduler="Nope")).encode(), "unknown scheduler"),
    (json.dumps(dict(BODY, width=4096)).encode(), "width must be at most"),
    (json.dumps(dict(BODY, width=36)).encode(), "multiple of 8"), (json.dumps(dict(BODY, steps=1000)).encode(),
    "steps must be at most"), (json.dumps(dict(BODY, batch_size=8, n_iter=8)).encode(), "batch_size * n_iter"),
    (json.dumps(dict(BODY, batch_size=0)).encode(), "batch_size"), (json.dumps(dict(BODY, cfg_scale=1e9)).encode(),
    "cfg scale"), (json.dumps(dict(BODY, seed=2**70)).encode(), "seed"),
]  # fmt: skip


@pytest.mark.parametrize("body,message", BAD_BODIES)
def test_bad_requests_get_a_clear_422(client, body, message):
    headers = {"content-type": "application/json"}
    if body == b"":
        response = client.post("/sdapi/v1/png-info", content=b"{}", headers=headers)
    else:
        response = client.post("/sdapi/v1/txt2img", content=body, headers=headers)
    assert response.status_code == (400 if body.startswith(b"\xff") else 422), response.text  # 400: not UTF-8
    assert message.lower() in detail_text(response).lower()


def _json_types(schema: dict, components: dict) -> set[str]:
    """The JSON types a property schema allows ('any' when it does not say)."""
    if "$ref" in schema:
        return _json_types(components[schema["$ref"].rsplit("/", 1)[-1]], components)
    if "anyOf" in schema:
        return set().union(*(_json_types(s, components) for s in schema["anyOf"]))
    return {schema["type"]} if "type" in schema else {"any"}


def _wrong_value(types: set[str], rng: random.Random):
    """A value of a JSON type the property does not allow (and pydantic's lax mode does not coerce), or None."""
    candidates = []
    if "object" not in types:
        candidates.append({"nested": [1, {"x": None}]})
    if "array" not in types:
        candidates.append([1, "two", None])
    if "string" not in types and types & {"integer", "number", "boolean"}:
        candidates.append(rng.choice(["many", "", "1e999x", "NaN?"]))
    if "null" not in types:
        candidates.append(None)
    return rng.choice(candidates) if candidates else None


def _fuzz_cases(schema: dict, rng: random.Random, count: int) -> list[tuple[str, bytes, bool]]:
    """(route, body, must_fail) drawn from the published OpenAPI schema: wrong-typed fields, garbage images,
    broken JSON, and random in-range values (which may pass)."""
    components = schema["components"]["schemas"]
    routes = {"/sdapi/v1/txt2img": "Txt2ImgBody", "/sdapi/v1/img2img": "Img2ImgBody",
              "/sdapi/v1/png-info": "PngInfoBody"}  # fmt: skip
    cases = []
    while len(cases) < count:
        route, name = rng.choice(sorted(routes.items()))
        properties = components[name]["properties"]
        body = dict(BODY) if name != "PngInfoBody" else {"image": ""}
        kind = rng.random()
        if kind < 0.1:
            raw = json.dumps(body).encode()
            cases.append((route, raw[: rng.randrange(1, len(raw))], True))  # truncated JSON
            continue
        if kind < 0.25 or name == "PngInfoBody":
            field = "image" if name == "PngInfoBody" else ("init_images" if name == "Img2ImgBody" else None)
            if field is not None:
                garbage = base64.b64encode(rng.randbytes(rng.randrange(1, 200))).decode()
                garbage = rng.choice([garbage, garbage + "!*", "data:image/png;base64," + garbage])
                body[field] = [garbage] if field == "init_images" else garbage
                cases.append((route, json.dumps(body).encode(), True))
                continue
        field = rng.choice(sorted(properties))
        value = _wrong_value(_json_types(properties[field], components), rng)
        if value is None:
            continue
        body[field] = value
        cases.append((route, json.dumps(body).encode(), True))
        if rng.random() < 0.3:  # and an in-range variation that may well be valid
            variation = dict(BODY, steps=1, seed=rng.randrange(-1, 1000), cfg_scale=rng.uniform(0, 15),
                             sampler_name=rng.choice(["Euler", "Euler a", "DDIM", "nope"]))  # fmt: skip
            cases.append(("/sdapi/v1/txt2img", json.dumps(variation).encode(), False))
    return cases[:count]


@pytest.mark.slow
def test_200_fuzzed_requests_never_crash_the_server(client, service):
    schema = client.get("/openapi.json").json()
    cases = _fuzz_cases(schema, random.Random(20261122), 200)
    statuses = []
    for route, body, must_fail in cases:
        response = client.post(route, content=body, headers={"content-type": "application/json"})
        assert response.status_code < 500, (route, body[:200], response.text)
        assert isinstance(response.json(), dict)
        if must_fail:
            assert 400 <= response.status_code < 500, (route, body[:200], response.status_code)
        statuses.append(response.status_code)
    assert len(statuses) == 200 and statuses.count(200) > 0 and statuses.count(422) > 150
    _assert_serving(client)


@pytest.mark.slow
def test_64_concurrent_requests_no_loss_no_duplicates_no_mixups(client, service, tiny_model):
    bodies = [dict(BODY, prompt=f"request {i}", seed=1000 + 3 * i, negative_prompt="" if i % 2 else "blurry", steps=2)
              for i in range(64)]  # fmt: skip
    batches = service.counts["batches"]
    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(lambda b: client.post("/sdapi/v1/txt2img", json=b), bodies))
    assert [r.status_code for r in responses] == [200] * 64
    assert service.counts["batches"] - batches < 64  # some requests shared a batch
    seen = set()
    for body, response in zip(bodies, responses):
        data = response.json()
        info = json.loads(data["info"])
        assert info["all_seeds"] == [body["seed"]] and info["prompt"] == body["prompt"]
        reference = tiny_model.txt2img(body["prompt"], negative_prompt=body["negative_prompt"], seed=body["seed"],
                                       steps=2, cfg_scale=6.0, width=SIZE, height=SIZE, sampler="Euler a")  # fmt: skip
        pixels = _pixels(data["images"][0])
        assert np.array_equal(pixels, to_uint8(reference.images[0]))
        seen.add(pixels.tobytes())
    assert len(seen) == 64
