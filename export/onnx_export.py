"""Export driver: a diffusers Stable Diffusion folder -> `engines/<model-key>/` (ONNX models, tokenizer, manifest).

Each component is traced with the TorchScript exporter (fp32, opset 17) into a private work folder inside the
artifact folder, cleaned there (onnx_clean), then renamed into `onnx/`; the UNet and the VAE also get their CPU graph
beside it (onnx_cpu: fused attention for ONNX Runtime's CPU provider). The manifest is written last and removed
before a rebuild starts, so an interrupted export never looks finished.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.cache import engines_dir_or_default
from runtime.checkpoint import describe_checkpoint, fingerprint, model_key, resolve_checkpoint
from runtime.errors import BackendUnavailableError, ModelError
from runtime.manifest import (
    DERIVED_GRAPHS,
    FINAL_NORM_FILE,
    MANIFEST_NAME,
    TOKEN_EMBEDDING_FILE,
    ComponentInfo,
    Manifest,
    TensorInfo,
    atomic_write_bytes,
    component_files,
    derived_graph_file,
    derived_graph_stamp,
    files_intact,
    read_manifest,
    write_manifest,
)

from .quiet import quiet_hub_libraries
from .specs import ComponentSpec, component_specs

logger = logging.getLogger(__name__)

OPSET = 17
WORK_PREFIX = ".export-"  # scratch folders inside an artifact folder: .export-<pid>-<random>
ONNX_DIR = "onnx"
TOKENIZER_DIR = "tokenizer"
EXPORT_PACKAGES = ("torch", "diffusers", "transformers", "onnx", "polygraphy", "onnx_graphsurgeon")
SUPPORTED_VARIANTS = ("sd", "sd-v", "inpaint", "depth", "upscale-x4", "sdxl")
TORCH_PARTS = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",  # SDXL only
    "unet": "unet",
    "vae_decoder": "vae",
    "vae_encoder": "vae",
    "depth_estimator": "depth_estimator",  # only when the checkpoint has one
}


def export_model(
    model: str | os.PathLike,
    engines_dir: Path | None = None,
    force: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
) -> Path:
    """Export `model` (a diffusers folder or a cached Hub id) to ONNX under `engines_dir` (default: the per-user cache,
    runtime.cache); return its artifact folder.

    An existing export of the same source files is reused unless `force`; a changed source gets a new folder.
    `allow_pickle` permits loading `.bin` (pickle) weights, which can run code: only for trusted checkpoints.
    """
    source = resolve_checkpoint(model).resolve()
    digest = fingerprint(source)
    folder = engines_dir_or_default(engines_dir) / model_key(source, digest)
    remove_stale_work_dirs(folder.parent)
    if not force and is_reusable(folder, digest):
        logger.info("reusing %s (its source is unchanged)", folder)
        return folder
    require_export_extras()
    safetensors = weight_formats(source, allow_pickle)
    description = describe_checkpoint(source)
    if description["variant"] not in SUPPORTED_VARIANTS:
        raise ModelError(f"exporting a {description['variant']!r} checkpoint is not supported yet ({source})")
    specs = component_specs(description)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)  # from here on the folder is unfinished
    started = time.perf_counter()
    components = _export_components(specs, source, folder, safetensors, progress)
    for tokenizer in tokenizer_dirs(description):
        copy_tokenizer(source / tokenizer, folder / tokenizer)
    manifest = Manifest(
        model_key=folder.name,
        source={"path": str(source), "fingerprint": digest},
        model=description,
        components=components,
        tools=tool_versions(),
    )
    write_manifest(folder, manifest)
    logger.info("exported %s in %.1f s", folder, time.perf_counter() - started)
    return folder


def tokenizer_dirs(model: dict) -> tuple[str, ...]:
    """The tokenizer folders a model has: SDXL's second text encoder has its own (it pads with another token); an
    SDXL refiner has only that one."""
    sdxl = model.get("sdxl")
    if sdxl and not sdxl.get("two_encoders", True):
        return ("tokenizer_2",)
    return (TOKENIZER_DIR, "tokenizer_2") if sdxl else (TOKENIZER_DIR,)


def _export_components(
    specs: dict[str, ComponentSpec], source: Path, folder: Path, safetensors: dict[str, bool], progress: bool
) -> dict[str, ComponentInfo]:
    from tqdm import tqdm

    components = {}
    bar = tqdm(list(specs), desc="export", unit="model", disable=not progress)
    with _work_dir(folder) as work, quiet_hub_libraries(), bar:
        for name in bar:
            bar.set_postfix_str(name)
            started = time.perf_counter()
            tables = name == ("text_encoder" if "text_encoder" in specs else "text_encoder_2")  # an SDXL refiner: 2
            load = _loader(name, source, safetensors[TORCH_PARTS[name]], folder, tables)
            components[name] = export_component(specs[name], load, folder, work)
            logger.info("exported %s in %.1f s", name, time.perf_counter() - started)
    return components


def _loader(name: str, source: Path, use_safetensors: bool, folder: Path, tables: bool) -> Callable[[], Any]:
    """A function loading the component's module (with `tables`, the text encoder's, it also saves its host-side
    tables beside it)."""

    def load():
        module = load_module(name, source, use_safetensors)
        if tables:
            write_token_embedding(module, folder / TOKEN_EMBEDDING_FILE)
            write_final_norm(module.text_encoder, folder / FINAL_NORM_FILE)
        return module

    return load


@contextlib.contextmanager
def _work_dir(folder: Path) -> Iterator[Path]:
    """A private scratch folder inside `folder` (same file system, so results can be renamed), always removed; its
    name carries this process's id, so a later export can tell one left by a killed export from a running one."""
    work = Path(tempfile.mkdtemp(dir=folder, prefix=f"{WORK_PREFIX}{os.getpid()}-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def remove_stale_work_dirs(engines_dir: Path) -> list[Path]:
    """Remove the scratch folders (`<artifacts>/.export-<pid>-*`) that exports killed before they could clean up left
    under `engines_dir`; those of a process still running stay. Returns the folders removed."""
    removed = []
    for work in sorted(Path(engines_dir).glob(f"*/{WORK_PREFIX}*")):
        pid = work.name[len(WORK_PREFIX) :].split("-", 1)[0]
        if work.is_dir() and not (pid.isdigit() and _process_alive(int(pid))):
            shutil.rmtree(work, ignore_errors=True)
            removed.append(work)
            logger.info("removed %s, left by an export that did not finish", work)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def require_export_extras() -> None:
    for name in EXPORT_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise BackendUnavailableError(
                f"exporting needs the export extras ({name} is not installed): pip install -e .[export]"
            ) from exc


def is_reusable(folder: Path, digest: str) -> bool:
    """Whether `folder` holds a finished export of the source with fingerprint `digest` (files not re-hashed).

    Finished means: every component file, both text tables (files_intact checks them) and the tokenizer.
    """
    try:
        manifest = read_manifest(folder)
    except ModelError:
        return False
    expected = set(component_specs(manifest.model))  # the four SD components, plus a depth estimator if any
    if manifest.source.get("fingerprint") != digest or set(manifest.components) != expected:
        return False
    return files_intact(folder, manifest) and all((folder / t).is_dir() for t in tokenizer_dirs(manifest.model))


def weight_formats(source: Path, allow_pickle: bool) -> dict[str, bool]:
    """For each torch part, whether to load .safetensors (True) or .bin pickles (False, only if allowed)."""
    formats = {}
    for part in sorted(set(TORCH_PARTS.values())):
        if not (source / part).is_dir():  # an optional part the checkpoint does not have
            continue
        has_safetensors = any((source / part).glob("*.safetensors"))
        if not has_safetensors and not allow_pickle:
            raise ModelError(
                f"{source / part} has only .bin (pickle) weights: convert them to .safetensors, "
                "or allow pickles (--allow-pickle, allow_pickle=True) if you trust this checkpoint"
            )
        formats[part] = has_safetensors
    return formats


def load_module(component: str, source: Path, use_safetensors: bool):
    """The component's torch module from the diffusers folder, fp32, eval mode, in its tracing wrapper."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, DPTForDepthEstimation

    from . import modules

    loaders = {
        "depth_estimator": (DPTForDepthEstimation, modules.DepthEstimator),
        "text_encoder": (CLIPTextModel, modules.TextEncoder),
        "text_encoder_2": (CLIPTextModelWithProjection, modules.TextEncoder2),
        "unet": (UNet2DConditionModel, modules.UNet),
        "vae_decoder": (AutoencoderKL, modules.VaeDecoder),
        "vae_encoder": (AutoencoderKL, modules.VaeEncoder),
    }
    model_class, wrapper = loaders[component]
    part = TORCH_PARTS[component]
    try:
        model = model_class.from_pretrained(
            source, subfolder=part, use_safetensors=use_safetensors, torch_dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {source / part}: {reason}") from exc
    if component == "unet" and model.config.get("addition_embed_type") == "text_time":
        wrapper = modules.SdxlUNet  # SDXL: pooled text and size/crop ids as two more inputs
    return wrapper(model).eval()


def export_component(spec: ComponentSpec, load: Callable[[], Any], folder: Path, work: Path) -> ComponentInfo:
    """Trace `load()` to `folder/onnx/<name>.onnx` (cleaned, shape-inferred) and describe it for the manifest.

    The torch module is freed before cleaning, which holds several copies of the ONNX weights at its peak.
    """
    from .onnx_clean import clean_onnx, io_signature

    raw = work / spec.name / "traced.onnx"
    raw.parent.mkdir()
    module = load()
    trace_to_onnx(spec, module, raw)
    fingerprints = weight_fingerprints(spec.name, module)
    del module
    gc.collect()
    cleaned = work / f"{spec.name}.onnx"
    external = clean_onnx(raw, cleaned, {t.name: t.shape for t in spec.inputs + spec.outputs})
    shutil.rmtree(raw.parent)
    names = io_signature(cleaned)
    if names != (spec.input_names, spec.output_names):
        raise RuntimeError(f"exported {spec.name} has inputs/outputs {names}, not the spec's names")
    target = folder / ONNX_DIR / f"{spec.name}.onnx"
    digest = install(cleaned, target, external)
    if fingerprints is not None:
        write_component_weight_map(target, spec.name, fingerprints)
    info = ComponentInfo(
        file=target.relative_to(folder).as_posix(),
        inputs={t.name: TensorInfo(t.dtype, list(t.shape)) for t in spec.inputs},
        outputs={t.name: TensorInfo(t.dtype, list(t.shape)) for t in spec.outputs},
        precision="fp32",
        sha256=digest,
    )
    info = replace(info, size=sum(p.stat().st_size for p in component_files(folder, info)))
    write_derived_graphs(folder, info, spec.name)
    return info


def write_derived_graphs(folder: Path, info: ComponentInfo, component: str) -> None:
    """Write the component's CPU graph (onnx_cpu) and remove derived graphs of the model it replaced (the int8 UNet
    is made again on first use)."""
    from .onnx_cpu import write_cpu_graph

    for kind, components in DERIVED_GRAPHS.items():
        if component in components and kind != "cpu":
            stale = folder / derived_graph_file(info, kind)
            stale.unlink(missing_ok=True)
            stale.with_name(stale.name + ".data").unlink(missing_ok=True)
    if component in DERIVED_GRAPHS["cpu"]:
        cpu = folder / derived_graph_file(info, "cpu")
        write_cpu_graph(folder / info.file, cpu, derived_graph_stamp(folder, info, "cpu"))


def weight_fingerprints(component: str, module) -> dict | None:
    """For LoRA: fingerprints of the text encoder's or UNet's parameters under their diffusers names (the
    tracing wrapper's first name part dropped); None for the other components."""
    from runtime.lora.weight_map import MAPPED_COMPONENTS, canonical_parameter_name, parameter_fingerprints

    if component not in MAPPED_COMPONENTS:
        return None
    named = (
        (canonical_parameter_name(component, name.split(".", 1)[1]), p.detach().float().numpy())
        for name, p in module.named_parameters()
    )
    return parameter_fingerprints(named)


def write_component_weight_map(model_path: Path, component: str, fingerprints: dict) -> None:
    """Write `onnx/<component>.weight_map.json`: ONNX initializer -> diffusers parameter (see runtime.lora)."""
    from runtime.lora.weight_map import build_weight_map

    mapping = build_weight_map(model_path, component, fingerprints)
    logger.debug("%s: %d initializers mapped to parameters", component, len(mapping))


def trace_to_onnx(spec: ComponentSpec, module, path: Path) -> None:
    """torch.onnx.export with the TorchScript exporter (dynamo=False), dynamic axes from the spec."""
    import torch

    args = tuple(torch.from_numpy(array) for array in spec.sample_inputs().values())
    with torch.no_grad(), quiet_tracing():
        torch.onnx.export(
            module,
            args,
            str(path),  # a str, not a Path: the exporter writes >2 GiB weights beside it only then
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Silence TracerWarnings and the legacy-exporter notice for the block; the warning filters are restored."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
        # SDXL's text encoder 2 picks its pooled row by index (never negative: the end token's position)
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        # BiT (the DPT-hybrid depth estimator's backbone) standardises its conv weights with batch_norm(training=True)
        # on purpose: exported as written, folded into constants afterwards
        warnings.filterwarnings("ignore", message="ONNX export mode is set to TrainingMode.EVAL", category=UserWarning)
        yield


def install(cleaned: Path, target: Path, external: bool) -> str:
    """Rename a cleaned model (and its external data) over `target`; return the sha256 of its bytes.

    The digest covers the .onnx file followed by its .onnx.data file when it has one.
    """
    from .onnx_clean import external_data_name

    data, target_data = cleaned.with_name(external_data_name(cleaned)), target.with_name(external_data_name(target))
    digest = sha256_files([cleaned, data] if external else [cleaned])
    target.parent.mkdir(parents=True, exist_ok=True)
    if external:
        os.replace(data, target_data)
    else:
        target_data.unlink(missing_ok=True)  # from an earlier export of a larger model under this name
    os.replace(cleaned, target)
    return digest


def sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def write_token_embedding(text_encoder, path: Path) -> None:
    """Save CLIP's token embedding table, float32 [vocab, D] (.npy), for the token lookup on the host."""
    table = text_encoder.token_embedding.weight.detach().float().numpy()  # [V, D]
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(table), allow_pickle=False)
    atomic_write_bytes(path, buffer.getbuffer())


def write_final_norm(text_encoder, path: Path) -> None:
    """Save CLIP's final LayerNorm (weight, bias, eps) so the runtime can apply it to hidden_states[-k]."""
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 nests text_model
    buffer = io.BytesIO()
    np.savez(
        buffer,
        weight=norm.weight.detach().float().numpy(),
        bias=norm.bias.detach().float().numpy(),
        eps=np.float64(norm.eps),
    )
    atomic_write_bytes(path, buffer.getvalue())


def copy_tokenizer(source: Path, target: Path) -> None:
    """Copy the tokenizer folder file by file, each write atomic."""
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        atomic_write_bytes(target / path.relative_to(source), path.read_bytes())


def tool_versions() -> dict:
    versions = {name: importlib.import_module(name).__version__ for name in EXPORT_PACKAGES[:5]}
    return dict(versions, opset=OPSET, exporter="torchscript")
