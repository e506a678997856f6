"""`cli.py build --backend tensorrt`: strongly typed TensorRT engines from the fp16 ONNX export, cached precisely.

Engines live in `<artifacts>/tensorrt/`. Each engine's file name is its cache key:

    unet.fp16.r1-2-h64-w64-t1.o3.trt10.8.0.sm90.plan      (static image size: rows 1..2, latent h x w, chunks 1)
    unet.fp16.r1-6-dyn32-128-t1-3.o3.trt10.8.0.sm90.plan  (dynamic latent sides 32..128, rows 1..6, chunks 1..3)
    text_encoder.fp16.b1-16.o3.trt10.8.0.sm90.plan        (rows per call 1..16, whatever the image size)
    vae_decoder.fp32.b1-h64-w64.o3.trt10.8.0.sm90.plan

SDXL: both text encoders (text_encoder_2 takes token ids, rows 1..16), the UNet with its text_embeds [rows, P] and
time_ids [rows, 6] (a refiner's [rows, 5]) in every profile point, the VAE fp32 (force_upcast). Without options the
static profile is the model's native size (SDXL: 1024x1024, latent 128, the CUDA-graph path); `--dynamic 512..1536`
builds the dynamic one (optimum 1024); both can sit side by side, and the runtime prefers a static engine.

The UNet's profile spans the rows and token chunks of every request it can serve: 1 row (one image without
guidance) up to (1 + m) x B rows (B images, m AND terms, the unconditional row), 1 up to K chunks of 77 tokens;
its optimum is 2 x B rows of one chunk. The runtime captures one CUDA graph per shape actually used.
So a component's key holds only the dimensions it uses: changing the UNet's profile (token chunks) rebuilds the
UNet alone, and a new image size never rebuilds the text encoder. The TensorRT version and the GPU's compute
capability are in every key (an engine runs only on the version and GPU family that built it). Beside each plan a
`.json` sidecar records the tensor shapes the profile covers; the runtime reads those to pick an engine. Plans
are written atomically; a cached plan that fails to deserialize (truncated, other version) is rebuilt with a
one-line warning. One timing cache per TensorRT version and GPU lives in the engines folder.

The TensorRT calls are behind `EngineBuilder` (tensorrt_builder.py has the real one), so the cache policy here is
testable without TensorRT.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from runtime.errors import InvalidRequestError
from runtime.manifest import atomic_write_bytes, read_manifest

from .specs import ComponentSpec, component_specs

logger = logging.getLogger(__name__)

ENGINE_DIR = "tensorrt"
TEXT_ROWS = (1, 2, 16)  # min/opt/max rows per text-encoder call (prompt chunks x prompts share one call)
ENGINE_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")  # those a model has
MAX_TOKEN_CHUNKS = 8
MAX_AND_TERMS = 8


@dataclass(frozen=True)
class BuildRequest:
    batch_size: int = 1  # images per request; the UNet runs 2x that with classifier-free guidance
    height: int | None = None  # pixels of a static profile; None: the model's native size
    width: int | None = None
    dynamic: tuple[int, int] | None = None  # pixel range of both sides for a dynamic profile
    token_chunks: int = 1  # 77-token chunks of the longest prompt
    opt_level: int = 3  # builder optimisation level 0-5
    refit: bool = False  # refittable engines (LoRA)
    and_terms: int = 1  # AND terms of the longest prompt (m): the UNet takes up to (1 + m) x batch_size rows

    @property
    def max_unet_rows(self) -> int:
        return (1 + self.and_terms) * self.batch_size


def build_request(
    batch_size: int = 1,
    width: int | None = None,
    height: int | None = None,
    dynamic: str | None = None,
    token_chunks: int = 1,
    opt_level: int = 3,
    refit: bool = False,
    and_terms: int = 1,
) -> BuildRequest:
    """A validated BuildRequest from the CLI's options (each mistake: one InvalidRequestError line)."""
    if not 1 <= batch_size <= 16:
        raise InvalidRequestError(f"--batch-size must be between 1 and 16, not {batch_size}")
    if not 1 <= token_chunks <= MAX_TOKEN_CHUNKS:
        raise InvalidRequestError(f"--token-chunks must be between 1 and {MAX_TOKEN_CHUNKS}, not {token_chunks}")
    if not 1 <= and_terms <= MAX_AND_TERMS:
        raise InvalidRequestError(f"--and-terms must be between 1 and {MAX_AND_TERMS}, not {and_terms}")
    if not 0 <= opt_level <= 5:
        raise InvalidRequestError(f"--opt-level must be between 0 and 5, not {opt_level}")
    if (width is None) != (height is None):
        raise InvalidRequestError("give both --width and --height, or neither")
    span = None
    if dynamic is not None:
        if width is not None:
            raise InvalidRequestError("--dynamic replaces --width/--height: give one or the other")
        span = _parse_range(dynamic)
    for side in (width, height, *(span or ())):
        if side is not None and (side < 64 or side % 8):
            raise InvalidRequestError(f"image sides must be multiples of 8 and at least 64 pixels, not {side}")
    return BuildRequest(batch_size, height, width, span, token_chunks, opt_level, refit, and_terms)


