"""fp16 ONNX for GPU targets: a pass over the cleaned fp32 models, then the usual Polygraphy clean-up.

Layout: the fp16 export is a complete artifact folder of its own, `engines/<model-key>/fp16/` (manifest, onnx/,
tokenizer/, text tables), so every backend opens it as it opens the fp32 one. The graph inputs and outputs stay
float32 (a Cast follows each input and precedes each output inside the graph): the host side of the runtime
keeps working in float32 and only the small latent/embedding arrays cross to the device.

Inside the graph every float tensor becomes float16 except
  * the normalisations (LayerNormalization, InstanceNormalization, GroupNormalization), computed in float32
    between two Casts: their mean/variance reductions are where fp16 loses most;
  * the UNet's timestep path up to the first linear layer (sin/cos of t * freq, t up to 1000, needs fp32 as
    diffusers computes it), found by following float32 graph inputs through non-linear ops; SDXL's `time_ids`
    (sizes up to a few thousand pixels, embedded by the same sin/cos) likewise;
  * shape arithmetic (floats made by Cast from integers, Resize scales and roi), left as it is.
Softmax runs in fp16: every GPU implementation subtracts the row maximum and accumulates in fp32.
Initializers are converted with their values clamped to the finite fp16 range (float32's lowest, used as an
attention mask value, becomes -65504 and not -inf). The VAE is fp16 for SD 1.x/2.x, as diffusers'
StableDiffusionPipeline runs it whatever `force_upcast` says (runtime.backends.gpu.vae_runs_fp16; the backends
retry an overflowing decode in fp32); the x4 upscaler's and SDXL's VAEs stay fp32 where their config says
`force_upcast` (SDXL's does: its VAE overflows in fp16), as their diffusers pipelines upcast them.
SDXL: both text encoders and the UNet (its text_embeds and time_ids inputs) are converted, and every tokenizer
folder the model has is copied (tokenizer/ and tokenizer_2/; a refiner's tokenizer_2/ alone).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from runtime.errors import ModelError
from runtime.manifest import TEXT_TABLE_FILES, ComponentInfo, Manifest, files_intact, read_manifest, write_manifest

logger = logging.getLogger(__name__)

FP16_DIR = "fp16"
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT / FLOAT16
FP32_OPS = frozenset({"LayerNormalization", "InstanceNormalization", "GroupNormalization"})
LINEAR_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})  # end the fp32 timestep path
FIXED_TYPE_OPS = frozenset({"Cast", "CastLike", "Constant", "ConstantOfShape", "RandomNormal", "RandomUniform"})
# input positions whose type the operator fixes to float32 whatever the data type
PROTECTED_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
KEEP_FP32_INPUTS = ("timestep", "time_ids")  # time_ids: SDXL's size/crop ids
FP16_MAX = float(np.finfo(np.float16).max)


def fp16_folder(folder: Path) -> Path:
    return Path(folder) / FP16_DIR


PRECISIONS = ("fp32", "fp16", "int8")


def export_with_precision(model, engines_dir: Path, precision: str = "fp32", force: bool = False, **options) -> Path:
    """export_model, then the fp16 conversion of its result (precision "fp16", for the GPU backends), or the
    onnxruntime CPU backend's derived graphs (fp32: the fused CPU graphs; int8: those and the int8 UNet); return the
    folder to load."""
    from runtime.errors import InvalidRequestError

    from .onnx_export import export_model

    if precision not in PRECISIONS:
        raise InvalidRequestError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    folder = export_model(model, engines_dir, force=force, **options)
    if precision != "fp16":
        from runtime.backends.onnxruntime import make_cpu_graphs

        for path in make_cpu_graphs(folder, precision):
            logger.info("CPU graph: %s", path)
        return folder
    return export_fp16(folder, force=force, progress=options.get("progress", True))


def export_fp16(folder: Path, force: bool = False, progress: bool = True) -> Path:
    """Convert the fp32 artifact folder `folder` into `folder/fp16/` (reused when up to date); return it."""
    from tqdm import tqdm

    source = read_manifest(folder)
    target = fp16_folder(folder)
    if not force and _is_current(target, source):
        logger.info("reusing %s", target)
        return target
    from .onnx_export import ONNX_DIR, _work_dir, tokenizer_dirs
    from .specs import component_specs

    target.mkdir(parents=True, exist_ok=True)
    (target / "manifest.json").unlink(missing_ok=True)  # unfinished from here on
    specs = component_specs(source.model)
    components = {}
    with _work_dir(target) as work:
        for name in tqdm(list(source.components), desc="fp16", unit="model", disable=not progress):
            info = source.components[name]
            out = target / ONNX_DIR / f"{name}.onnx"
            if _keeps_fp32(name, source.model):
                components[name] = _link_component(folder, target, info)
                continue
            spec = specs[name]
            io_shapes = {t.name: t.shape for t in spec.inputs + spec.outputs}
            components[name] = convert_component(folder / info.file, out, info, io_shapes, work)
            translate_weight_map(folder / info.file, out)
    for name in TEXT_TABLE_FILES:
        _link_or_copy(folder / name, target / name)
    for tokenizer in tokenizer_dirs(source.model):  # SDXL: tokenizer_2/ too (a refiner: that one only)
        _copy_tree(folder / tokenizer, target / tokenizer)
    tools = dict(source.tools, fp16_pass="sdrt-fp16-1", fp16_io="float32")
    write_manifest(target, replace(source, components=components, tools=tools))
    return target


def translate_weight_map(fp32_model: Path, fp16_model: Path) -> None:
    """Write the fp16 model's LoRA weight map (runtime.lora.weight_map) from the fp32 one: each initializer under
    its fp16 name (`<name>__fp16`), so LoRA and TensorRT refit find the weights in fp16 models too."""
    import onnx

    try:
        from runtime.lora.weight_map import read_weight_map, weight_map_path, write_weight_map
    except ImportError:  # an sdrt without LoRA support: nothing to translate
        return
    source = weight_map_path(fp32_model)
    if not source.is_file():
        return
    names = {t.name for t in onnx.load(str(fp16_model), load_external_data=False).graph.initializer}
    mapping = {}
    for name, mapped in read_weight_map(source).items():
        for candidate in (f"{name}__fp16", name):
            if candidate in names:
                mapping[candidate] = mapped
                break
    component = fp16_model.stem
    write_weight_map(weight_map_path(fp16_model), component, mapping)


def _keeps_fp32(component: str, model: dict) -> bool:
    """The VAE where its pipeline upcasts it (vae_runs_fp16), and the depth estimator, stay fp32."""
    from runtime.backends.gpu import vae_runs_fp16

    if component.startswith("vae_"):
        return not vae_runs_fp16(model)
    return component == "depth_estimator"


def _is_current(target: Path, source: Manifest) -> bool:
    try:
        manifest = read_manifest(target)
    except ModelError:
        return False
    return (
        manifest.source == source.source
        and set(manifest.components) == set(source.components)
        and files_intact(target, manifest)
    )


def convert_component(
    src: Path, out: Path, info: ComponentInfo, io_shapes: dict, work: Path, keep_fp32_inputs=KEEP_FP32_INPUTS
) -> ComponentInfo:
    """fp16-convert the ONNX model `src` (cleaned fp32) to `out` via `work`; return its manifest entry."""
    import onnx

    from .onnx_clean import clean_onnx
    from .onnx_export import install

    types = _float_types(src)
    model = onnx.load(str(src))
    convert_model(model, types, keep_fp32_inputs)
    raw = work / out.stem / "converted.onnx"
    raw.parent.mkdir(parents=True)
    onnx.save_model(model, str(raw), save_as_external_data=True, all_tensors_to_one_file=True, location="w.data")
    del model
    cleaned = work / out.name
    external = clean_onnx(raw, cleaned, io_shapes)
    shutil.rmtree(raw.parent)
    digest = install(cleaned, out, external)
    files = [out, out.with_name(out.name + ".data")] if external else [out]
    rel = out.relative_to(out.parent.parent).as_posix()
    return replace(info, file=rel, precision="fp16", sha256=digest, size=sum(p.stat().st_size for p in files))


def _float_types(path: Path) -> dict[str, int]:
    """Element type of every tensor the (shape-inferred) model at `path` names, read without its weights."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    return types


