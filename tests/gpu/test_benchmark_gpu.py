"""benchmarks/gpu.py where no CUDA device exists: one line, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.gpu.conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU exit; this machine has a GPU")
def test_gpu_benchmark_without_cuda_exits_2_with_one_line(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and ("GPU" in lines[0] or "cuda" in lines[0])
    assert not out.exists() and not (tmp_path / "work").exists()


def test_markdown_table_lists_every_system():
    from benchmarks.gpu import markdown

    result = {"device": "NVIDIA H100", "steps": 50, "size": 512, "speedup_vs_diffusers": 1.6,
              "systems": [{"system": "diffusers fp16 SDPA", "end_to_end_ms": 800.0, "unet_step_ms": 15.0,
                           "text_encoder_ms": 3.0, "vae_decode_ms": 20.0, "host_per_step_ms": None,
                           "device_memory_mib": 3000.0},
                          {"system": "sdrt tensorrt graphed", "end_to_end_ms": 500.0, "unet_step_ms": 9.0,
                           "text_encoder_ms": 1.0, "vae_decode_ms": 12.0, "host_per_step_ms": 0.1,
                           "device_memory_mib": 3300.0}]}  # fmt: skip
    table = markdown(result)
    assert "| diffusers fp16 SDPA | 800.0 | 15.0 | 3.0 | 20.0 | - | 3000.0 |" in table
    assert "| sdrt tensorrt graphed | 500.0 |" in table and "speedup over diffusers end to end: 1.6" in table
