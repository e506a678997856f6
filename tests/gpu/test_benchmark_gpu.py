"""benchmarks/gpu.py where no CUDA device exists: one line, exit 2, nothing written; its table; the SDXL-shaped
checkpoint's shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_torch
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


@needs_torch
def test_sdxl_shaped_checkpoint_has_sdxl_bases_published_shapes(tmp_path):
    """The benchmark's SDXL-shaped modules, made on the meta device (no memory, no weights; the real 7 GB checkpoint
    is built on the GPU machine only): SDXL base 1.0's published parameter counts, and its configs read back as SDXL
    with the TensorRT UNet profile of the issue (1024x1024: latent 128, 2048 context, pooled 1280, 6 time ids)."""
    import torch

    from export.configs import SDXL_SCHEDULER
    from export.specs import component_specs
    from export.tiny import TinyConfig, _sdxl_shaped_modules, _sdxl_text_encoder_2, write_tiny_tokenizer
    from runtime.checkpoint import describe_checkpoint

    write_tiny_tokenizer(tmp_path / "tokenizer", pad_token="!")
    vocab = json.loads((tmp_path / "tokenizer" / "vocab.json").read_text())
    config = TinyConfig(variant="sdxl-shaped")
    with torch.device("meta"):
        text_encoder, unet, vae = _sdxl_shaped_modules(config, vocab)
        text_encoder_2 = _sdxl_text_encoder_2(config, vocab)
    modules = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "unet": unet, "vae": vae}
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}
    # the published checkpoint's tensors: text_encoder 123,060,480 (CLIP ViT-L), text_encoder_2 694,659,840
    # (OpenCLIP bigG with projection), unet 2,567,463,684, vae 83,653,863
    assert counts == {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "unet": 2_567_463_684,
                      "vae": 83_653_863}  # fmt: skip
    for name, module in modules.items():  # the configs as save_pretrained writes them, without the weights
        (tmp_path / name).mkdir()
        if name.startswith("text"):
            module.config.to_json_file(tmp_path / name / "config.json")
        else:
            module.save_config(tmp_path / name)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    model = describe_checkpoint(tmp_path)
    assert model["family"] == "sdxl" and model["vae_force_upcast"] and model["vae_scaling_factor"] == 0.13025
    shapes = component_specs(model)["unet"].shapes(2, 1024, 1024)
    assert shapes["sample"] == (2, 4, 128, 128) and shapes["encoder_hidden_states"] == (2, 77, 2048)
    assert shapes["text_embeds"] == (2, 1280) and shapes["time_ids"] == (2, 6)
