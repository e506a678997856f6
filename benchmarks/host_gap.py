"""Host time between UNet calls: python -m benchmarks.host_gap [--json OUT] [--steps 20] [--runs 5].

Runs the real txt2img pipeline (request validation, conditioning, seeded noise, sampler, denoiser, progress hook)
at SD 1.5 shapes, 512x512, batch 1, CFG 7 over a stand-in backend: a UNet session that waits --unet-ms (10 ms: a
GPU-sized step) per call and returns a fixed noise_pred, a text encoder that returns fixed hidden states, and a VAE
decoder that returns a fixed image. The wait releases the GIL, as a GPU backend's synchronisation does; `--wait spin`
(the default) yields in a loop until the time is up, as CUDA's default synchronisation spins while a process has
fewer CUDA contexts than the machine has cores (cudaDeviceScheduleAuto), so the core stays awake; `--wait sleep`
sleeps it through, as cudaDeviceScheduleBlockingSync does (the step then starts on a cold core).

The number per sampler is the host time between the end of one UNet call and the start of the next one inside a
generation: everything sdrt adds to a step on a GPU backend (guidance, parameterisation, the sampler update, noise,
feed preparation). The target is 0.2 ms, 2% of a 10 ms step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export.configs import SD15_SCHEDULER, SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE

SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "DPM++ SDE", "UniPC", "Heun")
PROMPT = "a photo of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"
SIZE = 512
TARGET_MS = 0.2


class StandInUnet:
    """A GPU-sized UNet step: waits `seconds`, returns the same noise_pred array each call (valid until the next
    call, as GPU sessions' host buffers are), and records (start, end) of every call."""

    def __init__(self, seconds: float, wait: str = "spin"):
        self.seconds, self.wait = seconds, wait
        self.marks: list[tuple[float, float]] = []
        self._outputs: dict[tuple, np.ndarray] = {}

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        shape = (feeds["sample"].shape[0], 4, *feeds["sample"].shape[2:])  # [N, 4, h, w]
        out = self._outputs.get(shape)
        if out is None:
            out = self._outputs[shape] = (0.1 * np.random.default_rng(0).standard_normal(shape)).astype(np.float32)
        if self.wait == "sleep":
            time.sleep(max(0.0, self.seconds - (time.perf_counter() - start)))
        else:
            while time.perf_counter() - start < self.seconds:
                time.sleep(0)  # lets other threads (the noise drawn ahead) run, as a spinning sync does
        self.marks.append((start, time.perf_counter()))
        return {"noise_pred": out}


class _Fixed:
    """A session returning one fixed array (shape from a function of the feeds) under `name`."""

    def __init__(self, name: str, shape_of, value: float = 0.0):
        self.name, self.shape_of, self.value = name, shape_of, value

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        return {self.name: np.full(self.shape_of(feeds), self.value, dtype=np.float32)}


class StandInBackend:
    name = "stand-in"

    def __init__(self, unet: StandInUnet, vocab_size: int, hidden: int):
        from runtime.backends import TextTables

        text = _Fixed("last_hidden_state", lambda f: f["inputs_embeds"].shape, 0.1)  # emphasis divides by its mean
        vae = _Fixed("image", lambda f: (len(f["latent"]), 3, SIZE, SIZE))
        self.sessions = {"unet": unet, "text_encoder": text, "vae_decoder": vae}
        weight = np.zeros((vocab_size, hidden), dtype=np.float32)
        self.tables = TextTables(weight, np.ones(hidden, np.float32), np.zeros(hidden, np.float32), 1e-5)

    def session(self, component: str):
        return self.sessions[component]

    def text_tables(self):
        return self.tables


def stand_in_model(folder: Path, unet: StandInUnet):
    """A StableDiffusion over StandInBackend with SD 1.5's published configs and a small tokenizer."""
    from export.tiny import write_tiny_tokenizer
    from runtime.api import StableDiffusion
    from runtime.checkpoint import describe_checkpoint
    from runtime.tokenizer import ClipTokenizer

    configs = {
        "model_index.json": {"_class_name": "StableDiffusionPipeline"},
        "unet/config.json": SD15_UNET,
        "vae/config.json": SD15_VAE,
        "text_encoder/config.json": SD15_TEXT_ENCODER,
        "scheduler/scheduler_config.json": SD15_SCHEDULER,
    }
    for name, config in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(config))
    vocab_size = write_tiny_tokenizer(folder / "tokenizer")
    info = describe_checkpoint(folder)
    backend = StandInBackend(unet, vocab_size, info["text_hidden_size"])
    tokenizer = ClipTokenizer.from_folder(folder / "tokenizer")
    return StableDiffusion("sd15-stand-in", "sd15-stand-in-0", info, tokenizer, backend, progress=False)


