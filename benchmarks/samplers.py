"""Host cost of the numpy samplers, without the model: python -m benchmarks.samplers [--out PATH].

The model returns a fixed denoised array and noise() a fixed unit-normal array, so the numbers are the sampler's
own per-step work (array arithmetic and Python) at SD 1.5 latents [1, 4, 64, 64]; make_schedule is timed apart.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export.configs import SD15_SCHEDULER
from runtime.errors import InvalidRequestError
from runtime.samplers import SAMPLER_NAMES, SPECS, make_schedule, sample

SD15 = SD15_SCHEDULER
SHAPE = (1, 4, 64, 64)  # [B, C, h, w] latents of a 512x512 image
STEPS = (20, 50, 150)


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench(name: str, steps: int, repeats: int) -> dict:
    """One sampler at one step count; per_step_ms None where the sampler refuses the count (LCM: at most 50)."""
    spec = SPECS[name]
    try:
        make_schedule(spec, "default", SD15, steps)
    except InvalidRequestError as err:
        return {"sampler": name, "steps": steps, "per_step_ms": None, "skipped": str(err)}
    rng = np.random.default_rng(0)
    denoised = rng.standard_normal(SHAPE).astype(np.float32)
    unit = rng.standard_normal(SHAPE).astype(np.float32)
    calls = {"model": 0}

    def model(x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        calls["model"] += 1
        return denoised

    def noise() -> np.ndarray:
        return unit

    schedule_s = _best_of(lambda: make_schedule(spec, "default", SD15, steps), repeats)
    schedule = make_schedule(spec, "default", SD15, steps)
    x = unit * np.float32(schedule.init_noise_sigma)
    sample_s = _best_of(lambda: sample(spec, model, x, schedule, noise), repeats)
    return {
        "sampler": name,
        "steps": steps,
        "model_calls": calls["model"] // repeats,
        "per_step_ms": 1e3 * sample_s / steps,
        "total_ms": 1e3 * sample_s,
        "make_schedule_ms": 1e3 * schedule_s,
    }


def _cell(value: float | None, digits: int) -> str:
    return f"{'n/a':>20}" if value is None else f"{value:>20.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/samplers-cpu.json", help="JSON results path")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    rows = [bench(n, s, args.repeats) for n in tqdm(SAMPLER_NAMES, desc="samplers") for s in STEPS]
    header = f"{'sampler':<14}" + "".join(f"{f'{s} steps ms/step':>20}" for s in STEPS) + f"{'schedule ms (150)':>20}"
    lines = [header, "-" * len(header)]
    for name in SAMPLER_NAMES:
        mine = {r["steps"]: r for r in rows if r["sampler"] == name}
        cells = "".join(_cell(mine[s].get("per_step_ms"), 3) for s in STEPS)
        lines.append(f"{name:<14}{cells}{_cell(mine[STEPS[-1]].get('make_schedule_ms'), 2)}")
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"shape": list(SHAPE), "python": platform.python_version(), "numpy": np.__version__}
    meta["machine"] = platform.machine()
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
