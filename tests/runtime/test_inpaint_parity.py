"""inpaint parity with diffusers' StableDiffusionInpaintPipeline, for 9-channel and 4-channel UNets; outpaint;
"only masked"; txt2img with an inpainting model. Mean absolute difference <= 5e-5, max <= 2e-3."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.runtime.test_img2img_parity import assert_close, init_image
from tests.runtime.test_txt2img_parity import CFG, HEIGHT, NEGATIVE, PROMPT, SEED, STEPS, WIDTH

pytestmark = needs_torch


def mask_image():
    """White (repaint) on a block right of the centre, black elsewhere."""
    from PIL import Image

    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[8:24, 20:40] = 255
    return Image.fromarray(mask)


def reference(folder, sampler, schedule, strength, image=None, mask=None, batch=2):
    import diffusers
    import torch

    from runtime.samplers import resolve_sampler

    spec, schedule_type = resolve_sampler(sampler, schedule)
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    scheduler_class = getattr(diffusers, spec.diffusers_class)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **spec.diffusers_kwargs(schedule_type))
    return pipe(
        PROMPT,
        image=image or init_image(),
        mask_image=mask or mask_image(),
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        num_images_per_prompt=batch,
        generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)],
        height=HEIGHT,
        width=WIDTH,
        output_type="np",
    ).images


@pytest.fixture(scope="module")
def engines(shared_engines):
    return shared_engines  # the session's exports of the tiny checkpoints (tests/conftest.py)


@pytest.fixture(scope="module")
def models(tiny_sd1, tiny_sd1_inpaint, engines):
    import runtime

    return {
        "4ch": (runtime.load(tiny_sd1, engines_dir=engines), tiny_sd1),
        "9ch": (runtime.load(tiny_sd1_inpaint, engines_dir=engines), tiny_sd1_inpaint),
    }


def generate(sd, **options):
    options = {"negative_prompt": NEGATIVE, "steps": STEPS, "cfg_scale": CFG, "seed": SEED, "batch_size": 2, **options}
    return sd.inpaint(PROMPT, init_image(), mask_image(), mask_blur=0, **options)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize(("sampler", "schedule"), [("Euler", "default"), ("DPM++ 2M", "Karras"), ("DDIM", "default")])
@pytest.mark.parametrize("kind", ["9ch", "4ch"])
def test_inpaint_matches_diffusers(models, kind, sampler, schedule, strength):
    sd, folder = models[kind]
    result = generate(sd, strength=strength, sampler=sampler, schedule=schedule)
    assert "Mask blur: 0" in result.infotexts[0]
    assert_close(result.images, reference(folder, sampler, schedule, strength))


@pytest.mark.parametrize("kind", ["9ch", "4ch"])
def test_inpaint_ancestral_matches_diffusers(models, kind):
    sd, folder = models[kind]
    assert_close(generate(sd, strength=0.8, sampler="Euler a").images, reference(folder, "Euler a", "default", 0.8))


def test_txt2img_with_inpainting_model(models):
    """A1111 runs an inpainting model from text with the whole image masked and an empty masked image."""
    from PIL import Image

    sd, folder = models["9ch"]
    images = sd.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=2,
                        width=WIDTH, height=HEIGHT, sampler="Euler").images  # fmt: skip
    white = Image.new("L", (WIDTH, HEIGHT), 255)
    assert_close(images, reference(folder, "Euler", "default", 1.0, mask=white))


def test_outpaint_keeps_original_pixels(models):
    sd, _ = models["9ch"]
    image = init_image()
    result = sd.outpaint(PROMPT, image, (8, 16, 0, 8), steps=4, seed=SEED, sampler="Euler")
    out = result.images[0]
    assert out.shape == (HEIGHT + 8, WIDTH + 24, 3)
    original = np.asarray(image, dtype=np.float32) / 255
    assert np.array_equal(out[0:HEIGHT, 8 : 8 + WIDTH], original)  # untouched, exactly
    new_area = np.concatenate([out[:, :8].reshape(-1, 3), out[:, 8 + WIDTH :].reshape(-1, 3)])
    edge = np.concatenate(
        [np.repeat(original[:, :1], 8, 1).reshape(-1, 3), np.repeat(original[:, -1:], 16, 1).reshape(-1, 3)]
    )
    assert np.abs(new_area[: len(edge)] - edge).mean() > 0.01  # generated, not the edge fill


def test_only_masked_keeps_the_rest(models):
    sd, _ = models["9ch"]
    image = init_image()
    result = sd.inpaint(PROMPT, image, mask_image(), mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=4,
                        steps=4, seed=SEED, sampler="Euler", width=WIDTH, height=HEIGHT)  # fmt: skip
    out = result.images[0]
    assert out.shape == (HEIGHT, WIDTH, 3)
    keep = np.asarray(mask_image()) == 0
    assert np.array_equal(out[keep], (np.asarray(image, dtype=np.float32) / 255)[keep])
    assert np.abs(out[~keep] - (np.asarray(image, dtype=np.float32) / 255)[~keep]).mean() > 0.01
    assert "Inpaint area: Only masked" in result.infotexts[0]


def test_mask_of_another_size_is_resized_with_a_note(models, caplog):
    sd, _ = models["9ch"]
    big_mask = mask_image().resize((WIDTH * 2, HEIGHT * 2))
    result = sd.inpaint(PROMPT, init_image(), big_mask, steps=2, seed=SEED)
    assert result.images.shape == (1, HEIGHT, WIDTH, 3)
    assert "resizing the mask" in caplog.text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mask", "MISSING"], "cannot read mask"),
        (["--mask", "MASK", "--strength", "2"], "strength must be a number between 0 and 1"),
        (["--mask", "MASK", "--mask-blur", "-1"], "mask blur must be between 0 and 256"),
    ],
)
def test_bad_inpaint_input(tiny_sd1, engines, tmp_path, capsys, extra, message):
    import cli

    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    init_image().save(init)
    mask_image().save(mask)
    extra = [str(mask) if a == "MASK" else str(tmp_path / "missing.png") if a == "MISSING" else a for a in extra]
    out = tmp_path / "x.png"
    argv = ["--quiet", "inpaint", "--model", str(tiny_sd1), "--engines", str(engines), "--prompt", "a cat"]
    assert cli.main([*argv, "--init-image", str(init), "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_cli_outpaint(tiny_sd1_inpaint, engines, tmp_path):
    import cli

    init = tmp_path / "init.png"
    init_image().save(init)
    out = tmp_path / "wide.png"
    argv = ["--quiet", "outpaint", "--model", str(tiny_sd1_inpaint), "--engines", str(engines), "--prompt", "a cat"]
    assert (
        cli.main([*argv, "--init-image", str(init), "--extend", "8,8,0,0", "--steps", "2", "--output", str(out)]) == 0
    )
    from PIL import Image

    assert Image.open(out).size == (WIDTH + 16, HEIGHT)
    assert cli.main([*argv, "--init-image", str(init), "--extend", "8,8", "--output", str(out)]) == 2
