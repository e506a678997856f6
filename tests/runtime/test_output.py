"""runtime.output: infotext format/parse, metadata round trips read back with Pillow, all-or-nothing writes."""

from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin

from runtime.errors import InvalidRequestError, NumericalError, OutputError
from runtime.output import (
    RE_PARAM,
    UNICODE_PREFIX,
    exif_with_user_comment,
    format_parameters,
    parse_parameters,
    read_parameters,
    save_images,
    to_uint8,
)

# the regex as REFERENCE.md section 4 (and A1111's infotext_utils.py) writes it, kept apart from ours
A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')

PARAMS = {
    "Steps": "20",
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": "7.5",
    "Seed": "4294967295",
    "Size": "512x768",
    "Model hash": "abcdef1234",
    "Model": "v1-5-pruned, emaonly",
    "Lora hashes": 'detail: 1234, "style": 5678',
    "Prompt note": "a:b",
    "Backslash": "C:\\models\\sd",
    "Quote only": 'say "hi"',
    "Multi line": "one\ntwo\r\nthree",
    "Padded": "  spaces around  ",
    "Unicode": "日本語 é 🎉",
    "JSON like": '"already quoted"',
    "Looks like a key": "Seed: 1, Steps: 2",
    "Version": "sdrt 0.1.0",
}
PROMPT = 'a photo of an astronaut, (emphasis:1.2), [less], "quoted", 日本 🎉\nsecond line: with colon, comma'
NEGATIVE = "ugly, blurry,\nworst quality: 2"


def _images(batch: int = 2, size: int = 16) -> np.ndarray:
    return np.random.default_rng(batch).random((batch, size, size, 3), dtype=np.float32)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------- infotext


def test_format_matches_a1111_layout() -> None:
    text = format_parameters("a cat", "ugly", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 42})
    assert text == "a cat\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42"
    text = format_parameters("a cat", "", {"Steps": 20, "Seed": None, "Model": "", "Size": "512x512", "X y": "1"})
    assert text == "a cat\nSteps: 20, Size: 512x512, X y: 1"
    assert format_parameters("p", "", {"Model": "a,b"}).endswith('Model: "a,b"')  # A1111 quote: json.dumps


def test_parse_inverts_format_for_hard_values() -> None:
    text = format_parameters(PROMPT, NEGATIVE, PARAMS)
    assert parse_parameters(text) == (PROMPT, NEGATIVE, PARAMS)
    assert parse_parameters(format_parameters(PROMPT, "", PARAMS)) == (PROMPT, "", PARAMS)
    assert parse_parameters(format_parameters("", NEGATIVE, PARAMS)) == ("", NEGATIVE, PARAMS)


def test_a1111_regex_parses_the_last_line() -> None:
    last = format_parameters(PROMPT, NEGATIVE, PARAMS).split("\n")[-1]
    found = A1111_RE_PARAM.findall(last)
    assert [k for k, _ in found] == list(PARAMS)
    for (_, raw), expected in zip(found, PARAMS.values()):
        value = json.loads(raw) if raw.startswith('"') and raw.endswith('"') and len(raw) > 1 else raw
        assert value == expected
    assert RE_PARAM.pattern == A1111_RE_PARAM.pattern


def test_parse_follows_a1111_rules() -> None:
    # fewer than 3 parameters on the last line: it is prompt text, as in A1111
    assert parse_parameters("a cat\nSteps: 20, Seed: 1") == ("a cat\nSteps: 20, Seed: 1", "", {})
    text = "  a cat  \n Negative prompt:  ugly \nmore neg\nSteps: 20, Sampler: Euler, Seed: 3, Size: 64x64"
    assert parse_parameters(text) == (
        "a cat",
        "ugly\nmore neg",
        {"Steps": "20", "Sampler": "Euler", "Seed": "3", "Size": "64x64"},
    )
    assert parse_parameters("") == ("", "", {})


def test_bad_keys_are_rejected() -> None:
    for key in ("", "a", "Seed:", "Steps, Seed", " lead"):
        with pytest.raises(InvalidRequestError):
            format_parameters("p", "", {key: "1"})


# ------------------------------------------------------------------------------------------------ pixels


def test_to_uint8_matches_diffusers_numpy_to_pil() -> None:
    pytest.importorskip("diffusers")
    from diffusers.image_processor import VaeImageProcessor

    images = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    images[0, 0, :4, 0] = [0.5 / 255, 1.5 / 255, 254.5 / 255, 1.0]  # rounding edges
    expected = np.stack([np.asarray(p) for p in VaeImageProcessor.numpy_to_pil(images)])
    assert to_uint8(images).dtype == np.uint8
    assert np.array_equal(to_uint8(images), expected)
    assert to_uint8(np.array([[[[-0.5, 1.5, 0.5]]]], dtype=np.float32)).tolist() == [[[[0, 255, 128]]]]
    with pytest.raises(NumericalError):
        to_uint8(np.full((1, 2, 2, 3), np.nan, dtype=np.float32))


# ------------------------------------------------------------------------------------------ round trips


def _exif_user_comment_and_type(image: Image.Image) -> tuple[bytes, int]:
    """Walk the EXIF TIFF with Pillow's IFD reader: (UserComment bytes, its TIFF type)."""
    tiff = image.info["exif"]
    tiff = tiff[6:] if tiff.startswith(b"Exif\x00\x00") else tiff
    ifd0 = TiffImagePlugin.ImageFileDirectory_v2(tiff[:8])
    ifd0.load(io.BytesIO(tiff[8:]))
    fp = io.BytesIO(tiff)
    fp.seek(ifd0[0x8769])
    exif_ifd = TiffImagePlugin.ImageFileDirectory_v2(tiff[:8])
    exif_ifd.load(fp)
    return exif_ifd[0x9286], exif_ifd.tagtype[0x9286]


