"""One measurement of benchmarks.cpu, in a process of its own:

    python -m benchmarks.cpu_worker VARIANT --model FOLDER --engines DIR --size 512 --steps 4 --image OUT.npy

Loads the variant, warms it up with a one-step generation at the measured size (every kernel and buffer of that
shape once), then times one txt2img (Euler, CFG 7.5, a fixed seed): the text encoder, each UNet call, the VAE
decode and the whole generation. It saves the image (uint8 [H, W, 3], rounded as diffusers rounds) and prints one
JSON line: the times, the peak RSS of the process (VmHWM; ru_maxrss beside it; loading included), or
{"skipped": reason} where the variant cannot run here (sdrt refuses its backend or precision: the typed error's
line). Any other failure ends the process with the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPT = "a photo of an astronaut riding a horse on the moon"
SAMPLER = "Euler"
CFG_SCALE = 7.5
SEED = 1


@dataclass(frozen=True)
class Variant:
    """One system under test: sdrt over a backend at a precision, or diffusers over torch."""

    name: str
    family: str  # "sdrt" or "diffusers"
    backend: str  # the sdrt backend; "torch" for diffusers
    precision: str  # "fp32", "bf16" or "int8"
    jemalloc: bool = False  # run with libjemalloc preloaded (LD_PRELOAD)

    @property
    def exact(self) -> bool:
        return self.precision == "fp32"

    @property
    def reference(self) -> str | None:
        """The fp32 variant of the same family whose image this one's is compared with (None for the references)."""
        if self.family == "sdrt":
            return None if self.name == SDRT_FP32 else SDRT_FP32
        return None if self.name == DIFFUSERS_FP32 else DIFFUSERS_FP32


SDRT_FP32 = "sdrt-onnxruntime-fp32"
DIFFUSERS_FP32 = "diffusers-torch-fp32"
DIFFUSERS_FP32_JEMALLOC = "diffusers-torch-fp32-jemalloc"
DIFFUSERS_BF16 = "diffusers-torch-bf16"
VARIANTS = {
    v.name: v
    for v in (
        Variant(SDRT_FP32, "sdrt", "onnxruntime", "fp32"),
        Variant("sdrt-onnxruntime-int8", "sdrt", "onnxruntime", "int8"),
        Variant("sdrt-openvino-fp32", "sdrt", "openvino", "fp32"),
        Variant("sdrt-openvino-bf16", "sdrt", "openvino", "bf16"),
        Variant(DIFFUSERS_FP32, "diffusers", "torch", "fp32"),
        Variant(DIFFUSERS_FP32_JEMALLOC, "diffusers", "torch", "fp32", jemalloc=True),
        Variant(DIFFUSERS_BF16, "diffusers", "torch", "bf16"),
    )
}


class Clock:
    """Wall time (s) of every call of the wrapped callables, per stage."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {"text_encoder": [], "unet": [], "vae_decoder": []}

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self.calls[stage].append(time.perf_counter() - start)
            return result

        return timed

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()

    def stages(self) -> dict:
        """Per generation: text encoder and VAE decode summed over their calls, the UNet's median call."""
        unet = self.calls["unet"]
        return {
            "text_encoder_s": sum(self.calls["text_encoder"]),
            "unet_step_s": statistics.median(unet) if unet else None,
            "unet_calls": len(unet),
            "vae_decode_s": sum(self.calls["vae_decoder"]),
        }


class _TimedSession:
    """A session whose run() the clock times; everything else passes through."""

    def __init__(self, session, run):
        self._session, self.run = session, run

    def __getattr__(self, name):
        return getattr(self._session, name)


def load_sdrt(variant: Variant, model: Path, engines: Path, clock: Clock):
    """The loaded StableDiffusion with its sessions timed, and a generate(steps) -> float [H, W, 3] in [0, 1]."""
    import runtime

    options = {} if variant.exact else {"precision": variant.precision}  # fp32: every backend's default
    try:
        sd = runtime.load(model, backend=variant.backend, engines_dir=engines, **options)
    except TypeError as exc:
        if "precision" not in str(exc):
            raise
        raise _Unavailable(f"runtime.load takes no precision here, so no {variant.precision}") from exc
    computes_in = getattr(sd, "precision", "fp32")
    if computes_in != variant.precision:
        raise _Unavailable(f"the {variant.backend} backend loaded in {computes_in}, not {variant.precision}")
    timed = {}
    for stage in clock.calls:
        session = sd.backend.session(stage)
        timed[stage] = _TimedSession(session, clock.wrap(stage, session.run))
    opened = sd.backend.session
    sd.backend.session = lambda component: timed.get(component) or opened(component)

    def generate(size: int, steps: int) -> np.ndarray:
        result = sd.txt2img(
            PROMPT, steps=steps, seed=SEED, width=size, height=size, sampler=SAMPLER, cfg_scale=CFG_SCALE
        )
        return result.images[0]

    return generate


