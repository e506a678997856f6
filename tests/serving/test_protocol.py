"""The server's A1111 protocol on loopback: metadata that reproduces an image, the start-up routes, 405 Allow, CORS,
the body read timeout, bounded metrics labels, offline /docs and what the OpenAPI schema states.

References: StableDiffusion's own methods (the images), A1111's documented behaviour transcribed here (infotext keys,
the routes' shapes, CORS set up as its webui.py does), RFC 9110 (Allow, the standard methods), Starlette's CORS
rules, psutil (memory), prometheus_client's parser (metrics), jsonschema (responses against the stated schema).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from runtime.output import to_uint8
from tests.conftest import needs_torch
from tests.serving.conftest import SIZE, detail_text, needs_server
from tests.serving.test_faults import LONG, _idle, _wait_for_step, slow_device  # noqa: F401 (a fixture)
from tests.serving.test_server import BODY, ROOT, _pixels, _png_text

pytestmark = [needs_torch, needs_server]

ORIGINS = "http://allowed.example,http://also.example"
STYLES = ({"name": "film", "prompt": "{prompt}, film grain", "negative_prompt": "digital"},)
READ_TIMEOUT = 0.5
STANDARD_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}  # RFC 9110/5789


@pytest.fixture(scope="module")
def proto(service):
    """(url, app) of a server over the module's service with CORS origins, a short read timeout and one style."""
    from runtime.server import ServerThread
    from runtime.server.app import create_app
    from runtime.server.options import ServerOptions

    options = ServerOptions(cors_allow_origins=ORIGINS, read_timeout=READ_TIMEOUT, styles=STYLES)
    app = create_app(service, close_on_shutdown=False, options=options, flags={"port": 1234})
    with ServerThread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def http(proto):
    import httpx

    with httpx.Client(base_url=proto[0], timeout=120) as client:
        yield client


def _infotext_fields(text: str) -> dict:
    from runtime.output import parse_parameters

    return parse_parameters(text)[2]


# ------------------------------------------------------------------------------------------------ metadata


def test_clip_skip_is_recorded_and_reproduces_the_image(http, tiny_model):
    body = dict(BODY, override_settings={"CLIP_stop_at_last_layers": 2})
    data = http.post("/sdapi/v1/txt2img", json=body).json()
    info, text = json.loads(data["info"]), _png_text(data["images"][0])
    fields = _infotext_fields(text)
    assert fields["Clip skip"] == "2" and info["clip_skip"] == 2  # A1111 writes "Clip skip" from 2 on
    again = tiny_model.txt2img(BODY["prompt"], negative_prompt=BODY["negative_prompt"], seed=int(fields["Seed"]),
                               steps=int(fields["Steps"]), cfg_scale=float(fields["CFG scale"]), width=SIZE,
                               height=SIZE, sampler=fields["Sampler"], clip_skip=int(fields["Clip skip"]))  # fmt: skip
    assert np.array_equal(_pixels(data["images"][0]), to_uint8(again.images[0]))
    plain = http.post("/sdapi/v1/txt2img", json=BODY).json()
    assert "Clip skip" not in _png_text(plain["images"][0])
    assert not np.array_equal(_pixels(plain["images"][0]), _pixels(data["images"][0]))  # the option matters


def test_model_hash_agrees_and_hires_denoising_strength(http):
    models = http.get("/sdapi/v1/sd-models").json()
    hires = dict(BODY, enable_hr=True, hr_scale=2, denoising_strength=0.6, hr_second_pass_steps=1)
    data = http.post("/sdapi/v1/txt2img", json=hires).json()
    info = json.loads(data["info"])
    fields = _infotext_fields(info["infotexts"][0])
    assert info["sd_model_hash"] == models[0]["hash"] == fields["Model hash"]
    assert models[0]["title"].endswith(f"[{info['sd_model_hash']}]")
    assert info["denoising_strength"] == 0.6 and fields["Denoising strength"] == "0.6"
    assert _pixels(data["images"][0]).shape == (2 * SIZE, 2 * SIZE, 3)
    assert json.loads(http.post("/sdapi/v1/txt2img", json=BODY).json()["info"])["denoising_strength"] is None


