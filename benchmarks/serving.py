"""Serving benchmark: HTTP overhead and batched throughput of `cli.py serve`'s stack on a tiny checkpoint.

    python -m benchmarks.serving                      # tiny model, 64x64, 4 steps, 64 concurrent requests

* overhead: the median HTTP round trip of one small txt2img request (sequential; `cli.py serve` in its own process
  on loopback, httpx with keep-alive; PNG encoding and base64 included) minus the median of the same request
  through StableDiffusion.txt2img in this process;
* throughput: N concurrent requests (distinct prompts and seeds) with batching on and off: requests/s and
  p50/p99 latency per request.
Writes JSON (default benchmarks/results/<date>-cpu-serving.json).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.cpu import _cpu_count, _versions, make_model


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _body(i: int, size: int, steps: int) -> dict:
    return {"prompt": f"a photo of thing {i}", "seed": 1000 + i, "steps": steps, "width": size, "height": size,
            "sampler_name": "Euler a", "cfg_scale": 7.0}  # fmt: skip


def measure_overhead(sd, client, size: int, steps: int, runs: int) -> dict:
    """Median direct API time, median HTTP round trip, their difference (s)."""
    body = _body(0, size, steps)
    options = dict(seed=body["seed"], steps=steps, width=size, height=size, sampler="Euler a", cfg_scale=7.0)
    direct, http = [], []
    for _ in range(runs):
        start = time.perf_counter()
        sd.txt2img(body["prompt"], **options)
        direct.append(time.perf_counter() - start)
        start = time.perf_counter()
        response = client.post("/sdapi/v1/txt2img", json=body)
        http.append(time.perf_counter() - start)
        response.raise_for_status()
    return {"size": size, "steps": steps, "runs": runs, "direct_api_s": statistics.median(direct),
            "http_round_trip_s": statistics.median(http),
            "http_overhead_s": statistics.median(http) - statistics.median(direct)}  # fmt: skip


def measure_load(url: str, count: int, size: int, steps: int) -> dict:
    """`count` concurrent requests: wall time, requests/s, p50/p99 latency (s)."""
    import httpx

    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=count)) as client:

        def one(i: int) -> None:
            start = time.perf_counter()
            client.post("/sdapi/v1/txt2img", json=_body(i, size, steps)).raise_for_status()
            latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(one, range(count)))
        wall = time.perf_counter() - start
    return {"requests": count, "wall_s": wall, "requests_per_s": count / wall,
            "latency_p50_s": _percentile(latencies, 0.5), "latency_p99_s": _percentile(latencies, 0.99)}  # fmt: skip


@contextlib.contextmanager
def run_server(model: Path, engines: Path, batching: bool, max_batch: int) -> Iterator[str]:
    """`python cli.py serve` in its own process (as deployed; a server thread inside this process would share its GIL
    with the client and inflate every round trip); yields its URL once /health answers."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py"), "--quiet", "serve", "--model",
            str(model), "--engines", str(engines), "--port", str(port), "--max-batch-images", str(max_batch),
            ] + ([] if batching else ["--no-batching"])  # fmt: skip
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stderr.read().strip()[-300:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 120 s")
            time.sleep(0.2)
        yield url
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> dict:
    import httpx

    import runtime

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=30, help="sequential requests for the overhead")
    parser.add_argument("--overhead-size", type=int, default=32, help="a small request, so the overhead shows")
    parser.add_argument("--overhead-steps", type=int, default=1)
    parser.add_argument("--workdir", default="/tmp/sdrt-bench")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    model, engines = make_model("tiny", workdir), workdir / "engines"
    sd = runtime.load(model, engines_dir=engines)  # exports once; the servers reuse the artifacts
    record = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {_cpu_count()} cores)",
        "command": "python -m benchmarks.serving " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "model": "tiny", "size": args.size, "steps": args.steps, "sampler": "Euler a", "max_batch": args.max_batch,
        "versions": _versions(),
    }  # fmt: skip
    for batching in (True, False):
        server = run_server(model, engines, batching, args.max_batch)
        with server as url, httpx.Client(base_url=url, timeout=600) as client:
            client.post("/sdapi/v1/txt2img", json=_body(0, args.size, args.steps)).raise_for_status()  # warm-up
            if batching:
                record["overhead"] = measure_overhead(sd, client, args.overhead_size, args.overhead_steps, args.runs)
            record["batching_on" if batching else "batching_off"] = measure_load(
                url, args.requests, args.size, args.steps
            )
    record["throughput_gain"] = record["batching_on"]["requests_per_s"] / record["batching_off"]["requests_per_s"]
    out = Path(args.out or f"benchmarks/results/{record['date']}-cpu-serving.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(json.dumps({k: record[k] for k in ("overhead", "batching_on", "batching_off", "throughput_gain")}, indent=2))
    return record


if __name__ == "__main__":
    main()
