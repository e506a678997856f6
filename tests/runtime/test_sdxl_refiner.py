"""The SDXL refiner against diffusers, on the tiny SDXL base and the tiny refiner (text encoder 2 only, aesthetic-score
time ids, no forced-zero negative: SDXL's refiner folder layout).

* The refiner alone: img2img equal to StableDiffusionXLImg2ImgPipeline on the refiner folder.
* The hand-off (A1111's refiner_checkpoint + refiner_switch_at): txt2img with refiner= equal to diffusers' base with
  denoising_end=f and output_type="latent", handed to the refiner's img2img with denoising_start=f; the same
  generators go to both, so each image's noise stream continues into the refiner.
Tolerances as for txt2img (assert_parity).
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import InvalidRequestError
from tests.conftest import needs_torch
from tests.runtime.test_sdxl_img2img import CFG, HEIGHT, WIDTH, diffusers_pipe, generators, init_image
from tests.runtime.test_txt2img_parity import NEGATIVE, PROMPT, SEED, assert_parity

pytestmark = needs_torch

STEPS = 8


@pytest.fixture(scope="module")
def models(tiny_sdxl, tiny_sdxl_refiner, shared_engines):
    import runtime

    return runtime.load(tiny_sdxl, engines_dir=shared_engines), runtime.load(tiny_sdxl_refiner,
                                                                             engines_dir=shared_engines)  # fmt: skip


def diffusers_handoff(base_folder, refiner_folder, sampler, schedule, switch_at, batch, negative=NEGATIVE):
    base = diffusers_pipe("StableDiffusionXLPipeline", base_folder, sampler, schedule, add_watermarker=False)
    refiner = diffusers_pipe("StableDiffusionXLImg2ImgPipeline", refiner_folder, sampler, schedule,
                             add_watermarker=False)  # fmt: skip
    common = {"negative_prompt": negative, "num_inference_steps": STEPS, "guidance_scale": CFG}
    common.update(num_images_per_prompt=batch, generator=generators(batch))  # one generator list for both pipelines
    latents = base(PROMPT, **common, width=WIDTH, height=HEIGHT, denoising_end=switch_at, output_type="latent")
    return refiner(PROMPT, image=latents.images, **common, denoising_start=switch_at, output_type="np").images


@pytest.mark.parametrize(
    ("sampler", "schedule", "switch_at", "batch"),
    [
        ("DPM++ 2M", "Karras", 0.8, 2),  # Karras levels: the switch falls between uneven timesteps
        ("Euler a", "default", 0.7, 1),  # the noise streams continue into the refiner
        ("DDIM", "default", 0.6, 1),  # VP samples: the hand-off latents are x / sqrt(1 + sigma^2)
        ("UniPC", "default", 0.5, 1),
    ],
)
def test_refiner_handoff_matches_diffusers(models, tiny_sdxl, tiny_sdxl_refiner, sampler, schedule, switch_at, batch):
    base, refiner = models
    result = base.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=batch,
                          width=WIDTH, height=HEIGHT, sampler=sampler, schedule=schedule, refiner=refiner,
                          refiner_switch_at=switch_at)  # fmt: skip
    expected = diffusers_handoff(tiny_sdxl, tiny_sdxl_refiner, sampler, schedule, switch_at, batch)
    assert_parity(result.images, expected)
    assert f"Refiner: {refiner.name} [{refiner.key[-10:]}], Refiner switch at: {switch_at}" in result.infotexts[0]


def test_switch_step_as_diffusers_denoising_end():
    """round(1000 - 1000 f) is the cutoff: timesteps >= it run on the base (diffusers' filter, transcribed)."""
    from runtime.pipelines.refiner import switch_step

    timesteps = np.array([999.0, 874.0, 749.0, 624.0, 499.0, 374.0, 249.0, 124.0])
    for f in (0.05, 0.2, 0.5, 0.8, 0.99):
        cutoff = int(round(1000 - f * 1000))
        assert switch_step(timesteps, f, 1000) == len([t for t in timesteps if t >= cutoff])
    assert switch_step(timesteps, 0.8, 1000) == 7 and switch_step(timesteps, 0.001, 1000) == 1


@pytest.mark.parametrize(("sampler", "negative"), [("Euler a", NEGATIVE), ("DPM++ 2M", "")])
def test_refiner_img2img_matches_diffusers(models, tiny_sdxl_refiner, sampler, negative):
    """The refiner as a model: text encoder 2 alone, time ids (h, w, 0, 0, 6 / uncond 2.5), and an empty negative
    encoded as text (its force_zeros_for_empty_prompt is off)."""
    _, refiner = models
    result = refiner.img2img(PROMPT, init_image(), strength=0.5, negative_prompt=negative, steps=STEPS,
                             cfg_scale=CFG, seed=SEED, batch_size=2, sampler=sampler)  # fmt: skip
    pipe = diffusers_pipe("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_refiner, sampler, "default",
                          add_watermarker=False)  # fmt: skip
    expected = pipe(
        PROMPT,
        image=init_image(),
        strength=0.5,
        negative_prompt=negative,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        num_images_per_prompt=2,
        generator=generators(2),
        output_type="np",
    ).images
    assert_parity(result.images, expected)
    facts = refiner.info["sdxl"]
    assert (facts["two_encoders"], facts["requires_aesthetics_score"], facts["time_ids"]) == (False, True, 5)


def test_torch_backend_and_cli(tiny_sdxl, tiny_sdxl_refiner, shared_engines, tmp_path):
    """The torch backend runs the refiner folder's own modules; the CLI loads --refiner as it loads --model."""
    import cli

    expected = diffusers_handoff(tiny_sdxl, tiny_sdxl_refiner, "Euler", "default", 0.75, 1)
    out = tmp_path / "refined.npy"
    argv = ["--quiet", "txt2img", "--model", str(tiny_sdxl), "--refiner", str(tiny_sdxl_refiner), "--engines",
            str(shared_engines), "--prompt", PROMPT, "--negative-prompt", NEGATIVE, "--steps", str(STEPS),
            "--cfg-scale", str(CFG), "--seed", str(SEED), "--width", str(WIDTH), "--height", str(HEIGHT),
            "--sampler", "Euler", "--refiner-switch-at", "0.75", "--backend", "torch"]  # fmt: skip
    argv += ["--output", str(out)]
    assert cli.main(argv) == 0
    assert_parity(np.load(out), expected)


def test_bad_refiner_requests_are_refused(models, tiny_sdxl, shared_engines, tmp_path, capsys):
    import cli

    base, refiner = models
    options = {"steps": 2, "width": WIDTH, "height": HEIGHT}
    for call, message in [
        (lambda: base.txt2img("a cat", refiner=str(tiny_sdxl), **options), "the refiner must be a loaded model"),
        (lambda: base.txt2img("a cat", refiner=refiner, refiner_switch_at=0, **options), r"in \(0, 1\], not 0"),
        (lambda: refiner.txt2img("a cat", **options), "txt2img on an SDXL refiner is not supported"),
        (lambda: refiner.txt2img("a cat", refiner=refiner, **options), "txt2img on an SDXL refiner"),
        (lambda: refiner.inpaint("a cat", init_image(), init_image()), "inpaint on an SDXL refiner"),
    ]:
        with pytest.raises(InvalidRequestError, match=message):
            call()
    argv = ["--quiet", "txt2img", "--model", str(tiny_sdxl), "--engines", str(shared_engines), "--prompt", "a cat",
            "--refiner-switch-at", "0.5", "--output", str(tmp_path / "x.png")]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--refiner-switch-at needs --refiner" in err and len(err.splitlines()) == 1


def test_switch_at_one_runs_the_base_alone(models):
    """refiner_switch_at 1: the refiner never takes over (A1111), the images are the base's txt2img."""
    base, refiner = models
    options = {"steps": 3, "width": WIDTH, "height": HEIGHT, "seed": SEED, "sampler": "Euler"}
    alone = base.txt2img(PROMPT, **options)
    refined = base.txt2img(PROMPT, refiner=refiner, refiner_switch_at=1.0, **options)
    np.testing.assert_array_equal(refined.images, alone.images)
    assert "Refiner" not in refined.infotexts[0]
