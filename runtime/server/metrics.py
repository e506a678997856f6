"""Prometheus metrics in the text exposition format (no client library needed), and the ASGI guard that feeds them
and enforces the request body limit and the body read timeout."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

from starlette.exceptions import HTTPException

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # any other method: "other"


class Metrics:
    """Request counts by route and status, errors, latency histograms per route; the queue depth comes from a
    gauge function read at scrape time."""

    def __init__(self, routes: set[str], queue_depth, service_counts):
        self.routes = routes  # known paths; anything else is counted as "other" (fuzzers must not blow up labels)
        self.queue_depth = queue_depth  # () -> int
        self.service_counts = service_counts  # () -> Counter of the service (completed, failed, batches ...)
        self.requests: Counter = Counter()  # (method, route, status) -> n
        self.buckets: dict[str, list[int]] = {}
        self.sums: Counter = Counter()
        self._lock = threading.Lock()

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        method = method if method in METHODS else "other"  # a client picks the method: the label set stays bounded
        with self._lock:
            self.requests[(method, route, status)] += 1
            counts = self.buckets.setdefault(route, [0] * (len(LATENCY_BUCKETS) + 1))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    counts[i] += 1
            counts[-1] += 1  # +Inf, also the count
            self.sums[route] += seconds

    def render(self) -> str:
        lines = ["# HELP sdrt_requests_total HTTP requests by method, route and status code.",
                 "# TYPE sdrt_requests_total counter"]  # fmt: skip
        with self._lock:
            requests = dict(self.requests)
            buckets = {route: list(counts) for route, counts in self.buckets.items()}
            sums = dict(self.sums)
        for (method, route, status), n in sorted(requests.items()):
            lines.append(f'sdrt_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
        lines += ["# HELP sdrt_request_errors_total HTTP responses with a 4xx or 5xx status, by route.",
                  "# TYPE sdrt_request_errors_total counter"]  # fmt: skip
        errors: Counter = Counter()
        for (_, route, status), n in requests.items():
            if status >= 400:
                errors[route] += n
        for route, n in sorted(errors.items()):
            lines.append(f'sdrt_request_errors_total{{route="{route}"}} {n}')
        lines += ["# HELP sdrt_queue_depth Generation requests waiting for the device.",
                  "# TYPE sdrt_queue_depth gauge", f"sdrt_queue_depth {self.queue_depth()}"]  # fmt: skip
        lines += ["# HELP sdrt_request_latency_seconds HTTP request latency by route.",
                  "# TYPE sdrt_request_latency_seconds histogram"]  # fmt: skip
        for route, counts in sorted(buckets.items()):
            for bound, n in zip((*LATENCY_BUCKETS, "+Inf"), counts):
                lines.append(f'sdrt_request_latency_seconds_bucket{{route="{route}",le="{bound}"}} {n}')
            lines.append(f'sdrt_request_latency_seconds_sum{{route="{route}"}} {sums[route]}')
            lines.append(f'sdrt_request_latency_seconds_count{{route="{route}"}} {counts[-1]}')
        lines += ["# HELP sdrt_generation_jobs_total Generation requests by outcome, batches run.",
                  "# TYPE sdrt_generation_jobs_total counter"]  # fmt: skip
        for outcome, n in sorted(self.service_counts().items()):
            lines.append(f'sdrt_generation_jobs_total{{outcome="{outcome}"}} {n}')
        return "\n".join(lines) + "\n"


class Guard:
    """Pure ASGI middleware: rejects bodies over `max_body` bytes with 413 (by Content-Length, and while reading a
    chunked body), answers 408 when a body stalls for `read_timeout` seconds between two chunks, and records every
    HTTP request in `metrics`."""

    def __init__(self, app, metrics: Metrics, max_body: int, read_timeout: float = 30.0):
        self.app = app
        self.metrics = metrics
        self.max_body = max_body
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_recorded(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self._declared_length(scope) > self.max_body:
                await self._too_large(send_recorded)
                return
            await self.app(scope, self._limited(receive), send_recorded)
        finally:
            self.metrics.observe(scope["method"], scope["path"], status["code"], time.perf_counter() - start)

    @staticmethod
    def _declared_length(scope) -> int:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    def _limited(self, receive):
        received, complete = 0, False

        async def receive_limited():
            nonlocal received, complete
            if complete:  # after the body, receive waits for a disconnect as long as the response takes: no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                message = f"the request body stalled for more than {self.read_timeout:g} s"
                raise HTTPException(408, message, headers={"Connection": "close"}) from None  # frees the connection
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, f"request body larger than {self.max_body} bytes")
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        return receive_limited

    async def _too_large(self, send) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_body} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
