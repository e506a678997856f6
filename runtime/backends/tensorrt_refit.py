"""LoRA on TensorRT: refit a refittable engine (built with `cli.py build --refit`) to base + patch weights.

Names: the weight map (runtime.lora.weight_map, written at export) takes a diffusers parameter name to the fp32
ONNX initializer holding it (maybe transposed); the fp16 export stores that initializer as `<name>__fp16`; the
engine's refittable weights carry the ONNX initializer names. Every call starts from the base weights: names a
previous call patched and this one does not are set back to their base values, so no stale blend survives.
A refit that fails raises; the captured CUDA graphs are dropped either way.
"""

from __future__ import annotations

import logging

import numpy as np

from ..errors import ModelError

logger = logging.getLogger(__name__)


def engine_weight_name(onnx_name: str, refittable: set[str]) -> str | None:
    """The engine's name for an fp32 ONNX initializer: its fp16 copy if the engine has that, else itself."""
    for name in (f"{onnx_name}__fp16", onnx_name):
        if name in refittable:
            return name
    return None


def patch_targets(mapping: dict, values: dict[str, np.ndarray], refittable: set[str]) -> dict[str, np.ndarray]:
    """{engine weight name: value in the initializer's orientation} for each patched parameter."""
    by_parameter = {m.parameter: (name, m.transposed, m.shape) for name, m in mapping.items()}
    targets = {}
    for parameter, value in values.items():
        if parameter not in by_parameter:
            raise ModelError(f"the engine has no refittable weight for parameter {parameter!r}")
        onnx_name, transposed, shape = by_parameter[parameter]
        if tuple(value.shape) != tuple(shape):
            raise ModelError(f"{parameter}: a value of shape {tuple(value.shape)} for a parameter of shape {shape}")
        name = engine_weight_name(onnx_name, refittable)
        if name is None:
            raise ModelError(f"{parameter} ({onnx_name}) is not refittable in this engine (folded at build time)")
        targets[name] = np.asarray(value, np.float32).T if transposed else np.asarray(value, np.float32)
    return targets


def as_engine_dtype(name: str, value: np.ndarray, dtype=None) -> np.ndarray:
    """fp16 weights clamped to fp16's finite range; others float32. `dtype` is the engine's own type for the
    weight (the refitter's prototype) where TensorRT reports it; otherwise the `__fp16` name suffix decides."""
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype == np.float16:
            limit = float(np.finfo(np.float16).max)
            return np.ascontiguousarray(np.clip(value, -limit, limit).astype(np.float16))
        return np.ascontiguousarray(value, dtype)
    if name.endswith("__fp16"):
        limit = float(np.finfo(np.float16).max)
        return np.ascontiguousarray(np.clip(value, -limit, limit).astype(np.float16))
    return np.ascontiguousarray(value, np.float32)


def refit_component(backend, component: str, engines: list, values: dict[str, np.ndarray]) -> None:
    """Refit every engine of `component` to base + `values` (parameter name -> full new float32 value)."""
    from ..lora.weight_map import onnx_initializers, read_weight_map, weight_map_path

    trt = backend.trt
    mapping = read_weight_map(weight_map_path(backend.folder / "onnx" / f"{component}.onnx"))
    fp16_model = backend.folder / "fp16" / "onnx" / f"{component}.onnx"
    patched = backend._base_weights.setdefault(component, {})  # engine weight name -> base value
    targets: dict[str, np.ndarray] = {}
    for engine in engines:
        if not engine.engine.refittable:
            raise ModelError(f"{engine.plan.name} is not refittable: rebuild with python cli.py build --refit")
        refitter = trt.Refitter(engine.engine, backend.logger)
        refittable = set(refitter.get_all_weights())
        targets = patch_targets(mapping, values, refittable)
        missing = [n for n in targets if n not in patched]
        for name, base in onnx_initializers(fp16_model, missing):
            patched[name] = base
        keep_alive = []  # the host arrays must outlive refit_cuda_engine
        for name in set(patched) | set(targets):
            array = as_engine_dtype(name, targets[name] if name in targets else patched[name],
                                    _engine_dtype(trt, refitter, name))  # fmt: skip
            keep_alive.append(array)
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise ModelError(f"{engine.plan.name}: TensorRT rejects new values for {name} "
                                 f"({array.dtype}, {array.size} values)")  # fmt: skip
        fused = list(refitter.get_missing_weights())  # weights TensorRT combined with those set: base values
        for name, base in onnx_initializers(fp16_model, fused):
            array = as_engine_dtype(name, base, _engine_dtype(trt, refitter, name))
            keep_alive.append(array)
            refitter.set_named_weights(name, trt.Weights(array))
        still = list(refitter.get_missing_weights())
        if still:
            engine.invalidate_graphs()
            raise ModelError(f"refitting {engine.plan.name} also needs {len(still)} weights not in "
                             f"{fp16_model.name}, e.g. {still[0]}")  # fmt: skip
        ok = refitter.refit_cuda_engine()
        engine.invalidate_graphs()
        if not ok:
            raise ModelError(f"refitting {engine.plan.name} failed (see TensorRT's log)")
    for name in [n for n in patched if n not in targets]:
        del patched[name]  # back at base: nothing to restore next time
    logger.info("%s: refitted %d weights", component, len(values))


def _engine_dtype(trt, refitter, name: str):
    """The numpy type TensorRT expects for weight `name` (its prototype, TensorRT >= 10.x), or None if unknown."""
    prototype = getattr(refitter, "get_weights_prototype", None)
    if prototype is None:
        return None
    try:
        return np.dtype(trt.nptype(prototype(name).dtype))
    except Exception:  # an older binding, or a type numpy lacks: fall back to the name rule
        return None