def convert_model(model, types: dict[str, int], keep_fp32_inputs=KEEP_FP32_INPUTS) -> None:
    """Rewrite `model` (an onnx ModelProto, fp32, topologically sorted) in place to compute in fp16.

    `types` gives each tensor's element type in the fp32 model. Graph IO stays float32.
    """
    from onnx import helper

    graph = model.graph
    outputs = {value.name for value in graph.output}
    state = _Pass(graph, types)
    for value in graph.input:  # inputs become fp16 through one Cast at the top of the graph
        if types.get(value.name) == FLOAT:
            state.precision[value.name] = FLOAT
            if value.name not in keep_fp32_inputs:
                state.alias[value.name] = state.cast(value.name, FLOAT16)
    for node in graph.node:
        node.input[:] = [state.alias.get(n, n) for n in node.input]
        compute = state.compute_type(node)
        state.convert_inputs(node, compute)
        if compute == FLOAT and node.op_type in FP32_OPS:
            state.nodes.append(node)
            for i, out in enumerate(node.output):  # back to fp16 right after the normalisation
                if out and types.get(out) == FLOAT and out not in outputs:
                    node.output[i] = f"{out}__fp32"
                    state.precision[node.output[i]] = FLOAT
                    state.nodes.append(helper.make_node("Cast", [node.output[i]], [out], to=FLOAT16, name=f"{out}_c"))
                    state.precision[out] = FLOAT16
                elif out and types.get(out) == FLOAT:
                    state.precision[out] = FLOAT
            continue
        for out in node.output:
            if out and types.get(out) == FLOAT:
                state.precision[out] = _output_type(node, compute)
        state.nodes.append(node)
    _finish_outputs(graph, state.precision, state.nodes, helper)
    _drop_unused_initializers(graph, state.nodes)
    del graph.node[:]
    graph.node.extend(state.nodes)
    del graph.value_info[:]  # stale types; shape inference runs again in clean_onnx


