"""CPU benchmark: sdrt (ONNX Runtime CPU) against diffusers (torch CPU) on the same checkpoint, in one run.

    python -m benchmarks.cpu --model sd15-shaped --size 256 --steps 4        # SD-1.5 shapes, random weights
    python -m benchmarks.cpu --model tiny --steps 20                         # runtime overhead per step

Per stage (text encoder, one UNet call, VAE decode) and end to end, medians over --runs after a warm-up,
plus the runtime's own per-step overhead: sampling-loop time not spent inside the UNet session.
Writes JSON (default benchmarks/results/<date>-cpu-<model>.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

from tqdm import tqdm

PROMPT = "a photo of an astronaut riding a horse on the moon"
SAMPLER = "Euler"


def _timed_calls(obj, name: str, log: list[float]):
    """Wrap obj.name so every call appends its duration (s) to log; returns the restore function."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        log.append(time.perf_counter() - start)
        return result

    setattr(obj, name, wrapper)
    return lambda: setattr(obj, name, original)


def bench_sdrt(folder: Path, engines: Path, size: int, steps: int, runs: int) -> dict:
    import runtime
    from runtime.pipelines.conditioning import encode_groups

    sd = runtime.load(folder, backend="onnxruntime", engines_dir=engines)
    options = dict(steps=steps, seed=1, width=size, height=size, sampler=SAMPLER, cfg_scale=7.5)
    sd.txt2img(PROMPT, **options)  # warm-up
    unet_log, vae_log, totals, text_times = [], [], [], []
    restore_unet = _timed_calls(sd.backend.session("unet"), "run", unet_log)
    restore_vae = _timed_calls(sd.backend.session("vae_decoder"), "run", vae_log)
    try:
        for _ in tqdm(range(runs), desc="sdrt", leave=False):
            start = time.perf_counter()
            encode_groups(sd, [[""], [PROMPT]], "Original", 1)
            text_times.append(time.perf_counter() - start)
            unet_log.clear()
            vae_log.clear()
            start = time.perf_counter()
            sd.txt2img(PROMPT, **options)
            totals.append(time.perf_counter() - start)
    finally:
        restore_unet()
        restore_vae()
    return {
        "text_encoder_s": statistics.median(text_times),
        "unet_step_s": statistics.median(unet_log),
        "vae_decode_s": statistics.median(vae_log),
        "end_to_end_s": statistics.median(totals),
        "end_to_end_runs_s": totals,
        "runtime_overhead_per_step_s": _overhead_per_step(sd, steps, options),
    }


def _overhead_per_step(sd, steps: int, options: dict) -> float:
    """Median over steps of (sampler step time - UNet session time), measured inside one generation."""
    marks: list[tuple[float, float]] = []  # (time the UNet call started, time it ended)
    unet = sd.backend.session("unet")
    unet_run = unet.run

    def timed_run(feeds, outputs=None):
        start = time.perf_counter()
        result = unet_run(feeds, outputs)
        marks.append((start, time.perf_counter()))
        return result

    unet.run = timed_run
    try:
        sd.txt2img(PROMPT, **options)
    finally:
        del unet.run
    # between the end of one UNet call and the start of the next lies everything the runtime adds to a step
    gaps = [marks[i + 1][0] - marks[i][1] for i in range(len(marks) - 1)]
    return statistics.median(gaps) if gaps else 0.0


def bench_diffusers(folder: Path, size: int, steps: int, runs: int) -> dict:
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        generator = torch.Generator("cpu").manual_seed(1)
        kwargs = dict(num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, generator=generator)
        return pipe(PROMPT, output_type="np", **kwargs)

    generate()  # warm-up
    unet_log, vae_log, text_times, totals = [], [], [], []
    restore_unet = _timed_calls(pipe.unet, "forward", unet_log)
    restore_vae = _timed_calls(pipe.vae, "decode", vae_log)
    try:
        for _ in tqdm(range(runs), desc="diffusers", leave=False):
            start = time.perf_counter()
            with torch.inference_mode():
                pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
            text_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            generate()
            totals.append(time.perf_counter() - start)
    finally:
        restore_unet()
        restore_vae()
    return {
        "text_encoder_s": statistics.median(text_times),
        "unet_step_s": statistics.median(unet_log),
        "vae_decode_s": statistics.median(vae_log),
        "end_to_end_s": statistics.median(totals),
        "end_to_end_runs_s": totals,
    }


def make_model(kind: str, workdir: Path) -> Path:
    from export.tiny import TinyConfig, make_tiny_checkpoint

    folder = workdir / f"{kind}-checkpoint"
    if not (folder / "model_index.json").is_file():
        make_tiny_checkpoint(folder, TinyConfig(variant="sd15-shaped" if kind == "sd15-shaped" else "sd1"))
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15-shaped", "tiny"), default="sd15-shaped")
    parser.add_argument("--size", type=int, default=None, help="default: 256 (sd15-shaped), 64 (tiny)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/sdrt-bench")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    size = args.size or (256 if args.model == "sd15-shaped" else 64)
    workdir = Path(args.workdir)
    folder = make_model(args.model, workdir)
    sdrt = bench_sdrt(folder, workdir / "engines", size, args.steps, args.runs)
    ref = bench_diffusers(folder, size, args.steps, args.runs)
    stages = ("text_encoder_s", "unet_step_s", "vae_decode_s", "end_to_end_s")
    step = sdrt["unet_step_s"] + sdrt["runtime_overhead_per_step_s"]
    record = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {_cpu_count()} cores)",
        "command": "python -m benchmarks.cpu " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "date": datetime.date.today().isoformat(),
        "model": args.model,
        "size": size,
        "steps": args.steps,
        "sampler": SAMPLER,
        "versions": _versions(),
        "sdrt_onnxruntime_cpu": sdrt,
        "diffusers_torch_cpu": ref,
        "ratio_sdrt_over_diffusers": {k: sdrt[k] / ref[k] for k in stages},
        "runtime_overhead_fraction_of_step": sdrt["runtime_overhead_per_step_s"] / step,
    }
    out = Path(args.out or f"benchmarks/results/{record['date']}-cpu-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    _print_table(record, stages)
    return record


def _print_table(record: dict, stages: tuple[str, ...]) -> None:
    sdrt, ref = record["sdrt_onnxruntime_cpu"], record["diffusers_torch_cpu"]
    ratio = record["ratio_sdrt_over_diffusers"]
    print(f"| stage | sdrt ORT CPU (ms) | diffusers CPU (ms) | sdrt/diffusers |  [{record['device']}]")
    print("|---|---|---|---|")
    for stage in stages:
        print(f"| {stage[:-2]} | {sdrt[stage] * 1e3:.1f} | {ref[stage] * 1e3:.1f} | {ratio[stage]:.2f} |")
    overhead = sdrt["runtime_overhead_per_step_s"]
    print(f"runtime overhead per step: {overhead * 1e6:.0f} us = {record['runtime_overhead_fraction_of_step']:.2%}")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("numpy", "onnxruntime", "torch", "diffusers", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


if __name__ == "__main__":
    main()
