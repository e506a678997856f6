"""runtime.upscalers without models: A1111's built-in upscalers, its resize_image chain, the listing and lookup.

References transcribe A1111 1.10's modules/upscaler.py (Upscaler.upscale, UpscalerNone/Lanczos/Nearest) and
modules/images.py (resize_image mode 0 with an upscaler) over Pillow.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from runtime.errors import InvalidRequestError
from runtime.upscalers import list_upscalers, load_upscaler, resize_image

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST


def a1111_builtin(name: str, image: Image.Image, scale: float) -> Image.Image:
    """Upscaler.upscale with the built-in's do_upscale (None: the image as it is)."""
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for i in range(3):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = image.size
        if name != "None":
            size = (int(image.width * scale), int(image.height * scale))
            image = image.resize(size, resample=LANCZOS if name == "Lanczos" else NEAREST)
        if shape == image.size:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=LANCZOS)
    return image


def random_image(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("name", ["None", "Lanczos", "Nearest"])
@pytest.mark.parametrize("scale", [1, 1.5, 2.37, 0.5])
def test_builtins_equal_a1111(name, scale, tmp_path):
    image = random_image(45, 31)
    got = load_upscaler(name, tmp_path).upscale(image, scale)
    assert np.array_equal(np.asarray(got), np.asarray(a1111_builtin(name, image, scale)))


def test_resize_image_chain_as_a1111(tmp_path):
    """images.resize_image(0, im, w, h, upscaler_name): upscale by the larger ratio, then Lanczos to the size."""
    image = random_image(40, 30)
    nearest = load_upscaler("Nearest", tmp_path)
    got = resize_image(nearest, image, 100, 64)
    expected = a1111_builtin("Nearest", image, max(100 / 40, 64 / 30)).resize((100, 64), resample=LANCZOS)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    plain = image.resize((20, 16), resample=LANCZOS)  # shrinking, or "None": Lanczos alone
    assert np.array_equal(np.asarray(resize_image(nearest, image, 20, 16)), np.asarray(plain))
    assert np.array_equal(np.asarray(resize_image(None, image, 20, 16)), np.asarray(plain))


def test_listing_without_a_folder_has_the_builtins(tmp_path):
    items = [item.as_a1111() for item in list_upscalers(tmp_path)]
    assert items == [{"name": n, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                     for n in ("None", "Lanczos", "Nearest")]  # fmt: skip


def test_safetensors_first_and_real_esrgan_names(tmp_path):
    for name in ("RealESRGAN_x2plus.pth", "RealESRGAN_x2plus.safetensors", "b/4x-Ultra.pth", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    items = {item.name: item for item in list_upscalers(tmp_path)}
    assert list(items) == ["None", "Lanczos", "Nearest", "4x-Ultra", "R-ESRGAN 2x+"]
    two = items["R-ESRGAN 2x+"]
    assert two.path == tmp_path / "RealESRGAN_x2plus.safetensors" and two.scale == 2


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: load_upscaler("R-ESRGAN 4x+", d), "unknown upscaler 'R-ESRGAN 4x+'; choose one of: None, Lanczos"),
        (lambda d: load_upscaler("None", d / "missing"), "upscaler folder"),
        (lambda d: load_upscaler("Lanczos", d).upscale(random_image(8, 8), 0.5), "leaves an image under 8 pixels"),
        (lambda d: load_upscaler("Lanczos", d).upscale(random_image(8, 8), float("nan")), "positive number"),
        (lambda d: load_upscaler("Lanczos", d, tile_size=8, tile_overlap=9), "the overlap must be"),
    ],
)
def test_bad_requests_are_one_line_errors(tmp_path, call, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)) as info:
        call(tmp_path)
    assert "\n" not in str(info.value)
