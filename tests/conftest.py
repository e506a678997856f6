"""Session fixtures: tiny random checkpoints built once per test session (diffusers loads them too)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("diffusers") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch/diffusers not installed (export extras)")

# Parallel workers (pytest-xdist) share the machine's cores: every thread pool that assumes it owns them all spins
# against the other worker's (measured on 2 cores: sampler parity cases 3x slower). Before torch is first imported,
# one thread for torch/OpenMP and for the runtime's CPU backends (runtime.backends.cpu_threads); subprocesses inherit
# it. Set either variable yourself to override.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("SDRT_CPU_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def sdrt_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The per-user artifact cache ($SDRT_HOME) of the session: a temporary folder, never the real ~/.cache/sdrt.
    Subprocesses (cli.py runs) inherit it."""
    before = os.environ.get("SDRT_HOME")
    home = tmp_path_factory.mktemp("sdrt-home")
    os.environ["SDRT_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("SDRT_HOME", None)
    else:
        os.environ["SDRT_HOME"] = before


@pytest.fixture(scope="session")
def shared_engines(sdrt_home: Path) -> Path:
    """The session's artifact folder, $SDRT_HOME/engines (what runtime.load uses by default). Every test that only
    reads exports of the tiny checkpoints uses it, so each checkpoint is exported once per session (per xdist
    worker) instead of once per test module. A test that breaks, rewrites or counts artifacts works on a copy or
    in its own folder."""
    return sdrt_home / "engines"


def single_torch_thread():
    """A fixture body for test folders that export or run tiny models with torch: on two shared CPU cores torch's
    own thread pool makes them many times slower, so run torch on one thread and restore the count afterwards
    (also without xdist, where OMP_NUM_THREADS is not set above). A folder's conftest registers it:
    `one_torch_thread = pytest.fixture(scope="session", autouse=True)(...)`."""
    if not HAS_TORCH:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(tmp_path_factory: pytest.TempPathFactory, variant: str) -> Path:
    if not HAS_TORCH:
        pytest.skip("building a tiny checkpoint needs torch and diffusers (export extras)")
    from export.tiny import TinyConfig, make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp(variant) / f"tiny-{variant}", TinyConfig(variant=variant))


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1-style epsilon checkpoint (PNDM scheduler config as SD 1.5 publishes it)."""
    return _tiny(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD2-style v-prediction checkpoint (DDIM scheduler config, pad token "!")."""
    return _tiny(tmp_path_factory, "sd2-v")


@pytest.fixture(scope="session")
def tiny_sd1_inpaint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1-style inpainting checkpoint: 9-channel UNet, saved as a StableDiffusionInpaintPipeline."""
    return _tiny(tmp_path_factory, "sd1-inpaint")


@pytest.fixture(scope="session")
def tiny_sd2_depth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 2 depth checkpoint: 5-channel UNet, a DPT-hybrid depth estimator and its image processor."""
    return _tiny(tmp_path_factory, "sd2-depth")


@pytest.fixture(scope="session")
def tiny_x4_upscaler(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny x4 upscaler: 7-channel UNet with noise-level class embeddings, a x4 VAE, a low-res scheduler."""
    return _tiny(tmp_path_factory, "x4-upscaler")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL checkpoint: two text encoders (the second projected), a UNet with text_time added conditioning,
    VAE scaling 0.13025, SDXL base's Euler scheduler config (a StableDiffusionXLPipeline folder)."""
    return _tiny(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL inpainting checkpoint: tiny_sdxl's layout with a 9-channel UNet (a StableDiffusionXLInpaintPipeline
    folder)."""
    return _tiny(tmp_path_factory, "sdxl-inpaint")


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL refiner, laid out as SDXL's refiner folder: text encoder 2 and its tokenizer only, a UNet on that
    encoder's states with 5 time ids (size, crop, aesthetic score); requires_aesthetics_score, no forced-zero
    negative (a StableDiffusionXLImg2ImgPipeline folder)."""
    return _tiny(tmp_path_factory, "sdxl-refiner")
