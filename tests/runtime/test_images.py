"""runtime.images against diffusers' VaeImageProcessor and inpaint pipeline steps, OpenCV's GaussianBlur (when
installed), a float64 Gaussian, and hand-built expectations on synthetic images (A1111 has no importable reference).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image

from runtime import images
from runtime.errors import InvalidRequestError
from tests.conftest import needs_torch

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def random_mask(width: int, height: int, seed: int = 0) -> Image.Image:
    """A blurred random blob mask: mostly 0 and 255 with grey edges, and values near 127/128."""
    rng = np.random.default_rng(seed)
    mask = Image.fromarray((rng.random((height // 4 + 1, width // 4 + 1)) < 0.4).astype(np.uint8) * 255, mode="L")
    return images.blur_mask(mask.resize((width, height), Image.Resampling.NEAREST), 1.5)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int64)


# ---- load_image ---------------------------------------------------------------------------------------------------


def test_load_image_reads_rgb(tmp_path):
    source = random_image(24, 16)
    source.save(tmp_path / "a.png")
    loaded = images.load_image(tmp_path / "a.png")
    assert loaded.mode == "RGB" and np.array_equal(pixels(loaded), pixels(source))


def test_load_image_composites_transparency_on_white(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[:, :4, 3] = 255  # opaque left half
    rgba[:, 4:, 3] = 0  # transparent right half
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    loaded = pixels(images.load_image(tmp_path / "a.png"))
    assert (loaded[:, :4] == (200, 100, 0)).all() and (loaded[:, 4:] == 255).all()


def test_load_image_applies_exif_orientation(tmp_path):
    source = random_image(6, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    source.save(tmp_path / "a.png", exif=exif)
    assert images.load_image(tmp_path / "a.png").size == (4, 6)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("missing.png", None, "no such file"),
        ("text.png", b"not an image at all", "not an image format"),
        ("folder", "dir", "directory"),
        ("cut.png", "truncated", "truncated"),
    ],
)
def test_load_image_errors_name_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content == "truncated":
        random_image(64, 64).save(path)
        path.write_bytes(path.read_bytes()[:200])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidRequestError) as error:
        images.load_image(path)
    message = str(error.value)
    assert str(path) in message and reason in message and "\n" not in message


def test_read_mask_errors_say_mask(tmp_path):
    with pytest.raises(InvalidRequestError, match="cannot read mask .*no such file"):
        images.read_mask(tmp_path / "nope.png")


# ---- resize_image -------------------------------------------------------------------------------------------------


def vertical_stripes(width: int, height: int) -> Image.Image:
    """Red, green, blue thirds from left to right."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 3] = RED
    array[:, width // 3 : 2 * width // 3] = GREEN
    array[:, 2 * width // 3 :] = BLUE
    return Image.fromarray(array)


def test_just_resize_stretches():
    out = images.resize_image(Image.new("RGB", (200, 100), (12, 200, 77)), 64, 48, "just resize")
    assert out.size == (64, 48) and (pixels(out) == (12, 200, 77)).all()


def test_crop_and_resize_keeps_the_centre():
    out = pixels(images.resize_image(vertical_stripes(300, 100), 100, 100, "crop and resize"))
    # 300x100 already has the target height: the centre 100 columns (100..200) are kept, all green
    assert out.shape == (100, 100, 3) and (out == GREEN).all()
    out = pixels(images.resize_image(vertical_stripes(200, 100), 100, 100, "crop and resize"))
    # columns 50..150 of the source: red up to 66, green to 133, blue after
    assert (out[:, 5] == RED).all() and (out[:, 50] == GREEN).all() and (out[:, 95] == BLUE).all()


def test_resize_and_fill_stretches_the_edges_into_the_bands():
    source = np.zeros((100, 200, 3), dtype=np.uint8)
    source[:50] = RED
    source[50:] = BLUE
    source[..., 1] = np.arange(200)  # a gradient along x, so the bands must follow the edge row pixel by pixel
    out = pixels(images.resize_image(Image.fromarray(source), 100, 100, "resize and fill"))
    scaled = pixels(Image.fromarray(source).resize((100, 50), Image.Resampling.LANCZOS))
    assert np.array_equal(out[25:75], scaled)  # the whole image, centred
    assert (out[:25] == scaled[0]).all() and (out[75:] == scaled[-1]).all()  # bands: the first/last row stretched
    tall = pixels(images.resize_image(Image.fromarray(source.transpose(1, 0, 2)), 100, 100, "resize and fill"))
    assert (tall[:, :25] == tall[:, 25:26]).all() and (tall[:, 75:] == tall[:, 74:75]).all()


def test_resize_keeps_the_mode_of_masks():
    mask = Image.new("L", (30, 10), 255)
    for mode in images.RESIZE_MODES:
        out = images.resize_image(mask, 16, 16, mode)
        assert out.mode == "L" and out.size == (16, 16)


def test_resize_errors():
    with pytest.raises(InvalidRequestError, match="unknown resize mode 'stretch'; choose one of: just resize, crop"):
        images.resize_image(random_image(8, 8), 8, 8, "stretch")
    with pytest.raises(InvalidRequestError, match="0x8"):
        images.resize_image(random_image(8, 8), 0, 8)


@needs_torch
@pytest.mark.parametrize("size", [(40, 24), (24, 40), (33, 33), (64, 16)])
@pytest.mark.parametrize("mode", images.RESIZE_MODES)
def test_resize_modes_equal_diffusers(size, mode):
    from diffusers.image_processor import VaeImageProcessor

    diffusers_mode = {"just resize": "default", "crop and resize": "crop", "resize and fill": "fill"}[mode]
    source = random_image(*size, seed=size[0])
    for width, height in ((32, 32), (48, 24), (24, 40)):
        expected = VaeImageProcessor().resize(source, height, width, resize_mode=diffusers_mode)
        assert np.array_equal(pixels(images.resize_image(source, width, height, mode)), pixels(expected))


# ---- model inputs -------------------------------------------------------------------------------------------------


@needs_torch
def test_to_model_input_equals_diffusers_preprocess():
    from diffusers.image_processor import VaeImageProcessor

    image = random_image(40, 24)
    ours = images.to_model_input(image)
    assert ours.shape == (1, 3, 24, 40) and ours.dtype == np.float32
    assert np.array_equal(ours, VaeImageProcessor().preprocess(image).numpy())


@needs_torch
def test_mask_inputs_equal_diffusers_inpaint_pipeline():
    """Mask condition, masked image and latent mask as StableDiffusionInpaintPipeline builds them."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    image, mask = random_image(48, 40, seed=1), random_mask(48, 40, seed=2)
    assert {127, 128} <= set(np.unique(pixels(mask)))  # the binarisation threshold is exercised
    mask_processor = VaeImageProcessor(do_normalize=False, do_binarize=True, do_convert_grayscale=True)
    condition = mask_processor.preprocess(mask, height=40, width=48)
    init = VaeImageProcessor().preprocess(image, height=40, width=48)
    assert np.array_equal(images.binarize(mask), condition.numpy())
    assert np.array_equal(images.masked_image_input(image, mask), (init * (condition < 0.5)).numpy())
    for latent_h, latent_w in ((5, 6), (20, 24), (7, 9), (13, 5)):  # SD's / 8, the tiny VAE's / 2, uneven ratios
        expected = torch.nn.functional.interpolate(condition, size=(latent_h, latent_w)).numpy()
        assert np.array_equal(images.mask_to_latent_mask(mask, latent_w, latent_h), expected)


def test_masked_image_input_needs_matching_sizes():
    with pytest.raises(InvalidRequestError, match="mask is 8x8 but the image is 16x8"):
        images.masked_image_input(random_image(16, 8), Image.new("L", (8, 8)))


# ---- masks --------------------------------------------------------------------------------------------------------


def test_read_mask_uses_alpha_only_when_transparent():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 3] = [0, 128, 129, 255]  # alpha per column; colour black everywhere
    mask = pixels(images.read_mask(Image.fromarray(rgba, mode="RGBA")))
    assert (mask == [0, 0, 255, 255]).all()
    opaque = rgba.copy()
    opaque[..., :3], opaque[..., 3] = 255, 255
    assert (pixels(images.read_mask(Image.fromarray(opaque, mode="RGBA"))) == 255).all()  # luminance then
    assert (pixels(images.read_mask(Image.new("RGB", (4, 4), (255, 255, 255)))) == 255).all()


def float_gaussian(mask: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """A float64 Gaussian (OpenCV's tap count, reflected border), unquantised: the independent reference."""
    n = 2 * int(2.5 * sigma + 0.5) + 1
    offsets = np.arange(n) - n // 2
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(mask.astype(np.float64), [(n // 2, n // 2) if a == axis else (0, 0) for a in range(2)], "reflect")
    return np.apply_along_axis(lambda line: np.convolve(line, kernel, mode="valid"), axis, padded)


@pytest.mark.parametrize("sigma", [1, 4, 7.5, 30])
def test_blur_mask_is_a_separable_gaussian(sigma):
    mask = pixels(random_mask(50, 37, seed=3))
    expected = float_gaussian(float_gaussian(mask, sigma, 1), sigma, 0)
    blurred = pixels(images.blur_mask(Image.fromarray(mask.astype(np.uint8)), sigma))
    assert np.abs(blurred - expected).max() <= 2  # OpenCV's 8-bit taps are rounded to 1/256


def test_blur_mask_x_and_y_apart_and_zero():
    mask = Image.new("L", (21, 21))
    mask.putpixel((10, 10), 255)
    only_x = pixels(images.blur_mask(mask, 2, 0))
    assert (only_x[10] > 0).sum() > 1 and (only_x[:10] == 0).all() and (only_x[11:] == 0).all()
    assert np.array_equal(pixels(images.blur_mask(mask, 0)), pixels(mask))
    with pytest.raises(InvalidRequestError, match="mask blur must be >= 0, not -1"):
        images.blur_mask(mask, -1)


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV (A1111's blur) not installed")
@pytest.mark.parametrize("sigma", [0.5, 1, 4, 6.3, 16, 64])
def test_blur_mask_equals_a1111_opencv(sigma):
    import cv2

    mask = np.asarray(random_mask(70, 45, seed=int(sigma * 10)))
    taps = 2 * int(2.5 * sigma + 0.5) + 1
    expected = cv2.GaussianBlur(cv2.GaussianBlur(mask, (taps, 1), sigma), (1, taps), sigma)
    assert np.array_equal(np.asarray(images.blur_mask(Image.fromarray(mask), sigma)), expected)


def test_load_mask_blurs_then_resizes():
    mask = Image.new("L", (16, 8))
    mask.paste(255, (4, 2, 12, 6))
    loaded = images.load_mask(mask, 32, 32, "crop and resize", blur=2)
    assert loaded.mode == "L" and loaded.size == (32, 32)
    expected = images.resize_image(images.blur_mask(mask, 2), 32, 32, "crop and resize")
    assert np.array_equal(pixels(loaded), pixels(expected))


def test_overlay_mask_doubles():
    mask = Image.fromarray(np.array([[0, 1, 100, 127, 128, 255]], dtype=np.uint8), mode="L")
    assert pixels(images.overlay_mask(mask)).tolist() == [[0, 2, 200, 254, 255, 255]]


# ---- inpaint "Only masked" ----------------------------------------------------------------------------------------


def rectangle_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (width, height))
    mask.paste(255, box)
    return mask


def test_crop_region_on_synthetic_masks():
    mask = rectangle_mask(64, 48, (10, 20, 30, 25))
    assert images.crop_region(mask) == (10, 20, 30, 25)
    assert images.crop_region(mask, padding=4) == (6, 16, 34, 29)
    assert images.crop_region(mask, padding=40) == (0, 0, 64, 48)  # clamped to the image
    assert images.crop_region(np.asarray(mask), 1) == (9, 19, 31, 26)  # numpy masks too
    assert images.crop_region(Image.new("L", (8, 8))) is None
    with pytest.raises(InvalidRequestError, match="padding must be >= 0"):
        images.crop_region(mask, -1)


def test_expand_crop_region_matches_the_generation_ratio():
    assert images.expand_crop_region((192, 240, 320, 272), 512, 512, 512, 512) == (192, 192, 320, 320)  # 128x32
    assert images.expand_crop_region((0, 0, 10, 40), 64, 64, 100, 100) == (0, 0, 40, 40)  # shifted right of 0
    assert images.expand_crop_region((90, 60, 100, 100), 64, 64, 100, 100) == (60, 60, 100, 100)  # shifted left
    assert images.expand_crop_region((0, 40, 100, 50), 64, 128, 100, 100) == (0, 0, 100, 100)  # clamped


@needs_torch
@pytest.mark.parametrize("seed", range(6))
def test_crop_regions_equal_diffusers(seed):
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(40, 120, 2))
    x1, y1 = (int(v) for v in rng.integers(0, 30, 2))
    mask = rectangle_mask(width, height, (x1, y1, x1 + int(rng.integers(1, 40)), y1 + int(rng.integers(1, 40))))
    padding, (gen_w, gen_h) = int(rng.integers(0, 20)), rng.choice([(64, 64), (96, 64), (64, 128)])
    expected = VaeImageProcessor.get_crop_region(mask, gen_w, gen_h, pad=padding)
    ours = images.expand_crop_region(images.crop_region(mask, padding), gen_w, gen_h, width, height)
    assert ours == expected


def test_crop_for_inpaint():
    image, mask = random_image(100, 80), rectangle_mask(100, 80, (70, 10, 90, 20))
    image_crop, mask_crop, region = images.crop_for_inpaint(image, mask, 64, 64, padding=5)
    assert region == (65, 0, 95, 30) and image_crop.size == mask_crop.size == (64, 64) and mask_crop.mode == "L"
    expected = image.crop(region).resize((64, 64), Image.Resampling.LANCZOS)  # the region is square already
    assert np.array_equal(pixels(image_crop), pixels(expected))
    assert images.crop_for_inpaint(image, Image.new("L", (100, 80)), 64, 64, 5) is None
    with pytest.raises(InvalidRequestError, match="mask is 10x10 but the image is 100x80"):
        images.crop_for_inpaint(image, Image.new("L", (10, 10)), 64, 64, 5)


def test_paste_back_keeps_unmasked_pixels_and_takes_masked_ones():
    original, generated = random_image(40, 24, seed=1), random_image(40, 24, seed=2)
    mask = rectangle_mask(40, 24, (8, 4, 20, 16))
    out = pixels(images.paste_back(original, generated, None, mask))
    inside = pixels(mask) == 255
    assert np.array_equal(out[inside], pixels(generated)[inside])
    assert np.array_equal(out[~inside], pixels(original)[~inside])
    grey = Image.new("L", (40, 24), 128)  # half and half, up to the premultiplied rounding
    blended = (pixels(original) * 127 + pixels(generated) * 128) / 255
    assert np.abs(pixels(images.paste_back(original, generated, None, grey)) - blended).max() <= 2
    with pytest.raises(InvalidRequestError, match="generated image is 8x8 but the image is 40x24"):
        images.paste_back(original, random_image(8, 8), None, mask)


@needs_torch
def test_paste_back_equals_diffusers_apply_overlay():
    from diffusers.image_processor import VaeImageProcessor

    original = random_image(100, 80, seed=3)
    mask = images.blur_mask(rectangle_mask(100, 80, (60, 20, 80, 35)), 4)
    _, _, region = images.crop_for_inpaint(original, mask, 64, 48, padding=8)
    generated = random_image(64, 48, seed=4)
    expected = VaeImageProcessor().apply_overlay(mask, original, generated, region)
    assert np.array_equal(pixels(images.paste_back(original, generated, region, mask)), pixels(expected))


# ---- outpaint -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fill", images.OUTPAINT_FILLS)
def test_extend_canvas(fill):
    image = random_image(40, 24)
    canvas, mask = images.extend_canvas(image, 8, 16, 0, 8, fill=fill)
    assert canvas.size == mask.size == (64, 32) and canvas.mode == "RGB" and mask.mode == "L"
    assert np.array_equal(pixels(canvas)[0:24, 8:48], pixels(image))
    expected_mask = np.full((32, 64), 255)
    expected_mask[0:24, 8:48] = 0
    assert np.array_equal(pixels(mask), expected_mask)
    if fill == "edge":
        assert (pixels(canvas)[0:24, :8] == pixels(image)[:, :1]).all()  # left band: the left column stretched
        assert (pixels(canvas)[24:, 8:48] == pixels(image)[-1]).all()  # bottom band: the last row stretched
        assert (pixels(canvas)[24:, 48:] == pixels(image)[-1, -1]).all()  # corner: the corner pixel


@pytest.mark.parametrize(
    "sides, message",
    [
        ((-8, 0, 0, 0), "left must be a whole number of pixels >= 0, not -8"),
        ((0, 0, 2.5, 0), "top must be a whole number of pixels >= 0, not 2.5"),
        ((0, 0, 0, 0), "at least one of left, right, top, bottom"),
        ((0, 7, 0, 0), r"outpainted width 40\+7=47 is not a multiple of 8; extend the width by 0 or 8 pixels"),
        ((4, 8, 0, 0), r"outpainted width 40\+12=52 is not a multiple of 8; extend the width by 8 or 16 pixels"),
        ((0, 0, 5, 8), r"outpainted height 24\+13=37 is not a multiple of 8; extend the height by 8 or 16 pixels"),
    ],
)
def test_extend_canvas_errors(sides, message):
    with pytest.raises(InvalidRequestError, match=message):
        images.extend_canvas(random_image(40, 24), *sides)
    with pytest.raises(InvalidRequestError, match="unknown outpaint fill 'noise'; choose one of: edge, fill"):
        images.extend_canvas(random_image(40, 24), 8, 0, 0, 0, fill="noise")
