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
from runtime.cache import HOME_VARIABLE, engines_dir_or_default
from runtime.errors import InvalidRequestError, SdrtError

EXIT_USAGE = 2
PICKLE_HELP = "also read .bin/.pt pickle files (checkpoint weights; embeddings as tensors only): trusted files only"
ENGINES_HELP = f"artifact folder (default: ${HOME_VARIABLE}/engines, else ~/.cache/sdrt/engines)"
QUIET_HELP = "no progress bars or log lines (before or after the subcommand)"
MODEL_HELP = "diffusers folder, Hub id in the local cache, artifact folder, or single file (.safetensors)"
PRECISION_HELP = ("what the backend computes in: fp32 (every backend), int8 (onnxruntime: quantised UNet MatMuls), "
                  "bf16 (openvino, on a CPU with bf16 instructions)")
BUDGET_HELP = ("working memory a request may use, e.g. 6G or 512M (default: 80%% of the memory available at the "
               "first request; none on the GPU backends)")
VAE_TILING_HELP = ("decode and encode the image in overlapping tiles as diffusers' vae.enable_tiling(): auto tiles "
                   "only images over one VAE tile whose untiled decode would need over 4 GiB")
VAE_TILING = {"auto": None, "on": True, "off": False}


def memory_budget(args: argparse.Namespace) -> int | None:
    """--memory-budget in bytes ("6G", "512M", "1.5GiB" or bytes); None: not given."""
    from runtime.memory import parse_size

    if args.memory_budget is None:
        return None
    try:
        return parse_size(args.memory_budget)
    except ValueError as exc:
        raise InvalidRequestError(f"--memory-budget: {exc}") from None


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
        _checkpoint_source(args), engines, args.precision, force=args.force, progress=progress,
        allow_pickle=args.allow_pickle,
    )
    print(f"artifacts in {folder} ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_txt2img(args: argparse.Namespace) -> int:
    hires = {"hires_scale": args.hires_scale, "hires_width": args.hires_width, "hires_height": args.hires_height}
    hires.update(hires_upscaler=args.hires_upscaler, hires_steps=args.hires_steps, hires_strength=args.hires_strength)
    return _generate(args, "txt2img", hires)


def cmd_watermark_check(args: argparse.Namespace) -> int:
    from runtime.watermark import read_watermark

    text = read_watermark(args.image, args.length)
    print(text if text is not None else "no watermark found")
    return 0 if text is not None else 1


def cmd_img2img(args: argparse.Namespace) -> int:
    options = {"init_image": args.init_image, "strength": args.strength, "resize_mode": args.resize_mode}
    return _generate(args, "img2img", options)


def cmd_inpaint(args: argparse.Namespace) -> int:
    options = {"init_image": args.init_image, "mask": args.mask, "strength": args.strength}
    options.update(resize_mode=args.resize_mode, mask_blur=args.mask_blur, inpaint_full_res=args.inpaint_full_res)
    options.update(inpaint_full_res_padding=args.inpaint_full_res_padding)
    return _generate(args, "inpaint", options)


def cmd_depth2img(args: argparse.Namespace) -> int:
    options = {"init_image": args.init_image, "depth_map": args.depth_map, "strength": args.strength}
    return _generate(args, "depth2img", dict(options, resize_mode=args.resize_mode))


def cmd_upscale(args: argparse.Namespace) -> int:
    return _generate(args, "upscale", {"image": args.init_image, "noise_level": args.noise_level})


def cmd_outpaint(args: argparse.Namespace) -> int:
    try:
        extend = tuple(int(v) for v in args.extend.split(","))
    except ValueError:
        extend = ()
    if len(extend) != 4:
        raise InvalidRequestError(f"--extend takes four integers L,R,T,B (pixels), not {args.extend!r}")
    options = {"init_image": args.init_image, "extend": extend, "strength": args.strength, "mask_blur": args.mask_blur}
    return _generate(args, "outpaint", options)


def _add_lora_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply a LoRA file (.safetensors; .pt/.ckpt with --allow-pickle) at WEIGHT (default 1); "
                   "repeatable, weights add up")  # fmt: skip
    p.add_argument("--lora-dir", default=None, help="folder where <lora:name:weight> prompt tags find their files")


def _lora_options(sd, args: argparse.Namespace) -> dict:
    """Point the model at --lora-dir; the generation options for --lora files."""
    sd.set_lora_dir(args.lora_dir, allow_pickle=args.allow_pickle)
    return {"loras": list(args.lora)} if args.lora else {}