def test_hires_fix_stays_within_the_limits(http, proto):
    limits = proto[1].state.limits  # A1111's hires fix makes width * hr_scale: the final size is what must fit
    scale = limits.max_side // SIZE + 1
    response = http.post("/sdapi/v1/txt2img", json=dict(BODY, enable_hr=True, hr_scale=scale))
    assert response.status_code == 422
    assert f"width must be at most {limits.max_side}, not {SIZE * scale}" in detail_text(response)
    response = http.post("/sdapi/v1/txt2img", json=dict(BODY, enable_hr=True, hr_resize_x=limits.max_side + 8))
    assert response.status_code == 422 and "hires" in detail_text(response)
    steps = dict(BODY, enable_hr=True, hr_scale=1, hr_second_pass_steps=limits.max_steps + 1)
    assert http.post("/sdapi/v1/txt2img", json=steps).status_code == 422


def test_progress_job_timestamp_and_interrupted(http, service, slow_device):  # noqa: F811
    outcome = {}
    before = time.strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=lambda: outcome.update(r=http.post("/sdapi/v1/txt2img", json=LONG)))
    thread.start()
    _wait_for_step(http)
    running = http.get("/sdapi/v1/progress").json()["state"]
    assert re.fullmatch(r"\d{14}", running["job_timestamp"]) and running["job_timestamp"] >= before
    assert running["job_timestamp"] <= time.strftime("%Y%m%d%H%M%S") and running["interrupted"] is False
    assert http.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(30)
    info = json.loads(outcome["r"].json()["info"])
    assert info["job_timestamp"] == running["job_timestamp"]  # the job's start, as /progress showed it
    state = http.get("/sdapi/v1/progress").json()["state"]
    assert state["interrupted"] is True and state["job_timestamp"] == running["job_timestamp"]  # until the next job
    time.sleep(1.0)  # the next job starts in a later second
    http.post("/sdapi/v1/txt2img", json=BODY)
    state = http.get("/sdapi/v1/progress").json()["state"]
    assert state["interrupted"] is False and state["job_timestamp"] > running["job_timestamp"]


def test_skip_stops_the_current_iteration_only(http, service, tiny_model, slow_device, monkeypatch):  # noqa: F811
    """A1111's skip ends the running image's sampling but, unlike interrupt, runs the remaining n_iter iterations."""
    outcome, skipped, read = {}, threading.Event(), threading.Event()
    next_group = service._next_group

    def held_next_group():  # the next iteration starts (and clears `skipped`, as A1111's) once /progress was read
        if skipped.is_set():
            read.wait(30)
        return next_group()

    monkeypatch.setattr(service, "_next_group", held_next_group)
    body = dict(LONG, steps=30, n_iter=2, enable_hr=True, hr_scale=1, hr_second_pass_steps=1)  # hires: runs alone
    thread = threading.Thread(target=lambda: outcome.update(r=http.post("/sdapi/v1/txt2img", json=body)))
    thread.start()
    _wait_for_step(http)
    skipped.set()
    assert http.post("/sdapi/v1/skip").status_code == 200
    assert http.get("/sdapi/v1/progress").json()["state"]["skipped"] is True
    read.set()
    thread.join(60)
    data = outcome["r"].json()
    assert json.loads(data["info"])["all_seeds"] == [LONG["seed"], LONG["seed"] + 1]
    assert _idle(service)
    options = dict(steps=30, cfg_scale=LONG["cfg_scale"], width=SIZE, height=SIZE, sampler="Euler a",
                   negative_prompt=LONG["negative_prompt"], hires_scale=1, hires_steps=1)  # fmt: skip
    second = tiny_model.txt2img(LONG["prompt"], seed=LONG["seed"] + 1, **options)
    assert np.array_equal(_pixels(data["images"][1]), to_uint8(second.images[0]))  # ran in full


