"""`python cli.py serve`: the real command on a free loopback port, a request, then a clean Ctrl-C shutdown."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import needs_torch
from tests.serving.conftest import detail_text, needs_server
from tests.serving.test_server import BODY, ROOT

pytestmark = [needs_torch, needs_server]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_cli_serve_answers_and_shuts_down(tiny_sd1, serving_engines, tiny_model):
    import httpx

    port = _free_port()
    argv = [sys.executable, str(ROOT / "cli.py"), "--quiet", "serve", "--model", str(tiny_sd1), "--engines",
            str(serving_engines), "--port", str(port), "--max-steps", "10"]  # fmt: skip
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        response = httpx.post(f"{url}/sdapi/v1/txt2img", json=BODY, timeout=120)
        assert response.status_code == 200 and len(response.json()["images"]) == 1
        too_many = httpx.post(f"{url}/sdapi/v1/txt2img", json=dict(BODY, steps=11), timeout=30)
        assert too_many.status_code == 422 and "at most 10" in detail_text(too_many)
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert f"serving {tiny_model.name} on http://127.0.0.1:{port}" in out


def test_cli_serve_bad_model_is_one_line(tmp_path):
    argv = [sys.executable, str(ROOT / "cli.py"), "--quiet", "serve", "--model", str(tmp_path / "missing")]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