def bench(model, unet: StandInUnet, sampler: str, steps: int, runs: int) -> dict:
    """Gaps between consecutive UNet calls of `runs` generations (after one warm-up), in ms."""
    options = dict(
        negative_prompt=NEGATIVE, steps=steps, cfg_scale=7.0, width=SIZE, height=SIZE, sampler=sampler, batch_size=1
    )
    model.step_hook = lambda total: None  # what serving installs: a callable per UNet call
    model.txt2img(PROMPT, seed=0, **options)  # warm-up
    gaps, calls = [], 0
    for run in range(runs):
        unet.marks.clear()
        model.txt2img(PROMPT, seed=1 + run, **options)
        calls = len(unet.marks)
        gaps += [unet.marks[i + 1][0] - unet.marks[i][1] for i in range(calls - 1)]
    gaps_ms = np.array(gaps) * 1e3
    return {
        "sampler": sampler,
        "steps": steps,
        "unet_calls": calls,
        "median_gap_ms": float(np.median(gaps_ms)),
        "mean_gap_ms": float(gaps_ms.mean()),
        "p90_gap_ms": float(np.percentile(gaps_ms, 90)),
        "max_gap_ms": float(gaps_ms.max()),
        "under_target": bool(np.median(gaps_ms) < TARGET_MS),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results as JSON to this path")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps per generation")
    parser.add_argument("--runs", type=int, default=5, help="measured generations per sampler (after one warm-up)")
    parser.add_argument("--unet-ms", type=float, default=10.0, help="the stand-in UNet's time per call")
    parser.add_argument("--samplers", nargs="*", default=list(SAMPLERS), help="A1111 sampler labels")
    parser.add_argument("--wait", choices=("spin", "sleep"), default="spin",
                        help="how the stand-in UNet waits: spin (CUDA's default sync) or sleep (blocking sync)")
    args = parser.parse_args(argv)
    unet = StandInUnet(args.unet_ms / 1e3, args.wait)
    with tempfile.TemporaryDirectory() as tmp:
        model = stand_in_model(Path(tmp), unet)
        rows = [bench(model, unet, s, args.steps, args.runs) for s in tqdm(args.samplers, desc="samplers")]
    header = f"{'sampler':<12}{'calls':>7}{'median ms':>11}{'mean ms':>10}{'p90 ms':>10}{'max ms':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['sampler']:<12}{r['unet_calls']:>7}{r['median_gap_ms']:>11.3f}{r['mean_gap_ms']:>10.3f}"
            f"{r['p90_gap_ms']:>10.3f}{r['max_gap_ms']:>10.3f}"
        )
    print("\n".join(lines))
    print(f"target: median under {TARGET_MS} ms per gap, {TARGET_MS / max(args.unet_ms, 1e-9):.0%} of the UNet call")
    if args.json:
        meta = {
            "shape": [1, 4, SIZE // 8, SIZE // 8],
            "cfg_scale": 7.0,
            "unet_ms": args.unet_ms,
            "wait": args.wait,
            "runs": args.runs,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "median_of_medians_ms": statistics.median(r["median_gap_ms"] for r in rows),
        }
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
