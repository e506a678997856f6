"""A1111's "Extras" upscale, as its API runs it (/sdapi/v1/extra-single-image and /extra-batch-images).

Sources followed (no code taken from them): A1111 1.10 `scripts/postprocessing_upscale.py`
(ScriptPostprocessingUpscale: upscale, process), `modules/postprocessing.py` (run_postprocessing, run_extras) and
`modules/images.py` (read_info_from_image).

* Upscaler 1 ("None": the image unchanged, no info) upscales by `upscaling_resize` (resize_mode 0), or to cover
  `upscaling_resize_w` x `upscaling_resize_h` (resize_mode 1: by max(w / width, h / height)), through the upscaler's
  own Upscaler.upscale (runtime.upscalers: model passes, then Lanczos to the size floored to a multiple of 8). With
  resize_mode 1 and `upscaling_crop`, the result is pasted centred on a black canvas of exactly w x h.
* Upscaler 2, with a visibility above 0, upscales the original the same way and is blended in:
  Image.blend(first, second, visibility).
* The info text is A1111's ("Postprocess upscale by: 2.0, Postprocess upscaler: Lanczos", ...); the output keeps the
  input image's text chunks (its generation "parameters") and adds it as "postprocessing".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from ..errors import InvalidRequestError

# PIL info keys that are not text A1111 carries over (its images.IGNORED_INFO_KEYS)
IGNORED_INFO_KEYS = {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "exif", "loop", "background",
                     "timestamp", "duration", "progressive", "progression", "icc_profile", "chromaticity",
                     "photoshop"}  # fmt: skip


@dataclass(frozen=True)
class ExtrasOptions:
    """The upscale fields of A1111's ExtrasBaseRequest, with its defaults."""

    upscaler_1: str = "None"
    upscaler_2: str = "None"
    upscaler_2_visibility: float = 0.0  # extras_upscaler_2_visibility
    resize_mode: int = 0  # 0: by upscaling_resize; 1: to upscaling_resize_w x upscaling_resize_h
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True

    def __post_init__(self):
        if self.resize_mode not in (0, 1):
            raise InvalidRequestError(f"resize_mode must be 0 (scale by) or 1 (scale to), not {self.resize_mode!r}")
        if not 0 <= self.upscaler_2_visibility <= 1:
            visibility = self.upscaler_2_visibility
            raise InvalidRequestError(f"extras_upscaler_2_visibility must be in [0, 1], not {visibility}")
        if not 0 < self.upscaling_resize <= 8:
            raise InvalidRequestError(f"upscaling_resize must be in (0, 8], not {self.upscaling_resize}")
        for name in ("upscaling_resize_w", "upscaling_resize_h"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be at least 1, not {getattr(self, name)}")

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The size of the result for a width x height input (for limits checked before any work)."""
        if self.upscaler_1 == "None":
            return width, height
        if self.resize_mode == 1 and self.upscaling_crop:
            return self.upscaling_resize_w, self.upscaling_resize_h
        scale = self._scale(width, height)
        return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)

    def _scale(self, width: int, height: int) -> float:
        if self.resize_mode == 1:
            return max(self.upscaling_resize_w / width, self.upscaling_resize_h / height)
        return self.upscaling_resize


@dataclass
class ExtrasResult:
    """The upscaled images (PIL, with their text chunks in .info) and each one's A1111 postprocessing text."""

    images: list[Image.Image]
    infotexts: list[str]
    interrupted: bool = False


def quote(value) -> str:
    """A1111's infotext_utils.quote: values with a comma, colon or line break as a JSON string."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def infotext(info: dict) -> str:
    return ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in info.items() if v is not None)


def text_chunks(image: Image.Image) -> dict[str, str]:
    """The text an image carries (its PNG text chunks), as A1111 keeps it for the output."""
    return {k: v for k, v in (image.info or {}).items()
            if isinstance(k, str) and isinstance(v, str) and k not in IGNORED_INFO_KEYS}  # fmt: skip


def model_upscaler(model, name: str):
    """The runtime.upscalers upscaler `name` for `model` (a StableDiffusion): its upscaler folder, backend, pickle
    permission and memory budget (exports in the default artifact folder); loaded once per model and name."""
    from ..upscalers import MODEL_BACKENDS, load_upscaler

    if name not in model.upscalers:
        backend = model.backend.name if model.backend.name in MODEL_BACKENDS else "onnxruntime"
        model.upscalers[name] = load_upscaler(name, model.upscaler_dir, backend=backend,
                                              allow_pickle=model.allow_pickle,
                                              memory_budget=model.memory_budget)  # fmt: skip
    upscaler = model.upscalers[name]
    upscaler.interrupt_hook = model.interrupt_hook
    return upscaler


def postprocess(images: list[Image.Image], options: ExtrasOptions, load: Callable) -> ExtrasResult:
    """Every image through A1111's extras upscale; `load(name)`: the runtime.upscalers upscaler called `name`."""
    first = None if options.upscaler_1 == "None" else load(options.upscaler_1)
    second = None if options.upscaler_2 == "None" else load(options.upscaler_2)  # refused when unknown, as A1111
    outputs, texts = [], []
    for image in images:
        chunks = text_chunks(image)
        result, info = _upscale_one(image.convert("RGB"), options, first, second)
        text = infotext(info)
        result.info = {**chunks, "postprocessing": text}
        outputs.append(result)
        texts.append(text)
    return ExtrasResult(outputs, texts)


def _upscale_one(image: Image.Image, options: ExtrasOptions, first, second) -> tuple[Image.Image, dict]:
    info: dict = {}
    if first is None:
        return image, info
    upscaled = _upscale(image, info, first, options)
    info["Postprocess upscaler"] = first.name
    if second is not None and options.upscaler_2_visibility > 0:
        other = _upscale(image, info, second, options)
        if other.mode != upscaled.mode:
            other = other.convert(upscaled.mode)
        upscaled = Image.blend(upscaled, other, options.upscaler_2_visibility)
        info["Postprocess upscaler 2"] = second.name
    return upscaled, info


def _upscale(image: Image.Image, info: dict, upscaler, options: ExtrasOptions) -> Image.Image:
    """ScriptPostprocessingUpscale.upscale (no max side length: A1111's API sends none)."""
    width, height = options.upscaling_resize_w, options.upscaling_resize_h
    if options.resize_mode == 1:
        info["Postprocess upscale to"] = f"{width}x{height}"
    else:
        info["Postprocess upscale by"] = options.upscaling_resize
    image = upscaler.upscale(image, options._scale(image.width, image.height))
    if options.resize_mode == 1 and options.upscaling_crop:
        canvas = Image.new("RGB", (width, height))
        canvas.paste(image, box=(width // 2 - image.width // 2, height // 2 - image.height // 2))
        image = canvas
        info["Postprocess crop to"] = f"{image.width}x{image.height}"
    return image
