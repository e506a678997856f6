"""Fixtures of the LoRA tests: the tiny sd1 checkpoint exported once, LoRA files in each format, loaded models."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import HAS_TORCH

from .lora_files import attention_only, module_weights, write_kohya, write_old_diffusers, write_peft


@pytest.fixture(scope="session")
def lora_engines(tiny_sd1, tmp_path_factory) -> Path:
    """The artifact root holding only the tiny sd1 export (with its weight maps): tests look at its one folder."""
    from export import export_model

    engines = tmp_path_factory.mktemp("lora-engines")
    export_model(tiny_sd1, engines, progress=False)
    return engines


@pytest.fixture(scope="session")
def lora_dir(tiny_sd1, tmp_path_factory) -> Path:
    """A LoRA folder: kohya (alpha 2, rank 4) and PEFT files touching UNet and text encoder, a second kohya one,
    and a UNet-only one in a subfolder."""
    if not HAS_TORCH:
        pytest.skip("needs torch and diffusers")
    folder = tmp_path_factory.mktemp("loras")
    shapes = module_weights(tiny_sd1)
    write_kohya(folder / "kohya_a.safetensors", shapes, seed=1)
    write_kohya(folder / "kohya_b.safetensors", shapes, seed=2, rank=2, alpha=1.0)
    write_peft(folder / "peft_a.safetensors", shapes, seed=3)
    write_kohya(folder / "sub" / "unet_only.safetensors", shapes, seed=4, components=("unet",))
    write_kohya(folder / "kohya_a_ldm.safetensors", shapes, seed=1, ldm_names=True)  # kohya_a's values, LDM names
    write_old_diffusers(folder / "old_format.safetensors", attention_only(shapes), seed=6)
    write_peft(folder / "old_format_as_peft.safetensors", attention_only(shapes), seed=6)  # the same values
    return folder


@pytest.fixture(scope="session")
def lora_models(tiny_sd1, lora_engines):
    """backend -> the tiny sd1 model loaded on it."""
    import runtime

    return {b: runtime.load(tiny_sd1, backend=b, engines_dir=lora_engines) for b in ("onnxruntime", "torch")}
