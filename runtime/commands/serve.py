"""`serve`: load the model once and serve the A1111-compatible HTTP API (runtime.server)."""

from __future__ import annotations

import argparse

from ..errors import InvalidRequestError
from . import (
    BUDGET_HELP,
    ENGINES_HELP,
    PICKLE_HELP,
    PRECISION_HELP,
    VAE_TILING,
    VAE_TILING_HELP,
    add_checkpoint_options,
    checkpoint_options,
    memory_budget,
)
from .upscale import add_upscaler_dir_option


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model once and serve the A1111-compatible HTTP API until interrupted."""
    from .. import load
    from ..server import serve
    from ..server.a1111 import Limits
    from ..server.options import ServerOptions
    from ..serving import Service, ServiceConfig
    from ..styles import read_styles_csv

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
    if args.ray:
        if args.refiner:
            raise InvalidRequestError("--refiner is not available with --ray")
        return _serve_on_ray(args, limits, options, budget)
    if args.replicas is not None or args.autoscale or args.address:
        raise InvalidRequestError("--replicas, --autoscale and --address apply with --ray")
    sd = load(args.model, backend=args.backend, engines_dir=args.engines, allow_pickle=args.allow_pickle,
                      precision=args.precision, **checkpoint_options(args))  # fmt: skip
    if args.embeddings:
        sd.load_embeddings(args.embeddings, allow_pickle=args.allow_pickle)
    sd.set_lora_dir(args.lora_dir, allow_pickle=args.allow_pickle)
    sd.upscaler_dir, sd.allow_pickle = args.upscaler_dir, args.allow_pickle  # /upscalers, extras, hires fix
    sd.memory_budget = budget
    sd.vae_tiling = VAE_TILING[args.vae_tiling]
    if args.refiner:
        sd.refiner = _load_refiner(args, sd)
    config = ServiceConfig(batching=not args.no_batching, max_batch_images=args.max_batch_images)
    with Service(sd, config) as service:
        print(f"serving {sd.name} on http://{args.host}:{args.port} (docs at /docs, metrics at /metrics)")
        serve(service, args.host, args.port, limits, log_level="warning" if args.quiet else "info", options=options)
    return 0


def _load_refiner(args: argparse.Namespace, sd):
    """--refiner loaded once as the served model is (backend, engines, precision); requests name it by
    refiner_checkpoint (runtime.server.fields.refiner_of)."""
    from .. import load
    from ..pipelines.refiner import check_refiner

    refiner = load(args.refiner, backend=args.backend, engines_dir=args.engines, allow_pickle=args.allow_pickle,
                   precision=args.precision)  # fmt: skip
    check_refiner(sd, refiner, 0.8)  # both SDXL, the served one a base: an error now, not on every request
    refiner.vae_tiling = sd.vae_tiling  # the refiner's VAE decodes
    return refiner


def _serve_on_ray(args: argparse.Namespace, limits, options, budget: int | None) -> int:
    """`serve --ray`: the same API on Ray Serve replicas (runtime.ray_serve), exported once here first."""
    import dataclasses

    from ..ray_serve import parse_autoscale, require_ray, run

    require_ray()
    if args.autoscale:
        parse_autoscale(args.autoscale)  # a bad range is an error before anything starts
    if args.replicas is not None and args.replicas < 1:
        raise InvalidRequestError(f"--replicas must be at least 1, not {args.replicas}")
    app_args = {"model": args.model, "backend": args.backend, "precision": args.precision, "engines": args.engines,
                "allow_pickle": args.allow_pickle, **checkpoint_options(args), "lora_dir": args.lora_dir,
                "embeddings": args.embeddings, "upscaler_dir": getattr(args, "upscaler_dir", None),
                "memory_budget": budget, "vae_tiling": VAE_TILING[args.vae_tiling],
                "batching": not args.no_batching, "max_batch_images": args.max_batch_images,
                "limits": dataclasses.asdict(limits), "options": dataclasses.asdict(options),
                "flags": {"listen": args.host not in ("127.0.0.1", "localhost", "::1"), "port": args.port,
                          "server_name": args.host}}  # fmt: skip
    if args.autoscale:
        app_args["autoscale"] = args.autoscale
    else:
        app_args["replicas"] = args.replicas or 1
    run(app_args, args.host, args.port, args.address, quiet=args.quiet)
    return 0


def add_serve_command(sub) -> None:
    """`serve`: the HTTP server (runtime.server)."""
    from ..backends import BACKENDS

    p = sub.add_parser("serve", help="serve the A1111-compatible HTTP API (needs the serve extra)")
    p.add_argument(
        "--model",
        required=True,
        help="diffusers folder, Hub id in the local cache, artifact folder, or single file (.safetensors)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (A1111's is 7860)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="what runs the models")
    p.add_argument("--precision", default="fp32", help=PRECISION_HELP)
    p.add_argument("--engines", default=None, help=ENGINES_HELP)
    p.add_argument("--allow-pickle", action="store_true", help=PICKLE_HELP)
    add_checkpoint_options(p)
    p.add_argument("--refiner", default=None, metavar="MODEL",
                   help="SDXL: a refiner served beside the model (refiner_checkpoint, refiner_switch_at)")  # fmt: skip
    p.add_argument("--lora-dir", default=None, help="folder where <lora:name:weight> prompt tags find their files")
    p.add_argument("--embeddings", default=None, help="folder of textual-inversion embeddings, used by name")
    add_upscaler_dir_option(p)  # /sdapi/v1/upscalers, extras and hires fix
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
    p.add_argument(
        "--styles",
        default=None,
        metavar="CSV",
        help="prompt styles file in A1111's format (name,prompt,negative_prompt), used by request styles",
    )
    ray = p.add_argument_group("Ray Serve (needs the ray extra)")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas (runtime.ray_serve)")
    scale = ray.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="model replicas (default 1)")
    scale.add_argument("--autoscale", default=None, metavar="MIN:MAX", help="let Ray scale replicas in MIN..MAX")
    ray.add_argument("--address", default=None, help="Ray cluster to join (default: start a local Ray instance)")
    p.set_defaults(func=cmd_serve)
