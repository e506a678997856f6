"""The CPU execution provider's graph of a component, derived from its exported fp32 ONNX model.

The TorchScript export runs each attention block as MatMul(Q*s, K^T*s) -> Softmax -> MatMul(., V) with the heads
split and merged by Reshape/Transpose around it; ONNX Runtime's optimizers do not recognise that pattern (its
transformers optimizer fuses none of our blocks), so the CPU EP materialises a [B, heads, S, S] score tensor per block
(1.9 GiB at 512x512 in the SD 1.5 UNet). Here each block becomes one com.microsoft `MultiHeadAttention` node with
separate Q, K and V inputs [B, S, C], the form that takes ONNX Runtime's CPU flash-attention kernel (packed QKV is
not implemented on the CPU EP). The projections stay MatMul nodes over their original initializers, so LoRA
overrides by initializer name still apply. Residual Add -> LayerNormalization pairs become SkipLayerNormalization.
(Gelu, QuickGelu and FusedMatMul are fused by ONNX Runtime itself when a session loads.)

The graph is written next to its source; weights stored outside the source's proto (`<name>.onnx.data`, models over
2 GiB) are referenced, not copied. Its metadata names the source's sha256 (runtime.manifest.derived_graph_stamp), so a
graph left from an earlier export is recognised as stale.

The int8 graph (precision "int8", the UNet) is the CPU graph with dynamic int8 quantisation of the MatMuls whose
weights are constants (onnxruntime.quantization.quantize_dynamic); convolutions stay fp32 (int8 Conv is ~3.4x slower
on the CPU EP). Its weights are new initializers, so LoRA overrides do not reach them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from runtime.manifest import atomic_write_bytes

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


def write_cpu_graph(src: Path, out: Path, stamp: dict[str, str]) -> dict[str, int]:
    """Write the CPU graph of the model at `src` to `out` (same folder, atomically) with the metadata `stamp`;
    return the fused node counts."""
    src, out = Path(src), Path(out)
    if src.parent.resolve() != out.parent.resolve():
        raise ValueError(f"{out} must sit beside {src} (it shares its external weights)")
    model = onnx.load(str(src), load_external_data=False)  # external weights stay where they are
    counts = fuse_cpu_graph(model.graph)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _set_stamp(model, stamp)
    atomic_write_bytes(out, model.SerializeToString())
    logger.info("%s: %s", out.name, ", ".join(f"{n} {op}" for op, n in counts.items()))
    return counts


def write_int8_graph(src: Path, out: Path, stamp: dict[str, str]) -> None:
    """Quantise the constant-weight MatMuls of the CPU graph at `src` to int8 into `out` (+ `out`.data), atomically:
    made in a scratch folder beside `out`, the weights renamed first and the .onnx last."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=".int8-"))
    try:
        scratch = work / out.name
        with _quiet_root_logger():  # quantize_dynamic logs a pre-processing advice on the root logger
            quantize_dynamic(
                Path(src),
                scratch,
                op_types_to_quantize=["MatMul"],
                weight_type=QuantType.QInt8,
                use_external_data_format=True,  # the SD UNet stays over 2 GiB: its convolutions keep fp32 weights
                extra_options={"MatMulConstBOnly": True},
            )
        model = onnx.load(str(scratch), load_external_data=False)
        _set_stamp(model, stamp)
        scratch.write_bytes(model.SerializeToString())
        for path in sorted(work.iterdir(), key=lambda p: p.suffix == ".onnx"):
            os.replace(path, out.parent / path.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        Path(src).with_name(Path(src).stem + "-inferred.onnx").unlink(missing_ok=True)  # the quantiser's, on failure


def _set_stamp(model: onnx.ModelProto, stamp: dict[str, str]) -> None:
    props = {p.key: p.value for p in model.metadata_props if p.key != "onnx.infer"}
    del model.metadata_props[:]
    helper.set_model_props(model, dict(props, **stamp))


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Raise the root logger's level to ERROR for the block, then restore it."""
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(before)


def fuse_cpu_graph(graph: onnx.GraphProto) -> dict[str, int]:
    """Rewrite `graph` in place; return how many nodes of each fused kind it gained."""
    counts = {"MultiHeadAttention": fuse_attention(graph), "SkipLayerNormalization": fuse_skip_layer_norm(graph)}
    remove_dead_nodes(graph)
    return counts


class _Graph:
    """Producer/consumer lookups over a GraphProto, and the constants it holds inline."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.shapes = {v.name: v.type.tensor_type.shape for v in list(graph.value_info) + list(graph.output)}
        self.graph_outputs = {o.name for o in graph.output}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node held in the proto itself, else None."""
        tensor = self.initializers.get(name)
        node = self.producer.get(name)
        if tensor is None and node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(tensor)

    def scalar(self, name: str) -> float | None:
        value = self.constant(name)
        return float(value.reshape(())) if value is not None and value.size == 1 else None

    def dims(self, name: str) -> list | None:
        """Shape-inference dims of a tensor: ints, names of symbolic axes, None for unknown ones."""
        shape = self.shapes.get(name)
        if shape is None:
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.graph_outputs else None


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _scaled_input(g: _Graph, node: onnx.NodeProto) -> tuple[str, float] | None:
    """(the other input, factor) of a Mul/Div by a scalar constant, else None."""
    if node.op_type == "Mul":
        for i in (0, 1):
            factor = g.scalar(node.input[1 - i])
            if factor is not None:
                return node.input[i], factor
    if node.op_type == "Div":
        divisor = g.scalar(node.input[1])
        if divisor:
            return node.input[0], 1.0 / divisor
    return None


def _split_heads(g: _Graph, name: str) -> tuple[str, list[int], float, onnx.NodeProto] | None:
    """Walk back from a per-head tensor through Transposes and scalar Mul/Div to the Reshape splitting the heads.

    Returns (the Reshape's 3-D input [B, S, C], the perm taking its 4-D output to `name`, the scale, the Reshape)."""
    perm, scale = [0, 1, 2, 3], 1.0
    while (node := g.producer.get(name)) is not None:
        if node.op_type == "Transpose":
            p = _attr(node, "perm")
            perm = [p[i] for i in perm]
            name = node.input[0]
        elif (scaled := _scaled_input(g, node)) is not None:
            name, factor = scaled
            scale *= factor
        elif node.op_type == "Reshape":
            source_dims = g.dims(node.input[0])
            return (node.input[0], perm, scale, node) if source_dims is None or len(source_dims) == 3 else None
        else:
            return None
    return None


def _head_count(g: _Graph, reshape: onnx.NodeProto) -> int | None:
    """Heads of a Reshape to [B, S, heads, head_dim]: from shape inference, else from its constant shape parts."""
    dims = g.dims(reshape.output[0])
    if dims is not None and len(dims) == 4 and isinstance(dims[2], int) and dims[2] > 0:
        return dims[2]
    shape = g.constant(reshape.input[1])
    if shape is not None and shape.size == 4 and shape[2] > 0:
        return int(shape[2])
    concat = g.producer.get(reshape.input[1])
    if concat is not None and concat.op_type == "Concat" and len(concat.input) == 4:
        part = g.constant(concat.input[2])
        if part is not None and part.size == 1 and int(part.reshape(())) > 0:
            return int(part.reshape(()))
    return None


def _merge_heads(g: _Graph, name: str) -> onnx.NodeProto | None:
    """Follow [B, heads, S, d] forward through Transposes to the Reshape merging the heads into [B, S, C]."""
    perm = [0, 1, 2, 3]
    while (node := g.only_consumer(name)) is not None and node.op_type == "Transpose":
        p = _attr(node, "perm")
        perm = [perm[i] for i in p]
        name = node.output[0]
    if node is None or node.op_type != "Reshape" or perm != [0, 2, 1, 3]:
        return None
    dims = g.dims(node.output[0])
    return node if dims is None or len(dims) == 3 else None


def _match_attention(g: _Graph, softmax: onnx.NodeProto) -> dict | None:
    """The pieces of one attention block around `softmax`, or None when it is not the exported SDPA pattern."""
    if _attr(softmax, "axis", -1) not in (-1, 3):
        return None
    name, scale = softmax.input[0], 1.0
    while (node := g.producer.get(name)) is not None and (scaled := _scaled_input(g, node)) is not None:
        name, scale = scaled[0], scale * scaled[1]
    if node is None or node.op_type != "MatMul":
        return None
    q, k = _split_heads(g, node.input[0]), _split_heads(g, node.input[1])
    pv = g.only_consumer(softmax.output[0])
    if q is None or k is None or pv is None or pv.op_type != "MatMul" or pv.input[0] != softmax.output[0]:
        return None
    v = _split_heads(g, pv.input[1])
    merge = _merge_heads(g, pv.output[0])
    if v is None or merge is None or (q[1], k[1], v[1]) != ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]):
        return None
    heads = {_head_count(g, part[3]) for part in (q, k, v)}
    if len(heads) != 1 or None in heads:
        return None
    return {"q": q[0], "k": k[0], "v": v[0], "heads": heads.pop(), "scale": scale * q[2] * k[2] * v[2], "out": merge}


