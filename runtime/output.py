"""Writing images the way A1111 users expect: infotext in a PNG "parameters" chunk or EXIF UserComment.

The infotext ("generation parameters") is A1111's: `<prompt>\\nNegative prompt: <neg>\\nSteps: 20, Sampler: ...`.
PNG stores it as a `parameters` tEXt chunk (iTXt when it is not latin-1), as Pillow's `PngInfo.add_text` writes
it; JPEG and WebP store it in EXIF UserComment as piexif's "unicode" encoding does: b"UNICODE\\0" + UTF-16-BE,
in an Exif IFD of type UNDEFINED, so A1111's png-info (piexif.load) reads it back.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from runtime.errors import InvalidRequestError, NumericalError, OutputError

# A1111's parser of the last infotext line (modules/infotext_utils.py, re_param_code).
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_KEY = re.compile(r"\w[\w \-/]+")
NEGATIVE_PREFIX = "Negative prompt:"
PIL_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
OUTPUT_EXTENSIONS = (*PIL_FORMATS, ".npy")
JPEG_QUALITY = 80  # A1111's default "jpeg_quality" (used for JPEG and lossy WebP)
EXIF_IFD_POINTER = 0x8769
USER_COMMENT = 0x9286
UNICODE_PREFIX = b"UNICODE\x00"  # EXIF character code of piexif's encoding="unicode"; body is UTF-16-BE
ASCII_PREFIX = b"ASCII\x00\x00\x00"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [B, H, W, 3] in [0, 1] -> uint8, rounding as diffusers' numpy_to_pil: `(x * 255).round()`."""
    _check_finite(images)
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def _check_finite(images: np.ndarray) -> None:
    if not np.isfinite(images).all():
        bad = int(images.size - np.isfinite(images).sum())
        raise NumericalError(f"the decoded images contain {bad} NaN/Inf values (try fp32 or another VAE)")


# ---------------------------------------------------------------------------------------------- infotext


def _quote(value: str) -> str:
    """A1111's `quote` (JSON string when the value has a comma, newline or colon), also for values whose quotes
    or surrounding whitespace A1111's parser would otherwise lose."""
    if any(c in value for c in ',\n\r:"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def _unquote(value: str) -> str:
    """A1111's `unquote`: a JSON string literal back to text; anything else unchanged."""
    if len(value) < 2 or value[0] != '"' or value[-1] != '"':
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def format_parameters(prompt: str, negative_prompt: str, params: dict) -> str:
    """A1111 infotext: prompt, `Negative prompt: ...` when there is one, then `Key: value, ...` on one line.

    Keys whose value is None or "" are omitted; values are written with `str()` and quoted when needed.
    """
    items = []
    for key, value in params.items():
        if value is None or str(value) == "":
            continue
        if not _RE_KEY.fullmatch(key):
            raise InvalidRequestError(f"infotext key {key!r} is not a word followed by words, spaces, - or /")
        items.append(f"{key}: {_quote(str(value))}")
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(items)}".strip()


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """A1111's `parse_generation_parameters` core: (prompt, negative_prompt, {key: value string}).

    As in A1111, the last line is parameters only if the regex finds at least 3 of them there; lines are
    stripped. Unlike A1111, `Size: 512x512` stays one entry (no "Size-1"/"Size-2") so that this inverts
    `format_parameters`.
    """
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = "", "", False
    for line in lines:  # A1111's accumulation: an empty first line adds nothing, later ones add a newline
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative, line = True, line[len(NEGATIVE_PREFIX) :].strip()
        if in_negative:
            negative = f"{negative}\n{line}" if negative else line
        else:
            prompt = f"{prompt}\n{line}" if prompt else line
    params = {key: _unquote(value) for key, value in RE_PARAM.findall(last)}
    return prompt, negative, params


# ------------------------------------------------------------------------------------------------- EXIF


def user_comment(text: str) -> bytes:
    """EXIF UserComment bytes as `piexif.helper.UserComment.dump(text, encoding="unicode")` makes them."""
    return UNICODE_PREFIX + text.encode("utf_16_be", errors="replace")


def exif_with_user_comment(text: str) -> bytes:
    """An APP1/WebP EXIF block holding only Exif IFD / UserComment (type UNDEFINED), laid out as piexif.dump:
    big-endian TIFF header, IFD0 with the Exif IFD pointer, the Exif IFD, then the comment bytes."""
    comment = user_comment(text)
    ifd0_offset, entry_ifd_size = 8, 2 + 12 + 4  # count, one 12-byte entry, next-IFD offset
    exif_ifd_offset = ifd0_offset + entry_ifd_size
    data_offset = exif_ifd_offset + entry_ifd_size
    header = b"MM" + struct.pack(">HI", 42, ifd0_offset)
    ifd0 = struct.pack(">HHHII", 1, EXIF_IFD_POINTER, 4, 1, exif_ifd_offset) + struct.pack(">I", 0)  # LONG
    exif_ifd = struct.pack(">HHHII", 1, USER_COMMENT, 7, len(comment), data_offset) + struct.pack(">I", 0)
    return b"Exif\x00\x00" + header + ifd0 + exif_ifd + comment


