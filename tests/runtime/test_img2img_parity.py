"""img2img parity: sdrt against diffusers' StableDiffusionImg2ImgPipeline on the same folder and seeds.

The init image is given at the output size (no resampling), batch of 2 (seeds s, s + 1): each image's
stream draws the VAE posterior sample, then the noise, as diffusers does. Mean absolute difference
<= 5e-5 and max <= 2e-3 on float images in [0, 1].
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.runtime.test_txt2img_parity import CFG, HEIGHT, NEGATIVE, PROMPT, SEED, STEPS, WIDTH

pytestmark = needs_torch

CASES = [("Euler", "default"), ("Euler a", "default"), ("DDIM", "default"), ("DPM++ 2M", "Karras")]
# Samplers whose per-step constants (LCM's boundary scalings, DDPM's noise switch) must follow the partial schedule
PARTIAL_SCHEDULE_CASES = [("LCM", "default"), ("DDPM", "default")]


def init_image():
    """A smooth, deterministic RGB test image of the output size."""
    from PIL import Image

    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([x / WIDTH, y / HEIGHT, 0.5 + 0.4 * np.sin(x / 5.0) * np.cos(y / 7.0)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def reference(folder, sampler, schedule, strength, batch=2):
    import diffusers
    import torch

    from runtime.samplers import resolve_sampler

    spec, schedule_type = resolve_sampler(sampler, schedule)
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    scheduler_class = getattr(diffusers, spec.diffusers_class)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **spec.diffusers_kwargs(schedule_type))
    return pipe(
        PROMPT,
        image=init_image(),
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        num_images_per_prompt=batch,
        generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)],
        output_type="np",
    ).images


def assert_close(images, expected):
    diff = np.abs(images.astype(np.float64) - expected)
    assert diff.mean() <= 5e-5 and diff.max() <= 2e-3, f"mean {diff.mean():.2e}, max {diff.max():.2e}"


@pytest.fixture(scope="module")
def engines(shared_engines):
    return shared_engines  # the session's exports of the tiny checkpoints (tests/conftest.py)


@pytest.mark.parametrize(("sampler", "schedule"), CASES + PARTIAL_SCHEDULE_CASES)
@pytest.mark.parametrize("variant", ["sd1", "sd2v"])
def test_img2img_matches_diffusers(tiny_sd1, tiny_sd2v, engines, variant, sampler, schedule):
    import runtime

    folder = {"sd1": tiny_sd1, "sd2v": tiny_sd2v}[variant]
    sd = runtime.load(folder, engines_dir=engines)
    result = sd.img2img(
        PROMPT,
        init_image(),
        strength=0.6,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        cfg_scale=CFG,
        seed=SEED,
        batch_size=2,
        sampler=sampler,
        schedule=schedule,
    )
    assert (result.request.width, result.request.height) == (WIDTH, HEIGHT)
    assert "Denoising strength: 0.6" in result.infotexts[0]
    assert_close(result.images, reference(folder, sampler, schedule, 0.6))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_cli_img2img_full_strength(tiny_sd1, engines, tmp_path, backend):
    import cli

    path = tmp_path / "init.png"
    init_image().save(path)
    out = tmp_path / "x.npy"
    argv = f"--quiet img2img --steps {STEPS} --cfg-scale {CFG} --seed {SEED} --batch-size 2 --strength 1".split()
    argv += ["--model", str(tiny_sd1), "--engines", str(engines), "--init-image", str(path), "--output", str(out)]
    argv += ["--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--sampler", "Euler", "--backend", backend]
    assert cli.main(argv) == 0
    assert_close(np.load(out), reference(tiny_sd1, "Euler", "default", 1.0))


def test_strength_zero_runs_no_unet(tiny_sd1, engines):
    import runtime

    sd = runtime.load(tiny_sd1, engines_dir=engines)
    unet = sd.backend.session("unet")
    calls = []
    original = unet.run
    unet.run = lambda feeds, outputs=None: calls.append(1) or original(feeds, outputs)
    try:
        result = sd.img2img(PROMPT, init_image(), strength=0.0, steps=STEPS, seed=SEED)
    finally:
        del unet.run
    assert calls == [] and result.images.shape == (1, HEIGHT, WIDTH, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--strength", "1.5"], "strength must be a number between 0 and 1, not 1.5"),
        (["--strength", "-0.1"], "strength must be a number between 0 and 1"),
        (["--resize-mode", "stretch"], "unknown resize mode 'stretch'"),
    ],
)
def test_bad_img2img_input(tiny_sd1, engines, tmp_path, capsys, argv, message):
    import cli

    path = tmp_path / "init.png"
    init_image().save(path)
    out = tmp_path / "x.png"
    base = ["--quiet", "img2img", "--model", str(tiny_sd1), "--engines", str(engines), "--prompt", "a cat"]
    assert cli.main([*base, "--init-image", str(path), "--output", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_unreadable_init_image(tiny_sd1, engines, tmp_path, capsys):
    import cli

    bad = tmp_path / "init.png"
    bad.write_bytes(b"not an image")
    base = ["--quiet", "img2img", "--model", str(tiny_sd1), "--engines", str(engines), "--prompt", "a cat"]
    assert cli.main([*base, "--init-image", str(bad), "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "init.png" in err and len(err.splitlines()) == 1
