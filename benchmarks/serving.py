"""Serving benchmark: HTTP overhead and batched throughput of `cli.py serve`'s stack on a tiny checkpoint.

    python -m benchmarks.serving                      # tiny model, 64x64, 4 steps, 64 concurrent requests

* overhead: the median HTTP round trip of one small txt2img request (sequential; `cli.py serve` in its own process
  on loopback, httpx with keep-alive; PNG encoding and base64 included) minus the median of the same request
  through StableDiffusion.txt2img in this process;
* throughput: N concurrent requests (distinct prompts and seeds) with batching on and off: requests/s and
  p50/p99 latency per request.
Writes JSON (default benchmarks/results/<date>-cpu-serving.json).

    python -m benchmarks.serving --mixed              # the load record: mixed concurrent requests

* mixed: txt2img (some batched together, some with a hires fix), img2img and inpaint at several sizes, samplers and
  batch sizes, each sent alone first (the solo images), then all at once (--requests at a time) for --rounds rounds;
  every image of the load must equal its solo image byte for byte, and the server process's RSS is read (psutil)
  before and after each phase. Writes benchmarks/results/<date>-cpu-serving-mixed.json.

    python -m benchmarks.serving --ray                # Ray Serve (runtime.ray_serve) beside the single process

* ray: the throughput load (--requests concurrent txt2img) against `cli.py serve`, then `cli.py serve --ray` with 1
  and with 2 model replicas (a local Ray instance each time): requests/s, p50/p95/p99 latency. Writes
  benchmarks/results/<date>-cpu-serving-ray.json.
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

from benchmarks.cpu import device_facts, resolve_model, versions


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
            "latency_p50_s": _percentile(latencies, 0.5), "latency_p95_s": _percentile(latencies, 0.95),
            "latency_p99_s": _percentile(latencies, 0.99)}  # fmt: skip


@contextlib.contextmanager
def run_server(model: Path, engines: Path, batching: bool, max_batch: int, extra: tuple = ()) -> Iterator[str]:
    """`python cli.py serve` in its own process (as deployed; a server thread inside this process would share its GIL
    with the client and inflate every round trip); yields its URL once /health answers. `extra`: more options
    (`--ray --replicas 2`)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py"), "--quiet", "serve", "--model",
            str(model), "--engines", str(engines), "--port", str(port), "--max-batch-images", str(max_batch),
            *extra] + ([] if batching else ["--no-batching"])  # fmt: skip
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        startup = 300 if "--ray" in extra else 120  # Ray starts its processes first
        deadline = time.monotonic() + startup
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {server.stderr.read().strip()[-300:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {startup} s")
            time.sleep(0.2)
        yield url
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def _png_b64(pixels) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def mixed_bodies(count: int, steps: int) -> list[tuple[str, dict]]:
    """`count` (route, body) pairs cycling through the modes, sizes, samplers and batch sizes of the mixed load."""
    import numpy as np

    y, x = np.mgrid[0:64, 0:64]
    init = _png_b64(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))  # a gradient, 64x64
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255  # white: repaint
    mask_b64 = _png_b64(mask)
    kinds = [
        ("txt2img", dict(width=64, height=64)), ("txt2img", dict(width=32, height=48, batch_size=2)),
        ("txt2img", dict(width=64, height=64, sampler_name="DPM++ 2M", scheduler="karras")),
        ("img2img", dict(init_images=[init], width=64, height=64, denoising_strength=0.6)),
        ("txt2img", dict(width=32, height=32, enable_hr=True, hr_scale=2, hr_second_pass_steps=2)),
        ("img2img", dict(init_images=[init], mask=mask_b64, width=64, height=64, denoising_strength=0.9)),
        ("img2img", dict(init_images=[init], width=32, height=32, sampler_name="Euler", n_iter=2)),
    ]  # fmt: skip
    bodies = []
    for i in range(count):
        route, extra = kinds[i % len(kinds)]
        body = {"prompt": f"a photo of thing {i}", "seed": 7000 + 10 * i, "steps": steps, "sampler_name": "Euler a",
                "cfg_scale": 7.0, **extra}  # fmt: skip
        bodies.append((f"/sdapi/v1/{route}", body))
    return bodies


def measure_mixed(url: str, pid: int, count: int, steps: int, rounds: int) -> dict:
    """Solo images first, then `rounds` rounds of all `count` requests at once; images compared, RSS recorded."""
    import httpx
    import psutil

    server = psutil.Process(pid)
    rss = {"start": server.memory_info().rss}
    bodies = mixed_bodies(count, steps)
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=count)) as client:

        def post(item: tuple[str, dict]) -> tuple[list[str], float]:
            start = time.perf_counter()
            response = client.post(item[0], json=item[1])
            if response.status_code != 200:
                raise RuntimeError(f"{item[0]} answered {response.status_code}: {response.text[:300]}")
            return response.json()["images"], time.perf_counter() - start

        solo = [post(item)[0] for item in bodies]
        rss["after_solo"] = server.memory_info().rss
        record: dict = {"requests": count, "images": sum(len(images) for images in solo), "rounds": []}
        for k in range(rounds):
            start = time.perf_counter()
            with ThreadPoolExecutor(count) as pool:
                answers = list(pool.map(post, bodies))
            wall = time.perf_counter() - start
            latencies = [seconds for _, seconds in answers]
            differing = sum(a != b for (images, _), expected in zip(answers, solo) for a, b in zip(images, expected))
            rss[f"after_round_{k + 1}"] = server.memory_info().rss
            record["rounds"].append({
                "wall_s": wall, "requests_per_s": count / wall, "latency_p50_s": _percentile(latencies, 0.5),
                "latency_p99_s": _percentile(latencies, 0.99), "images_differing_from_solo": differing,
                "image_counts_equal": all(len(a[0]) == len(b) for a, b in zip(answers, solo)),
            })  # fmt: skip
    record["rss_bytes"] = rss
    if rounds >= 2:  # a steady server holds its memory from one round of the same load to the next
        record["rss_growth_last_round_bytes"] = rss[f"after_round_{rounds}"] - rss[f"after_round_{rounds - 1}"]
    record["identical_to_solo"] = all(r["images_differing_from_solo"] == 0 and r["image_counts_equal"]
                                      for r in record["rounds"])  # fmt: skip
    hidden = ("init_images", "mask", "prompt")
    record["mix"] = [
        {"route": route, **{k: v for k, v in body.items() if k not in hidden}, "init_image": "init_images" in body,
         "mask": "mask" in body} for route, body in bodies
    ]  # fmt: skip
    return record