def load_diffusers(variant: Variant, model: Path, clock: Clock):
    """diffusers' pipeline at the variant's dtype, its modules timed; the same generate() as load_sdrt's.

    The initial noise is drawn in fp32 from the seeded CPU generator (what sdrt and fp32 diffusers draw) and cast
    to the pipeline's dtype, so bf16 differs from fp32 by its arithmetic only, not by another noise sample."""
    import diffusers
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[variant.precision]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.forward = clock.wrap("text_encoder", pipe.text_encoder.forward)
    pipe.unet.forward = clock.wrap("unet", pipe.unet.forward)
    pipe.vae.decode = clock.wrap("vae_decoder", pipe.vae.decode)

    def generate(size: int, steps: int) -> np.ndarray:
        shape = (1, pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(SEED), dtype=torch.float32)
        with torch.inference_mode():
            out = pipe(
                PROMPT,
                num_inference_steps=steps,
                guidance_scale=CFG_SCALE,
                height=size,
                width=size,
                latents=noise.to(dtype),
                output_type="np",
            )
        return out.images[0]

    return generate


class _Unavailable(Exception):
    """The variant cannot run here; the message says why."""


def measure(variant: Variant, model: Path, engines: Path, size: int, steps: int, image_path: Path | None) -> dict:
    from runtime.errors import BackendUnavailableError, InvalidRequestError

    clock = Clock()
    start = time.perf_counter()
    try:
        if variant.family == "sdrt":
            generate = load_sdrt(variant, model, engines, clock)
        else:
            generate = load_diffusers(variant, model, clock)
    except (BackendUnavailableError, InvalidRequestError, _Unavailable) as exc:  # this backend or precision: not here
        return {"skipped": (str(exc).strip().splitlines() or [type(exc).__name__])[0]}
    load_s = time.perf_counter() - start
    rss_after_load = _peak_rss_gib()
    if steps == 0:  # load only: the export, quantisation or compile cache the variant needs is made now
        return {"load_s": load_s, "peak_rss_after_load_gib": rss_after_load}
    generate(size, 1)  # warm-up
    clock.clear()
    load_average = os.getloadavg()[0]
    start = time.perf_counter()
    image = generate(size, steps)
    end_to_end = time.perf_counter() - start
    pixels = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    if image_path is not None:
        np.save(image_path, pixels)
    return {
        **clock.stages(),
        "end_to_end_s": end_to_end,
        "load_s": load_s,
        "peak_rss_gib": _peak_rss_gib(),
        "peak_rss_after_load_gib": rss_after_load,
        "ru_maxrss_gib": _ru_maxrss_gib(),
        "allocator": "jemalloc" if _jemalloc_mapped() else "default",
        "torch_imported": "torch" in sys.modules,
        "load_average_1min": [load_average, os.getloadavg()[0]],
    }


def _peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM, GiB). ru_maxrss is the same figure except that Linux carries the
    parent's resident set at fork across exec into it: a worker started by a large parent would read the parent's."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 2**20
    except (OSError, StopIteration):
        return _ru_maxrss_gib()


def _ru_maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _jemalloc_mapped() -> bool:
    try:
        return "libjemalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu_worker", description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--model", required=True, help="a diffusers checkpoint folder")
    parser.add_argument("--engines", required=True, help="sdrt's artifact folder")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True, help="0: load only (makes what the variant caches)")
    parser.add_argument("--image", help="save the image here (.npy, uint8 [H, W, 3])")
    args = parser.parse_args(argv)
    variant = VARIANTS[args.variant]
    result = measure(variant, Path(args.model), Path(args.engines), args.size, args.steps,
                     Path(args.image) if args.image else None)  # fmt: skip
    sys.stdout.write(json.dumps({"variant": variant.name, **result}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