def _output_type(node, compute: int | None) -> int:
    """The element type of a node's float output after the pass (Cast and constants: their attribute)."""
    if compute is not None:
        return compute
    for attr in node.attribute:
        if attr.name == "to":
            return attr.i
        if attr.name == "value" and attr.HasField("t"):
            return attr.t.data_type
    return FLOAT


class _Pass:
    """The fp16 pass's bookkeeping: new node list, each float tensor's type, Casts and fp16 initializers made."""

    def __init__(self, graph, types: dict[str, int]):
        self.graph = graph
        self.types = types
        self.initializers = {t.name: t for t in graph.initializer}
        self.precision: dict[str, int] = {}  # float tensor -> FLOAT or FLOAT16 after the pass
        self.alias: dict[str, str] = {}  # graph input -> its fp16 Cast
        self.nodes: list = []
        self.casts: dict[tuple[str, int], str] = {}
        self.fp16_copies: dict[str, str] = {}

    def float_inputs(self, node) -> list[tuple[int, str]]:
        protected = PROTECTED_INPUTS.get(node.op_type, ())
        return [(i, n) for i, n in enumerate(node.input) if n and i not in protected and self._is_float(n)]

    def _is_float(self, name: str) -> bool:
        return self.types.get(name) == FLOAT or self.precision.get(name) is not None

    def compute_type(self, node) -> int | None:
        """FLOAT or FLOAT16 for the node's float inputs and outputs; None where an attribute fixes the output."""
        if node.op_type in FP32_OPS:
            return FLOAT
        activations = [n for _, n in self.float_inputs(node) if n not in self.initializers]
        if node.op_type == "Cast":  # an fp32 -> fp32 identity in the traced graph follows its input
            to = next(a.i for a in node.attribute if a.name == "to")
            if to == FLOAT and activations and self.precision.get(activations[0]) == FLOAT16:
                for attr in node.attribute:
                    if attr.name == "to":
                        attr.i = FLOAT16
            return None
        if node.op_type in FIXED_TYPE_OPS:
            return None
        if any(self.precision.get(n) == FLOAT16 for n in activations) or node.op_type in LINEAR_OPS:
            return FLOAT16
        return FLOAT if activations else FLOAT16  # fp32 branches (timestep, shape arithmetic) stay fp32

    def convert_inputs(self, node, compute: int | None) -> None:
        if compute is None:
            return
        for i, name in self.float_inputs(node):
            if name in self.initializers:
                node.input[i] = self.initializer_as(name, compute)
            elif self.precision.get(name, FLOAT) != compute:
                node.input[i] = self.cast(name, compute)

    def cast(self, name: str, to: int) -> str:
        from onnx import helper

        if (name, to) not in self.casts:
            out = f"{name}__to_{'fp16' if to == FLOAT16 else 'fp32'}"
            self.nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"{out}_cast"))
            self.casts[name, to] = out
            self.precision[out] = to
        return self.casts[name, to]

    def initializer_as(self, name: str, to: int) -> str:
        """The initializer `name` as type `to`: an fp16 copy (values clamped to fp16's finite range) if needed."""
        tensor = self.initializers[name]
        if to == tensor.data_type:
            return name
        if name not in self.fp16_copies:
            array = _to_array(tensor).astype(np.float32)
            half = np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16)
            copy = _from_array(half, f"{name}__fp16")
            self.graph.initializer.append(copy)
            self.fp16_copies[name] = copy.name
        return self.fp16_copies[name]