# ------------------------------------------------------------------------------------------------ start-up routes


def test_startup_routes_answer_what_is_true(http, tiny_model):
    import psutil

    flags = http.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["nowebui"] is True and flags["port"] == 1234
    assert flags["cors_allow_origins"] == ORIGINS and flags["sdrt_backend"] == tiny_model.backend.name
    assert http.get("/sdapi/v1/prompt-styles").json() == [dict(STYLES[0])]
    memory = http.get("/sdapi/v1/memory").json()
    process = psutil.Process()  # the server runs in this process
    assert memory["ram"]["total"] == psutil.virtual_memory().total
    assert 0.5 * process.memory_info().rss < memory["ram"]["used"] < 2 * process.memory_info().rss
    assert memory["cuda"] == {"error": "unavailable"}  # onnxruntime on the CPU
    assert http.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert http.get("/sdapi/v1/script-info").json() == []
    models = http.get("/sdapi/v1/sd-models").json()
    refreshed = http.post("/sdapi/v1/refresh-checkpoints")
    assert refreshed.status_code == 200 and refreshed.json() is None
    assert http.get("/sdapi/v1/sd-models").json() == models


def test_default_server_has_no_styles_and_no_cors(client):
    assert client.get("/sdapi/v1/prompt-styles").json() == []
    response = client.get("/health", headers={"Origin": "http://allowed.example"})
    assert "access-control-allow-origin" not in response.headers


# ------------------------------------------------------------------------------------------------ HTTP protocol


def test_405_names_every_allowed_method(http):
    response = http.get("/sdapi/v1/txt2img")
    assert response.status_code == 405 and set(response.headers["allow"].split(", ")) == {"POST"}
    response = http.delete("/sdapi/v1/options")  # GET and POST routes share the path
    assert response.status_code == 405 and set(response.headers["allow"].split(", ")) == {"GET", "POST"}
    assert "detail" in response.json()


def test_cors_as_a1111_sets_it_up(http):
    preflight = {"Origin": "http://also.example", "Access-Control-Request-Method": "POST"}
    response = http.options("/sdapi/v1/txt2img", headers=preflight)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://also.example"
    assert response.headers["access-control-allow-credentials"] == "true"
    refused = http.options("/sdapi/v1/txt2img", headers=dict(preflight, Origin="http://other.example"))
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    simple = http.get("/health", headers={"Origin": "http://allowed.example"})
    assert simple.headers["access-control-allow-origin"] == "http://allowed.example"


@pytest.mark.parametrize("flag, value, message", [
    ("--read-timeout", "0", "the read timeout must be more than 0 seconds, not 0.0"),
    ("--cors-allow-origins-regex", "([", "the CORS origin regex '([': unterminated character set at position 1"),
])  # fmt: skip
def test_serve_refuses_bad_http_options_before_loading(flag, value, message):
    """One line and exit code 2, before the (missing) model is looked at."""
    argv = [sys.executable, str(ROOT / "cli.py"), "serve", "--model", "/nonexistent", flag, value]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"error: {message}"]


