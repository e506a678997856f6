"""benchmarks/device.sh, the one script a GPU lease runs: its dry run runs here, so the script cannot rot (stages,
timeouts, output files) before a GPU is lent."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "device.sh"
STAGES = ["install", "env", "gpu", "plumbing", "bench"]
SDXL_STAGES = ["install", "env", "bench-sdxl"]  # bash benchmarks/device.sh --sdxl
LEASE_SECONDS = 6 * 60  # what the script may take of a 15-minute lease
MAX_FILES = 8  # files a device call brings back


def test_the_stage_timeouts_fit_the_lease():
    limits = {m.group(1): int(m.group(2)) for m in re.finditer(r"\bstage ([\w-]+) (\d+) ", SCRIPT.read_text())}
    assert list(limits) == ["install", "env", "bench-sdxl", "gpu", "plumbing", "bench"]
    for stages in (STAGES, SDXL_STAGES):  # each mode, its stages' kill grace included
        assert sum(limits[name] for name in stages) + 10 * len(stages) <= LEASE_SECONDS


def test_dry_run_runs_every_stage_and_writes_the_lease_files(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stages = (out / "stages.txt").read_text().splitlines()
    assert [line.split()[0] for line in stages] == STAGES
    assert all(" rc=0 " in line for line in stages), stages
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in files)
    assert {"env.txt", "gpu-tests.xml", "plumbing.xml", "bench.json", "bench.md"} <= set(files)
    assert "tests collected" in (out / "gpu-tests.log").read_text()  # the GPU tests import and collect
    bench = json.loads((out / "bench.json").read_text())
    assert [s["system"] for s in bench["systems"]] == [
        "diffusers fp16 SDPA", "sdrt torch-cuda eager", "sdrt torch-cuda graphed"]  # fmt: skip
    assert (bench["steps"], bench["runs"], bench["size"]) == (50, 3, 512)
    assert "cuda-bindings" in (out / "env.txt").read_text()


def test_sdxl_dry_run_plans_the_sdxl_case(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), TMPDIR=str(tmp_path))
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--sdxl"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stages = (out / "stages.txt").read_text().splitlines()
    assert [line.split()[0] for line in stages] == SDXL_STAGES and all(" rc=0 " in line for line in stages), stages
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-sdxl.json", "bench-sdxl.log", "bench-sdxl.md", "env.txt", "stages.txt"]
    bench = json.loads((out / "bench-sdxl.json").read_text())
    assert [s["system"] for s in bench["systems"]] == [
        "diffusers fp16 SDPA", "sdrt torch-cuda eager", "sdrt torch-cuda graphed"]  # fmt: skip
    # the SDXL case: 1024x1024, 30 steps, CFG 5, on SDXL base's shapes
    assert (bench["model"], bench["size"], bench["steps"], bench["cfg_scale"]) == ("sdxl-shaped", 1024, 30, 5.0)
    assert "sdxl-shaped, 30 steps, 1024x1024, batch 1, CFG 5.0" in (out / "bench-sdxl.md").read_text()
    assert not (tmp_path / "sdrt-bench").exists()  # the dry run builds no checkpoint


def test_unknown_arguments_are_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "--now"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