@pytest.mark.parametrize("extension", [".png", ".jpg", ".jpeg", ".webp", ".PNG"])
def test_infotext_round_trip(extension: str, tmp_path: Path) -> None:
    infotext = format_parameters(PROMPT, NEGATIVE, PARAMS)
    (path,) = save_images(_images(1), tmp_path / f"out{extension}", [infotext])
    assert path == tmp_path / f"out{extension}"
    assert read_parameters(path) == infotext
    with Image.open(path) as image:  # independently of read_parameters
        assert image.size == (16, 16) and image.mode == "RGB"
        if extension.lower() == ".png":
            assert image.info["parameters"] == infotext
            assert any(isinstance(v, PngImagePlugin.iTXt) for v in image.text.values())  # not latin-1
        else:
            comment, tag_type = _exif_user_comment_and_type(image)
            assert comment == b"UNICODE\x00" + infotext.encode("utf_16_be")  # piexif's "unicode" dump
            assert tag_type == 7  # UNDEFINED, as piexif writes UserComment


def test_png_latin1_infotext_is_a_text_chunk(tmp_path: Path) -> None:
    infotext = format_parameters("a cat", "", {"Steps": 20, "Seed": 1, "Size": "16x16"})
    (path,) = save_images(_images(1), tmp_path / "a.png", [infotext])
    chunks = path.read_bytes()
    assert b"tEXtparameters\x00" + infotext.encode("latin-1") in chunks
    assert np.array_equal(np.asarray(Image.open(path)), to_uint8(_images(1))[0])  # lossless


def test_exif_block_layout_matches_piexif() -> None:
    block = exif_with_user_comment("hi")
    # "Exif\0\0", big-endian TIFF header, IFD0 {ExifIFD pointer -> 26}, Exif IFD {UserComment, UNDEFINED, 12 @ 44}
    assert block[:14] == b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08"
    assert struct.unpack(">HHHII", block[14:28]) == (1, 0x8769, 4, 1, 26)
    assert struct.unpack(">HHHII", block[32:46]) == (1, 0x9286, 7, 12, 44)
    assert block[50:] == UNICODE_PREFIX + "hi".encode("utf_16_be")


def test_batch_gives_numbered_files(tmp_path: Path) -> None:
    infotexts = [f"prompt {i}\nSteps: 20, Seed: {i}, Size: 16x16" for i in range(3)]
    paths = save_images(_images(3), tmp_path / "name.png", infotexts)
    assert paths == [tmp_path / f"name-{i}.png" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["name-0.png", "name-1.png", "name-2.png"]
    assert [read_parameters(p) for p in paths] == infotexts


def test_npy_holds_the_float_batch(tmp_path: Path) -> None:
    images = _images(2).astype(np.float64)
    (path,) = save_images(images, tmp_path / "batch.npy", [])
    assert path == tmp_path / "batch.npy" and [p.name for p in tmp_path.iterdir()] == ["batch.npy"]
    loaded = np.load(path)
    assert loaded.dtype == np.float32 and loaded.shape == (2, 16, 16, 3)
    assert np.array_equal(loaded, images.astype(np.float32))


def test_no_infotext_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    save_images(_images(1), path, ["first\nSteps: 1, Seed: 1, Size: 1x1"])
    save_images(_images(1), path, [""])
    assert read_parameters(path) is None
    assert [p.name for p in tmp_path.iterdir()] == ["a.jpg"]


# ------------------------------------------------------------------------------------------ error cases


def _bad_request(tmp_path: Path, case: str):
    images, path, infotexts = _images(2), tmp_path / "out.png", ["a", "b"]
    if case == "missing_folder":
        path = tmp_path / "nowhere" / "out.png"
    elif case == "unknown_extension":
        path = tmp_path / "out.bmp"
    elif case == "no_extension":
        path = tmp_path / "out"
    elif case == "nan":
        images[1, 3, 3, 1] = np.nan
    elif case == "inf":
        images[0, 0, 0, 0] = np.inf
    elif case == "shape":
        images = images[..., :2]
    elif case == "infotext_count":
        infotexts = ["a"]
    return images, path, infotexts


@pytest.mark.parametrize(
    "case", ["missing_folder", "unknown_extension", "no_extension", "nan", "inf", "shape", "infotext_count"]
)
def test_errors_write_nothing(case: str, tmp_path: Path) -> None:
    (tmp_path / "keep.png").write_bytes(b"existing")
    before = _listing(tmp_path)
    images, path, infotexts = _bad_request(tmp_path, case)
    expected = NumericalError if case in ("nan", "inf") else OutputError
    with pytest.raises(expected) as info:
        save_images(images, path, infotexts)
    assert "\n" not in str(info.value)
    assert _listing(tmp_path) == before


def test_failure_midway_removes_temporaries(tmp_path: Path) -> None:
    (tmp_path / "out-1.png").mkdir()  # the second rename fails: a folder is in the way
    with pytest.raises(OutputError):
        save_images(_images(2), tmp_path / "out.png", ["a", "b"])
    assert [p.name for p in tmp_path.iterdir()] == ["out-1.png"]
    too_long = "x" * 40000  # UTF-16 UserComment over JPEG's 64 KiB APP1 limit
    with pytest.raises(OutputError):
        save_images(_images(2), tmp_path / "big.jpg", ["ok", too_long])
    assert [p.name for p in tmp_path.iterdir()] == ["out-1.png"]


def test_read_parameters_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError):
        read_parameters(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InvalidRequestError):
        read_parameters(tmp_path / "junk.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    assert read_parameters(tmp_path / "plain.png") is None
