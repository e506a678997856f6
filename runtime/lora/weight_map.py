"""Which ONNX initializer holds which diffusers parameter: the map LoRA (and TensorRT refit) patch weights through.

The TorchScript exporter renames weights (`onnx::MatMul_123`) and stores Linear weights transposed, so the map is
found by value: every UNet and text-encoder parameter is fingerprinted (shape + sha256 of its float32 bytes, also of
its transpose), then every ONNX initializer is looked up by the same fingerprint. A fingerprint several parameters
share (identical values, e.g. fresh LayerNorm weights) is ambiguous and left out, and so is an initializer no
parameter produced (folded constants). The map is written beside the model at export:

    onnx/<component>.weight_map.json
    {"format": 1, "component": "unet",
     "initializers": {"onnx::MatMul_123": {"parameter": "down_blocks.0...to_q.weight", "transposed": true,
                                           "shape": [320, 320]}}}

`shape` is the parameter's (diffusers) shape; a transposed initializer holds its transpose.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..manifest import atomic_write_bytes

MAP_FORMAT = 1
MAPPED_COMPONENTS = ("text_encoder", "text_encoder_2", "unet")  # text_encoder_2: SDXL's second (a refiner's only)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
Fingerprint = tuple[tuple[int, ...], str]


@dataclass(frozen=True)
class MappedInitializer:
    parameter: str  # the diffusers parameter name, e.g. "text_model.encoder.layers.0.self_attn.q_proj.weight"
    transposed: bool  # the initializer holds the parameter's transpose (a Linear weight feeding MatMul)
    shape: tuple[int, ...]  # the parameter's shape


def canonical_parameter_name(component: str, name: str) -> str:
    """The name LoRA files and the backend weight interface use: transformers 5's CLIPTextModel dropped the
    `text_model.` level that transformers 4 (and every LoRA file) has, so it is put back here (SDXL's second encoder,
    CLIPTextModelWithProjection, keeps it; its `text_projection` sits beside `text_model`)."""
    if component in TEXT_ENCODERS and not name.startswith(("text_model.", "text_projection.")):
        return "text_model." + name
    return name


def weight_map_path(model_path: Path) -> Path:
    """`onnx/unet.onnx` -> `onnx/unet.weight_map.json`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".onnx") + ".weight_map.json")


def fingerprint(array: np.ndarray) -> Fingerprint:
    """Shape and sha256 of the float32 C-order bytes: equal exactly when the values are bit-identical."""
    data = np.ascontiguousarray(array, dtype=np.float32)
    return tuple(data.shape), hashlib.sha256(data.tobytes()).hexdigest()


def parameter_fingerprints(parameters: Iterable[tuple[str, np.ndarray]]) -> dict[Fingerprint, tuple[str, bool]]:
    """Fingerprint -> (parameter name, transposed) for every floating parameter and, for 2-D ones, its transpose.

    Fingerprints that more than one (parameter, orientation) produce are dropped: they cannot be told apart.
    """
    found: dict[Fingerprint, tuple[str, bool]] = {}
    ambiguous: set[Fingerprint] = set()
    for name, value in parameters:
        if value.dtype.kind != "f":
            continue
        views = [(value, False)] + ([(value.T, True)] if value.ndim == 2 else [])
        for view, transposed in views:
            key = fingerprint(view)
            if key in found or key in ambiguous:
                found.pop(key, None)
                ambiguous.add(key)
            else:
                found[key] = (name, transposed)
    return found


def match_initializers(
    initializers: Iterable[tuple[str, np.ndarray]], fingerprints: Mapping[Fingerprint, tuple[str, bool]]
) -> dict[str, MappedInitializer]:
    """Initializer name -> the parameter it holds; a parameter claimed by two initializers maps to neither."""
    matched: dict[str, MappedInitializer] = {}
    owners: dict[str, list[str]] = {}
    for name, value in initializers:
        hit = fingerprints.get(fingerprint(value)) if value.dtype == np.float32 else None
        if hit is None:
            continue
        parameter, transposed = hit
        shape = tuple(value.T.shape) if transposed else tuple(value.shape)
        matched[name] = MappedInitializer(parameter, transposed, shape)
        owners.setdefault(parameter, []).append(name)
    for names in owners.values():
        if len(names) > 1:
            for name in names:
                del matched[name]
    return matched


