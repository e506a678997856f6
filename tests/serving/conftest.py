"""Fixtures of the serving tests: one tiny model loaded once, a service over it, and the HTTP server on loopback."""

from __future__ import annotations

import importlib.util

import pytest

HAS_SERVER = all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn", "httpx"))
needs_server = pytest.mark.skipif(not HAS_SERVER, reason="fastapi/uvicorn/httpx not installed (serve and dev extras)")

SIZE = 32  # pixels: the tiny model's VAE halves it
OPTIONS = dict(steps=3, width=SIZE, height=SIZE, sampler="Euler a", cfg_scale=6.0)  # Euler a also draws noise per step


@pytest.fixture(scope="session")
def serving_engines(shared_engines):
    """The artifact folder of the serving tests (the CLI test reuses the export): the session's shared one."""
    return shared_engines


@pytest.fixture(scope="session")
def tiny_model(tiny_sd1, serving_engines):
    """The tiny SD1 checkpoint exported once and loaded (onnxruntime)."""
    import runtime

    return runtime.load(tiny_sd1, engines_dir=serving_engines)


@pytest.fixture(scope="module")
def service(tiny_model):
    from runtime.serving import Service

    with Service(tiny_model) as service:
        yield service


@pytest.fixture(scope="module")
def server(service):
    """(base URL, app) of the real server on a free loopback port, over the module's service."""
    if not HAS_SERVER:
        pytest.skip("fastapi/uvicorn/httpx not installed (serve and dev extras)")
    from runtime.server import ServerThread
    from runtime.server.app import create_app

    app = create_app(service, close_on_shutdown=False)
    with ServerThread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server[0], timeout=120) as client:
        yield client


def detail_text(response) -> str:
    """An error answer's message: `detail` itself, or a 422's problems ([{loc, msg, type}]) joined by "; "."""
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else "; ".join(problem["msg"] for problem in detail)