def _parse_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(".."))
    except ValueError:
        raise InvalidRequestError(f"--dynamic takes MIN..MAX pixels, e.g. 256..1024, not {text!r}") from None
    if low > high:
        raise InvalidRequestError(f"--dynamic {text}: MIN is larger than MAX")
    return low, high


@dataclass(frozen=True)
class EngineSpec:
    """One engine to build: its component, precision, profile and the tensor shapes that profile covers."""

    component: str
    precision: str  # "fp16", or "fp32" for an upcast VAE
    profile: str  # e.g. "b2-h64-w64-t1"; only the dimensions this component uses
    shapes: dict = field(default_factory=dict)  # input name -> [min, opt, max] shapes
    opt_level: int = 3
    refit: bool = False

    def file_name(self, trt_version: str, compute_capability: str) -> str:
        refit = ".refit" if self.refit else ""
        return (
            f"{self.component}.{self.precision}.{self.profile}{refit}.o{self.opt_level}."
            f"trt{trt_version}.sm{compute_capability}.plan"
        )


def engine_specs(model: dict, precisions: dict[str, str], request: BuildRequest) -> dict[str, EngineSpec]:
    """The engines a request needs, from the manifest's model block and each component's ONNX precision."""
    specs = component_specs(model)
    native = model["unet_sample_size"] * model["vae_scale_factor"]
    height, width = request.height or native, request.width or native
    result = {}
    for name in ENGINE_COMPONENTS:
        if name not in precisions:
            continue
        spec = specs[name]
        if name in ("text_encoder", "text_encoder_2"):
            profile, shapes = f"b{TEXT_ROWS[0]}-{TEXT_ROWS[2]}", _text_shapes(spec)
        elif name == "unet":
            profile, shapes = _unet_profile(spec, height, width, request)
        else:
            profile, shapes = _image_profile(spec, request.batch_size, height, width, request)
        result[name] = EngineSpec(name, precisions[name], profile, shapes, request.opt_level, request.refit)
    return result


def _text_shapes(spec: ComponentSpec) -> dict:
    f = spec.vae_scale_factor  # the text encoder's shapes do not depend on the image size
    return {t.name: [list(spec.shapes(rows, f, f)[t.name]) for rows in TEXT_ROWS] for t in spec.inputs}


def _image_profile(spec: ComponentSpec, batch: int, height: int, width: int, request: BuildRequest):
    """(profile tag, shapes) of an image component, static or over the dynamic pixel range."""
    f = spec.vae_scale_factor
    chunks = request.token_chunks

    def shapes_at(h: int, w: int) -> dict:
        return spec.shapes(batch, h, w, chunks)

    if request.dynamic is None:
        static = shapes_at(height, width)
        shapes = {t.name: [list(static[t.name])] * 3 for t in spec.inputs}
        return f"b{batch}-h{height // f}-w{width // f}", shapes
    low, high = request.dynamic
    opt = min(max(height, low), high)
    lo, mid, hi = shapes_at(low, low), shapes_at(opt, opt), shapes_at(high, high)
    shapes = {t.name: [list(lo[t.name]), list(mid[t.name]), list(hi[t.name])] for t in spec.inputs}
    return f"b{batch}-dyn{low // f}-{high // f}", shapes