def write_weight_map(path: Path, component: str, mapping: Mapping[str, MappedInitializer]) -> None:
    """Write the map atomically (see the module docstring for the layout)."""
    initializers = {
        name: {"parameter": m.parameter, "transposed": m.transposed, "shape": list(m.shape)}
        for name, m in sorted(mapping.items())
    }
    text = json.dumps({"format": MAP_FORMAT, "component": component, "initializers": initializers}, indent=1)
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def read_weight_map(path: Path) -> dict[str, MappedInitializer]:
    """The map written by write_weight_map; ModelError when it is unreadable or of another format."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != MAP_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {MAP_FORMAT}")
        return {
            name: MappedInitializer(str(m["parameter"]), bool(m["transposed"]), tuple(int(d) for d in m["shape"]))
            for name, m in data["initializers"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"cannot read the weight map {path} ({str(exc)[:160]}); re-export with --force") from exc


def onnx_initializers(model_path: Path, names: Iterable[str] | None = None) -> Iterable[tuple[str, np.ndarray]]:
    """(name, value) of the initializers of an ONNX file (only `names` when given), external data included.

    Needs the `onnx` package; only the wanted tensors' external data is read.
    """
    try:
        import onnx
        from onnx import numpy_helper
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
    except ImportError as exc:
        raise ModelError("reading ONNX weights (for LoRA) needs the 'onnx' package: pip install onnx") from exc
    model = onnx.load(str(model_path), load_external_data=False)
    wanted = None if names is None else set(names)
    for tensor in model.graph.initializer:
        if wanted is not None and tensor.name not in wanted:
            continue
        external = uses_external_data(tensor)
        if external:
            load_external_data_for_tensor(tensor, str(Path(model_path).parent))
        yield tensor.name, numpy_helper.to_array(tensor)
        if external:  # keep one large tensor in memory at a time, not the whole UNet
            tensor.ClearField("raw_data")


def build_weight_map(
    model_path: Path, component: str, fingerprints: Mapping[Fingerprint, tuple[str, bool]]
) -> dict[str, MappedInitializer]:
    """Match the initializers of `model_path` against parameter_fingerprints(...) of the component's diffusers
    module and write the map beside the model."""
    mapping = match_initializers(onnx_initializers(model_path), fingerprints)
    write_weight_map(weight_map_path(model_path), component, mapping)
    return mapping


def base_parameters(
    model_path: Path, mapping: Mapping[str, MappedInitializer], parameters: Iterable[str]
) -> dict[str, np.ndarray]:
    """The base float32 values of `parameters` (diffusers names, parameter orientation) read from the ONNX file."""
    by_parameter = {m.parameter: (name, m.transposed) for name, m in mapping.items()}
    wanted = {by_parameter[p][0]: p for p in parameters}
    values = {}
    for name, value in onnx_initializers(model_path, wanted):
        values[wanted[name]] = np.ascontiguousarray(value.T if mapping[name].transposed else value, np.float32)
    return values


def ensure_weight_map(folder: Path, manifest, component: str) -> dict[str, MappedInitializer]:
    """The weight map of `component` in an artifact folder. An export made before maps existed gets one now,
    from its source checkpoint (needs the export extras); without that, a ModelError asks for a re-export."""
    info = manifest.components.get(component)
    if info is None:
        raise ModelError(f"{folder} has no {component} model; re-export with --force")
    model_path = Path(folder) / info.file
    path = weight_map_path(model_path)
    if path.is_file():
        return read_weight_map(path)
    source = Path(manifest.source.get("path", ""))
    try:
        from export.onnx_export import load_module, weight_fingerprints
    except ImportError:
        load_module = None
    if load_module is None or not any((source / component).glob("*.safetensors")):
        raise ModelError(f"{folder} was exported without a weight map, which LoRA needs; re-export with --force")
    fingerprints = weight_fingerprints(component, load_module(component, source, True))
    return build_weight_map(model_path, component, fingerprints)
