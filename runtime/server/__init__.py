"""The HTTP server: A1111-compatible routes on FastAPI + uvicorn (`pip install -e ".[serve]"`).

    python cli.py serve --model models/tiny --port 7860
    curl -s localhost:7860/sdapi/v1/txt2img -d '{"prompt": "a cat", "steps": 20}'
"""

from __future__ import annotations

import socket
import threading
import time

from ..errors import BackendUnavailableError


def _require_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        message = f'the server needs FastAPI and uvicorn: pip install -e ".[serve]" ({exc})'
        raise BackendUnavailableError(message) from None


# uvicorn's HTTP parser, fixed rather than "auto": with httptools installed (ray[serve] pulls uvicorn[standard]) auto
# picks it, and it answers an unknown method with a bare 400 before the app can say 405 and which methods the path
# allows; h11 hands every request to the app, so the server answers the same whatever else is installed.
HTTP_IMPLEMENTATION = "h11"


def serve(
    service, host: str = "127.0.0.1", port: int = 7860, limits=None, log_level: str = "info", options=None
) -> None:
    """Serve `service` (a runtime.serving.Service) until interrupted; shutdown cancels what is still running.
    `limits`: a1111.Limits; `options`: options.ServerOptions (CORS, read timeout, prompt styles)."""
    _require_packages()
    import uvicorn

    from .app import create_app

    flags = {"listen": host not in ("127.0.0.1", "localhost", "::1"), "port": port, "server_name": host}
    uvicorn.run(create_app(service, limits, options=options, flags=flags), host=host, port=port, log_level=log_level,
                http=HTTP_IMPLEMENTATION)  # fmt: skip


class ServerThread:
    """uvicorn in a background thread on a free loopback port (tests, benchmarks): `with ServerThread(app) as url:`."""

    def __init__(self, app, host: str = "127.0.0.1"):
        _require_packages()
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5,
                                http=HTTP_IMPLEMENTATION)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()
