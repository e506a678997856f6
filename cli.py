"""sdrt command line: one function per subcommand, no logic of its own.

    python cli.py tiny-model models/tiny
    python cli.py export --model models/tiny
    python cli.py txt2img --model models/tiny --prompt "a photo of a cat" --seed 42 --output cat.png
    python cli.py samplers
    python cli.py cache list

Artifacts go to the per-user cache ($SDRT_HOME/engines, default ~/.cache/sdrt/engines) unless --engines names a
folder. Global options (--quiet) go before or after the subcommand. User mistakes print one line `error: ...` to
stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from export.tiny import VARIANTS as TINY_VARIANTS
from runtime.cache import engines_dir_or_default
from runtime.commands import (
    ENGINES_HELP,
    MODEL_HELP,
    PICKLE_HELP,
    QUIET_HELP,
    add_checkpoint_options,
    checkpoint_source,
)
from runtime.commands.generate import add_generation_commands
from runtime.commands.gpu import add_gpu_commands
from runtime.commands.serve import add_serve_command
from runtime.commands.upscale import add_upscale_command
from runtime.errors import InvalidRequestError, SdrtError

EXIT_USAGE = 2


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from export.tiny import TinyConfig, make_tiny_checkpoint

    folder = Path(args.path)
    if folder.exists() and any(folder.iterdir()):
        raise InvalidRequestError(f"{folder} exists and is not empty; choose a new folder")
    make_tiny_checkpoint(folder, TinyConfig(variant=args.variant, seed=args.seed))
    print(f"wrote a tiny random {args.variant} checkpoint to {folder}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from export.fp16 import export_with_precision

    start = time.perf_counter()
    progress = not args.quiet
    engines = engines_dir_or_default(args.engines)
    folder = export_with_precision(
        checkpoint_source(args),
        engines,
        args.precision,
        force=args.force,
        progress=progress,
        allow_pickle=args.allow_pickle,
    )
    print(f"artifacts in {folder} ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_watermark_check(args: argparse.Namespace) -> int:
    from runtime.watermark import read_watermark

    text = read_watermark(args.image, args.length)
    print(text if text is not None else "no watermark found")
    return 0 if text is not None else 1


def cmd_cache(args: argparse.Namespace) -> int:
    """List the artifact cache's entries, or delete them (all, or those named)."""
    from runtime.cache import cache_entries, clear_cache

    engines = engines_dir_or_default(args.engines)
    if args.action == "clear":
        removed = clear_cache(engines, args.names)
        print(f"removed {len(removed)} entries ({_mib(sum(e.size for e in removed))}) from {engines}")
        return 0
    if args.names:
        raise InvalidRequestError("cache list takes no names (cache clear NAME ... deletes entries)")
    entries = cache_entries(engines)
    for entry in entries:
        print(f"{_mib(entry.size):>11}  {entry.name}  ({entry.kind})")
    print(f"{len(entries)} entries, {_mib(sum(e.size for e in entries))} in {engines}")
    return 0


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def cmd_samplers(args: argparse.Namespace) -> int:
    from runtime.samplers import SAMPLER_NAMES, SCHEDULE_TYPES, resolve_sampler

    specs = [resolve_sampler(name)[0] for name in SAMPLER_NAMES]
    if args.json:
        rows = [{"name": s.name, "description": s.description, "diffusers": s.diffusers_class} for s in specs]
        print(json.dumps({"samplers": rows, "schedule_types": list(SCHEDULE_TYPES)}, indent=2))
        return 0
    width = max(len(s.name) for s in specs)
    for spec in specs:
        print(f"{spec.name:<{width}}  {spec.description}")
    print(f"\nschedule types: {', '.join(SCHEDULE_TYPES)} (as --schedule or a label suffix, e.g. 'DPM++ 2M Karras')")
    return 0


def cmd_parse_prompt(args: argparse.Namespace) -> int:
    from runtime.prompts import describe_prompt

    tokenizer = None
    if args.model:
        from runtime.api import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    if args.steps < 1:
        raise InvalidRequestError(f"steps must be at least 1, not {args.steps}")
    report = describe_prompt(args.prompt, args.steps, tokenizer, emphasis=args.emphasis)
    print(json.dumps(report, ensure_ascii=False, indent=2))
    return 0


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help when it has a value worth showing and the help names none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default is argparse.SUPPRESS or default in ("", [])
        if hidden or not action.option_strings or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description="sdrt: Stable Diffusion inference engine")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny-model", help="create a tiny random diffusers checkpoint (demos, tests)")
    p.add_argument("path", help="a new (or empty) folder to write the diffusers checkpoint to")
    p.add_argument("--variant", default="sd1", choices=TINY_VARIANTS,  # export.tiny's, importable without torch
                   help="sd1 / sd2-v: text to image (epsilon / v-prediction); sd15-shaped: SD 1.5's layer shapes; "
                   "sd1-inpaint, sd2-depth, x4-upscaler: the inpaint, depth2img and upscale models; "
                   "sdxl: SDXL base's layout; sdxl-inpaint: its 9-channel inpainting UNet; sdxl-refiner: SDXL's "
                   "refiner layout (text encoder 2 only); sdxl-shaped: SDXL base's layer shapes (3.5 billion "
                   "parameters, 7 GB: for GPU benchmarks)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("export", help="export a diffusers checkpoint to ONNX (+ manifest)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--engines", default=None, help=ENGINES_HELP)
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "fp16", "int8"),
        help="fp32: also the onnxruntime CPU graphs (fused attention); int8: those and the int8 UNet (generation's "
        "--precision int8); fp16: the GPU models under <artifacts>/fp16 (the VAE stays fp32 if it upcasts)",
    )
    add_checkpoint_options(p)
    p.set_defaults(func=cmd_export)

    add_generation_commands(sub)

    add_upscale_command(sub)

    p = sub.add_parser("parse-prompt", help="show how a prompt is read: attention, schedule, chunks, tokens")
    p.add_argument("--prompt", required=True, help="the prompt, in A1111's syntax")
    p.add_argument("--steps", type=int, default=20, help="steps the prompt-editing schedule spans")
    p.add_argument("--model", default=None, help="a model whose tokenizer counts tokens and chunks")
    p.add_argument("--emphasis", default="Original", help="Original, 'No norm', Ignore or None")
    p.set_defaults(func=cmd_parse_prompt)

    p = sub.add_parser("watermark-check", help="read the invisible watermark of an image (exit 1 if none)")
    p.add_argument("image", help="the image file to read")
    p.add_argument("--length", type=int, default=None, help="the text's length in bytes, if known")
    p.set_defaults(func=cmd_watermark_check)

    add_gpu_commands(sub)

    add_serve_command(sub)

    p = sub.add_parser("samplers", help="list the samplers and schedule types")
    p.add_argument("--json", action="store_true", help="as JSON (name, description, diffusers class)")
    p.set_defaults(func=cmd_samplers)

    p = sub.add_parser("cache", help="list or delete exported artifacts (the per-user cache, or --engines)")
    p.add_argument("action", choices=("list", "clear"), help="list: entries and sizes; clear: delete them")
    p.add_argument("names", nargs="*", help="clear only these entries (names as listed)")
    p.add_argument("--engines", default=None, help=ENGINES_HELP)
    p.set_defaults(func=cmd_cache)

    for command in sub.choices.values():  # global options also after the subcommand; defaults shown in --help
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
        command.formatter_class = DefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        with logging_redirect_tqdm():  # log lines above a running progress bar, not through it
            return args.func(args)
    except SdrtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
