"""sdrt on Ray Serve (runtime.ray_serve): one local Ray instance (2 CPUs, no dashboard) for the whole module, the
application of deploy/ray-serve.yaml with 2 CPU replicas of the tiny model, on loopback.

References: the single-process server of `cli.py serve` (tests/serving/conftest.py's `client`, the same images byte
for byte), StableDiffusion.txt2img called in this process (the image each request must get), Ray's own view of its
replica processes (psutil, serve.status) for the replica killed under load.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from runtime.output import to_uint8
from tests.conftest import needs_torch
from tests.serving.conftest import SIZE, needs_server
from tests.serving.test_server import BODY, ROOT, _b64_png

HAS_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("yaml") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray[serve] not installed (ray extra)")
pytestmark = [needs_torch, needs_server, needs_ray]

APP = "sdrt"
CONFIG = ROOT / "deploy" / "ray-serve.yaml"
REPLICA_HEADER = "x-sdrt-replica"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_args() -> dict:
    """The application args of the repository's config file."""
    import yaml

    (application,) = yaml.safe_load(CONFIG.read_text())["applications"]
    assert application["import_path"] == "runtime.ray_serve:build_app"
    return copy.deepcopy(application["args"])


@pytest.fixture(scope="module")
def ray_url(tiny_sd1, serving_engines, tiny_model):
    """The base URL of the Ray application: the config file's args with the tiny model, 2 replicas, a batch window
    long enough for concurrent test requests to meet in one batch."""
    import ray
    from ray import serve

    from runtime.ray_serve import artifact_path, build_app

    args = dict(_config_args(), model=artifact_path(str(tiny_sd1), "onnxruntime", str(serving_engines)))
    args.update(replicas=2, batch_wait_s=0.25, limits={})
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_client(ray_url):
    import httpx

    with httpx.Client(base_url=ray_url, timeout=120) as client:
        yield client


def _pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB"))


def _same_answer(ray_response, local_response) -> None:
    assert ray_response.status_code == local_response.status_code == 200, (ray_response.text, local_response.text)
    ray_data, local_data = ray_response.json(), local_response.json()
    assert ray_data["images"] == local_data["images"]  # the PNG files, byte for byte (infotext chunk included)
    ray_info, local_info = json.loads(ray_data["info"]), json.loads(local_data["info"])
    ray_info.pop("job_timestamp"), local_info.pop("job_timestamp")
    assert ray_info == local_info


def test_images_equal_the_single_process_server(ray_client, client):
    rng = np.random.default_rng(3)
    init = _b64_png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    mask[8:24, 8:24] = 255
    img2img = dict(BODY, seed=7, init_images=[init], denoising_strength=0.6)
    hires = dict(BODY, seed=5, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=2)
    cases = [
        ("txt2img", dict(BODY, batch_size=2, n_iter=2)),
        ("txt2img", dict(hires, denoising_strength=0.5)),
        ("img2img", img2img),
        ("img2img", dict(img2img, mask=_b64_png(mask), mask_blur=2, inpainting_fill=1)),
    ]
    for mode, body in cases:
        _same_answer(ray_client.post(f"/sdapi/v1/{mode}", json=body), client.post(f"/sdapi/v1/{mode}", json=body))
    for route in ("/sdapi/v1/sd-models", "/sdapi/v1/samplers", "/sdapi/v1/options", "/sdapi/v1/cmd-flags"):
        ray_listing, local_listing = ray_client.get(route).json(), client.get(route).json()
        if route.endswith("cmd-flags"):
            assert {k: v for k, v in ray_listing.items() if k not in ("port", "sdrt_read_timeout")} == {
                k: v for k, v in local_listing.items() if k not in ("port", "sdrt_read_timeout")}  # fmt: skip
        else:
            assert ray_listing == local_listing, route
    assert ray_client.get("/openapi.json").json()["paths"].keys() == client.get("/openapi.json").json()["paths"].keys()
    bad = ray_client.post("/sdapi/v1/txt2img", json=dict(BODY, steps=0))
    assert bad.status_code == 422 == client.post("/sdapi/v1/txt2img", json=dict(BODY, steps=0)).status_code


