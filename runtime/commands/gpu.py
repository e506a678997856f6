"""The NVIDIA path's commands: check (each component on a backend against the fp32 reference) and build (TensorRT
engines)."""

from __future__ import annotations

import argparse
import time

from ..cache import engines_dir_or_default
from . import ENGINES_HELP


def cmd_check(args: argparse.Namespace) -> int:
    """Each component on --backend against the fp32 reference; exit 2 with one line if any output fails."""
    from ..check import check_model, failure_line
    from ..errors import NumericalError

    reports = check_model(
        args.model,
        args.backend,
        args.precision,
        args.engines,
        args.batch_size,
        args.height,
        args.width,
        progress=not args.quiet,
    )
    for report in reports:
        print(report.line())
    failure = failure_line(reports)
    if failure:
        raise NumericalError(failure)
    print(f"check passed: {len(reports)} outputs of {args.backend} ({args.precision}) match the fp32 reference")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    """Build (or reuse) the TensorRT engines of a model for the requested profile."""
    from export.tensorrt_build import build_engines, build_request

    request = build_request(args.batch_size, args.width, args.height, args.dynamic, args.token_chunks,
                            args.opt_level, args.refit, args.and_terms)  # fmt: skip
    start = time.perf_counter()
    engines = engines_dir_or_default(args.engines)
    paths = build_engines(args.model, engines, request, force=args.force, progress=not args.quiet)
    for component, path in paths.items():
        print(f"{component}: {path}")
    print(f"engines ready ({time.perf_counter() - start:.1f} s)")
    return 0


def add_gpu_commands(sub) -> None:
    """`check` and `build` (the NVIDIA path)."""
    from ..backends import BACKENDS

    p = sub.add_parser("check", help="compare each component on a backend with the fp32 reference")
    p.add_argument("--model", required=True, help="diffusers folder, Hub id in the local cache, or artifact folder")
    p.add_argument("--backend", default="onnxruntime", choices=[b for b in BACKENDS if b != "torch"],
                   help="the backend to check")  # fmt: skip
    p.add_argument("--precision", default="fp16", choices=("fp32", "fp16"), help="the models to check")
    p.add_argument("--batch-size", type=int, default=1, help="images per check run")
    p.add_argument("--width", type=int, default=None, help="default: the model's native size")
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--engines", default=None, help=ENGINES_HELP)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("build", help="build fp16 TensorRT engines (static profile, or --dynamic)")
    p.add_argument("--model", required=True, help="diffusers folder, Hub id in the local cache, or artifact folder")
    p.add_argument("--backend", default="tensorrt", choices=("tensorrt",), help="the engines' backend")
    p.add_argument("--batch-size", type=int, default=1, help="images per request (the UNet runs 2x with CFG)")
    p.add_argument("--width", type=int, default=None, help="static profile width (default: the model's size)")
    p.add_argument("--height", type=int, default=None, help="static profile height (default: the model's size)")
    p.add_argument("--dynamic", default=None, metavar="MIN..MAX", help="a dynamic profile, e.g. 256..1024 pixels")
    p.add_argument("--token-chunks", type=int, default=1, help="prompt chunks of 77 tokens the engines take (1..K)")
    p.add_argument("--and-terms", type=int, default=1, help="AND terms of a prompt the UNet takes (1..m)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0-5 (default 3)")
    p.add_argument("--refit", action="store_true", help="refittable engines (LoRA weights without a rebuild)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--engines", default=None, help=ENGINES_HELP)
    p.set_defaults(func=cmd_build)
