"""Cleaning a freshly traced ONNX model: fold constants (Polygraphy), prune, infer shapes, save.

Models over 2 GiB (the fp32 SD UNet is ~3.4 GB) cannot be one protobuf: they are saved with their weights in
`<name>.onnx.data` beside the graph, and shape inference then runs from the path.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import onnx

logger = logging.getLogger(__name__)

EXTERNAL_DATA_THRESHOLD = 2**31 - 2**24  # bytes of weights above which the model keeps them outside the proto


def external_data_name(path: Path) -> str:
    """The file name of a model's external weights: `unet.onnx` -> `unet.onnx.data`."""
    return Path(path).name + ".data"


def clean_onnx(raw_path: Path, out_path: Path, io_shapes: dict[str, tuple[int | str, ...]]) -> bool:
    """Fold, prune and shape-infer the model at `raw_path` into `out_path`; return whether it has external data.

    `io_shapes` gives every graph input's and output's shape (strings name dynamic axes); they are written into
    the graph, since shape inference would otherwise name output axes after formulas ("floor(2.0*height)").
    `out_path` must sit in the folder the model finally lives in, or be moved there with its data file.
    """
    from polygraphy.backend.onnx import fold_constants
    from polygraphy.logger import G_LOGGER

    model = onnx.load(str(raw_path))  # also loads external data the exporter wrote beside it
    with G_LOGGER.verbosity(G_LOGGER.WARNING), _quiet_onnxruntime():  # both restored afterwards
        model = fold_constants(model, error_ok=False)
    model = _prune(model)
    _set_io_shapes(model, io_shapes)
    external = _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    if external:
        location = external_data_name(out_path)
        onnx.save_model(
            model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True, location=location
        )
    else:
        onnx.save_model(model, str(out_path))
    del model
    onnx.shape_inference.infer_shapes_path(str(out_path), str(out_path))
    onnx.checker.check_model(str(out_path))
    logger.debug("cleaned %s (%s)", out_path.name, "external data" if external else "single file")
    return external


@contextlib.contextmanager
def _quiet_onnxruntime() -> Iterator[None]:
    """Hide ONNX Runtime's optimizer notices while Polygraphy evaluates subgraphs, then restore the default.

    ONNX Runtime has no getter for its default logger severity; 2 (warning) is its documented default.
    """
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # errors only
    try:
        yield
    finally:
        onnxruntime.set_default_logger_severity(2)


def _prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove nodes and initializers that feed no output, and sort the graph topologically."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return gs.export_onnx(graph, do_type_check=False)


def _set_io_shapes(model: onnx.ModelProto, io_shapes: dict[str, tuple[int | str, ...]]) -> None:
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in io_shapes:
            raise ValueError(f"{value.name!r} is a graph input/output the component spec does not name")
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for axis in io_shapes[value.name]:
            dim = dims.add()
            if isinstance(axis, str):
                dim.dim_param = axis
            else:
                dim.dim_value = axis


def _weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (ByteSize() itself fails on protos over 2 GiB)."""
    total = 0
    for tensor in model.graph.initializer:
        count = 1
        for d in tensor.dims:
            count *= d
        total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def io_signature(path: Path) -> tuple[list[str], list[str]]:
    """Input and output names of the ONNX model at `path`, read without its external weights."""
    model = onnx.load(str(path), load_external_data=False)
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]