def _metric(text: str, outcome: str) -> int:
    line = f'sdrt_generation_jobs_total{{outcome="{outcome}"}} '
    return sum(int(row[len(line) :]) for row in text.splitlines() if row.startswith(line))


def test_concurrent_requests_batch_and_spread_over_both_replicas(ray_client, tiny_model):
    """Concurrent compatible requests: some share a UNet batch on a replica (the replicas' counts say so), both
    replicas answer (the response header names the replica), and each image is the one its request makes alone."""
    before = ray_client.get("/metrics").text
    bodies = [dict(BODY, prompt=f"a photo of thing {i}", seed=100 + i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda body: ray_client.post("/sdapi/v1/txt2img", json=body), bodies))
    after = ray_client.get("/metrics").text
    replicas = set()
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        replicas.add(response.headers[REPLICA_HEADER])
        alone = tiny_model.txt2img(body["prompt"], negative_prompt="blurry", seed=body["seed"], steps=3,
                                   cfg_scale=6.0, width=SIZE, height=SIZE, sampler="Euler a")  # fmt: skip
        assert np.array_equal(_pixels(response.json()["images"][0]), to_uint8(alone.images[0]))
    assert len(replicas) == 2, replicas
    batches = _metric(after, "batches") - _metric(before, "batches")
    batched = _metric(after, "batched_requests") - _metric(before, "batched_requests")
    assert batched == 8 and batches < 8, (batches, batched)  # at least one batch ran several requests


def _wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


LONG = dict(BODY, steps=150, width=64, height=64)  # seconds of work on the tiny model


def test_progress_interrupt_and_cancel_reach_the_replicas(ray_url, ray_client):
    import httpx

    answers = {}
    thread = threading.Thread(target=lambda: answers.update(r=ray_client.post("/sdapi/v1/txt2img", json=LONG)))
    thread.start()
    state = _wait_for(lambda: (s := ray_client.get("/sdapi/v1/progress").json())["state"]["sampling_step"] > 0 and s,
                      60, "progress from the replica")  # fmt: skip
    assert state["state"]["job"] == "generating" and state["state"]["sampling_steps"] == 150
    assert 0 < state["progress"] < 1
    assert ray_client.post("/sdapi/v1/interrupt").json() == {}
    thread.join(60)
    response = answers["r"]
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    assert "Steps: 150," in json.loads(response.json()["info"])["infotexts"][0]  # A1111 keeps the requested steps
    assert ray_client.get("/sdapi/v1/progress").json()["state"]["interrupted"] is True

    # a client that goes away: its request is cancelled on the replica, which stops working on it (this request
    # alone takes over 20 s here; it is gone within a few seconds of the client)
    cancelled = _metric(ray_client.get("/metrics").text, "cancelled")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{ray_url}/sdapi/v1/txt2img", json=dict(LONG, seed=9, width=96, height=96), timeout=3)
    _wait_for(lambda: ray_client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0, 6,
              "the cancelled request to stop")  # fmt: skip
    assert _metric(ray_client.get("/metrics").text, "cancelled") == cancelled + 1


def _replica_processes() -> dict[int, str]:
    import psutil

    found = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(process.info["cmdline"] or ())
        if f"ServeReplica:{APP}:SdrtModel" in title:
            found[process.info["pid"]] = title
    return found


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments["SdrtModel"]
    return deployment.replica_states.get("RUNNING", 0)


