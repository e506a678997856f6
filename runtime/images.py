"""The image side of img2img, inpaint and outpaint: A1111's geometry and masks, diffusers' model inputs (PIL + numpy).

Sources followed (no code taken from them): A1111 `modules/images.py` (resize_image, flatten, read),
`modules/masking.py` (get_crop_region_v2, expand_crop_region, fill), `modules/processing.py`
(StableDiffusionProcessingImg2Img.init: mask blur, "Only masked", apply_overlay); diffusers `image_processor.py`
(VaeImageProcessor) and `pipeline_stable_diffusion_inpaint.py` (mask condition, masked image, prepare_mask_latents).

Masks are PIL "L" images, white (255) = repaint. Model inputs are float32 numpy arrays, NCHW.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from runtime.errors import InvalidRequestError

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")  # A1111's resize_mode 0, 1, 2
OUTPAINT_FILLS = ("edge", "fill")  # stretched edge pixels; A1111's "fill" masked content (blurred colours)
BACKGROUND = (255, 255, 255)  # A1111's img2img_background_color: transparent pixels become white
LANCZOS = Image.Resampling.LANCZOS
LATENT_MULTIPLE = 8  # pixels per latent cell of every SD VAE; outpaint canvases must be a multiple of it
_FILL_LAYERS = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # A1111 masking.fill: (blur radius, repeats)

Region = tuple[int, int, int, int]  # (x1, y1, x2, y2) in pixels, x2 and y2 exclusive, as PIL's crop box


def load_image(path: str | os.PathLike) -> Image.Image:
    """An RGB image from a file: EXIF orientation applied, transparency composited on white (A1111's flatten)."""
    return flatten(_open(path, "image"))


def flatten(image: Image.Image) -> Image.Image:
    """RGB with transparent pixels composited on `BACKGROUND`, as A1111's images.flatten does for RGBA."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, BACKGROUND)
        background.paste(image, mask=image)  # the alpha band is the paste mask
        image = background
    return image.convert("RGB")


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except FileNotFoundError:
        reason = "no such file"
    except IsADirectoryError:
        reason = "it is a directory"
    except UnidentifiedImageError:
        reason = "not an image format Pillow can read"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
    raise InvalidRequestError(f"cannot read {what} {path}: {reason}")


def resize_image(image: Image.Image, width: int, height: int, mode: str = "just resize") -> Image.Image:
    """Resize to width x height as A1111's resize_image (Lanczos): stretch, cover and crop, or fit and fill the
    empty bands with the stretched edge rows/columns. The result keeps the image's mode."""
    if mode not in RESIZE_MODES:
        raise InvalidRequestError(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    if width < 1 or height < 1:
        raise InvalidRequestError(f"cannot resize an image to {width}x{height}")
    if mode == "just resize":
        return image.resize((width, height), resample=LANCZOS)
    fill = mode == "resize and fill"
    ratio, src_ratio = width / height, image.width / image.height
    if (ratio < src_ratio) if fill else (ratio > src_ratio):  # the scaled image spans the full width
        src_w, src_h = width, image.height * width // image.width
    else:  # ... or the full height
        src_w, src_h = image.width * height // image.height, height
    if src_w < 1 or src_h < 1:  # A1111's integer scaling leaves no pixel of a very thin image
        raise InvalidRequestError(
            f"a {image.width}x{image.height} image scaled to fit {width}x{height} ({mode!r}) would be {src_w}x{src_h}"
            " pixels; use resize mode 'just resize' or an image with a less extreme aspect ratio"
        )
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if fill:
        _fill_bands(canvas, resized, ratio, src_ratio)
    return canvas


def _fill_bands(canvas: Image.Image, resized: Image.Image, ratio: float, src_ratio: float) -> None:
    """Stretch the first/last row (or column) of `resized` over the empty bands around it (A1111 mode 2)."""
    width, height = canvas.size
    src_w, src_h = resized.size
    if ratio < src_ratio:  # bands above and below
        band = height // 2 - src_h // 2
        if band > 0:
            canvas.paste(resized.resize((width, band), box=(0, 0, src_w, 0)), (0, 0))
            canvas.paste(resized.resize((width, band), box=(0, src_h, src_w, src_h)), (0, band + src_h))
    elif ratio > src_ratio:  # bands left and right
        band = width // 2 - src_w // 2
        if band > 0:
            canvas.paste(resized.resize((band, height), box=(0, 0, 0, src_h)), (0, 0))
            canvas.paste(resized.resize((band, height), box=(src_w, 0, src_w, src_h)), (band + src_w, 0))


def to_model_input(image: Image.Image) -> np.ndarray:
    """RGB image -> float32 [1, 3, H, W] in [-1, 1], as diffusers' VaeImageProcessor.preprocess (x / 255 * 2 - 1)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    return np.ascontiguousarray((2.0 * pixels - 1.0).transpose(2, 0, 1)[None])  # [1, 3, H, W]


# ---- masks -------------------------------------------------------------------------------------------------------


def read_mask(source: str | os.PathLike | Image.Image) -> Image.Image:
    """A mask file or image as "L" (A1111's create_binary_mask): an RGBA mask that has transparency is its alpha
    band rounded to 0/255 (above 128 -> 255); anything else is its luminance."""
    image = source if isinstance(source, Image.Image) else _open(source, "mask")
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return image.convert("L")


def blur_mask(mask: Image.Image, blur: float, blur_y: float | None = None) -> Image.Image:
    """A1111's mask blur: a Gaussian of sigma `blur` along x, then `blur_y` (default: the same) along y, each
    with OpenCV's kernel (2 * int(2.5 * sigma + 0.5) + 1 taps, reflected border) and its 8-bit fixed point."""
    blur_y = blur if blur_y is None else blur_y
    if blur < 0 or blur_y < 0:
        raise InvalidRequestError(f"mask blur must be >= 0, not {min(blur, blur_y)}")
    pixels = np.asarray(mask.convert("L"), dtype=np.int64)  # [H, W]
    if blur > 0:
        pixels = _gaussian_u8(pixels, blur, axis=1)
    if blur_y > 0:
        pixels = _gaussian_u8(pixels, blur_y, axis=0)
    return Image.fromarray(pixels.astype(np.uint8), mode="L")


def _gaussian_u8(pixels: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """cv2.GaussianBlur of a uint8 plane along one axis: Q8 integer taps, sum rounded half up, BORDER_REFLECT_101."""
    taps = _gaussian_taps_q8(sigma)
    half = len(taps) // 2
    lines = np.moveaxis(pixels, axis, 0)  # blur along the first axis
    padded = np.pad(lines, ((half, half), (0, 0)), mode="reflect")  # numpy's "reflect" is OpenCV's REFLECT_101
    total = np.zeros_like(lines)
    for i, tap in enumerate(taps):
        total += int(tap) * padded[i : i + len(lines)]
    return np.moveaxis((total + 128) >> 8, 0, axis)


def _gaussian_taps_q8(sigma: float) -> np.ndarray:
    """OpenCV's bit-exact 8-bit Gaussian kernel: the normalised double kernel quantised to integers summing to 256,
    rounding with the error carried from tap to tap (getGaussianKernelBitExact + getGaussianKernelFixedPoint_ED)."""
    n = 2 * int(2.5 * sigma + 0.5) + 1
    half = n // 2
    x = np.arange(1 - n, 0, 2, dtype=np.float64)  # twice the offsets of the left half
    left = np.exp(x * x * (-0.125 / (sigma * sigma)))
    scale = 1.0 / (2.0 * left.sum() + 1.0)  # the centre tap is exp(0) = 1
    taps = np.zeros(n, dtype=np.int64)
    carried = 0.0
    for i, value in enumerate(left):
        exact = value * scale * 256.0 + carried
        taps[i] = taps[n - 1 - i] = int(np.rint(exact))
        carried = exact - taps[i]
    taps[half] = 256 - 2 * int(taps[:half].sum())
    return taps


def load_mask(
    source: str | os.PathLike | Image.Image,
    width: int,
    height: int,
    resize_mode: str = "just resize",
    blur: float = 0,
    blur_y: float | None = None,
) -> Image.Image:
    """The inpaint mask at width x height, "L": read, blurred at its own size (`blur` along x, `blur_y` along y,
    default the same), then resized with the image's resize mode, in A1111's order."""
    return resize_image(blur_mask(read_mask(source), blur, blur_y), width, height, resize_mode).convert("L")


def binarize(mask: Image.Image) -> np.ndarray:
    """float32 [1, 1, H, W] of 0/1: diffusers' inpaint mask condition (mask / 255 >= 0.5 -> 1)."""
    values = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0  # [H, W]
    return (values >= 0.5).astype(np.float32)[None, None]


def masked_image_input(image: Image.Image, mask: Image.Image) -> np.ndarray:
    """float32 [1, 3, H, W]: the model input with the repainted pixels zeroed (diffusers: image * (mask < 0.5))."""
    _check_size(mask, image, "mask")
    return to_model_input(image) * (binarize(mask) < 0.5)


def mask_to_latent_mask(mask: Image.Image, latent_w: int, latent_h: int) -> np.ndarray:
    """float32 [1, 1, latent_h, latent_w]: the binarised mask, nearest-neighbour resized as torch's
    F.interpolate(mode="nearest") in diffusers' prepare_mask_latents."""
    binary = binarize(mask)[0, 0]  # [H, W]
    rows = _nearest_indices(binary.shape[0], latent_h)
    cols = _nearest_indices(binary.shape[1], latent_w)
    return np.ascontiguousarray(binary[np.ix_(rows, cols)][None, None])  # [1, 1, h, w]


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output index in torch's nearest interpolation: floor(i * (in / out)), in float32."""
    scale = np.float32(size_in) / np.float32(size_out)
    index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, size_in - 1)


def overlay_mask(mask: Image.Image) -> Image.Image:
    """The mask A1111 composites a whole-image inpaint through: the (blurred) mask doubled, clipped at 255.
    ("Only masked" composites through the blurred mask itself.)"""
    doubled = np.clip(np.asarray(mask.convert("L"), dtype=np.float32) * 2, 0, 255).astype(np.uint8)
    return Image.fromarray(doubled, mode="L")


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area painted with ever less blurred colours of the rest."""
    unmasked = Image.new("RGBa", image.size)
    unmasked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    filled = Image.new("RGBA", image.size)
    for radius, repeats in _FILL_LAYERS:
        layer = unmasked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(layer)
    return filled.convert("RGB")


# ---- inpaint "Only masked" (full resolution) ---------------------------------------------------------------------


def crop_region(mask: Image.Image | np.ndarray, padding: int = 0) -> Region | None:
    """The box around the mask's non-zero pixels grown by `padding` on each side within the image (A1111's
    get_crop_region_v2); None when the mask is blank."""
    if padding < 0:
        raise InvalidRequestError(f"inpaint padding must be >= 0, not {padding}")
    mask = mask if isinstance(mask, Image.Image) else Image.fromarray(np.asarray(mask, dtype=np.uint8))
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_crop_region(region: Region, width: int, height: int, image_w: int, image_h: int) -> Region:
    """Grow `region` to the width:height aspect ratio of generation, shifted back inside the image and clamped
    to it (A1111's expand_crop_region; the result can miss the ratio when the image is too small)."""
    x1, y1, x2, y2 = region
    ratio = width / height
    if (x2 - x1) / (y2 - y1) > ratio:
        y1, y2 = _grow(y1, y2, (x2 - x1) / ratio, image_h)
    else:
        x1, x2 = _grow(x1, x2, (y2 - y1) * ratio, image_w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, length: float, limit: int) -> tuple[int, int]:
    extra = int(length - (hi - lo))
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def crop_for_inpaint(
    image: Image.Image, mask: Image.Image, width: int, height: int, padding: int
) -> tuple[Image.Image, Image.Image, Region] | None:
    """A1111's "Only masked": (image crop, mask crop) around the (blurred, full-size) mask, each resized to
    width x height with "resize and fill", and the region to paste back into; None when the mask is blank."""
    _check_size(mask, image, "mask")
    region = crop_region(mask, padding)
    if region is None:
        return None
    region = expand_crop_region(region, width, height, image.width, image.height)
    crops = (resize_image(part.crop(region), width, height, "resize and fill") for part in (image, mask))
    image_crop, mask_crop = crops
    return image_crop, mask_crop.convert("L"), region


def paste_back(original: Image.Image, generated: Image.Image, region: Region | None, mask: Image.Image) -> Image.Image:
    """The original with `generated` composited in through `mask` (A1111's apply_overlay): `generated` is resized
    into `region` ("crop and resize") when one is given, else it must be the original's size."""
    _check_size(mask, original, "mask")
    overlay = Image.new("RGBa", original.size)  # the original where the mask is not, premultiplied as A1111 has it
    overlay.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    if region is not None:
        x1, y1, x2, y2 = region
        base = Image.new("RGBA", original.size)
        base.paste(resize_image(generated, x2 - x1, y2 - y1, "crop and resize"), (x1, y1))
        generated = base
    else:
        _check_size(generated, original, "generated image")
    result = generated.convert("RGBA")
    result.alpha_composite(overlay.convert("RGBA"))
    return result.convert("RGB")


def _check_size(part: Image.Image, image: Image.Image, name: str) -> None:
    if part.size != image.size:
        raise InvalidRequestError(
            f"{name} is {part.width}x{part.height} but the image is {image.width}x{image.height}"
        )


# ---- outpaint ----------------------------------------------------------------------------------------------------


def extend_canvas(
    image: Image.Image, left: int, right: int, top: int, bottom: int, fill: str = "edge"
) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask) for outpainting: the image on a canvas grown by the given pixels, the new bands filled
    ("edge": the border pixels stretched outwards; "fill": A1111's blurred colours), the mask white exactly on the
    new bands. The canvas must come out a multiple of 8 in each direction; the original pixels are unchanged."""
    _check_extension(image, left, right, top, bottom)
    if fill not in OUTPAINT_FILLS:
        raise InvalidRequestError(f"unknown outpaint fill {fill!r}; choose one of: {', '.join(OUTPAINT_FILLS)}")
    image = image.convert("RGB")
    pixels = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")  # [H', W', 3]
    canvas = Image.fromarray(pixels, mode="RGB")
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    if fill == "fill":
        canvas = fill_masked(canvas, mask)
        canvas.paste(image, (left, top))
    return canvas, mask


def _check_extension(image: Image.Image, left: int, right: int, top: int, bottom: int) -> None:
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    for name, value in sides.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InvalidRequestError(f"outpaint {name} must be a whole number of pixels >= 0, not {value!r}")
    if not any(sides.values()):
        raise InvalidRequestError("outpaint needs at least one of left, right, top, bottom above 0")
    for axis, size, added in (("width", image.width, left + right), ("height", image.height, top + bottom)):
        rest = (size + added) % LATENT_MULTIPLE
        if rest:
            options = " or ".join(str(n) for n in (added - rest, added + LATENT_MULTIPLE - rest) if n >= 0)
            raise InvalidRequestError(
                f"outpainted {axis} {size}+{added}={size + added} is not a multiple of {LATENT_MULTIPLE}; "
                f"extend the {axis} by {options} pixels in total"
            )
