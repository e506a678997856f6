"""`check`: run each component on one backend and on the fp32 reference (ONNX Runtime, CPU) with the same seeded
inputs, and report how far the outputs are apart.

The error measure is relative to the reference's scale: max |candidate - reference| / max |reference|, so one
bound serves text embeddings (|x| ~ 30) and noise predictions (|x| ~ 1) alike. NaN or Inf in any output fails the
check whatever the bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import Session, TextTables

logger = logging.getLogger(__name__)

# max |error| / max |reference| allowed per precision: fp16 keeps ~3 decimal digits, accumulated over ~20 layers
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2}
CHECK_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")  # those a model has
CHECK_TIMESTEP = 500.0


@dataclass(frozen=True)
class OutputReport:
    component: str
    output: str
    max_abs: float  # max |candidate - reference|
    mean_abs: float
    scale: float  # max |reference|
    finite: bool  # no NaN/Inf in the candidate's output
    tolerance: float

    @property
    def relative(self) -> float:
        return self.max_abs / max(self.scale, 1e-12)

    @property
    def passed(self) -> bool:
        return self.finite and self.relative <= self.tolerance

    def line(self) -> str:
        status = "ok" if self.passed else ("NaN/Inf" if not self.finite else "FAIL")
        return (
            f"{self.component:<13} {self.output:<18} max abs {self.max_abs:.3e}  mean abs {self.mean_abs:.3e}  "
            f"rel {self.relative:.2e} (<= {self.tolerance:.0e})  {status}"
        )


def check_inputs(
    specs: dict, tables: TextTables, batch: int, height: int, width: int, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """Fixed seeded inputs per component at an image size: real token embeddings, unit-normal latents and images
    in [-1, 1], a mid-schedule timestep."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, dict[str, np.ndarray]] = {}
    for name in CHECK_COMPONENTS:
        if name not in specs:
            continue
        spec = specs[name]
        shapes = spec.shapes(2 * batch if name == "unet" else batch, height, width)
        feeds[name] = {}
        for t in spec.inputs:
            shape = shapes[t.name]
            if t.name == "inputs_embeds":
                ids = rng.integers(0, tables.token_embedding.shape[0], size=shape[:2])  # [B, 77]
                feeds[name][t.name] = tables.embed(ids)
            elif t.name == "timestep":
                feeds[name][t.name] = np.full(shape, CHECK_TIMESTEP, dtype=np.float32)
            elif t.name == "image":
                feeds[name][t.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
            elif np.issubdtype(np.dtype(t.dtype), np.integer):
                feeds[name][t.name] = np.full(shape, 20, dtype=t.dtype)
            else:
                feeds[name][t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def compare(component: str, reference: dict, candidate: dict, tolerance: float) -> list[OutputReport]:
    """One report per output of `component`."""
    reports = []
    for name, ref in reference.items():
        got = np.asarray(candidate[name], dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if got.shape != ref.shape:
            raise ValueError(f"{component}.{name}: candidate shape {got.shape} is not the reference's {ref.shape}")
        finite = bool(np.isfinite(got).all())
        diff = np.abs(np.nan_to_num(got, nan=np.inf) - ref)
        reports.append(
            OutputReport(
                component, name, float(diff.max()), float(diff.mean()), float(np.abs(ref).max()), finite, tolerance
            )
        )
    return reports


def check_sessions(
    reference: dict[str, Session],
    candidate: dict[str, Session],
    feeds: dict[str, dict[str, np.ndarray]],
    tolerance: float,
) -> list[OutputReport]:
    """Run every component of `feeds` on both session sets and compare each output."""
    reports = []
    for component, inputs in feeds.items():
        ref = reference[component].run(dict(inputs))
        got = candidate[component].run(dict(inputs), list(ref))
        reports.extend(compare(component, ref, got, tolerance))
    return reports


def failure_line(reports: list[OutputReport]) -> str | None:
    """One line naming the worst failing output, or None when every output passed."""
    failed = [r for r in reports if not r.passed]
    if not failed:
        return None
    worst = next((r for r in failed if not r.finite), None) or max(failed, key=lambda r: r.relative)
    if not worst.finite:
        return f"check failed: {worst.component} {worst.output} has NaN/Inf values"
    return (
        f"check failed: {worst.component} {worst.output} differs from the fp32 reference by "
        f"{worst.relative:.2e} of its scale (allowed {worst.tolerance:.0e}); {len(failed)} output(s) failed"
    )


def run_check(
    fp32_folder: Path, candidate, precision: str, batch: int = 1, height: int | None = None, width: int | None = None
) -> list[OutputReport]:
    """Compare the backend `candidate` (opened on its own artifacts) with ONNX Runtime fp32 on the CPU."""
    from export.specs import component_specs

    from .backends.onnxruntime import OnnxRuntimeBackend

    reference = OnnxRuntimeBackend(fp32_folder)
    model = reference.manifest.model
    size = model["unet_sample_size"] * model["vae_scale_factor"]
    specs = {k: v for k, v in component_specs(model).items() if k in reference.manifest.components}
    feeds = check_inputs(specs, reference.text_tables(), batch, height or size, width or size)
    names = list(feeds)
    return check_sessions(
        {n: reference.session(n) for n in names},
        {n: candidate.session(n) for n in names},
        feeds,
        TOLERANCES[precision],
    )


def artifact_folders(model: str | Path, engines_dir: Path, precision: str, progress: bool) -> tuple[Path, Path]:
    """(fp32 reference folder, folder of the precision to check) for a checkpoint or an artifact folder; the
    export and the fp16 conversion run first where they are missing (they need the export extras)."""
    from .cache import ensure_exported
    from .checkpoint import fingerprint, model_key, resolve_checkpoint
    from .manifest import MANIFEST_NAME

    path = Path(model).expanduser()
    if (path / MANIFEST_NAME).is_file():
        fp32 = path.parent if path.name == "fp16" and (path.parent / MANIFEST_NAME).is_file() else path
    else:
        checkpoint = resolve_checkpoint(model)
        fp32 = ensure_exported(checkpoint, engines_dir, model_key(checkpoint, fingerprint(checkpoint)), progress)
    if precision == "fp32":
        return fp32, fp32
    from export.fp16 import export_fp16

    return fp32, export_fp16(fp32, progress=progress)


def check_model(
    model: str | Path,
    backend: str,
    precision: str = "fp16",
    engines_dir: Path | None = None,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    progress: bool = False,
) -> list[OutputReport]:
    """`cli.py check`: the per-output reports of `backend` at `precision` against the fp32 reference."""
    from .backends import check_backend, open_backend
    from .cache import engines_dir_or_default
    from .errors import InvalidRequestError
    from .manifest import read_manifest

    if precision not in TOLERANCES:
        raise InvalidRequestError(f"unknown precision {precision!r}; choose one of: {', '.join(TOLERANCES)}")
    check_backend(backend)
    fp32, folder = artifact_folders(model, engines_dir_or_default(engines_dir), precision, progress)
    source = Path(read_manifest(fp32).source.get("path", ""))
    artifacts = folder if backend == "onnxruntime" else fp32
    candidate = open_backend(backend, artifacts=artifacts, checkpoint=source if source.is_dir() else None)
    return run_check(fp32, candidate, precision, batch, height, width)
