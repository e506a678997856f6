"""Image upscalers as the A1111 web UI 1.10 has them: the built-ins "None", "Lanczos" and "Nearest", and model files
(any upscaler spandrel recognises: ESRGAN, Real-ESRGAN and its compact SRVGG models, SwinIR, HAT, DAT, ...).

Contract (what the HTTP routes, hires fix and `cli.py upscale-image` use):

* `list_upscalers(folder=None) -> list[UpscalerFile]`: what A1111's /sdapi/v1/upscalers lists, in its order (the
  built-ins, then the files by name, case-insensitive); `item.as_a1111()` is the route's item (name, model_name,
  model_path, model_url, scale). NAME is A1111's display name ("R-ESRGAN 4x+" for RealESRGAN_x4plus.pth, else the
  file stem); the file stem is accepted too. `folder` None: `default_upscaler_dir()` ($SDRT_HOME/upscalers).
* `load_upscaler(name, folder=None, *, backend="onnxruntime", engines_dir=None, allow_pickle=False, tile_size=192,
  tile_overlap=8, memory_budget=None, progress=False) -> Upscaler`. Unknown names are an InvalidRequestError naming
  the choices; unreadable or unrecognised files a ModelError; .pth/.pt files need allow_pickle (read by the
  restricted unpickler: no code runs). The first load of a file exports it to ONNX (export.upscalers: needs torch
  and spandrel) into `<engines>/upscalers/<stem>-<sha256[:10]>/`; later loads, from any process, need neither.
* `upscaler.upscale(image: PIL.Image, scale: float) -> PIL.Image`: A1111's Upscaler.upscale. The target is
  (int(w * scale) // 8 * 8) x (int(h * scale) // 8 * 8); the model runs up to 3 times while the image is smaller
  than the target (once even at scale 1), then a Lanczos resize gives the exact target size. "None" changes nothing
  before that resize; "Lanczos"/"Nearest" resize to int(w * scale) x int(h * scale) first. A model runs tiled as
  A1111 tiles it (runtime.upscalers.tiling): the grid for ESRGAN-like models, tiled_upscale_2 for SwinIR, tile
  size and overlap 192 and 8 (A1111's ESRGAN_tile/ESRGAN_tile_overlap and SWIN_tile defaults; tile size 0: none).
  Its peak memory is estimated and checked against `memory_budget` (default: 80% of the available memory) before
  any work: over it, a ResourceError names the largest tile size that fits. `upscaler.interrupt_hook`: a callable
  checked between tiles.
* `resize_image(upscaler, image, width, height)`: A1111's images.resize_image(0, ...) with an upscaler, what its
  hires fix calls: upscale by max(width / w, height / h) when enlarging, then Lanczos to exactly width x height.

Backends: onnxruntime (the exported fp32 graph on the CPU provider), openvino (the same file), torch (spandrel's
module itself), all fp32. GPU backends (runtime.upscalers.gpu): onnxruntime-cuda runs the fp16 ONNX (export.fp16's
conversion) where spandrel says the architecture supports half precision, fp32 otherwise; torch-cuda spandrel's
module in fp16 (or fp32) on CUDA; tensorrt builds no engine for them and runs them as onnxruntime-cuda does (torch-cuda
where ONNX Runtime has no CUDA provider, onnxruntime on the CPU where neither is there). An fp16 output tile with
NaN/Inf is computed again in fp32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from PIL import Image

from ..errors import BackendUnavailableError, InvalidRequestError
from .files import UpscalerFile, check_folder, default_upscaler_dir, upscaler_files

__all__ = ["BUILTIN_UPSCALERS", "Upscaler", "UpscalerFile", "default_upscaler_dir", "find_upscaler",
           "list_upscalers", "load_upscaler", "resize_image"]  # fmt: skip

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST
BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")  # A1111's order at the top of its list
TILE_SIZE, TILE_OVERLAP = 192, 8  # A1111's ESRGAN_tile and ESRGAN_tile_overlap defaults
MODEL_BACKENDS = ("onnxruntime", "openvino", "torch", "onnxruntime-cuda", "torch-cuda", "tensorrt")
GPU_MODEL_BACKENDS = ("onnxruntime-cuda", "torch-cuda", "tensorrt")  # runtime.upscalers.gpu
MAX_PASSES = 3  # A1111's Upscaler.upscale runs the model at most three times


class Upscaler(Protocol):
    name: str

    def do_upscale(self, image: Image.Image, scale: float) -> Image.Image: ...

    def upscale(self, image: Image.Image, scale: float) -> Image.Image: ...


class BuiltinUpscaler:
    """A1111's UpscalerNone, UpscalerLanczos and UpscalerNearest."""

    def __init__(self, name: str):
        self.name = name
        self.resample = {"Lanczos": LANCZOS, "Nearest": NEAREST}.get(name)

    def do_upscale(self, image: Image.Image, scale: float) -> Image.Image:
        if self.resample is None:
            return image
        return image.resize((int(image.width * scale), int(image.height * scale)), resample=self.resample)

    def upscale(self, image: Image.Image, scale: float) -> Image.Image:
        return upscale_passes(self, image, scale)


def target_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's destination of upscale(): each side times `scale`, floored to a multiple of 8."""
    if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
        raise InvalidRequestError(f"the upscale factor must be a positive number, not {scale!r}")
    dest = int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)
    if min(dest) < 8:
        raise InvalidRequestError(f"upscaling {width}x{height} by {scale:g} leaves an image under 8 pixels")
    return dest