def _decode_user_comment(data: bytes) -> str:
    """piexif's UserComment.load, with A1111's fallback to UTF-8 for an unknown character code."""
    prefix, body = data[:8], data[8:]
    if prefix == UNICODE_PREFIX:
        return body.decode("utf_16_be", errors="replace")
    if prefix == ASCII_PREFIX:
        return body.decode("ascii", errors="replace")
    return data.decode("utf-8", errors="ignore")


def read_parameters(path: Path) -> str | None:
    """The infotext stored in a PNG ("parameters" chunk) or JPEG/WebP (EXIF UserComment); None when absent."""
    try:
        with Image.open(path) as image:
            parameters = image.info.get("parameters")
            comment = image.getexif().get_ifd(EXIF_IFD_POINTER).get(USER_COMMENT)
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for missing, truncated or unknown files
        raise InvalidRequestError(f"cannot read image {path}: {e}") from None
    if parameters is not None:
        return str(parameters)
    if isinstance(comment, bytes) and comment:
        return _decode_user_comment(comment)
    return None


# ---------------------------------------------------------------------------------------------- writing


def output_paths(path: Path, count: int) -> list[Path]:
    """Where `count` images go: `path` itself for one image (or .npy), else `name-0.png`, `name-1.png`, ..."""
    path = Path(path)
    if count == 1 or path.suffix.lower() == ".npy":
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]


def check_output_path(path: Path) -> str:
    """Raise OutputError unless `path` has a known extension in an existing folder; return the extension."""
    path = Path(path)
    extension = path.suffix.lower()
    if extension not in OUTPUT_EXTENSIONS:
        raise OutputError(f"unknown output format {path.suffix or path.name!r}; use {', '.join(OUTPUT_EXTENSIONS)}")
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist")
    return extension


def _check_request(images: np.ndarray, path: Path, infotexts: list[str]) -> str:
    """Validate before anything is written; return the lower-case extension."""
    extension = check_output_path(path)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise OutputError(f"expected images [B, H, W, 3] with B >= 1, got shape {images.shape}")
    if extension != ".npy" and len(infotexts) != images.shape[0]:
        raise OutputError(f"{images.shape[0]} images but {len(infotexts)} infotexts")
    _check_finite(images)
    return extension


def _write_image(pixels: np.ndarray, infotext: str, extension: str, file) -> None:
    image = Image.fromarray(pixels)
    if extension == ".png":
        pnginfo = PngImagePlugin.PngInfo()
        if infotext:
            pnginfo.add_text("parameters", infotext)  # tEXt, or iTXt when not latin-1
        image.save(file, format="PNG", pnginfo=pnginfo)
        return
    extra = {"exif": exif_with_user_comment(infotext)} if infotext else {}
    if PIL_FORMATS[extension] == "JPEG":
        extra["subsampling"] = 0  # 4:4:4: full colour resolution (4:2:0 would also erase an invisible watermark)
    image.save(file, format=PIL_FORMATS[extension], quality=JPEG_QUALITY, **extra)


def save_images(images: np.ndarray, path: Path, infotexts: list[str]) -> list[Path]:
    """Write a float [B, H, W, 3] batch in [0, 1] to `path` (format from the extension); return the files.

    All or nothing: every file goes to a temporary name in the target folder first and is renamed into place
    only when all were written; on any failure the temporaries (and already renamed files) are removed.
    """
    path = Path(path)
    images = np.asarray(images)
    extension = _check_request(images, path, infotexts)
    targets = output_paths(path, images.shape[0])
    temps: list[Path] = []
    try:
        for i, target in enumerate(targets):
            temps.append(target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp"))
            with open(temps[-1], "xb") as file:  # "x": never clobber; permissions follow the umask
                if extension == ".npy":
                    np.save(file, images.astype(np.float32))
                else:
                    _write_image(to_uint8(images[i]), infotexts[i], extension, file)
        _rename_all(temps, targets)
    except BaseException as e:
        _remove(temps)
        if isinstance(e, (OSError, ValueError)):  # file system errors; Pillow's "EXIF too long" and the like
            raise OutputError(f"cannot write {path}: {e}") from None
        raise
    return targets


def _rename_all(temps: list[Path], targets: list[Path]) -> None:
    """Move every temporary into place; if one rename fails, remove the files already moved."""
    for done, (temp, target) in enumerate(zip(temps, targets)):
        try:
            os.replace(temp, target)
        except OSError:
            _remove(targets[:done])
            raise


def _remove(paths: list[Path]) -> None:
    for p in paths:
        try:
            p.unlink(missing_ok=True)
        except OSError:
            pass