def _unet_profile(spec: ComponentSpec, height: int, width: int, request: BuildRequest):
    """(profile tag, shapes) of the UNet: rows 1 .. (1 + m)B (optimum 2B), chunks 1 .. K (optimum 1), and the image
    size static or over the dynamic pixel range."""
    f = spec.vae_scale_factor
    rows, chunks = request.max_unet_rows, request.token_chunks
    if request.dynamic is None:
        sides, size_tag = [(height, width)] * 3, f"h{height // f}-w{width // f}"
    else:
        low, high = request.dynamic
        opt = min(max(height, low), high)
        sides, size_tag = [(low, low), (opt, opt), (high, high)], f"dyn{low // f}-{high // f}"
    row_points = (1, 2 * request.batch_size, rows)  # min, opt (guided, one term), max
    points = [spec.shapes(n, h, w, k) for n, (h, w), k in zip(row_points, sides, (1, 1, chunks))]
    shapes = {t.name: [list(point[t.name]) for point in points] for t in spec.inputs}
    chunk_tag = "t1" if chunks == 1 else f"t1-{chunks}"
    return f"r1-{rows}-{size_tag}-{chunk_tag}", shapes


class EngineBuilder(Protocol):
    """What the cache policy needs from TensorRT (tensorrt_builder.TensorRTBuilder is the real one)."""

    version: str  # TensorRT version, e.g. "10.8.0"
    compute_capability: str  # e.g. "90"

    def build(self, onnx_path: Path, spec: EngineSpec, timing_cache: Path) -> bytes: ...

    def can_deserialize(self, plan: bytes) -> bool: ...


def timing_cache_path(engines_dir: Path, builder: EngineBuilder) -> Path:
    """One timing cache per TensorRT version and GPU, shared by every model in `engines_dir`."""
    return Path(engines_dir) / f"tensorrt-timing.trt{builder.version}.sm{builder.compute_capability}.cache"


def ensure_engines(
    artifacts: Path,
    fp16_artifacts: Path,
    request: BuildRequest,
    builder: EngineBuilder,
    timing_cache: Path,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Build the engines `request` needs into `artifacts/tensorrt/` (cached ones reused); return their plans."""
    from tqdm import tqdm

    manifest = read_manifest(fp16_artifacts)
    precisions = {name: info.precision for name, info in manifest.components.items()}
    specs = engine_specs(manifest.model, precisions, request)
    folder = Path(artifacts) / ENGINE_DIR
    plans = {}
    bar = tqdm(list(specs.values()), desc="tensorrt", unit="engine", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.component)
        path = folder / spec.file_name(builder.version, builder.compute_capability)
        if force or not _usable(path, builder):
            onnx_path = fp16_artifacts / manifest.components[spec.component].file
            started = time.perf_counter()
            plan = builder.build(onnx_path, spec, timing_cache)
            atomic_write_bytes(path, plan)
            logger.info("built %s in %.1f s", path.name, time.perf_counter() - started)
        _write_sidecar(path, spec, builder)
        plans[spec.component] = path
    return plans


def _usable(path: Path, builder: EngineBuilder) -> bool:
    """Whether a cached plan exists and deserializes; a broken one is reported in one line (then rebuilt)."""
    if not path.is_file():
        return False
    if builder.can_deserialize(path.read_bytes()):
        logger.info("reusing %s", path.name)
        return True
    logger.warning("%s does not deserialize (truncated, or another TensorRT/GPU): rebuilding it", path.name)
    return False


def _write_sidecar(path: Path, spec: EngineSpec, builder: EngineBuilder) -> None:
    sidecar = path.with_suffix(".json")
    data = dict(asdict(spec), plan=path.name, tensorrt=builder.version, compute_capability=builder.compute_capability)
    text = json.dumps(data, indent=2, sort_keys=True)
    if not sidecar.is_file() or sidecar.read_text(encoding="utf-8") != text:
        atomic_write_bytes(sidecar, text.encode("utf-8"))


def build_engines(
    model: str | Path, engines_dir: Path, request: BuildRequest, force: bool = False, progress: bool = True
) -> dict[str, Path]:
    """`cli.py build`: check TensorRT first, export (fp32, then fp16) where needed, then ensure the engines."""
    from runtime.backends import check_backend
    from runtime.check import artifact_folders

    check_backend("tensorrt")  # one line naming the missing package, before any export work
    from .tensorrt_builder import TensorRTBuilder

    builder = TensorRTBuilder()
    fp32, fp16 = artifact_folders(model, Path(engines_dir), "fp16", progress)
    return ensure_engines(fp32, fp16, request, builder, timing_cache_path(engines_dir, builder), force, progress)
