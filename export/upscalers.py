"""Upscaler model files -> ONNX, once per file: spandrel recognises the architecture, torch traces it.

Reading: a .safetensors file, or a .pth/.pt pickle through runtime.torch_pickle's restricted unpickler (only with
allow_pickle; no code from the file runs, and spandrel's own loader, which would torch.jit.load a .pt, is never
used). spandrel (`pip install --no-deps spandrel`) detects the architecture from the tensor names and shapes and
builds the module: ESRGAN and Real-ESRGAN (RRDB), Real-ESRGAN compact (SRVGG), SwinIR, HAT, DAT and the others it
knows. Only RGB image-to-image models of purpose "SR" or "Restoration" are upscalers.

spandrel imports torchvision in two architectures that are not upscalers (LaMa, RestoreFormer). Where torchvision is
missing or does not load (PyPI's torchvision does not load beside the CPU torch sdrt pins), spandrel is imported
inside `torchvision_stand_in()`: a stand-in torchvision sits in sys.modules for the import only, and calling anything
from it raises an error that names the cause.

The ONNX model takes `image` float32 [1, C, H, W] (BGR in [0, 1], as A1111 feeds it) with dynamic H and W and
returns `upscaled` [1, C, H * s, W * s] before spandrel's clamp; the runtime pads, clamps and crops on the host as
spandrel's ImageModelDescriptor does. Some architectures pad their input to a multiple of their window inside the
model (spandrel's `pad_to_multiple`); a trace would freeze that padding at the traced size, so a probe run records
those paddings and the runtime applies them before the model instead. Every export is checked before it is
installed: the runtime's call (that padding, the ONNX model, the crop) must equal the torch module at two sizes other
than the traced one; a model for which it does not is refused.

fp16: where spandrel's descriptor says the architecture supports half precision (`supports_half`), the fp32 graph is
also converted by export.fp16's pass (the SD models' fp16 conversion: float32 IO, fp16 weights and compute, the
normalisations fp32) into `<folder>-fp16.onnx`, named in upscaler.json's `fp16_model`; the GPU backends run it. It is
checked on ONNX Runtime's CPU provider at the traced size: a converted model whose output is not finite or not
within FP16_TOLERANCE of the fp32 one (relative to the output's largest value) is not kept (`fp16_model` null, the
GPU backends then run fp32).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
import types
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from runtime.errors import BackendUnavailableError, ModelError
from runtime.upscalers.files import (
    EXPORT_VERSION,
    META_FILE,
    artifact_folder,
    file_sha256,
    model_path,
    read_meta,
    read_upscaler_file,
)

logger = logging.getLogger(__name__)

OPSET = 17
PURPOSES = ("SR", "Restoration")
WEIGHTED_TILING = ("SwinIR",)  # A1111 1.10 runs SwinIR through upscaler_utils.upscale_2; the others through the grid
CHECK_TOLERANCE = 1e-4  # largest |onnx - torch| accepted at the check sizes (float32 rounding is ~1e-6)
FP16_TOLERANCE = 1e-2  # largest |fp16 - fp32| / max |fp32| kept (fp16's own rounding is 4.9e-4 per operation)
SPANDREL_HINT = "pip install --no-deps spandrel (and pip install -e .[export] for torch and einops)"


class _Unavailable:
    """A torchvision name spandrel imports but no upscaler uses: using it raises, naming why."""

    def __init__(self, name: str):
        self._name = name

    def _fail(self, *args, **kwargs):
        raise BackendUnavailableError(
            f"torchvision.{self._name} is needed here, and torchvision is not installed (or does not load beside "
            "this torch); sdrt's upscalers do not use it"
        )

    __call__ = _fail

    def __getattr__(self, attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        self._fail()


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Unavailable(f"{self.__name__.partition('.')[2]}.{name}".lstrip("."))


STAND_IN_MODULES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


@contextlib.contextmanager
def torchvision_stand_in() -> Iterator[None]:
    """For the block: a stand-in torchvision in sys.modules when the real one cannot be imported; afterwards
    sys.modules holds exactly the torchvision entries it held before (none, usually)."""
    try:
        importlib.import_module("torchvision")
        yield
        return
    except Exception:  # absent, or built for another torch ("operator torchvision::nms does not exist")
        pass
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "torchvision"}
    for name in saved:
        del sys.modules[name]
    for name in STAND_IN_MODULES:
        sys.modules[name] = _StandInModule(name)
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        sys.modules.update(saved)


def import_spandrel():
    """The spandrel package (imported inside torchvision_stand_in()); BackendUnavailableError when absent."""
    try:
        with torchvision_stand_in():
            import spandrel
    except ImportError as exc:
        raise BackendUnavailableError(f"upscaler models need spandrel ({exc}): {SPANDREL_HINT}") from exc
    return spandrel


def load_descriptor(path: Path, allow_pickle: bool = False):
    """spandrel's ImageModelDescriptor of upscaler file `path` (fp32, CPU, eval mode); ModelError when spandrel does
    not recognise it or it is not an RGB upscaler."""
    import torch

    spandrel = import_spandrel()
    data = read_upscaler_file(path, allow_pickle)
    state = _to_torch(data, torch)
    try:
        descriptor = spandrel.MAIN_REGISTRY.load(state)
    except spandrel.UnsupportedModelError:
        raise ModelError(f"{path} is not a model spandrel {spandrel.__version__} recognises") from None
    except (KeyError, ValueError, RuntimeError, AssertionError, IndexError, TypeError) as exc:
        raise ModelError(f"{path}: spandrel could not build its model ({type(exc).__name__}: {exc})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in PURPOSES:
        raise ModelError(f"{path} is a {descriptor.architecture.name} {descriptor.purpose} model, not an upscaler")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ModelError(f"{path} takes {descriptor.input_channels} channels and gives "
                         f"{descriptor.output_channels}; upscalers work on RGB images (3)")  # fmt: skip
    descriptor.model.float().eval()
    return descriptor


def _to_torch(data: dict, torch) -> dict:
    """Nested dicts of numpy arrays -> the same with torch tensors (copied: the arrays may be read-only maps)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(np.array(value))
        elif isinstance(value, dict):
            out[key] = _to_torch(value, torch)
        else:
            out[key] = value
    return out


