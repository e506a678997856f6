"""SDXL inpaint and outpaint parity: sdrt (onnxruntime) against diffusers' StableDiffusionXLInpaintPipeline, on the
tiny SDXL base (4-channel UNet: the known region blended back after every step) and the tiny SDXL inpainting model
(9-channel UNet: mask and masked-image latents as input channels). Same folder, seeds and scheduler config; the mask
unblurred (diffusers binarises it); tolerances as for txt2img (assert_parity)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.runtime.test_sdxl_img2img import CFG, HEIGHT, STEPS, WIDTH, diffusers_pipe, generators, init_image
from tests.runtime.test_txt2img_parity import NEGATIVE, PROMPT, SEED, assert_parity

pytestmark = needs_torch


def mask_image(width: int = WIDTH, height: int = HEIGHT):
    """White (repaint) on a block right of the centre, black elsewhere."""
    from PIL import Image

    mask = np.zeros((height, width), dtype=np.uint8)
    mask[8:32, 24:48] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def models(tiny_sdxl, tiny_sdxl_inpaint, shared_engines):
    import runtime

    return {
        "4ch": (runtime.load(tiny_sdxl, engines_dir=shared_engines), tiny_sdxl),
        "9ch": (runtime.load(tiny_sdxl_inpaint, engines_dir=shared_engines), tiny_sdxl_inpaint),
    }


def reference(folder, sampler, schedule, strength, batch, image=None, mask=None):
    image, mask = image or init_image(), mask or mask_image()
    pipe = diffusers_pipe("StableDiffusionXLInpaintPipeline", folder, sampler, schedule, add_watermarker=False)
    return pipe(
        PROMPT,
        image=image,
        mask_image=mask,
        strength=strength,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        num_images_per_prompt=batch,
        generator=generators(batch),
        height=image.height,
        width=image.width,
        output_type="np",
    ).images


@pytest.mark.parametrize(
    ("kind", "sampler", "schedule", "strength", "batch"),
    [
        ("9ch", "Euler a", "default", 1.0, 2),
        ("9ch", "DPM++ 2M", "Karras", 0.6, 1),
        ("4ch", "DDIM", "default", 0.75, 2),
        ("4ch", "UniPC", "default", 1.0, 1),
    ],
)
def test_inpaint_matches_diffusers(models, kind, sampler, schedule, strength, batch):
    sd, folder = models[kind]
    result = sd.inpaint(PROMPT, init_image(), mask_image(), mask_blur=0, strength=strength, negative_prompt=NEGATIVE,
                        steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=batch, sampler=sampler,
                        schedule=schedule)  # fmt: skip
    assert_parity(result.images, reference(folder, sampler, schedule, strength, batch))


def test_txt2img_with_the_inpainting_model(models):
    """A1111 runs an inpainting model from text with the whole image masked and an empty masked image: diffusers'
    inpaint pipeline on a white mask (the image then does not matter)."""
    from PIL import Image

    sd, folder = models["9ch"]
    images = sd.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, width=WIDTH,
                        height=HEIGHT, sampler="Euler").images  # fmt: skip
    white = Image.new("L", (WIDTH, HEIGHT), 255)
    assert_parity(images, reference(folder, "Euler", "default", 1.0, 1, mask=white))


def test_outpaint_matches_diffusers_on_the_canvas(models):
    """Outpaint = inpaint of the grown canvas (new bands white in the mask), the original pixels then put back: equal
    to diffusers' inpaint of the same canvas and mask with the original pixels put back."""
    from runtime.images import extend_canvas

    sd, folder = models["9ch"]
    extend = (8, 8, 0, 16)  # left, right, top, bottom: 80 x 64
    result = sd.outpaint(PROMPT, init_image(), extend, mask_blur=0, negative_prompt=NEGATIVE, steps=STEPS,
                         cfg_scale=CFG, seed=SEED, sampler="DPM++ 2M", schedule="Karras")  # fmt: skip
    canvas, mask = extend_canvas(init_image(), *extend)
    expected = reference(folder, "DPM++ 2M", "Karras", 1.0, 1, image=canvas, mask=mask)
    known = np.asarray(mask) == 0
    expected[:, known] = np.asarray(canvas, dtype=np.float32)[known] / 255
    assert result.images.shape == (1, HEIGHT + 16, WIDTH + 16, 3)
    assert np.array_equal(result.images[0, :HEIGHT, 8 : 8 + WIDTH], np.asarray(init_image(), dtype=np.float32) / 255)
    assert_parity(result.images, expected)


@pytest.mark.parametrize("fill", ["latent nothing", "fill"])
def test_only_masked_with_masked_content_keeps_the_rest(models, fill):
    """A1111's "only masked" (crop, inpaint at the generation size, paste back through the blurred mask) and masked
    content options run on SDXL: the unmasked pixels stay exactly, the masked ones change."""
    sd, _ = models["4ch"]
    image = init_image()
    result = sd.inpaint(PROMPT, image, mask_image(), mask_blur=0, inpaint_full_res=True, inpaint_full_res_padding=4,
                        inpainting_fill=fill, steps=3, seed=SEED, sampler="Euler", width=WIDTH,
                        height=HEIGHT)  # fmt: skip
    out, original = result.images[0], np.asarray(image, dtype=np.float32) / 255
    keep = np.asarray(mask_image()) == 0
    assert np.array_equal(out[keep], original[keep])
    assert np.abs(out[~keep] - original[~keep]).mean() > 0.01
    assert "Inpaint area: Only masked" in result.infotexts[0] and f"Masked content: {fill}" in result.infotexts[0]
