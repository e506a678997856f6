"""The UNet's graphs on ONNX Runtime's CPU provider: exported (plain) vs CPU graph (fused attention) vs int8.

Each measurement is its own process (so peak RSS is the graph's alone), variants interleaved round by round
(A B C, A B C, ...); per variant: the median seconds per UNet call and the median peak RSS over rounds.

    flock /work/bench/heavy.lock python -m benchmarks.unet_cpu_graphs --artifacts <folder> --size 512 --batch 2 \
        --rounds 3 --calls 2 --out benchmarks/results/<date>-cpu-attention-fusion.json

The derived graphs are made first (not timed) where the folder lacks them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("plain", "fused", "int8")


def worker(artifacts: Path, variant: str, size: int, batch: int, calls: int) -> dict:
    """Load one UNet graph, run one warm-up call and `calls` timed ones; seconds per call and peak RSS."""
    import numpy as np

    from runtime.backends.onnxruntime import OnnxRuntimeBackend, OnnxRuntimeSession

    started = time.perf_counter()
    if variant == "plain":
        backend = OnnxRuntimeBackend(artifacts)
        session = OnnxRuntimeSession(backend.model_path("unet"), "unet", backend.providers)
    else:
        backend = OnnxRuntimeBackend(artifacts, precision="int8" if variant == "int8" else "fp32")
        session = backend.session("unet")
    load_s = time.perf_counter() - started
    model = backend.manifest.model
    rng = np.random.default_rng(0)
    latent = size // model["vae_scale_factor"]
    feeds = {
        "sample": rng.standard_normal((batch, model["unet_in_channels"], latent, latent)).astype(np.float32),
        "timestep": np.full((batch,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, model["cross_attention_dim"])).astype(np.float32),
    }
    session.run(feeds)  # warm-up
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"variant": variant, "load_s": load_s, "call_s": times, "peak_rss_bytes": peak}


def prepare(artifacts: Path) -> None:
    """Make the CPU and int8 graphs once (a session of each makes what is missing)."""
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    for precision in ("fp32", "int8"):
        OnnxRuntimeBackend(artifacts, precision=precision).session("unet")


def device() -> dict:
    fields = {}
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return {
        "cpu": fields.get("Model name"),
        "cpus": os.cpu_count(),
        "flags_vnni": "avx512_vnni" in fields.get("Flags", ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=VARIANTS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.artifacts, args.worker, args.size, args.batch, args.calls)))
        return
    prepare(args.artifacts)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    loads = []
    for round_index in range(args.rounds):
        for variant in VARIANTS:
            command = [sys.executable, "-m", "benchmarks.unet_cpu_graphs", "--worker", variant]
            command += ["--artifacts", str(args.artifacts), "--size", str(args.size), "--batch", str(args.batch)]
            command += ["--calls", str(args.calls)]
            loads.append(os.getloadavg()[0])
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
            print(round_index, variant, runs[variant][-1], file=sys.stderr, flush=True)
    summary = {}
    plain = statistics.median(per_process_calls(runs["plain"]))
    for variant, results in runs.items():
        calls = per_process_calls(results)
        peaks = [r["peak_rss_bytes"] for r in results]
        summary[variant] = {
            "call_s_median": statistics.median(calls),
            "call_s_min": min(calls),
            "call_s_max": max(calls),
            "peak_rss_gib_median": statistics.median(peaks) / 2**30,
            "peak_rss_gib_range": [min(peaks) / 2**30, max(peaks) / 2**30],
            "time_vs_plain": statistics.median(calls) / plain,
        }
    record = {
        "what": f"UNet call on ONNX Runtime's CPU provider, {args.size}x{args.size}, batch {args.batch} (CFG)",
        "device": device(),
        "rounds": args.rounds,
        "timed_calls_per_process": args.calls,
        "load_average_1min": [round(x, 2) for x in loads],
        "summary": summary,
        "runs": runs,
    }
    text = json.dumps(record, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


def per_process_calls(results: list[dict]) -> list[float]:
    """Each process's median seconds per call."""
    return [statistics.median(r["call_s"]) for r in results]


if __name__ == "__main__":
    main()