def _raw_request(url: str, head: bytes, body: bytes) -> tuple[bytes, float]:
    """Send `head` and part of a body, then stall: what the server answers, and after how many seconds."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body)
        start = time.monotonic()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer, time.monotonic() - start


def test_stalled_upload_gets_408_and_the_server_stays_healthy(proto, http):
    head = (b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")  # fmt: skip
    answer, seconds = _raw_request(proto[0], head, b'{"prompt": "a')
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert READ_TIMEOUT <= seconds < READ_TIMEOUT + 5  # answered after the timeout, and the connection closed
    assert b"stalled" in answer
    assert http.get("/health").json()["status"] == "ok"
    assert http.post("/sdapi/v1/txt2img", json=BODY).status_code == 200  # a slow generation is not a stalled body


def test_metrics_method_labels_stay_bounded(http):
    from prometheus_client.parser import text_string_to_metric_families

    rng = np.random.default_rng(0)
    for _ in range(30):
        method = "".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), 8))
        assert http.request(method, "/health").status_code == 405
    families = {f.name: f for f in text_string_to_metric_families(http.get("/metrics").text)}
    methods = {s.labels["method"] for s in families["sdrt_requests"].samples}
    assert methods <= STANDARD_METHODS | {"other"} and "other" in methods
    other = [s for s in families["sdrt_requests"].samples if s.labels["method"] == "other"]
    assert sum(s.value for s in other) >= 30


def test_docs_work_offline(http):
    page = http.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page.text, re.I)  # no external host
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert len(assets) >= 3
    for asset in assets:
        response = http.get(asset)
        assert response.status_code == 200 and len(response.content) > 100, asset


# ------------------------------------------------------------------------------------------------ OpenAPI


def test_openapi_states_limits_enums_errors_and_typed_responses(http, proto):
    schema = http.get("/openapi.json").json()
    limits = proto[1].state.limits
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            ok = operation["responses"]["200"]["content"]
            media, body = next(iter(ok.items()))
            assert media == "text/plain" or body["schema"] not in ({}, {"title": "Response"}), (method, path)
            assert "413" in operation["responses"], (method, path)
    txt2img = schema["paths"]["/sdapi/v1/txt2img"]["post"]["responses"]
    assert {"408", "409", "413", "422", "429", "503", "507"} <= set(txt2img)
    refs = {code: r["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1] for code, r in txt2img.items()}
    assert refs.pop("422") == "ValidationErrorResponse" and refs.pop("200") == "GenerationResponse"
    assert set(refs.values()) == {"ErrorResponse"}
    body = schema["components"]["schemas"]["Txt2ImgBody"]["properties"]

    def stated(prop, keyword):
        return next(b[keyword] for b in prop.get("anyOf", [prop]) if keyword in b)

    assert stated(body["width"], "maximum") == stated(body["height"], "maximum") == limits.max_side
    assert stated(body["steps"], "maximum") == limits.max_steps
    assert stated(body["batch_size"], "maximum") == limits.max_images

    def enum(prop):
        return stated(prop, "enum")

    for name in ("Txt2ImgBody", "Img2ImgBody"):  # null means the default in every field (A1111's bodies)
        props = schema["components"]["schemas"][name]["properties"]
        assert all({"type": "null"} in prop.get("anyOf", []) for prop in props.values()), name
    nulls = dict.fromkeys(("negative_prompt", "seed", "subseed_strength", "n_iter", "cfg_scale", "restore_faces"))
    assert http.post("/sdapi/v1/txt2img", json=dict(BODY, steps=1, **nulls)).status_code == 200

    samplers = {s["name"] for s in http.get("/sdapi/v1/samplers").json()}
    assert samplers <= set(enum(body["sampler_name"])) and "DPM++ 2M Karras" in enum(body["sampler_name"])
    assert {s["name"] for s in http.get("/sdapi/v1/schedulers").json()} <= set(enum(body["scheduler"]))
    upscalers = [u["name"] for u in http.get("/sdapi/v1/latent-upscale-modes").json()]
    upscalers += [u["name"] for u in http.get("/sdapi/v1/upscalers").json()]
    assert set(enum(body["hr_upscaler"])) == set(upscalers)
    stated = enum(body["sampler_name"])
    for name in [n for n in stated if n in samplers or n.startswith("DPM++ 2M ")]:  # stated names are accepted
        assert http.post("/sdapi/v1/txt2img", json=dict(BODY, sampler_name=name, steps=1, cfg_scale=1,
                                                        send_images=False)).status_code == 200, name  # fmt: skip
