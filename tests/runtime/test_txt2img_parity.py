"""txt2img parity: sdrt (API and CLI, both backends) against diffusers' StableDiffusionPipeline.

Same checkpoint folder, same seeds (CPU torch.Generator per image), same scheduler config:
mean absolute difference <= 2e-5 and max <= 1e-3 on float images in [0, 1].
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = needs_torch

SAMPLERS = ("DDIM", "Euler", "Euler a", "DPM++ 2M")
SCHEDULES = ("default", "Karras")


def _supported(sampler: str, schedule: str) -> bool:
    from runtime.samplers import resolve_sampler

    return schedule in resolve_sampler(sampler)[0].schedule_types


CASES = [(sampler, schedule) for sampler in SAMPLERS for schedule in SCHEDULES if _supported(sampler, schedule)]
PROMPT = "a photo of an astronaut riding a horse"
NEGATIVE = "blurry, low quality"
SEED = 1234
WIDTH, HEIGHT = 48, 32  # non-square
STEPS, CFG = 10, 6.0


def reference_images(folder, sampler, schedule, *, batch=2, cfg=CFG, steps=STEPS, seed=SEED, eta=0.0) -> np.ndarray:
    """diffusers' own pipeline on the same folder: float images [B, H, W, 3] in [0, 1]."""
    import diffusers
    import torch

    from runtime.samplers import resolve_sampler

    spec, schedule_type = resolve_sampler(sampler, schedule)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    scheduler_class = getattr(diffusers, spec.diffusers_class)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **spec.diffusers_kwargs(schedule_type))
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]
    out = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=steps,
        guidance_scale=cfg,
        num_images_per_prompt=batch,
        generator=generators,
        height=HEIGHT,
        width=WIDTH,
        eta=eta,
        output_type="np",
    )
    return out.images


def assert_parity(images: np.ndarray, reference: np.ndarray) -> None:
    assert images.shape == reference.shape
    diff = np.abs(images.astype(np.float64) - reference.astype(np.float64))
    assert diff.mean() <= 2e-5 and diff.max() <= 1e-3, f"mean {diff.mean():.2e}, max {diff.max():.2e}"
    assert reference.std() > 0.01  # the reference is a real image, not a constant


@pytest.fixture(scope="module")
def engines(shared_engines):
    return shared_engines  # the session's exports of the tiny checkpoints (tests/conftest.py)


@pytest.fixture(scope="module")
def models(tiny_sd1, tiny_sd2v, engines):
    """Loaded sdrt models per (variant, backend); the ONNX export happens once here."""
    import runtime

    folders = {"sd1": tiny_sd1, "sd2v": tiny_sd2v}
    return {
        (variant, backend): runtime.load(folder, backend=backend, engines_dir=engines)
        for variant, folder in folders.items()
        for backend in ("onnxruntime", "torch")
    }


@pytest.fixture(scope="module")
def references(tiny_sd1, tiny_sd2v):
    cache = {}

    def get(variant, sampler, schedule):
        if (variant, sampler, schedule) not in cache:
            folder = {"sd1": tiny_sd1, "sd2v": tiny_sd2v}[variant]
            cache[variant, sampler, schedule] = reference_images(folder, sampler, schedule)
        return cache[variant, sampler, schedule]

    return get


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize(("sampler", "schedule"), CASES)
@pytest.mark.parametrize("variant", ["sd1", "sd2v"])
def test_api_matches_diffusers(models, references, variant, sampler, schedule, backend):
    sd = models[variant, backend]
    result = sd.txt2img(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        cfg_scale=CFG,
        seed=SEED,
        batch_size=2,
        width=WIDTH,
        height=HEIGHT,
        sampler=sampler,
        schedule=schedule,
    )
    assert result.seeds == [SEED, SEED + 1]
    assert_parity(result.images, references(variant, sampler, schedule))


@pytest.mark.parametrize("variant", ["sd1", "sd2v"])
def test_no_guidance_matches_diffusers(models, tiny_sd1, tiny_sd2v, variant):
    """cfg <= 1: no uncond pass, as diffusers (guidance_scale 1)."""
    sd = models[variant, "onnxruntime"]
    folder = {"sd1": tiny_sd1, "sd2v": tiny_sd2v}[variant]
    calls = []
    unet = sd.backend.session("unet")
    original_run = unet.run

    def counting_run(feeds, outputs=None):
        calls.append(len(feeds["sample"]))
        return original_run(feeds, outputs)

    unet.run = counting_run
    try:
        result = sd.txt2img(
            PROMPT,
            negative_prompt=NEGATIVE,
            steps=STEPS,
            cfg_scale=1.0,
            seed=SEED,
            batch_size=2,
            width=WIDTH,
            height=HEIGHT,
            sampler="Euler",
        )
    finally:
        del unet.run
    assert calls == [2] * STEPS  # batch of 2 images, no doubled uncond batch
    assert_parity(result.images, reference_images(folder, "Euler", "default", cfg=1.0))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_cli_npy_matches_diffusers(tiny_sd2v, engines, references, tmp_path, backend):
    import cli

    out = tmp_path / "images.npy"
    argv = [
        "--quiet",
        "txt2img",
        "--model",
        str(tiny_sd2v),
        "--prompt",
        PROMPT,
        "--negative-prompt",
        NEGATIVE,
        "--steps",
        str(STEPS),
        "--cfg-scale",
        str(CFG),
        "--seed",
        str(SEED),
        "--batch-size",
        "2",
        "--width",
        str(WIDTH),
        "--height",
        str(HEIGHT),
        "--sampler",
        "DPM++ 2M Karras",
        "--backend",
        backend,
        "--engines",
        str(engines),
        "--output",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert_parity(np.load(out), references("sd2v", "DPM++ 2M", "Karras"))