def _commit() -> str:
    """The code measured: the checkout's commit, "+changes" when its tracked files differ from it."""
    root = Path(__file__).resolve().parents[1]
    run = dict(cwd=root, capture_output=True, text=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **run).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    return commit + ("+changes" if dirty else "")


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def main_mixed(args, model: Path, engines: Path, record: dict) -> dict:
    import os

    for key in ("size", "sampler"):  # the throughput run's; the mix names its own
        record.pop(key)
    record["commit"] = _commit()
    record["cpu_model"] = _cpu_model()
    record["load_average_before"] = os.getloadavg()  # other work on the machine slows every timing down
    with run_server(model, engines, True, args.max_batch) as url:
        pid = _server_pid(url)
        record["mixed"] = measure_mixed(url, pid, args.requests, args.steps, args.rounds)
    record["load_average_after"] = os.getloadavg()
    out = Path(args.out or f"benchmarks/results/{record['date']}-cpu-serving-mixed.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    summary = {k: v for k, v in record["mixed"].items() if k != "mix"}
    print(json.dumps(summary, indent=2))
    return record


def main_ray(args, model: Path, engines: Path, record: dict) -> dict:
    """The throughput load on the single-process server and on Ray Serve with 1 and 2 replicas."""
    import os

    import httpx

    record["commit"] = _commit()
    record["cpu_model"] = _cpu_model()
    record["load_average_before"] = os.getloadavg()
    record["note"] = ("one machine: Ray's replicas share its cores with each other, the proxy and the ingress; the "
                      "single process runs onnxruntime on its default threads, each Ray replica on the CPUs Ray "
                      "reserved for it (1, SDRT_CPU_THREADS), which on a loaded machine spins less")  # fmt: skip
    servers = {"single_process": (), "ray_1_replica": ("--ray", "--replicas", "1"),
               "ray_2_replicas": ("--ray", "--replicas", "2")}  # fmt: skip
    for name, extra in servers.items():
        with run_server(model, engines, True, args.max_batch, extra) as url:
            with httpx.Client(base_url=url, timeout=600) as client:  # warm-up: every replica's first request
                for i in range(4):
                    client.post("/sdapi/v1/txt2img", json=_body(i, args.size, args.steps)).raise_for_status()
            record[name] = measure_load(url, args.requests, args.size, args.steps)
            print(name, json.dumps(record[name]), flush=True)
    record["load_average_after"] = os.getloadavg()
    out = Path(args.out or f"benchmarks/results/{record['date']}-cpu-serving-ray.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    return record


def _server_pid(url: str) -> int:
    """The pid of the `cli.py serve` child process serving on the URL's port."""
    import psutil

    port = url.rsplit(":", 1)[1]
    for child in psutil.Process().children():
        command = child.cmdline()
        if "serve" in command and port in command:
            return child.pid
    raise RuntimeError(f"no server child process on port {port}")


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
    parser.add_argument("--mixed", action="store_true", help="the mixed load record (--requests at once)")
    parser.add_argument("--rounds", type=int, default=2, help="mixed: rounds of the concurrent load")
    parser.add_argument("--ray", action="store_true", help="Ray Serve with 1 and 2 replicas beside the single process")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    model, engines = resolve_model("tiny", workdir)[1], workdir / "engines"
    sd = runtime.load(model, engines_dir=engines)  # exports once; the servers reuse the artifacts
    record = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {device_facts()['cores']} cores)",
        "command": "python -m benchmarks.serving " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "model": "tiny", "size": args.size, "steps": args.steps, "sampler": "Euler a", "max_batch": args.max_batch,
        "versions": versions(),
    }  # fmt: skip
    if args.mixed:
        return main_mixed(args, model, engines, record)
    if args.ray:
        return main_ray(args, model, engines, record)
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
