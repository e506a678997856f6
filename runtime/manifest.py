"""The artifact manifest: everything the runtime knows about an exported model, written once by export/.

Layout of an artifact folder (`engines/<model-key>/`):
    manifest.json    this file's data
    tokenizer/       the checkpoint's tokenizer files, copied
    onnx/<component>.onnx   one model per component (fp32 for the CPU execution provider)
    onnx/text_encoder_token_embedding.npy   CLIP's token embedding table, float32 [vocab, D]
    onnx/text_encoder_final_norm.npz        CLIP's final LayerNorm: weight [D], bias [D], eps
    onnx/<component>.cpu.onnx    the CPU execution provider's graph (fused attention; export.onnx_cpu), for the UNet
                                 and VAE; it reads the weights of `<component>.onnx.data` when the model has that file
    onnx/unet.int8.onnx          the CPU graph with int8 MatMul weights (precision "int8"), made on first use
Both are derived from `<component>.onnx`, whose sha256 (as this manifest records it) their ONNX metadata names: one
that is missing, unloadable or made from another export is made again from it, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ArtifactError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
REEXPORT_HINT = "; re-export with --force"  # ends ArtifactError messages; api.load drops it when it re-exports
# Every model's components; a depth checkpoint that ships a depth estimator adds "depth_estimator", an SDXL model
# "text_encoder_2" (token ids in, its token lookup inside; no host tables) and tokenizer_2/ beside tokenizer/
# (export.specs.component_specs lists what a given model has).
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# The text encoder's host-side tables: the token lookup (the ONNX text encoder takes token embeddings, so
# textual-inversion vectors can replace rows) and the final norm (clip skip takes an earlier hidden state).
TOKEN_EMBEDDING_FILE = "onnx/text_encoder_token_embedding.npy"
FINAL_NORM_FILE = "onnx/text_encoder_final_norm.npz"
TEXT_TABLE_FILES = (TOKEN_EMBEDDING_FILE, FINAL_NORM_FILE)
# Graphs derived from a component's model for ONNX Runtime's CPU execution provider: kind -> the components that have
# one. "cpu": attention as MultiHeadAttention (export.onnx_cpu); "int8": that graph, MatMul weights quantised.
DERIVED_GRAPHS = {"cpu": ("unet", "vae_decoder", "vae_encoder"), "int8": ("unet",)}
DERIVED_GRAPH_VERSION = {"cpu": "1", "int8": "1"}  # a derived graph of another version is made again
DERIVED_VERSION_KEY = "sdrt.derived_graph"  # ONNX metadata of a derived graph: "<kind>/<version>"
DERIVED_SOURCE_KEY = "sdrt.source_sha256"  # ONNX metadata of a derived graph: its model's sha256, as recorded here
DERIVED_FILE_KEY = "sdrt.source_file_sha256"  # ... and the sha256 of the model's .onnx file alone (without .data)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # numpy dtype name, e.g. "float32", "int32"
    shape: list  # ints for fixed axes, strings for dynamic ones ("batch", "height", ...)


@dataclass(frozen=True)
class ComponentInfo:
    file: str  # path relative to the artifact folder
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    precision: str = "fp32"
    sha256: str = ""  # of the file (followed by its external data file, if any), as written
    size: int = 0  # bytes of the file plus its external data file, as written


@dataclass(frozen=True)
class Manifest:
    model_key: str
    source: dict  # {"path": str, "fingerprint": str}
    model: dict  # runtime.checkpoint.describe_checkpoint(...)
    components: dict[str, ComponentInfo]
    tools: dict = field(default_factory=dict)  # versions of torch, diffusers, onnx, opset ...
    format: int = MANIFEST_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        components = {
            name: ComponentInfo(
                file=c["file"],
                inputs={k: TensorInfo(**v) for k, v in c["inputs"].items()},
                outputs={k: TensorInfo(**v) for k, v in c["outputs"].items()},
                precision=c.get("precision", "fp32"),
                sha256=c.get("sha256", ""),
                size=c.get("size", 0),
            )
            for name, c in data["components"].items()
        }
        return cls(
            model_key=data["model_key"],
            source=data["source"],
            model=data["model"],
            components=components,
            tools=data.get("tools", {}),
            format=data["format"],
        )


def read_manifest(folder: Path) -> Manifest:
    """Load `folder/manifest.json`; a missing, unreadable or older-format manifest raises ArtifactError."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ArtifactError(f"{folder} has no {MANIFEST_NAME}: export the model first (python cli.py export)") from exc
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is unreadable ({exc}){REEXPORT_HINT}") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{path} has an unknown format{REEXPORT_HINT}")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} is incomplete ({exc}){REEXPORT_HINT}") from exc


def component_files(folder: Path, info: ComponentInfo) -> list[Path]:
    """The files of one component: the ONNX model and, for models over 2 GiB, its external data file."""
    path = Path(folder) / info.file
    data = path.with_name(path.name + ".data")
    return [path, data] if data.is_file() else [path]


def derived_graph_file(info: ComponentInfo, kind: str) -> str:
    """The derived graph of kind `kind` beside a component's model: onnx/unet.onnx -> onnx/unet.cpu.onnx."""
    if kind not in DERIVED_GRAPHS:
        raise ValueError(f"unknown derived graph {kind!r}")
    stem, _, suffix = info.file.rpartition(".")
    return f"{stem}.{kind}.{suffix}"


def derived_graph_stamp(folder: Path, info: ComponentInfo, kind: str) -> dict[str, str]:
    """The ONNX metadata a derived graph of the component's model as it is now carries (checked when it is loaded).

    The model's .onnx file is hashed (not its .data file: the graph of a model over 2 GiB is a few MB), so a derived
    graph never outlives a model file that was replaced or damaged (the backend then loads that model and reports
    it)."""
    digest = hashlib.sha256()
    with (Path(folder) / info.file).open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return {
        DERIVED_VERSION_KEY: f"{kind}/{DERIVED_GRAPH_VERSION[kind]}",
        DERIVED_SOURCE_KEY: info.sha256,
        DERIVED_FILE_KEY: digest.hexdigest(),
    }


def files_intact(folder: Path, manifest: Manifest) -> bool:
    """Whether every component file exists with the size the manifest recorded, and the text tables exist."""
    return artifact_problem(folder, manifest) is None


def artifact_problem(folder: Path, manifest: Manifest) -> str | None:
    """What is wrong with an artifact folder's files (a missing file, a size the manifest did not record), or None.

    Cheap: nothing is re-hashed. An export older than the text tables is not intact, so it is exported again.
    Derived graphs (DERIVED_GRAPHS) are not looked at: the backend that reads one makes it again when it is missing
    or does not match (runtime.backends.onnxruntime).
    """
    for info in manifest.components.values():
        files = component_files(folder, info)
        if not files[0].is_file():
            return f"{files[0]} is missing"
        size = sum(p.stat().st_size for p in files)
        if size != info.size:
            return f"{files[0]} is {size} bytes where its manifest says {info.size} (truncated or overwritten)"
    for name in TEXT_TABLE_FILES:
        if not (Path(folder) / name).is_file():
            return f"{Path(folder) / name} is missing"
    return None


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_manifest(folder: Path, manifest: Manifest) -> None:
    atomic_write_bytes(Path(folder) / MANIFEST_NAME, manifest.to_json().encode("utf-8"))