def _generate(args: argparse.Namespace, mode: str, mode_options: dict) -> int:
    import runtime
    from runtime.output import check_output_path, save_images

    output = Path(args.output)
    check_output_path(output)  # fail before any work on a bad output path
    budget = memory_budget(args)
    start = time.perf_counter()
    progress = not args.quiet
    sd = runtime.load(
        args.model, backend=args.backend, engines_dir=args.engines, progress=progress, allow_pickle=args.allow_pickle,
        precision=args.precision, **_checkpoint_options(args),
    )  # fmt: skip
    if args.embeddings:
        sd.load_embeddings(args.embeddings, allow_pickle=args.allow_pickle)
    sd.memory_budget = budget  # None: the default, measured before the first request
    sd.vae_tiling = VAE_TILING[args.vae_tiling]
    options = dict(
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        width=args.width,
        height=args.height,
        sampler=args.sampler,
        schedule=args.schedule,
        eta=args.eta,
        emphasis=args.emphasis,
        clip_skip=args.clip_skip,
    )
    options.update(_lora_options(sd, args))
    if args.watermark and output.suffix.lower() == ".webp":
        logging.getLogger("cli").warning("lossy WebP keeps little of an invisible watermark; prefer .png or .jpg")
    result = getattr(sd, mode)(args.prompt, watermark=args.watermark, **mode_options, **options)
    paths = save_images(result.images, output, result.infotexts)
    elapsed = time.perf_counter() - start
    seeds = ", ".join(str(s) for s in result.seeds)
    print(f"wrote {', '.join(str(p) for p in paths)} (seed {seeds}; {elapsed:.1f} s)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Each component on --backend against the fp32 reference; exit 2 with one line if any output fails."""
    from runtime.check import check_model, failure_line
    from runtime.errors import NumericalError

    reports = check_model(
        args.model, args.backend, args.precision, args.engines, args.batch_size, args.height, args.width,
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


def _add_gpu_commands(sub) -> None:
    """`check` and `build` (the NVIDIA path)."""
    from runtime.backends import BACKENDS

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


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model once and serve the A1111-compatible HTTP API until interrupted."""
    import runtime
    from runtime.server import serve
    from runtime.server.a1111 import Limits
    from runtime.server.options import ServerOptions
    from runtime.serving import Service, ServiceConfig
    from runtime.styles import read_styles_csv

    if args.request_timeout is not None and args.request_timeout <= 0:
        raise InvalidRequestError(f"--request-timeout must be positive, not {args.request_timeout}")
    limits = Limits(max_side=args.max_side, max_steps=args.max_steps, max_images=args.max_images,
                    max_body_bytes=int(args.max_body_mb * 2**20), request_timeout=args.request_timeout,
                    max_prompt_chars=args.max_prompt_chars, max_prompt_chunks=args.max_prompt_chunks,
                    max_and_terms=args.max_and_terms)  # fmt: skip
    limits.prompt_limits()  # a bad prompt limit is an error before the model loads
    styles = read_styles_csv(args.styles) if args.styles else ()  # an unreadable file too
    options = ServerOptions(args.cors_allow_origins or (), args.cors_allow_origins_regex, args.read_timeout,
                            styles)  # fmt: skip
    budget = memory_budget(args)
    sd = runtime.load(args.model, backend=args.backend, engines_dir=args.engines, allow_pickle=args.allow_pickle,
                      precision=args.precision, **_checkpoint_options(args))  # fmt: skip
    if args.embeddings:
        sd.load_embeddings(args.embeddings, allow_pickle=args.allow_pickle)
    sd.set_lora_dir(args.lora_dir, allow_pickle=args.allow_pickle)
    sd.memory_budget = budget
    sd.vae_tiling = VAE_TILING[args.vae_tiling]
    config = ServiceConfig(batching=not args.no_batching, max_batch_images=args.max_batch_images)
    with Service(sd, config) as service:
        print(f"serving {sd.name} on http://{args.host}:{args.port} (docs at /docs, metrics at /metrics)")
        serve(service, args.host, args.port, limits, log_level="warning" if args.quiet else "info", options=options)
    return 0


def _add_serve_command(sub) -> None:
    """`serve`: the HTTP server (runtime.server)."""
    from runtime.backends import BACKENDS

    p = sub.add_parser("serve", help="serve the A1111-compatible HTTP API (needs the serve extra)")
    p.add_argument("--model", required=True,
                   help="diffusers folder, Hub id in the local cache, artifact folder, or single file (.safetensors)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (A1111's is 7860)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="what runs the models")
    p.add_argument("--precision", default="fp32", help=PRECISION_HELP)
    p.add_argument("--engines", default=None, help=ENGINES_HELP)
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    _add_checkpoint_options(p)
    p.add_argument("--lora-dir", default=None, help="folder where <lora:name:weight> prompt tags find their files")
    p.add_argument("--embeddings", default=None, help="folder of textual-inversion embeddings, used by name")
    p.add_argument("--no-batching", action="store_true", help="run every request alone (default: batch compatible)")
    p.add_argument("--max-batch-images", type=int, default=8, help="images per batched UNet run (default 8)")
    p.add_argument("--request-timeout", type=float, default=None, help="seconds per request (default: none)")
    p.add_argument("--max-side", type=int, default=2048, help="largest width/height accepted (default 2048)")
    p.add_argument("--max-steps", type=int, default=150, help="most steps accepted (default 150)")
    p.add_argument("--max-images", type=int, default=16, help="most batch_size * n_iter accepted (default 16)")
    p.add_argument("--max-body-mb", type=float, default=32, help="request body limit in MiB (default 32)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE", help=BUDGET_HELP)
    p.add_argument("--vae-tiling", default="auto", choices=("auto", "on", "off"), help=VAE_TILING_HELP)
    p.add_argument("--max-prompt-chars", type=int, default=20000, help="characters per prompt, checked first")
    p.add_argument("--max-prompt-chunks", type=int, default=20, help="75-token chunks per prompt (20: 1500 tokens)")
    p.add_argument("--max-and-terms", type=int, default=16, help="AND sub-prompts per prompt")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a request body may stall before a 408 (default 30)")  # fmt: skip
    p.add_argument("--cors-allow-origins", default=None, help="allowed CORS origins, comma-separated (as A1111)")
    p.add_argument("--cors-allow-origins-regex", default=None, help="allowed CORS origins as a regular expression")
    p.add_argument("--styles", default=None, metavar="CSV",
                   help="prompt styles file in A1111's format (name,prompt,negative_prompt), used by request styles")
    p.set_defaults(func=cmd_serve)


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


def _add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """Options of single-file checkpoints and VAE overrides (runtime.single_file)."""
    p.add_argument("--vae", default=None, metavar="FILE", help="replace the model's VAE with this VAE file")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="single files: tokenizer folder (default: CLIP's / SD 2's from the Hugging Face cache)")
    p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="single files: override the detected prediction type (SD 2.x)")  # fmt: skip


def _checkpoint_options(args: argparse.Namespace) -> dict:
    return {"vae": args.vae, "tokenizer": args.tokenizer, "prediction_type": args.prediction_type}


def _checkpoint_source(args: argparse.Namespace):
    """What `export` reads: the model as given, or the diffusers folder of a single file / VAE override."""
    if not (Path(args.model).is_file() or args.vae or args.tokenizer or args.prediction_type):
        return args.model
    from runtime.single_file import prepare_checkpoint

    options = dict(_checkpoint_options(args), allow_pickle=args.allow_pickle)
    return prepare_checkpoint(args.model, engines_dir_or_default(args.engines), **options)


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    from runtime.backends import BACKENDS
    from runtime.request import DEFAULT_SAMPLER

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="what to generate, in A1111's syntax: (word:1.2), [a:b:5], BREAK")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (same syntax)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance; <= 1 skips the uncond pass")
    p.add_argument("--seed", type=int, default=-1, help="-1 (default): random; image i of a batch uses seed + i")
    p.add_argument("--batch-size", type=int, default=1, help="images generated together")
    p.add_argument("--width", type=int, default=None, help="a multiple of 8 (default: the model's native size)")
    p.add_argument("--height", type=int, default=None, help="a multiple of 8 (default: the model's native size)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, help="A1111 name, e.g. 'DPM++ 2M Karras' (cli.py samplers)")
    p.add_argument("--schedule", default=None, help="schedule type: Karras, Exponential, ... (default: the sampler's)")
    p.add_argument("--emphasis", default="Original", help="Original (default), 'No norm', Ignore or None")
    p.add_argument("--clip-skip", type=int, default=1, help="1: last text-encoder layer (default); 2: the one before")
    p.add_argument("--embeddings", default=None, help="folder of textual-inversion embeddings, used by name")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    _add_checkpoint_options(p)
    _add_lora_options(p)
    p.add_argument("--eta", type=float, default=None, help="DDIM noise multiplier in [0, 1] (default 0)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="what runs the models")
    p.add_argument("--precision", default="fp32", help=PRECISION_HELP)
    p.add_argument("--engines", default=None, help=ENGINES_HELP)
    p.add_argument("--memory-budget", default=None, metavar="SIZE", help=BUDGET_HELP)
    p.add_argument("--vae-tiling", default="auto", choices=("auto", "on", "off"), help=VAE_TILING_HELP)
    p.add_argument("--output", default="sdrt-output.png", help="image file: .png, .jpg, .webp or .npy (float32 array)")
    p.add_argument("--watermark", nargs="?", const="StableDiffusionV1", default=None, metavar="TEXT",
                   help="embed an invisible DWT-DCT watermark (default text StableDiffusionV1)")  # fmt: skip


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
                   "sd1-inpaint, sd2-depth, x4-upscaler: the inpaint, depth2img and upscale models")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("export", help="export a diffusers checkpoint to ONNX (+ manifest)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--engines", default=None, help=ENGINES_HELP)
    p.add_argument("--force", action="store_true", help="rebuild even if up to date")
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"),
                   help="fp16: also write GPU models under <artifacts>/fp16 (the VAE stays fp32 if it upcasts)")
    _add_checkpoint_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("txt2img", help="generate images from text")
    _add_generation_options(p)
    p.add_argument("--hires-scale", type=float, default=None, help="hires fix: upscale by this factor")
    p.add_argument("--hires-width", type=int, default=0, help="hires fix: target width (0: keep the aspect ratio)")
    p.add_argument("--hires-height", type=int, default=0, help="hires fix: target height (0: keep the aspect ratio)")
    p.add_argument("--hires-upscaler", default="Latent", help="Latent (default), 'Latent (nearest)', Lanczos ...")
    p.add_argument("--hires-steps", type=int, default=0, help="hires pass steps (0: the same as --steps)")
    p.add_argument("--hires-strength", type=float, default=0.7, help="hires pass denoising strength (default 0.7)")
    p.set_defaults(func=cmd_txt2img)

    p = sub.add_parser("img2img", help="generate from an init image and text")
    _add_generation_options(p)
    p.add_argument("--init-image", required=True, help="the image to start from")
    p.add_argument("--strength", type=float, default=0.75, help="denoising strength in [0, 1] (default 0.75)")
    p.add_argument("--resize-mode", default="just resize", help="just resize, crop and resize, resize and fill")
    p.set_defaults(func=cmd_img2img)

    p = sub.add_parser("inpaint", help="repaint the white part of a mask")
    _add_generation_options(p)
    p.add_argument("--init-image", required=True, help="the image to repaint")
    p.add_argument("--mask", required=True, help="white = repaint (an RGBA mask's alpha counts if it has any)")
    p.add_argument("--strength", type=float, default=0.75, help="denoising strength in [0, 1] (default 0.75)")
    p.add_argument("--resize-mode", default="just resize", help="just resize, crop and resize, resize and fill")
    p.add_argument("--mask-blur", type=int, default=4, help="Gaussian blur of the mask in pixels (default 4)")
    p.add_argument("--inpaint-full-res", action="store_true", help="generate a crop around the mask at full size")
    p.add_argument("--inpaint-full-res-padding", type=int, default=32, help="context pixels around the mask")
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("outpaint", help="extend the canvas and fill the new area")
    _add_generation_options(p)
    p.add_argument("--init-image", required=True, help="the image to extend")
    p.add_argument("--extend", required=True, help="pixels to add: L,R,T,B (the new size must be a multiple of 8)")
    p.add_argument("--strength", type=float, default=1.0, help="denoising strength in [0, 1] (default 1)")
    p.add_argument("--mask-blur", type=int, default=4, help="Gaussian blur of the new-area mask in pixels")
    p.set_defaults(func=cmd_outpaint)

    p = sub.add_parser("depth2img", help="img2img guided by depth (SD 2 depth checkpoints)")
    _add_generation_options(p)
    p.add_argument("--init-image", required=True, help="the image to start from")
    p.add_argument("--depth-map", default=None, help="a depth image (any scale); default: the model's estimator")
    p.add_argument("--strength", type=float, default=0.75, help="denoising strength in [0, 1] (default 0.75)")
    p.add_argument("--resize-mode", default="just resize", help="just resize, crop and resize, resize and fill")
    p.set_defaults(func=cmd_depth2img)

    p = sub.add_parser("upscale", help="4x upscale with an x4 upscaler checkpoint")
    _add_generation_options(p)
    p.add_argument("--init-image", required=True, help="the low-resolution image")
    p.add_argument("--noise-level", type=int, default=20, help="noise added to the low-res image (default 20)")
    p.set_defaults(func=cmd_upscale)

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

    _add_gpu_commands(sub)

    _add_serve_command(sub)

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