def upscale_passes(upscaler: Upscaler, image: Image.Image, scale: float) -> Image.Image:
    """A1111's Upscaler.upscale over `upscaler.do_upscale`."""
    dest_w, dest_h = target_size(image.width, image.height, scale)
    for i in range(MAX_PASSES):
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        size = image.size
        image = upscaler.do_upscale(image, scale)
        if image.size == size:
            break
    if image.size != (dest_w, dest_h):
        image = image.resize((dest_w, dest_h), resample=LANCZOS)
    return image


def pass_sizes(width: int, height: int, scale: float, factor: int) -> list[tuple[int, int]]:
    """The input sizes of the model passes upscale_passes makes with a model of scale `factor`."""
    dest_w, dest_h = target_size(width, height, scale)
    sizes = []
    for i in range(MAX_PASSES):
        if width >= dest_w and height >= dest_h and (i > 0 or scale != 1):
            break
        sizes.append((width, height))
        if factor == 1:
            break
        width, height = width * factor, height * factor
    return sizes or [(width, height)]


def resize_image(upscaler: Upscaler | None, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's images.resize_image(0, image, width, height, upscaler_name): Lanczos alone for no upscaler ("None")
    or a mask; else the upscaler by max(width / w, height / h) when that enlarges, then Lanczos to the exact size."""
    if upscaler is None or upscaler.name == "None" or image.mode == "L":
        return image.resize((width, height), resample=LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = upscaler.upscale(image, scale)
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    return image


def list_upscalers(folder: str | os.PathLike | None = None) -> list[UpscalerFile]:
    """The built-ins, then the upscaler files of `folder` (default: default_upscaler_dir()), as A1111 lists them."""
    builtins = [UpscalerFile(name, None, 4) for name in BUILTIN_UPSCALERS]
    return builtins + upscaler_files(check_folder(folder))


def find_upscaler(name: str, folder: str | os.PathLike | None = None) -> UpscalerFile:
    """The upscaler called `name` (A1111's display name, else a file stem; exact first, then ignoring case)."""
    entries = list_upscalers(folder)
    exact = [e for e in entries if name in (e.name, e.model_name)]
    folded = [e for e in entries if name.lower() in (e.name.lower(), (e.model_name or "").lower())]
    if exact or folded:
        return (exact or folded)[0]
    where = check_folder(folder)
    raise InvalidRequestError(
        f"unknown upscaler {name!r}; choose one of: {', '.join(e.name for e in entries)} (model files go in {where})"
    )


def load_upscaler(
    name: str,
    folder: str | os.PathLike | None = None,
    *,
    backend: str = "onnxruntime",
    engines_dir: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    tile_size: int = TILE_SIZE,
    tile_overlap: int = TILE_OVERLAP,
    memory_budget: int | None = None,
    progress: bool = False,
) -> Upscaler:
    """The upscaler called `name`, ready to run on `backend` (see the module's contract)."""
    from .tiling import check_tiling

    check_tiling(tile_size, tile_overlap)
    entry = find_upscaler(name, folder)
    if entry.path is None:
        return BuiltinUpscaler(entry.name)
    from ..cache import engines_dir_or_default
    from .model import ModelUpscaler

    if backend not in MODEL_BACKENDS:
        raise BackendUnavailableError(
            f"upscaler models run on {', '.join(MODEL_BACKENDS)}; not on {backend} yet (use one of those)"
        )
    if backend in GPU_MODEL_BACKENDS:  # what runs it (what is missing: an error before any export)
        from .gpu import runner

        backend = runner(backend)
    engines = engines_dir_or_default(engines_dir)
    artifacts, meta = _exported(entry.path, engines, allow_pickle)
    session = _session(backend, artifacts, entry.path, allow_pickle, meta)
    return ModelUpscaler(entry.name, entry.path, meta, session, tile_size, tile_overlap, memory_budget, progress)


def _exported(path: Path, engines: Path, allow_pickle: bool) -> tuple[Path, dict]:
    """(artifact folder, facts) of upscaler file `path`, exporting it first when it has not been."""
    from .files import artifact_folder, file_sha256, read_meta, read_upscaler_file

    folder = artifact_folder(engines, path, file_sha256(engines, path))
    meta = read_meta(folder)
    if meta is None:
        read_upscaler_file(path, allow_pickle)  # the file's own errors (a pickle, no tensors) before any import
        try:
            from export.upscalers import export_upscaler
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the first use of an upscaler file exports it, which needs torch and spandrel ({exc}): "
                "pip install -e .[export] && pip install --no-deps spandrel"
            ) from exc
        folder = export_upscaler(path, engines, allow_pickle)
        meta = read_meta(folder)
    return folder, meta


def _session(backend: str, folder: Path, path: Path, allow_pickle: bool, meta: dict):
    """What runs the model: `run({"image": x}, ["upscaled"])` on the chosen backend."""
    from ..backends import check_backend, cpu_threads
    from .files import model_path

    if backend in GPU_MODEL_BACKENDS:
        from .gpu import gpu_session

        return gpu_session(backend, folder, meta, path, allow_pickle)
    check_backend(backend)
    if backend == "onnxruntime":
        from ..backends.onnxruntime import CPU_PROVIDERS, OnnxRuntimeSession

        return OnnxRuntimeSession(model_path(folder), "upscaler", CPU_PROVIDERS)
    if backend == "openvino":
        import openvino as ov

        from ..backends.openvino import OpenVinoSession

        threads = cpu_threads()
        config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        return OpenVinoSession(model_path(folder), "upscaler", ov.Core(), config)
    from export.upscalers import TorchUpscalerSession, load_descriptor

    return TorchUpscalerSession(load_descriptor(path, allow_pickle))