def test_a_replica_killed_under_load(ray_client, tiny_model):
    """40 requests, one replica's process killed while they run: each request ends with its own image, at once or
    after retrying a 503; Ray starts a new replica."""
    pids = sorted(_replica_processes())
    assert len(pids) == 2
    bodies = [dict(BODY, prompt=f"load {i}", seed=1000 + i, steps=8) for i in range(40)]
    statuses: list[list[int]] = [[] for _ in bodies]

    def post(i: int):
        for _ in range(6):
            response = ray_client.post("/sdapi/v1/txt2img", json=bodies[i])
            statuses[i].append(response.status_code)
            if response.status_code != 503:
                return response
            assert "retry" in response.json()["detail"]
            time.sleep(0.5)
        return response

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, i) for i in range(40)]
        _wait_for(lambda: sum(f.done() for f in futures) >= 4, 120, "the load to start")
        os.kill(pids[0], signal.SIGKILL)
        responses = [f.result(timeout=300) for f in futures]
    for body, response, codes in zip(bodies, responses, statuses):
        assert response.status_code == 200, (codes, response.text)
        data = response.json()
        assert len(data["images"]) == 1 and json.loads(data["info"])["seed"] == body["seed"]
        alone = tiny_model.txt2img(body["prompt"], negative_prompt="blurry", seed=body["seed"], steps=8,
                                   cfg_scale=6.0, width=SIZE, height=SIZE, sampler="Euler a")  # fmt: skip
        assert np.array_equal(_pixels(data["images"][0]), to_uint8(alone.images[0])), body["seed"]
    assert all(set(codes) <= {200, 503} for codes in statuses)
    _wait_for(lambda: _running_replicas() == 2 and len(_replica_processes()) == 2, 120, "Ray to replace the replica")
    assert pids[0] not in _replica_processes()
    assert ray_client.post("/sdapi/v1/txt2img", json=BODY).status_code == 200


def test_build_app_scaling_options(ray_url, serving_engines, tiny_sd1):
    """Replicas or Ray's autoscaling config, and one-line errors for bad ones (before anything is deployed)."""
    from runtime.errors import InvalidRequestError
    from runtime.ray_serve import build_app

    model = str(tiny_sd1)
    engines = str(serving_engines)

    def model_deployment(**args):
        return build_app(dict(model=model, engines=engines, **args))._bound_deployment.init_args[0]._bound_deployment

    for args in ({"replicas": 3}, {"autoscale": "1:4"}):
        deployment = model_deployment(**args)
        if "replicas" in args:
            assert deployment.num_replicas == 3 and deployment.ray_actor_options["num_cpus"] == 1
        else:
            autoscaling = deployment._deployment_config.autoscaling_config
            assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 4)
    assert model_deployment(backend="onnxruntime-cuda").ray_actor_options["num_gpus"] == 1  # checked on its nodes
    for args, message in (({"replicas": 0}, "at least 1"), ({"autoscale": "4:1"}, "MIN <= MAX"), ({}, "args.model")):
        with pytest.raises(InvalidRequestError, match=message):
            build_app(dict(model=model, engines=engines, **args) if args else {})


def test_cli_ray_options_are_checked_first(tiny_sd1):
    for extra, message in ((["--replicas", "2"], "apply with --ray"), (["--ray", "--autoscale", "3:1"], "MIN <= MAX")):
        argv = [sys.executable, str(ROOT / "cli.py"), "--quiet", "serve", "--model", str(tiny_sd1), *extra]
        result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_shutdown_drains_queued_requests(ray_client, tiny_model):
    """Requests running and queued when the application is deleted all finish with their images (Serve's graceful
    shutdown waits for them; the replicas' Services drain). Last: it takes the application down."""
    from ray import serve

    bodies = [dict(BODY, prompt=f"drain {i}", seed=2000 + i, steps=30 + i) for i in range(6)]  # none batch together
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ray_client.post, "/sdapi/v1/txt2img", json=body) for body in bodies]
        _wait_for(lambda: ray_client.get("/sdapi/v1/progress").json()["state"]["job_count"] >= 4, 60,
                  "requests to queue on the replicas")  # 2 running at most: the others queued # fmt: skip
        serve.delete(APP)
        responses = [f.result(timeout=120) for f in futures]
    for body, response in zip(bodies, responses):
        assert response.status_code == 200, response.text
        alone = tiny_model.txt2img(body["prompt"], negative_prompt="blurry", seed=body["seed"], steps=body["steps"],
                                   cfg_scale=6.0, width=SIZE, height=SIZE, sampler="Euler a")  # fmt: skip
        assert np.array_equal(_pixels(response.json()["images"][0]), to_uint8(alone.images[0]))
    assert _replica_processes() == {}
