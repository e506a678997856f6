"""Tiled against untiled VAE decode on the CPU: peak RSS and time, each decode in its own process.

python -m benchmarks.vae_tiling --checkpoint CKPT --onnx ENGINES/onnx/vae_decoder.onnx [--json OUT] [--rounds 2]

Each run is a fresh process that loads the VAE decoder's ONNX model into sdrt's ONNX Runtime session (CPU provider,
no memory arena) and decodes one random latent with runtime.pipelines.common.decode_latents, the model's
`vae_tiling` forced on or off. It reports its peak RSS (ru_maxrss: weights, runtime and working memory), its RSS
once the session is loaded, and the decode's wall time. Variants run interleaved (A B C, A B C, ...); the record
gives per variant the median and the spread of each, and runtime.memory's estimate of the VAE term. A 2048x2048
untiled decode is not run: its estimate (~44 GiB for SD 1.5's VAE) is over the machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

VARIANTS = "1024:untiled,1024:tiled,2048:tiled"  # image side : vae_tiling
GIB = 2**30


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def vm_rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def decode_once(checkpoint: Path, onnx: Path, side: int, tiling: bool) -> dict:
    """One decode in this process (the child): timings and memory as a dict."""
    from runtime.backends.onnxruntime import CPU_PROVIDERS, OnnxRuntimeSession
    from runtime.checkpoint import describe_checkpoint
    from runtime.pipelines.common import decode_latents

    info = describe_checkpoint(checkpoint)
    session = OnnxRuntimeSession(onnx, "vae_decoder", CPU_PROVIDERS)
    backend = SimpleNamespace(session=lambda component: session, manifest=SimpleNamespace(source={"path": checkpoint}))
    model = SimpleNamespace(info=info, backend=backend, vae_tiling=tiling)
    factor = info["vae_scale_factor"]
    latents = np.random.default_rng(0).standard_normal((1, 4, side // factor, side // factor), dtype=np.float32)
    loaded = vm_rss()
    start = time.perf_counter()
    image = decode_latents(model, latents)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"decode_s": seconds, "peak_rss": peak, "rss_loaded": loaded, "shape": list(image.shape)}


def run_child(checkpoint: Path, onnx: Path, side: int, tiling: bool) -> dict:
    command = [sys.executable, "-m", "benchmarks.vae_tiling", "--child", "--checkpoint", str(checkpoint)]
    command += ["--onnx", str(onnx), "--side", str(side), "--tiling", str(int(tiling))]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the diffusers folder (its configs)")
    parser.add_argument("--onnx", type=Path, required=True, help="the plain exported vae_decoder.onnx")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=VARIANTS, help=f"side:tiled|untiled, comma-separated ({VARIANTS})")
    parser.add_argument("--json", type=Path, help="write the record here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tiling", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(decode_once(args.checkpoint, args.onnx, args.side, bool(args.tiling))))
        return
    from runtime.checkpoint import describe_checkpoint
    from runtime.memory import estimate

    info = describe_checkpoint(args.checkpoint)
    variants = [(int(side), kind == "tiled") for side, kind in (v.split(":") for v in args.variants.split(","))]
    runs: dict[tuple[int, bool], list[dict]] = {v: [] for v in variants}
    with tqdm(total=args.rounds * len(variants), desc="VAE decodes", unit="run") as bar:
        for _ in range(args.rounds):
            for side, tiling in variants:
                runs[side, tiling].append(run_child(args.checkpoint, args.onnx, side, tiling))
                bar.update()
    results = []
    for (side, tiling), measured in runs.items():
        estimated = estimate(info, side, side, images=1, rows=2, vae_tiling=tiling).vae
        results.append({
            "size": f"{side}x{side}",
            "vae_tiling": tiling,
            "decode_s": summary([m["decode_s"] for m in measured]),
            "peak_rss_gib": summary([m["peak_rss"] / GIB for m in measured]),
            "rss_after_load_gib": summary([m["rss_loaded"] / GIB for m in measured]),
            "working_gib": summary([(m["peak_rss"] - m["rss_loaded"]) / GIB for m in measured]),
            "estimated_vae_gib": estimated / GIB,
        })  # fmt: skip
    untiled_2048 = estimate(info, 2048, 2048, images=1, rows=2, vae_tiling=False).vae / GIB
    record = {
        "meta": {
            "benchmark": "python -m benchmarks.vae_tiling",
            "device": f"{cpu_name()}, {os.cpu_count()} cores (shared with other work)",
            "load_average": os.getloadavg(),
            "checkpoint": "SD 1.5-shaped VAE (random weights), plain fp32 vae_decoder.onnx, onnxruntime CPU EP",
            "rounds": args.rounds,
            "order": "interleaved: " + ", ".join(f"{s}x{s} {'tiled' if t else 'untiled'}" for s, t in variants),
            "python": platform.python_version(),
        },
        "results": results,
        "not_run": {"2048x2048 untiled": f"estimated {untiled_2048:.1f} GiB of working memory"},
    }
    text = json.dumps(record, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
