"""Tiny checkpoints as diffusers folders and as single files, and a Hugging Face cache holding only tokenizers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import HAS_TORCH, single_torch_thread

VARIANTS = ("sd1", "sd2-v", "sd1-inpaint", "sd2-depth", "x4-upscaler")


one_torch_thread = pytest.fixture(scope="session", autouse=True)(single_torch_thread)


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """A Hugging Face cache with CLIP-L's tokenizer (tiny stand-in), SD 2.1's tokenizer/ and SDXL base's tokenizer_2/
    (both padded with "!")."""
    from export.tiny import write_tiny_tokenizer

    root = tmp_path_factory.mktemp("hub")
    clip = root / "models--openai--clip-vit-large-patch14"
    write_tiny_tokenizer(clip / "snapshots" / "0123abcd")
    (clip / "refs").mkdir()
    (clip / "refs" / "main").write_text("0123abcd")
    write_tiny_tokenizer(root / "models--stabilityai--stable-diffusion-2-1" / "snapshots" / "4567" / "tokenizer", "!")
    sdxl = root / "models--stabilityai--stable-diffusion-xl-base-1.0" / "snapshots" / "89ab"
    write_tiny_tokenizer(sdxl / "tokenizer_2", "!")
    return root


@pytest.fixture(autouse=True)
def use_hub_cache(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """variant -> (diffusers folder, single file .safetensors), built on first use."""
    if not HAS_TORCH:
        pytest.skip("building tiny checkpoints needs torch and diffusers (export extras)")
    from tests.single_file.ldm import make_tiny, write_single_file

    root = tmp_path_factory.mktemp("single-file-models")
    built = {}

    def get(variant: str) -> tuple[Path, Path]:
        if variant not in built:
            folder = make_tiny(root / f"tiny-{variant}", variant)
            built[variant] = folder, write_single_file(folder, root / f"tiny-{variant}.safetensors")
        return built[variant]

    return get


@pytest.fixture(scope="session")
def tiny_sdxl_models(tmp_path_factory):
    """SDXL variant ("sdxl", "sdxl-inpaint", "sdxl-refiner") -> (diffusers folder, SGM-layout single file)."""
    if not HAS_TORCH:
        pytest.skip("building tiny checkpoints needs torch and diffusers (export extras)")
    from tests.single_file.ldm import make_tiny_sdxl, write_sdxl_single_file

    root = tmp_path_factory.mktemp("single-file-sdxl")
    built = {}

    def get(variant: str) -> tuple[Path, Path]:
        if variant not in built:
            folder = make_tiny_sdxl(root / f"tiny-{variant}", variant)
            built[variant] = folder, write_sdxl_single_file(folder, root / f"tiny-{variant}.safetensors")
        return built[variant]

    return get