def export_upscaler(path: Path, engines_dir: Path, allow_pickle: bool = False) -> Path:
    """The artifact folder of upscaler file `path` under `engines_dir` (exported now unless it is there)."""
    path = Path(path)
    folder = artifact_folder(engines_dir, path, file_sha256(engines_dir, path))
    if read_meta(folder) is not None:
        return folder
    started = time.perf_counter()
    descriptor = load_descriptor(path, allow_pickle)
    with _building(folder) as work, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)  # spandrel's Swin models
        padding, memory = probe(descriptor)
        sample = _sample_side(descriptor, padding)
        onnx_file = work / model_path(folder).name
        trace(descriptor.model, sample, onnx_file)
        check_export(descriptor, onnx_file, padding, sample, path)
        meta = describe(descriptor, padding, memory, path, folder)
        meta["fp16_model"] = export_fp16(onnx_file, sample, path) if descriptor.supports_half else None
        (work / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    logger.info("exported upscaler %s (%s, %dx) in %.1f s", path.name, meta["architecture"], meta["scale"],
                time.perf_counter() - started)  # fmt: skip
    return folder


def describe(descriptor, padding: dict | None, memory: dict, path: Path, folder: Path) -> dict:
    """The facts upscaler.json holds for the runtime."""
    import spandrel
    import torch

    requirements = descriptor.size_requirements
    return {
        "export_version": EXPORT_VERSION,
        "source": {"path": str(path), "name": path.stem, "folder": folder.name},
        "architecture": descriptor.architecture.id,
        "architecture_name": descriptor.architecture.name,
        "tags": list(descriptor.tags),
        "purpose": descriptor.purpose,
        "scale": int(descriptor.scale),
        "size_requirements": dict(
            minimum=requirements.minimum, multiple_of=requirements.multiple_of, square=requirements.square
        ),
        "input_padding": padding,
        "supports_half": bool(descriptor.supports_half),
        "tiling": "weighted" if descriptor.architecture.id in WEIGHTED_TILING else "grid",
        "memory": memory,
        "tools": {"torch": torch.__version__, "spandrel": spandrel.__version__, "opset": OPSET},
    }


@contextlib.contextmanager
def _recorded_paddings(calls: list) -> Iterator[None]:
    """For the block: spandrel's `pad_to_multiple` in every loaded architecture module records each call (the
    tensor, the multiple, mode and value) in `calls` before padding; the modules get the original back after."""
    patched = []
    for name, module in list(sys.modules.items()):
        original = getattr(module, "pad_to_multiple", None) if name.startswith("spandrel.architectures.") else None
        if original is None:
            continue

        def recording(tensor, multiple, *, mode, value=0.0, _original=original):
            calls.append((tensor, int(multiple), mode, float(value)))
            return _original(tensor, multiple, mode=mode, value=value)

        patched.append((module, original))
        module.pad_to_multiple = recording
    try:
        yield
    finally:
        for module, original in patched:
            module.pad_to_multiple = original


def probe(descriptor) -> tuple[dict | None, dict]:
    """Run the model once on a random image: (the padding it applies to its own input, which the runtime must apply
    on the host instead; its memory facts: the largest module output in bytes per input pixel, and its weights)."""
    import torch

    side = max(32, descriptor.size_requirements.minimum)
    side = math.ceil(side / descriptor.size_requirements.multiple_of) * descriptor.size_requirements.multiple_of
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    largest = [0]

    def record(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            largest[0] = max(largest[0], output.numel())

    calls: list = []
    hooks = [m.register_forward_hook(record) for m in descriptor.model.modules()]
    try:
        with torch.no_grad(), _recorded_paddings(calls):
            descriptor.model(image)
    finally:
        for hook in hooks:
            hook.remove()
    own = [(multiple, mode, value) for tensor, multiple, mode, value in calls if tensor.shape[-2:] == image.shape[-2:]]
    if len({(mode, value) for _, mode, value in own}) > 1:
        raise ModelError(f"a {descriptor.architecture.name} model pads its input in two ways; not supported yet")
    padding = None
    if own:
        multiple = math.lcm(*(m for m, _, _ in own))
        padding = {"multiple": multiple, "mode": own[0][1], "value": own[0][2]}
    weights = sum(p.numel() * p.element_size() for p in descriptor.model.parameters())
    memory = {"bytes_per_pixel": 4 * largest[0] / side**2, "weights_bytes": int(weights)}
    return padding, memory


def _sample_side(descriptor, padding: dict | None) -> int:
    """The traced image side: a multiple of every padding multiple, at least the model's minimum."""
    multiple = math.lcm(descriptor.size_requirements.multiple_of, padding["multiple"] if padding else 1, 16)
    return math.ceil(max(32, descriptor.size_requirements.minimum) / multiple) * multiple


def trace(model, side: int, target: Path) -> None:
    """torch.onnx.export (TorchScript exporter) of `model` on a side x side image, height and width dynamic."""
    import torch

    from .onnx_export import quiet_tracing

    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), quiet_tracing(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            model,
            (image,),
            str(target),
            input_names=["image"],
            output_names=["upscaled"],
            dynamic_axes={"image": {2: "height", 3: "width"}, "upscaled": {2: "out_height", 3: "out_width"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def check_export(descriptor, onnx_path: Path, padding: dict | None, side: int, source: Path) -> None:
    """ModelError unless the model call the runtime makes (the recorded padding on the host, the ONNX model, the
    crop) equals the torch module at two sizes other than the traced one, sizes its own padding changes."""
    import onnxruntime as ort
    import torch

    from runtime.upscalers.model import pad_input

    step, scale = descriptor.size_requirements.multiple_of, descriptor.scale
    unconstrained = {"minimum": 0, "multiple_of": 1, "square": False}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(2)
    for height, width in ((side + step, side + 3 * step), (side + 5 * step, side + 2 * step)):
        image = torch.rand(1, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = descriptor.model(image).numpy()
        try:
            feed = pad_input(image.numpy(), unconstrained, padding)
            got = session.run(["upscaled"], {"image": feed})[0][:, :, : height * scale, : width * scale]
        except Exception as exc:  # onnxruntime's own exception types
            reason = str(exc).splitlines()[0][:160]
            raise ModelError(
                f"{source}: its ONNX export does not run at {width}x{height} ({reason}); this architecture is not "
                "supported yet"
            ) from None
        if got.shape != expected.shape or not np.allclose(got, expected, rtol=0, atol=CHECK_TOLERANCE):
            raise ModelError(
                f"{source}: its ONNX export differs from the torch model at {width}x{height}; this architecture is "
                "not supported yet"
            )


def export_fp16(onnx_file: Path, side: int, source: Path) -> str | None:
    """Write the fp16 conversion of the fp32 upscaler graph `onnx_file` beside it (`<stem>-fp16.onnx`) and return
    its file name; None (nothing written) when its check on ONNX Runtime's CPU provider fails."""
    import onnx
    import onnxruntime as ort

    from .fp16 import _float_types, convert_model

    target = onnx_file.with_name(f"{onnx_file.stem}-fp16.onnx")
    model = onnx.load(str(onnx_file))
    convert_model(model, _float_types(onnx_file))
    onnx.save_model(model, str(target))
    image = np.random.default_rng(3).random((1, 3, side, side), dtype=np.float32)
    try:
        expected = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"image": image})
        got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"image": image})
        error = float(np.abs(got[0] - expected[0]).max() / max(float(np.abs(expected[0]).max()), 1e-6))
    except Exception as exc:  # onnxruntime's own exception types
        reason, error = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__, float("nan")
    else:
        reason = f"relative error {error:.2g} over {FP16_TOLERANCE:g}"
    if not error <= FP16_TOLERANCE:  # NaN included
        target.unlink()
        logger.warning("%s: no fp16 model (%s); the GPU backends run it in fp32", source.name, reason)
        return None
    logger.info("%s: fp16 model within %.2g of fp32 (relative)", source.name, error)
    return target.name


@contextlib.contextmanager
def _building(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target`, renamed to it on success and removed on any failure."""
    work = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    work.mkdir(parents=True)
    try:
        yield work
        if read_meta(target) is not None:  # another process exported the same file meanwhile: keep that one
            return
        if target.exists():  # an unfinished export, or one of an older export version
            shutil.rmtree(target, ignore_errors=True)
        try:
            work.rename(target)
        except OSError:
            if read_meta(target) is None:  # not a concurrent export of the same file
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


class TorchUpscalerSession:
    """The torch backend's upscaler: spandrel's module itself behind the ONNX model's contract (`image` float32 in,
    `upscaled` float32 out, before the clamp), so the host-side padding, tiling and rounding are the same code.
    torch-cuda: `device` "cuda" and `dtype` "float16" (where the architecture supports half precision; a name, so
    that the runtime asks for it without importing torch); the module is moved and cast in place, the input cast to
    `dtype` on the device, the output returned as float32."""

    def __init__(self, descriptor, device: str = "cpu", dtype: str = "float32"):
        import torch

        self.descriptor = descriptor
        self.device, self.dtype = torch.device(device), getattr(torch, dtype)
        self.component = f"upscaler ({self.device.type}, {str(self.dtype).removeprefix('torch.')})"
        descriptor.model.to(device=self.device, dtype=self.dtype)

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        import torch

        image = torch.from_numpy(np.ascontiguousarray(feeds["image"], dtype=np.float32))
        with torch.no_grad():
            upscaled = self.descriptor.model(image.to(self.device, self.dtype))
        return {"upscaled": upscaled.float().cpu().numpy()}
