"""GPU benchmark: diffusers (fp16, SDPA) against every sdrt backend available here, eager and graphed, in one run.

    python -m benchmarks.gpu                       # SD-1.5 shapes, random weights: 512x512, 50 steps, CFG 7.5
    python -m benchmarks.gpu --model sdxl-shaped   # SDXL base shapes: 1024x1024, 30 steps, CFG 5
    python -m benchmarks.gpu --steps 20 --runs 3   # shorter

The checkpoint is export/tiny.py's "sd15-shaped" or "sdxl-shaped" variant (the published configs, seeded random
weights: latency depends on shapes, not on values), built under --work on first use (the SDXL one, 3.5 billion
parameters saved in fp16, takes about a minute and 7 GB: it is built on the GPU machine, never by the tests). The
peer is diffusers' StableDiffusionPipeline or StableDiffusionXLPipeline (fp16, its VAE upcast to fp32 for the decode
as the pipeline does for SDXL). Per system: text encoders, one UNet step (batch 2 with CFG), VAE decode,
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
import statistics
import sys
import time
from pathlib import Path

from benchmarks.gpu_report import DIFFUSERS, Writer, header, markdown, speedup

PROMPT = "a photo of an astronaut riding a horse on the moon"
SAMPLER = "Euler"
# per model: the checkpoint variant's usual size, steps and CFG scale (the defaults of --size, --steps, --cfg)
CASES = {"sd15-shaped": (512, 50, 7.5), "sdxl-shaped": (1024, 30, 5.0)}


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


class Timed:
    """A proxy of a session whose run() logs its wall time (s) and, where torch sees the GPU, a CUDA event pair
    around it on torch's current stream (the GPU time of torch-cuda sessions; other backends use their own
    streams, so their GPU time is not read this way)."""

    def __init__(self, session, events: bool):
        self.session, self.events = session, events
        self.wall: list[float] = []
        self.pairs: list = []

    def run(self, feeds, outputs=None):
        pair = None
        if self.events:
            import torch

            pair = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            pair[0].record()
        start = time.perf_counter()
        result = self.session.run(feeds, outputs)
        self.wall.append(time.perf_counter() - start)
        if pair is not None:
            pair[1].record()
            self.pairs.append(pair)
        return result

    def gpu_seconds(self) -> float | None:
        """The GPU time of the calls logged since the last clear (None without events)."""
        if not self.events:
            return None
        import torch

        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.pairs) / 1000

    def clear(self) -> None:
        self.wall.clear()
        self.pairs.clear()

    def __getattr__(self, name):
        return getattr(self.session, name)


def bench_sdrt(load, label: str, size: int, steps: int, runs: int, cfg: float = 7.5) -> dict:
    """End to end and per stage for the StableDiffusion `load()` returns (its backend already chosen); memory is
    measured from before the load, as for diffusers. Host time per step: end-to-end wall time less the GPU time of
    every session call (CUDA events), over the steps, where the GPU time can be read (torch-cuda)."""
    _release_memory()
    watch = MemoryWatch()
    sd = load()
    options = dict(steps=steps, seed=1, width=size, height=size, sampler=SAMPLER, cfg_scale=cfg)
    events = sd.backend.name == "torch-cuda"
    texts = ("text_encoder", "text_encoder_2") if sd.info.get("sdxl") else ("text_encoder",)  # SDXL base: both
    names = (*texts, "unet", "vae_decoder")
    sessions = {name: Timed(sd.backend.session(name), events) for name in names}
    sd.backend.session = lambda name, _o=sd.backend.session: sessions.get(name) or _o(name)
    sd.txt2img(PROMPT, **options)  # warm-up (engine activation, graph capture)
    totals, host, text = [], [], []
    for _ in range(runs):
        for timed in sessions.values():
            timed.clear()
        start = time.perf_counter()
        sd.txt2img(PROMPT, **options)
        total = time.perf_counter() - start
        totals.append(total)
        text.append(sum(sum(sessions[name].wall) for name in texts))  # every text-encoder call of one generation
        gpu = [timed.gpu_seconds() for timed in sessions.values()]
        if None not in gpu:
            host.append((total - sum(gpu)) / steps)
        watch.sample()
    return {
        "system": label,
        "end_to_end_ms": _median_ms(totals),
        "unet_step_ms": _median_ms(sessions["unet"].wall),
        "text_encoder_ms": _median_ms(text),
        "vae_decode_ms": _median_ms(sessions["vae_decoder"].wall),
        "host_per_step_ms": _median_ms(host) if host else None,
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


def bench_diffusers(checkpoint: Path, size: int, steps: int, runs: int, cfg: float = 7.5) -> dict:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    _release_memory()
    watch = MemoryWatch()
    sdxl = (checkpoint / "text_encoder_2").is_dir()
    if sdxl:
        pipe = StableDiffusionXLPipeline.from_pretrained(checkpoint, torch_dtype=torch.float16)
    else:
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
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=cfg, height=size, width=size, output_type="np",
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
        text = [_cuda_ms(_diffusers_text_encoders(pipe, sdxl)) for _ in range(runs)]
        vae = _diffusers_vae_decodes(pipe, size, runs, upcast=sdxl and pipe.vae.config.force_upcast)
    return {
        "system": DIFFUSERS,
        "end_to_end_ms": _median_ms(totals),
        "unet_step_ms": _median_ms(unet_times),
        "text_encoder_ms": _median_ms(text),
        "vae_decode_ms": _median_ms(vae),
        "host_per_step_ms": None,
        "device_memory_mib": round(watch.peak / 2**20, 1),
    }


def _diffusers_text_encoders(pipe, sdxl: bool):
    """One call of the pipeline's text encoders on the prompt and the empty negative: both of SDXL's (its
    encode_prompt, which also tokenizes), SD's one on ready token ids."""
    if sdxl:
        return lambda: pipe.encode_prompt(PROMPT, device="cuda", do_classifier_free_guidance=True)
    ids = pipe.tokenizer([PROMPT] * 2, padding="max_length", max_length=77, return_tensors="pt").input_ids.cuda()
    return lambda: pipe.text_encoder(ids)


