"""The generation commands: txt2img, img2img, inpaint, outpaint, depth2img and upscale share their options and run
through one function (load, generate, save)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..errors import InvalidRequestError
from . import (
    BUDGET_HELP,
    ENGINES_HELP,
    MODEL_HELP,
    PICKLE_HELP,
    PRECISION_HELP,
    VAE_TILING,
    VAE_TILING_HELP,
    add_checkpoint_options,
    checkpoint_options,
    memory_budget,
)
from .upscale import add_upscaler_dir_option


def cmd_txt2img(args: argparse.Namespace) -> int:
    hires = {"hires_scale": args.hires_scale, "hires_width": args.hires_width, "hires_height": args.hires_height}
    hires.update(hires_upscaler=args.hires_upscaler, hires_steps=args.hires_steps, hires_strength=args.hires_strength)
    return _generate(args, "txt2img", {**hires, **_refiner_options(args)})


def _refiner_options(args: argparse.Namespace) -> dict:
    """--refiner loaded as the base model is (backend, precision, engines), with --refiner-switch-at."""
    if args.refiner is None:
        if args.refiner_switch_at is not None:
            raise InvalidRequestError("--refiner-switch-at needs --refiner (the refiner model)")
        return {}
    from .. import load
    from ..output import check_output_path

    check_output_path(Path(args.output))  # fail before any work on a bad output path
    refiner = load(args.refiner, backend=args.backend, engines_dir=args.engines, progress=not args.quiet,
                   allow_pickle=args.allow_pickle, precision=args.precision)  # fmt: skip
    switch_at = 0.8 if args.refiner_switch_at is None else args.refiner_switch_at
    return {"refiner": refiner, "refiner_switch_at": switch_at}


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
    from .. import load
    from ..output import check_output_path, save_images

    output = Path(args.output)
    check_output_path(output)  # fail before any work on a bad output path
    budget = memory_budget(args)
    start = time.perf_counter()
    progress = not args.quiet
    sd = load(
        args.model, backend=args.backend, engines_dir=args.engines, progress=progress, allow_pickle=args.allow_pickle,
        precision=args.precision, **checkpoint_options(args),
    )  # fmt: skip
    if args.embeddings:
        sd.load_embeddings(args.embeddings, allow_pickle=args.allow_pickle)
    sd.memory_budget = budget  # None: the default, measured before the first request
    sd.upscaler_dir, sd.allow_pickle = getattr(args, "upscaler_dir", None), args.allow_pickle  # hires upscalers
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


def add_generation_options(p: argparse.ArgumentParser) -> None:
    from ..backends import BACKENDS
    from ..request import DEFAULT_SAMPLER

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
    add_checkpoint_options(p)
    _add_lora_options(p)
    p.add_argument("--eta", type=float, default=None,
                   help="noise multiplier in [0, 1]: DDIM's (default 0), ancestral/SDE samplers' (default 1)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="what runs the models")
    p.add_argument("--precision", default="fp32", help=PRECISION_HELP)
    p.add_argument("--engines", default=None, help=ENGINES_HELP)
    p.add_argument("--memory-budget", default=None, metavar="SIZE", help=BUDGET_HELP)
    p.add_argument("--vae-tiling", default="auto", choices=("auto", "on", "off"), help=VAE_TILING_HELP)
    p.add_argument("--output", default="sdrt-output.png", help="image file: .png, .jpg, .webp or .npy (float32 array)")
    p.add_argument("--watermark", nargs="?", const="StableDiffusionV1", default=None, metavar="TEXT",
                   help="embed an invisible DWT-DCT watermark (default text StableDiffusionV1)")  # fmt: skip


def add_generation_commands(sub) -> None:
    """The generation subcommands, each with the shared options and its own."""
    p = sub.add_parser("txt2img", help="generate images from text")
    add_generation_options(p)
    p.add_argument("--hires-scale", type=float, default=None, help="hires fix: upscale by this factor")
    p.add_argument("--hires-width", type=int, default=0, help="hires fix: target width (0: keep the aspect ratio)")
    p.add_argument("--hires-height", type=int, default=0, help="hires fix: target height (0: keep the aspect ratio)")
    p.add_argument("--hires-upscaler", default="Latent",
                   help="Latent (default), 'Latent (nearest)', Lanczos, or an upscaler model's name (--upscaler-dir)")
    p.add_argument("--hires-steps", type=int, default=0, help="hires pass steps (0: the same as --steps)")
    p.add_argument("--hires-strength", type=float, default=0.7, help="hires pass denoising strength (default 0.7)")
    add_upscaler_dir_option(p)  # where --hires-upscaler finds model files
    p.add_argument("--refiner", default=None, metavar="MODEL",
                   help="SDXL: a refiner model (folder or Hub id) that takes over at --refiner-switch-at")  # fmt: skip
    p.add_argument("--refiner-switch-at", type=float, default=None, metavar="F",
                   help="the fraction of the noise schedule after which the refiner runs, in (0, 1] (default 0.8; "
                   "as diffusers' denoising_end/denoising_start)")  # fmt: skip
    p.set_defaults(func=cmd_txt2img)

    p = _image_command(sub, "img2img", "generate from an init image and text", "the image to start from", 0.75, True)
    p.set_defaults(func=cmd_img2img)

    p = _image_command(sub, "inpaint", "repaint the white part of a mask", "the image to repaint", 0.75, True)
    p.add_argument("--mask", required=True, help="white = repaint (an RGBA mask's alpha counts if it has any)")
    p.add_argument("--mask-blur", type=int, default=4, help="Gaussian blur of the mask in pixels (default 4)")
    p.add_argument("--inpaint-full-res", action="store_true", help="generate a crop around the mask at full size")
    p.add_argument("--inpaint-full-res-padding", type=int, default=32, help="context pixels around the mask")
    p.set_defaults(func=cmd_inpaint)

    p = _image_command(sub, "outpaint", "extend the canvas and fill the new area", "the image to extend", 1.0)
    p.add_argument("--extend", required=True, help="pixels to add: L,R,T,B (the new size must be a multiple of 8)")
    p.add_argument("--mask-blur", type=int, default=4, help="Gaussian blur of the new-area mask in pixels")
    p.set_defaults(func=cmd_outpaint)

    help_text = "img2img guided by depth (SD 2 depth checkpoints)"
    p = _image_command(sub, "depth2img", help_text, "the image to start from", 0.75, True)
    p.add_argument("--depth-map", default=None, help="a depth image (any scale); default: the model's estimator")
    p.set_defaults(func=cmd_depth2img)

    p = _image_command(sub, "upscale", "4x upscale with an x4 upscaler checkpoint", "the low-resolution image")
    p.add_argument("--noise-level", type=int, default=20, help="noise added to the low-res image (default 20)")
    p.set_defaults(func=cmd_upscale)


def _image_command(
    sub, name: str, help_text: str, image_help: str, strength: float | None = None, resize: bool = False
) -> argparse.ArgumentParser:
    """A generation subcommand that starts from --init-image, with --strength (default `strength`) and
    --resize-mode where given."""
    p = sub.add_parser(name, help=help_text)
    add_generation_options(p)
    p.add_argument("--init-image", required=True, help=image_help)
    if strength is not None:
        p.add_argument(
            "--strength", type=float, default=strength, help=f"denoising strength in [0, 1] (default {strength:g})"
        )
    if resize:
        p.add_argument("--resize-mode", default="just resize", help="just resize, crop and resize, resize and fill")
    return p
