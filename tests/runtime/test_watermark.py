"""Invisible watermark: round trips through sdrt's PNG writer and JPEG, the reference decoder, the size limit and
the missing package."""

from __future__ import annotations

import importlib.util
import io
import logging
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from runtime.errors import BackendUnavailableError, InvalidRequestError
from runtime.output import save_images
from runtime.watermark import DEFAULT_TEXT, embed_watermark, read_watermark

needs_imwatermark = pytest.mark.skipif(
    importlib.util.find_spec("imwatermark") is None, reason="invisible-watermark not installed (watermark extras)"
)


def textured(size=512, seed=0) -> np.ndarray:
    """A deterministic float32 image [size, size, 3] in [0, 1] with texture everywhere, as photos have."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.2 * np.sin(6 * x), 0.5 + 0.2 * np.cos(4 * y), 0.5 + 0.1 * x * y], axis=-1)
    return np.clip(base + 3 * (np.asarray(noise) / 255 - 0.5), 0, 1).astype(np.float32)


def jpeg(pixels: np.ndarray, quality: int, subsampling: int) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
    return Image.open(buffer)


@needs_imwatermark
@pytest.mark.parametrize("text", [DEFAULT_TEXT, "SDV2", "sdrt 0.1 — ✓"])
def test_round_trip_through_png(tmp_path, text):
    images = textured()[None]  # [1, 512, 512, 3] float, as a pipeline returns them
    marked = embed_watermark(images, text)
    assert marked.dtype == np.float32 and marked.shape == images.shape
    assert 0 < np.abs(marked - images).mean() < 0.02  # invisible, but there
    [path] = save_images(marked, tmp_path / "marked.png", ["a cat"])
    assert np.array_equal(np.asarray(Image.open(path)), (marked[0] * 255).round().astype(np.uint8))
    assert read_watermark(path) == text
    assert read_watermark(path, length=len(text.encode())) == text


@needs_imwatermark
def test_reference_decoder_reads_it(tmp_path):
    """Stable Diffusion's scripts/tests/test_watermark.py: cv2.imread, WatermarkDecoder("bytes", 136), dwtDct."""
    import cv2
    from imwatermark import WatermarkDecoder

    [path] = save_images(embed_watermark(textured()[None]), tmp_path / "marked.png", [""])
    assert WatermarkDecoder("bytes", 136).decode(cv2.imread(str(path)), "dwtDct") == DEFAULT_TEXT.encode()


@needs_imwatermark
def test_survives_jpeg_quality_90():
    marked = embed_watermark((textured() * 255).round().astype(np.uint8)[None])[0]  # uint8 in, uint8 out
    assert marked.dtype == np.uint8
    assert read_watermark(jpeg(marked, 90, subsampling=0)) == DEFAULT_TEXT  # full-resolution colour (4:4:4)
    assert read_watermark(jpeg(marked, 90, subsampling=2)) != DEFAULT_TEXT  # 4:2:0 chroma erases the U-plane bits


@needs_imwatermark
def test_batch_and_unmarked_images():
    images = np.stack([textured(seed=1), textured(seed=2)])
    marked = embed_watermark(images, "two")
    assert [read_watermark(image) for image in marked] == ["two", "two"]
    assert read_watermark(images[0]) is None


@needs_imwatermark
def test_small_images_are_skipped_with_a_note(caplog):
    small = (textured(size=200) * 255).astype(np.uint8)[None]
    with caplog.at_level(logging.WARNING, logger="runtime.watermark"):
        assert embed_watermark(small) is small
        assert read_watermark(small[0]) is None
    assert "not watermarking a 200x200 image: the invisible watermark needs 256x256 pixels at least" in caplog.text
    assert "no watermark read from a 200x200 image" in caplog.text
    exact = (textured(size=256) * 255).astype(np.uint8)[None]
    assert not np.array_equal(embed_watermark(exact), exact)  # 256x256 is enough


def test_missing_package_is_a_typed_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "imwatermark", None)  # `import imwatermark` now raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"needs the invisible-watermark package \(pip install"):
        embed_watermark(np.zeros((1, 512, 512, 3), dtype=np.uint8))
    with pytest.raises(BackendUnavailableError, match="invisible-watermark"):
        read_watermark(np.zeros((512, 512, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: embed_watermark(np.zeros((1, 512, 512, 3)), ""), "watermark text must be 1 to 32 printable UTF-8"),
        (lambda: embed_watermark(np.zeros((1, 512, 512, 3)), "x" * 33), "watermark text must be 1 to 32"),
        (lambda: embed_watermark(np.zeros((1, 512, 512, 3)), "a\nb"), "watermark text must be 1 to 32"),
        (lambda: embed_watermark(np.zeros((512, 512, 3))), "expected images [B, H, W, 3], got shape (512, 512, 3)"),
        (lambda: read_watermark(np.zeros((512, 512))), "expected an image [H, W, 3], got shape (512, 512)"),
        (lambda: read_watermark(np.zeros((512, 512, 3)), length=0), "watermark length must be a positive number"),
        (lambda: read_watermark("no/such/file.png"), "cannot read image no/such/file.png: no such file"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(InvalidRequestError) as error:
        call()
    assert message in str(error.value)