def fuse_attention(graph: onnx.GraphProto) -> int:
    """Replace each exported attention block by MultiHeadAttention(Q, K, V) [B, S, C]; return how many."""
    g = _Graph(graph)
    fused = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        match = _match_attention(g, softmax)
        if match is None:
            continue
        merge = match["out"]
        node = helper.make_node(
            "MultiHeadAttention",
            [match["q"], match["k"], match["v"]],
            [merge.output[0]],  # [B, S, C]: what the head-merging Reshape produced
            name=softmax.name.rsplit("/", 1)[0] + "/MultiHeadAttention",
            domain=MS_DOMAIN,
            num_heads=match["heads"],
            scale=match["scale"],
        )
        index = list(graph.node).index(merge)
        graph.node.remove(merge)
        graph.node.insert(index, node)  # Q, K and V are computed before the Reshape stood
        fused += 1
    return fused


def fuse_skip_layer_norm(graph: onnx.GraphProto) -> int:
    """Replace Add(x, residual) -> LayerNormalization over the last axis by SkipLayerNormalization (the Add's
    sum, when something else reads it, becomes the node's fourth output); return how many."""
    g = _Graph(graph)
    fused = 0
    for norm in [n for n in graph.node if n.op_type == "LayerNormalization"]:
        add = g.producer.get(norm.input[0])
        if add is None or add.op_type != "Add" or len(norm.input) < 3 or _attr(norm, "axis", -1) not in (-1, 2):
            continue
        if any(g.constant(i) is None and i not in g.initializers for i in norm.input[1:3]):
            continue
        a, b = (g.dims(i) for i in add.input)
        if a is None or a != b or len(a) != 3 or None in a or norm.output[0] in g.graph_outputs:
            continue
        sum_users = [n for n in g.consumers.get(add.output[0], []) if n is not norm]
        keep_sum = bool(sum_users) or add.output[0] in g.graph_outputs
        outputs = [norm.output[0], "", "", add.output[0]] if keep_sum else [norm.output[0]]
        node = helper.make_node(
            "SkipLayerNormalization",
            [add.input[0], add.input[1], norm.input[1], norm.input[2]],
            outputs,
            name=norm.name + "/SkipLayerNormalization",
            domain=MS_DOMAIN,
            epsilon=float(_attr(norm, "epsilon", 1e-5)),
        )
        index = list(graph.node).index(add)
        graph.node.remove(norm)
        graph.node.remove(add)
        graph.node.insert(index, node)
        fused += 1
    return fused


def remove_dead_nodes(graph: onnx.GraphProto) -> None:
    """Drop nodes none of whose outputs reaches a graph output, and initializers nothing reads any more."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    unused = [t for t in graph.initializer if t.name not in needed]
    for tensor in unused:
        graph.initializer.remove(tensor)
    produced = {o for n in graph.node for o in n.output}
    stale = [v for v in graph.value_info if v.name not in produced]
    for value in stale:
        graph.value_info.remove(value)
