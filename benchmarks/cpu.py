"""CPU benchmark: sdrt's CPU paths against diffusers on torch, variants interleaved in one run.

    flock /work/bench/heavy.lock python -m benchmarks.cpu --model /work/bench/sd15-shaped-checkpoint \\
        --engines /work/bench/engines-bench --sizes 512 256 --rounds 3 --steps 4
    python -m benchmarks.cpu --model tiny --sizes 64 --rounds 1 --steps 2          # a quick check of the harness

Variants (--variants: a comma-separated subset): sdrt onnxruntime fp32 and int8, sdrt openvino fp32 and bf16,
diffusers torch fp32, fp32 with libjemalloc preloaded, and bf16. Each (round, variant) runs in a process of its
own (benchmarks/cpu_worker.py): load, a one-step warm-up, one timed txt2img (Euler, CFG 7.5, a fixed seed), its
peak RSS. A round runs every variant once, in an order rotated by one each round (A B C, B C A, ...), so a slow
spell of the shared machine falls on all of them; medians and min/max over the rounds. speedup_end_to_end:
diffusers torch fp32's end-to-end median over the variant's. Image difference, in 8-bit levels: each sdrt variant
against sdrt onnxruntime fp32 (and that against diffusers torch fp32), torch bf16 and jemalloc against torch fp32.
Issue 20's targets are computed at every size. Before the rounds each sdrt variant is loaded once (export,
quantisation and compile caches are made then, not timed); a variant that cannot run here is recorded as skipped
with the reason. The record (JSON) is rewritten after every measurement, so an interrupted run keeps what finished:
benchmarks/results/<date>-cpu-<model>.json by default. Runs on the SD 1.5-shaped checkpoint hold the shared lock.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import datetime
import fcntl
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from benchmarks.cpu_report import add_comparisons, markdown, summarize, targets
from benchmarks.cpu_worker import CFG_SCALE, PROMPT, SAMPLER, SEED, VARIANTS

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_CONF")  # what changes the workers' threads or allocator
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)


def device_facts() -> dict:
    """The CPU by name (lscpu's model name), its usable cores, and the instruction sets the variants care about."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or platform.machine()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"model_name": name, "cores": cores, "memory_gib": round(memory, 1),
            "flags": {flag: flag in flags for flag in CPU_FLAGS}}  # fmt: skip


