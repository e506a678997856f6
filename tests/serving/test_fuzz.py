"""Requests generated from the server's own OpenAPI schema (schemathesis over hypothesis), valid and invalid ones, on
loopback: no answer is a 5xx, and every answer has a status code, content type, headers and body that the schema
states. The server's limits are small here, and the schema states them, so valid requests stay cheap.

Bounded and deterministic: a fixed number of examples per operation, derandomized, no example database.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import needs_torch
from tests.serving.conftest import needs_server

pytestmark = [
    needs_torch,
    needs_server,
    pytest.mark.skipif(importlib.util.find_spec("schemathesis") is None, reason="schemathesis not installed (dev)"),
]

EXAMPLES = 25  # per operation and mode; operations without parameters have one case: ~300 requests


@pytest.fixture(scope="module")
def fuzz_server(service):
    from runtime.server import ServerThread
    from runtime.server.a1111 import Limits
    from runtime.server.app import create_app
    from runtime.server.options import ServerOptions

    limits = Limits(max_side=64, max_steps=2, max_images=2, max_body_bytes=2**20, max_image_bytes=2**16,
                    max_image_pixels=128 * 128)  # fmt: skip
    app = create_app(service, limits, close_on_shutdown=False, options=ServerOptions(read_timeout=5.0))
    with ServerThread(app) as url:
        yield url


def _small(case):
    """A generated body that leaves out width, height or steps (or sends null) gets A1111's default (512, 512, 50),
    over this server's limits (a 422): give such a body values within them, so that valid requests generate images."""
    if isinstance(case.body, dict) and case.operation.path.endswith("2img"):
        for field, value in (("width", 32), ("height", 32), ("steps", 1)):
            if case.body.get(field) is None:
                case.body[field] = value
    return case


def _fuzz(operation, mode, url: str, session, calls: dict, failures: list) -> None:
    """EXAMPLES generated cases of one operation: call each, check the answer against the schema."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance]  # fmt: skip

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), phases=["generate"])  # fmt: skip
    @given(case=operation.as_strategy(generation_mode=mode).map(_small))
    def run(case):
        try:
            response = case.call(base_url=url, session=session, timeout=60)
            calls["n"] += 1
            calls["statuses"].add(response.status_code)
            calls.setdefault(operation.label, []).append(response.status_code)
            case.validate_response(response, checks=checks)
        except Exception as exc:  # every operation's failures are reported together
            failures.append(f"{operation.label} [{mode.value}]: {str(exc).strip()[:400]}")
            raise

    try:
        run()
    except BaseException as exc:  # recorded in `failures` (schemathesis raises exception groups)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise


def test_schema_fuzz_no_server_errors_no_schema_violations(fuzz_server):
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(fuzz_server + "/openapi.json")
    calls: dict = {"n": 0, "statuses": set()}
    failures: list[str] = []
    with requests.Session() as session:
        for operation in schema.get_all_operations():
            for mode in GenerationMode:
                _fuzz(operation.ok(), mode, fuzz_server, session, calls, failures)
    print(f"fuzz: {calls['n']} requests, statuses {sorted(calls['statuses'])}")
    for label in ("POST /sdapi/v1/txt2img", "POST /sdapi/v1/img2img", "POST /sdapi/v1/png-info"):
        print(label, {s: calls.get(label, []).count(s) for s in sorted(set(calls.get(label, [])))})
    assert not failures, "\n\n".join(failures)
    assert calls["n"] >= 200 and 200 in calls["statuses"] and 422 in calls["statuses"]
    assert not any(status >= 500 for status in calls["statuses"])