def _diffusers_vae_decodes(pipe, size: int, runs: int, upcast: bool) -> list[float]:
    """VAE decode times of one latent, in the dtype the pipeline decodes in: fp32 with `upcast` (SDXL's pipeline, its
    VAE config saying force_upcast), else fp16."""
    import torch

    dtype = torch.float32 if upcast else torch.float16
    pipe.vae.to(dtype)
    latents = torch.randn(1, 4, size // 8, size // 8, device="cuda", dtype=dtype)
    times = [_cuda_ms(lambda: pipe.vae.decode(latents)) for _ in range(runs)]
    pipe.vae.to(torch.float16)
    return times


def _cuda_ms(fn) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def sdrt_variants(checkpoint: Path, engines: Path, size: int, backends: tuple[str, ...]):
    """(label, loader or the reason it cannot run) for every requested sdrt backend, eager and graphed."""
    from runtime.backends import check_backend
    from runtime.errors import SdrtError

    variants = []
    for backend in backends:
        try:
            check_backend(backend)
            reason = None
        except SdrtError as exc:
            reason = f"unavailable: {exc}"
        for graph in (False, True):
            label = f"sdrt {backend} {'graphed' if graph else 'eager'}"
            load = reason or (lambda b=backend, g=graph: _load_variant(checkpoint, engines, b, g, size))
            variants.append((label, load))
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
        if not graph:
            sd.backend.session("unet").graphed = None  # the loaded modules, run eagerly (no second copy)
    else:
        for engine in sd.backend.session("unet").engines:
            engine.graphed = graph
    return sd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-shaped", choices=list(CASES), help="the published shapes to run")
    parser.add_argument("--size", type=int, default=None, help="pixels per side (default: 512, SDXL 1024)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: 50, SDXL 30)")
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale (default: 7.5, SDXL 5)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--backends", default="torch-cuda,onnxruntime-cuda,tensorrt", help="sdrt backends, in order")
    parser.add_argument("--work", default="benchmarks/.work", help="checkpoint and engines (reused across runs)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--stem", help="result file names without suffix (default: <date>-<device>)")
    parser.add_argument("--dry-run", action="store_true", help="check arguments, imports and the writer; no GPU")
    args = parser.parse_args(argv)
    size, steps, cfg = CASES[args.model]
    args.size = size if args.size is None else args.size
    args.steps = steps if args.steps is None else args.steps
    args.cfg = cfg if args.cfg is None else args.cfg
    from runtime.errors import SdrtError

    if args.steps < 1 or args.runs < 1 or args.size < 64 or args.size % 8:
        print("error: --steps and --runs must be positive, --size a multiple of 8 of at least 64", file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(args)
    try:
        device = require_cuda()
    except SdrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stem = args.stem or f"{datetime.date.today().isoformat()}-{device['device'].replace(' ', '-').lower()}"
    result = run(args, device, Writer(Path(args.out), stem))
    print(markdown(result))
    return 0


def dry_run(args: argparse.Namespace) -> int:
    """What a GPU run would do, without one: the imports the run needs, the variants, and the writer."""
    import export.tiny  # noqa: F401  (the checkpoint maker the run uses)
    import runtime  # noqa: F401

    variants = sdrt_variants(Path(args.work) / args.model, Path(args.work) / "engines", args.size,
                             tuple(b for b in args.backends.split(",") if b))  # fmt: skip
    result = header(args, {"device": "dry run (no GPU)"})
    peer = {"system": DIFFUSERS, "error": "not run (dry run)" if _has_diffusers() else "diffusers is not installed"}
    result["systems"] = [peer] + [{"system": label, "error": load if isinstance(load, str) else "not run (dry run)"}
                                  for label, load in variants]  # fmt: skip
    Writer(Path(args.out), args.stem or "dry-run")(result)
    print(f"dry run: {len(variants)} sdrt variants planned; diffusers {'present' if _has_diffusers() else 'absent'}")
    return 0


def _has_diffusers() -> bool:
    import importlib.util

    return importlib.util.find_spec("diffusers") is not None


def _attempt(label: str, bench) -> dict:
    """One system's result, or its error (one line) so that the other systems still run."""
    try:
        return bench()
    except Exception as exc:  # any failure of one variant is data, not the end of the run
        print(f"{label} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        reason = (str(exc).strip().splitlines() or [""])[0][:300]
        return {"system": label, "error": f"{type(exc).__name__}: {reason}"}
    finally:
        _release_memory()


def run(args: argparse.Namespace, device: dict, write) -> dict:
    from export.tiny import TinyConfig, make_tiny_checkpoint

    work = Path(args.work)
    checkpoint = work / args.model
    if not (checkpoint / "model_index.json").is_file():
        make_tiny_checkpoint(checkpoint, TinyConfig(variant=args.model))
    result = header(args, device)
    systems = result["systems"]
    if _has_diffusers():
        bench = lambda: bench_diffusers(checkpoint, args.size, args.steps, args.runs, args.cfg)  # noqa: E731
        systems.append(_attempt(DIFFUSERS, bench))
    else:
        systems.append({"system": DIFFUSERS, "error": "diffusers is not installed"})
    write(result)
    backends = tuple(b for b in args.backends.split(",") if b)
    for label, load in sdrt_variants(checkpoint, work / "engines", args.size, backends):
        if isinstance(load, str):
            systems.append({"system": label, "error": load})
        else:
            bench = lambda load=load, label=label: bench_sdrt(load, label, args.size, args.steps, args.runs,  # noqa: E731
                                                              args.cfg)  # fmt: skip
            systems.append(_attempt(label, bench))
        result["speedup_vs_diffusers"] = speedup(systems)
        write(result)
    return result


if __name__ == "__main__":
    sys.exit(main())