def find_jemalloc(given: str | None) -> Path | None:
    """libjemalloc's shared library: the one given, else the system's (ldconfig's or a usual path)."""
    if given:
        return Path(given) if Path(given).is_file() else None
    found = ctypes.util.find_library("jemalloc")
    candidates = [*JEMALLOC_PATHS, *([found] if found and found.startswith("/") else [])]
    path = next((Path(p) for p in candidates if Path(p).is_file()), None)
    if path is None and found:  # a bare soname: the loader finds it on its own path
        path = Path(found)
    return path


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("numpy", "onnxruntime", "openvino", "torch", "diffusers", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    found["sdrt_commit"] = _git("rev-parse", "--short", "HEAD")
    changed = _git("status", "--porcelain", "--", "runtime", "export")
    found["sdrt_uncommitted_files"] = len(changed.splitlines()) if changed else 0  # runtime/ and export/ as measured
    return found


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def run_worker(name: str, args: argparse.Namespace, size: int, steps: int, image: Path | None, env: dict) -> dict:
    """One worker process; its JSON line, or {"failed": the reason} (exit status, the last line of its errors)."""
    command = [sys.executable, "-m", "benchmarks.cpu_worker", name, "--model", str(args.model_folder),
               "--engines", str(args.engines), "--size", str(size), "--steps", str(steps)]  # fmt: skip
    if image is not None:
        command += ["--image", str(image)]
    try:
        with _held(args.lock):
            done = subprocess.run(
                command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.worker_timeout
            )
    except subprocess.TimeoutExpired:
        return {"failed": f"no result within {args.worker_timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    if done.returncode < 0:
        return {"failed": f"stopped by signal {-done.returncode}"}
    errors = [line for line in done.stderr.strip().splitlines() if line.strip() and "it/s]" not in line]
    raised = [line for line in errors if "Error" in line or "Exception" in line]  # the traceback's last line
    return {"failed": f"exit {done.returncode}: {((raised or errors) or ['no output'])[-1][:300]}"}


@contextlib.contextmanager
def _held(lock: str | None):
    """An exclusive flock on `lock` for the duration (none without one): heavy runs of several people take turns."""
    if lock is None:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def worker_env(name: str, jemalloc: Path | None) -> dict:
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)  # no variant inherits another allocator
    if VARIANTS[name].jemalloc and jemalloc is not None:
        env["LD_PRELOAD"] = str(jemalloc)
    return env


def prepare(names: list[str], args: argparse.Namespace, jemalloc: Path | None) -> dict[str, str]:
    """The variants that cannot run here -> why. Loads each sdrt variant once (its artifacts are made now)."""
    skipped = {}
    for name in tqdm(names, desc="prepare", leave=False):
        if VARIANTS[name].jemalloc and jemalloc is None:
            where = f"{args.jemalloc} is not a file" if args.jemalloc else "none here (apt install libjemalloc2)"
            skipped[name] = f"no libjemalloc to preload: {where}"
        elif VARIANTS[name].family == "sdrt":
            result = run_worker(name, args, args.sizes[0], 0, None, worker_env(name, jemalloc))
            if "skipped" in result or "failed" in result:
                skipped[name] = result.get("skipped") or f"load failed: {result['failed']}"
    return skipped


def rotated(names: list[str], round_index: int) -> list[str]:
    """Round r runs the variants starting from the r-th: A B C, B C A, C A B, ..."""
    shift = round_index % len(names) if names else 0
    return names[shift:] + names[:shift]


def measure_all(record: dict, names: list[str], args: argparse.Namespace, jemalloc: Path | None, write) -> None:
    """Every size: the rounds of the runnable variants, then their summaries, comparisons and targets."""
    skipped = record["skipped"]
    runnable = [n for n in names if n not in skipped]
    bar = tqdm(total=len(args.sizes) * args.rounds * len(runnable), desc="measure")
    budget = Budget(args.max_minutes)
    for size in args.sizes:
        runs: dict[str, list[dict]] = {n: [] for n in runnable}
        images: dict[str, Path] = {}
        for round_index in range(args.rounds):
            if not budget.allows_another_round(round_index):
                record["stopped_early"] = f"{size}px after {round_index} rounds: --max-minutes {args.max_minutes}"
                write(record)
                break
            for name in rotated(runnable, round_index):
                bar.set_postfix_str(f"{size}px round {round_index + 1} {name}")
                image = args.workdir / f"image-{size}-{name}.npy"
                result = run_worker(name, args, size, args.steps, image, worker_env(name, jemalloc))
                if "skipped" in result:  # a variant that loaded in prepare but refuses this size
                    result = {"failed": result["skipped"]}
                if "failed" not in result and image.is_file():
                    images[name] = image
                runs[name].append({k: v for k, v in result.items() if k != "variant"})
                record["results"][str(size)] = _size_block(names, skipped, runs, images)
                write(record)
                bar.update()
            record["rounds_done"][str(size)] = round_index + 1
            budget.round_done()
        if "stopped_early" in record:
            break
    bar.close()


class Budget:
    """Whether another round fits in --max-minutes, judged by the last round's duration (no limit without one)."""

    def __init__(self, minutes: float | None):
        self.end = None if minutes is None else time.monotonic() + 60 * minutes
        self.round_started = time.monotonic()
        self.last_round = 0.0

    def allows_another_round(self, round_index: int) -> bool:
        self.round_started = time.monotonic()
        if self.end is None:
            return True
        return self.round_started + (self.last_round if round_index else 0.0) <= self.end

    def round_done(self) -> None:
        self.last_round = time.monotonic() - self.round_started


def _size_block(names: list[str], skipped: dict[str, str], runs: dict[str, list[dict]], images: dict) -> dict:
    variants = {}
    for name in names:
        if name in skipped:
            variants[name] = {"status": "skipped", "reason": skipped[name]}
        elif runs.get(name):
            variants[name] = summarize(runs[name])
    add_comparisons(variants, images)
    return {"variants": variants, "targets": targets(variants)}


def resolve_model(model: str, workdir: Path) -> tuple[str, Path]:
    """(the record's model name, its checkpoint folder): "tiny" and "sd15-shaped" are built under workdir once."""
    if model in ("tiny", "sd15-shaped"):
        from export.tiny import TinyConfig, make_tiny_checkpoint

        folder = workdir / f"{model}-checkpoint"
        if not (folder / "model_index.json").is_file():
            make_tiny_checkpoint(folder, TinyConfig(variant="sd1" if model == "tiny" else "sd15-shaped"))
        return model, folder
    folder = Path(model).expanduser()
    return folder.name.removesuffix("-checkpoint"), folder


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15-shaped", help='a checkpoint folder, or "tiny"/"sd15-shaped" (built)')
    parser.add_argument("--engines", help="sdrt's artifact folder (default: <workdir>/engines)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256], help="square sizes, in run order")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--jemalloc", help="libjemalloc.so path (default: the system's, where installed)")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "sdrt-bench"))
    parser.add_argument("--max-minutes", type=float, help="start no round that would end past this (by the last one)")
    parser.add_argument("--worker-timeout", type=int, default=3600, help="seconds one measurement may take")
    parser.add_argument("--lock", help="take an flock on this file for each measurement, not the whole run (then do "
                        "not also run under flock(1) on the same file: it would wait on itself)")  # fmt: skip
    parser.add_argument("--note", help="a sentence the record keeps (why a variant was left out, the machine's state)")
    parser.add_argument("--out", help="the record's path (default: benchmarks/results/<date>-cpu-<model>.json)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variants {unknown}; choose from: {', '.join(VARIANTS)}")
    if args.rounds < 1 or args.steps < 1 or any(s < 64 or s % 8 for s in args.sizes):
        parser.error("--rounds and --steps must be positive, every size a multiple of 8 of at least 64")
    args.names = names
    args.workdir = Path(args.workdir)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_name, args.model_folder = resolve_model(args.model, args.workdir)
    args.engines = Path(args.engines) if args.engines else args.workdir / "engines"
    date = datetime.date.today().isoformat()
    out = Path(args.out or REPO / f"benchmarks/results/{date}-cpu-{model_name}.json")
    jemalloc = find_jemalloc(args.jemalloc)
    record = {
        "benchmark": "cpu",
        "date": date,
        "command": "python -m benchmarks.cpu " + shlex.join(sys.argv[1:] if argv is None else argv),
        "device": device_facts(),
        "python": platform.python_version(),
        "versions": versions(),
        "model": model_name,
        "sizes": args.sizes,
        "steps": args.steps,
        "rounds": args.rounds,
        "order": "each round runs every variant once, the order rotated by one per round; one process each",
        "sampler": SAMPLER,
        "cfg_scale": CFG_SCALE,
        "seed": SEED,
        "prompt": PROMPT,
        "jemalloc": None if jemalloc is None else str(jemalloc),
        "environment": {k: os.environ[k] for k in ENVIRONMENT if k in os.environ},
        "note": args.note,
        "load_average_1min": {"start": os.getloadavg()[0]},
        "skipped": {},
        "rounds_done": {},
        "results": {},
    }
    write = _writer(out)
    record["skipped"] = prepare(args.names, args, jemalloc)
    write(record)
    measure_all(record, args.names, args, jemalloc, write)
    record["load_average_1min"]["end"] = os.getloadavg()[0]
    write(record)
    print(markdown(record))
    print(f"wrote {out}")
    return record


def _writer(path: Path):
    """Write the record atomically (temporary file, then rename)."""

    def write(record: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.tmp")
        scratch.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        scratch.replace(path)

    return write


if __name__ == "__main__":
    main()
