"""`upscale-image`: one image through an upscaler (runtime.upscalers), written as the generation commands write
images; and the `--upscaler-dir` option the commands that use upscalers share."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import BUDGET_HELP, ENGINES_HELP, PICKLE_HELP, memory_budget

UPSCALER_DIR_HELP = (
    "folder of upscaler model files (.safetensors; .pth/.pt with --allow-pickle), found by file stem or A1111's name "
    "(default: $SDRT_HOME/upscalers, else ~/.cache/sdrt/upscalers)"
)
UPSCALER_BACKENDS = ("onnxruntime", "openvino", "torch")


def add_upscaler_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upscaler-dir", default=None, metavar="DIR", help=UPSCALER_DIR_HELP)


def cmd_upscale_image(args: argparse.Namespace) -> int:
    import numpy as np

    from ..images import load_image
    from ..output import check_output_path, save_images
    from ..upscalers import load_upscaler

    output = Path(args.output)
    check_output_path(output)  # fail before any work on a bad output path
    budget = memory_budget(args)
    image = load_image(args.input)
    start = time.perf_counter()
    upscaler = load_upscaler(
        args.upscaler, args.upscaler_dir, backend=args.backend, engines_dir=args.engines,
        allow_pickle=args.allow_pickle, tile_size=args.tile_size, tile_overlap=args.tile_overlap,
        memory_budget=budget, progress=not args.quiet,
    )  # fmt: skip
    result = upscaler.upscale(image, args.scale)
    pixels = np.asarray(result.convert("RGB"), dtype=np.float32)[None] / np.float32(255)  # [1, H, W, 3]
    infotext = f"Postprocess upscale by: {args.scale:g}, Postprocess upscaler: {upscaler.name}"  # A1111's extras
    paths = save_images(pixels, output, [infotext])
    elapsed = time.perf_counter() - start
    print(f"wrote {paths[0]} ({result.width}x{result.height}, {upscaler.name}; {elapsed:.1f} s)")
    return 0


def add_upscale_command(sub) -> None:
    """`upscale-image`: the A1111 upscalers (None, Lanczos, Nearest and model files) on one image."""
    p = sub.add_parser("upscale-image", help="upscale an image with an upscaler model (ESRGAN, SwinIR ...) or Lanczos")
    p.add_argument("--input", required=True, help="the image to upscale")
    p.add_argument("--upscaler", required=True, help="None, Lanczos, Nearest, or a model's file stem or A1111 name")
    add_upscaler_dir_option(p)
    p.add_argument("--scale", type=float, default=4.0, help="upscale factor; sides end as a multiple of 8 (A1111)")
    p.add_argument(
        "--tile-size", type=int, default=192, help="model tile size in pixels, as A1111's ESRGAN_tile (0: no tiling)"
    )
    p.add_argument(
        "--tile-overlap", type=int, default=8, help="pixels neighbouring tiles share, as A1111's ESRGAN_tile_overlap"
    )
    p.add_argument("--backend", default="onnxruntime", choices=UPSCALER_BACKENDS, help="what runs the model")
    p.add_argument("--engines", default=None, help=ENGINES_HELP)
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.add_argument("--memory-budget", default=None, metavar="SIZE", help=BUDGET_HELP)
    p.add_argument("--output", required=True, help="image file: .png, .jpg, .webp or .npy (float32 [1, H, W, 3])")
    p.set_defaults(func=cmd_upscale_image)