def timestep_path_nodes(model, keep_fp32_inputs=KEEP_FP32_INPUTS) -> list[str]:
    """Names of the nodes on a float32 input's path up to the first linear layer (the UNet's sin/cos timestep
    embedding): what an fp16 converter must leave in fp32 (ONNX Runtime's converter takes them as a block list)."""
    reached = set(keep_fp32_inputs)
    names = []
    for node in model.graph.node:
        if node.op_type in LINEAR_OPS or not any(i in reached for i in node.input):
            continue
        reached.update(o for o in node.output if o)
        names.append(node.name)
    return names


def _finish_outputs(graph, precision: dict[str, int], nodes: list, helper) -> None:
    """Graph outputs stay float32: an fp16 output is renamed inside the graph and cast back under its name."""
    for value in graph.output:
        if precision.get(value.name) != FLOAT16:
            continue
        inner = f"{value.name}__fp16"
        for node in nodes:
            node.output[:] = [inner if o == value.name else o for o in node.output]
            node.input[:] = [inner if i == value.name else i for i in node.input]
        nodes.append(helper.make_node("Cast", [inner], [value.name], to=FLOAT, name=f"{value.name}_output_cast"))


def _drop_unused_initializers(graph, nodes: list) -> None:
    used = {name for node in nodes for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _to_array(tensor) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def _from_array(array: np.ndarray, name: str):
    from onnx import numpy_helper

    return numpy_helper.from_array(array, name)


def _link_component(folder: Path, target: Path, info: ComponentInfo) -> ComponentInfo:
    """A component kept fp32: its files hard-linked (or copied) into the fp16 folder."""
    src = folder / info.file
    _link_or_copy(src, target / info.file)
    data = src.with_name(src.name + ".data")
    if data.is_file():
        _link_or_copy(data, (target / info.file).with_name(data.name))
    return replace(info, precision="fp32")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (atomically replacing it), or copy it where links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _copy_tree(src: Path, dst: Path) -> None:
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        _link_or_copy(path, dst / path.relative_to(src))
