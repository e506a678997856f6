"""GPU benchmark: diffusers (fp16, SDPA) against every sdrt backend available here, eager and graphed, in one run.

    python -m benchmarks.gpu                       # SD-1.5 shapes, random weights: 512x512, 50 steps, CFG 7.5
    python -m benchmarks.gpu --steps 20 --runs 3   # shorter

The checkpoint is export/tiny.py's "sd15-shaped" variant (SD 1.5's published configs, seeded random weights:
latency depends on shapes, not on values). Per system: text encoder, one UNet step (batch 2 with CFG), VAE decode,
end to end (median of --runs after a warm-up), device memory, and the host time per step spent outside the UNet
call. GPU work is timed with CUDA events (diffusers) or around calls that end in a host copy (sdrt's sessions
synchronize before returning). Device memory: the largest (total - free) seen after each run, less the baseline
before loading (the same measure for every system, since TensorRT and ONNX Runtime allocate outside torch).
Writes benchmarks/results/<date>-<device>.json and a Markdown table beside it. Without a CUDA device it prints
one line and exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

PROMPT = "a photo of an astronaut riding a horse on the moon"
SAMPLER = "Euler"


def require_cuda() -> dict:
    """The device facts, or BackendUnavailableError (one line) where no CUDA device exists."""
    from runtime.cuda import compute_capability, device_count, device_name, driver_version
    from runtime.errors import BackendUnavailableError

    if device_count() < 1:
        raise BackendUnavailableError("no CUDA device: the GPU benchmark needs an NVIDIA GPU")
    major, minor = compute_capability(0)
    return {"device": device_name(0), "compute_capability": f"{major}.{minor}", "driver": driver_version()}


class MemoryWatch:
    """Device memory in use above a baseline, sampled when asked (cudaMemGetInfo)."""

    def __init__(self):
        from runtime.cuda import mem_get_info

        self.read = mem_get_info
        free, total = self.read()
        self.baseline = total - free
        self.peak = 0

    def sample(self) -> None:
        free, total = self.read()
        self.peak = max(self.peak, total - free - self.baseline)


def _median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


def _timed(session, log: list[float]):
    """A proxy of `session` whose run() appends its wall time (s) to log."""

    class Timed:
        def run(self, feeds, outputs=None):
            start = time.perf_counter()
            result = session.run(feeds, outputs)
            log.append(time.perf_counter() - start)
            return result

        def __getattr__(self, name):
            return getattr(session, name)

    return Timed()


def bench_sdrt(load, label: str, size: int, steps: int, runs: int) -> dict:
    """End to end and per stage for the StableDiffusion `load()` returns (its backend already chosen); memory is
    measured from before the load, as for diffusers."""
    _release_memory()
    watch = MemoryWatch()
    sd = load()
    options = dict(steps=steps, seed=1, width=size, height=size, sampler=SAMPLER, cfg_scale=7.5)
    logs = {"text_encoder": [], "unet": [], "vae_decoder": []}
    originals = {name: sd.backend.session(name) for name in logs}
    sessions = {name: _timed(session, logs[name]) for name, session in originals.items()}
    sd.backend.session = lambda name, _o=sd.backend.session: sessions.get(name) or _o(name)
    sd.txt2img(PROMPT, **options)  # warm-up (engine activation, graph capture)
    totals, host, text = [], [], []
    for _ in range(runs):
        for log in logs.values():
            log.clear()
        start = time.perf_counter()
        sd.txt2img(PROMPT, **options)
        total = time.perf_counter() - start
        totals.append(total)
        text.append(sum(logs["text_encoder"]))  # every text-encoder call of one generation
        host.append((total - sum(logs["text_encoder"]) - sum(logs["unet"]) - sum(logs["vae_decoder"])) / steps)
        watch.sample()
    return {
        "system": label,
        "end_to_end_ms": _median_ms(totals),
        "unet_step_ms": _median_ms(logs["unet"]),
        "text_encoder_ms": _median_ms(text),
        "vae_decode_ms": _median_ms(logs["vae_decoder"]),
        "host_per_step_ms": _median_ms(host),
        "device_memory_mib": round(watch.peak / 2**20, 1),
    }


def _release_memory() -> None:
    """Drop what the previous system left (its objects, torch's cached blocks) before the next baseline."""
    import gc

    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def bench_diffusers(checkpoint: Path, size: int, steps: int, runs: int) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    _release_memory()
    watch = MemoryWatch()
    pipe = StableDiffusionPipeline.from_pretrained(checkpoint, torch_dtype=torch.float16, safety_checker=None)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to("cuda")
    pipe.set_progress_bar_config(disable=True)
    unet_times: list[float] = []
    original = pipe.unet.forward

    def timed_unet(*args, **kwargs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = original(*args, **kwargs)
        end.record()
        end.synchronize()
        unet_times.append(start.elapsed_time(end) / 1000)
        return out

    def run() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, output_type="np",
             generator=torch.Generator("cuda").manual_seed(1))  # fmt: skip
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000

    run()  # warm-up
    totals = []
    for _ in range(runs):
        totals.append(run())
        watch.sample()
    pipe.unet.forward = timed_unet
    run()  # per-step UNet times (synchronizing every call: not part of the end-to-end figure)
    pipe.unet.forward = original
    with torch.inference_mode():
        ids = pipe.tokenizer([PROMPT] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids.cuda()
        latents = torch.randn(1, 4, size // 8, size // 8, device="cuda", dtype=torch.float16)
        text = [_cuda_ms(lambda: pipe.text_encoder(ids)) for _ in range(runs)]
        vae = [_cuda_ms(lambda: pipe.vae.decode(latents)) for _ in range(runs)]
    return {
        "system": "diffusers fp16 SDPA",
        "end_to_end_ms": _median_ms(totals),
        "unet_step_ms": _median_ms(unet_times),
        "text_encoder_ms": _median_ms(text),
        "vae_decode_ms": _median_ms(vae),
        "host_per_step_ms": None,
        "device_memory_mib": round(watch.peak / 2**20, 1),
    }


def _cuda_ms(fn) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def sdrt_variants(checkpoint: Path, engines: Path, size: int):
    """(label, loader) for every sdrt backend available here, eager and graphed; a loader returns a model."""
    from runtime.backends import check_backend
    from runtime.errors import BackendUnavailableError

    variants = []
    for backend, graphs in (("onnxruntime-cuda", (False, True)), ("torch-cuda", (False, True)),
                            ("tensorrt", (False, True))):  # fmt: skip
        try:
            check_backend(backend)
        except BackendUnavailableError as exc:
            print(f"skipping {backend}: {exc}", file=sys.stderr)
            continue
        for graph in graphs:
            label = f"sdrt {backend} {'graphed' if graph else 'eager'}"
            variants.append((label, lambda b=backend, g=graph: _load_variant(checkpoint, engines, b, g, size)))
    return variants


def _load_variant(checkpoint: Path, engines: Path, backend: str, graph: bool, size: int):
    import runtime

    if backend == "tensorrt":
        from export.tensorrt_build import build_engines, build_request

        build_engines(checkpoint, engines, build_request(1, size, size), progress=False)
    sd = runtime.load(checkpoint, backend=backend, engines_dir=engines)
    if backend == "onnxruntime-cuda":
        from runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaBackend

        sd.backend = OnnxRuntimeCudaBackend(sd.backend.folder, cuda_graph=graph)
    elif backend == "torch-cuda":
        from runtime.backends.torch_cuda import TorchCudaBackend

        sd.backend = TorchCudaBackend(checkpoint, cuda_graph=graph)
    else:
        for engine in sd.backend.session("unet").engines:
            engine.graphed = graph
    return sd


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-bindings"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return found


def markdown(result: dict) -> str:
    rows = ["| system | end to end ms | UNet step ms | text encoder ms | VAE ms | host/step ms | memory MiB |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["systems"]:
        cells = [r["system"], r["end_to_end_ms"], r["unet_step_ms"], r["text_encoder_ms"], r["vae_decode_ms"],
                 r["host_per_step_ms"], r["device_memory_mib"]]  # fmt: skip
        rows.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    speedup = result["speedup_vs_diffusers"]
    rows.append(f"\n{result['device']}, {result['steps']} steps, {result['size']}x{result['size']}, batch 1, CFG 7.5; "
                f"best sdrt speedup over diffusers end to end: {speedup}")  # fmt: skip
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", default="benchmarks/.work", help="checkpoint and engines (reused across runs)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    from runtime.errors import SdrtError

    try:
        device = require_cuda()
    except SdrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run(args, device)
    stem = f"{datetime.date.today().isoformat()}-{device['device'].replace(' ', '-').lower()}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / f"{stem}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


def run(args: argparse.Namespace, device: dict) -> dict:
    from export.tiny import TinyConfig, make_tiny_checkpoint

    work = Path(args.work)
    checkpoint = work / "sd15-shaped"
    if not (checkpoint / "model_index.json").is_file():
        make_tiny_checkpoint(checkpoint, TinyConfig(variant="sd15-shaped"))
    systems = [bench_diffusers(checkpoint, args.size, args.steps, args.runs)]
    for label, load in sdrt_variants(checkpoint, work / "engines", args.size):
        systems.append(bench_sdrt(load, label, args.size, args.steps, args.runs))
    peer = systems[0]["end_to_end_ms"]
    best = min((s["end_to_end_ms"] for s in systems[1:]), default=None)
    return {
        **device,
        "python": platform.python_version(),
        "versions": versions(),
        "command": " ".join(["python -m benchmarks.gpu", *sys.argv[1:]]),
        "size": args.size,
        "steps": args.steps,
        "runs": args.runs,
        "systems": systems,
        "speedup_vs_diffusers": round(peer / best, 3) if best else None,
    }


if __name__ == "__main__":
    sys.exit(main())
