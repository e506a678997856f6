"""What the command line's subcommands share: option help, the checkpoint options, --memory-budget and --vae-tiling.
cli.py assembles the parser from runtime.commands.generate (the generation commands), runtime.commands.gpu (check,
build) and runtime.commands.serve."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cache import HOME_VARIABLE, engines_dir_or_default
from ..errors import InvalidRequestError

QUIET_HELP = "no progress bars or log lines (before or after the subcommand)"
PICKLE_HELP = "also read .bin/.pt pickle files (checkpoint weights; embeddings as tensors only): trusted files only"
ENGINES_HELP = f"artifact folder (default: ${HOME_VARIABLE}/engines, else ~/.cache/sdrt/engines)"
QUIET_HELP = "no progress bars or log lines (before or after the subcommand)"
MODEL_HELP = "diffusers folder, Hub id in the local cache, artifact folder, or single file (.safetensors)"
PRECISION_HELP = (
    "what the backend computes in: fp32 (every backend), int8 (onnxruntime: quantised UNet MatMuls), "
    "bf16 (openvino, on a CPU with bf16 instructions)"
)
BUDGET_HELP = (
    "working memory a request may use, e.g. 6G or 512M (default: 80%% of the memory available at the "
    "first request; none on the GPU backends)"
)
VAE_TILING_HELP = (
    "decode and encode the image in overlapping tiles as diffusers' vae.enable_tiling(): auto tiles "
    "only images over one VAE tile whose untiled decode would need over 4 GiB"
)
VAE_TILING = {"auto": None, "on": True, "off": False}


def memory_budget(args: argparse.Namespace) -> int | None:
    """--memory-budget in bytes ("6G", "512M", "1.5GiB" or bytes); None: not given."""
    from ..memory import parse_size

    if args.memory_budget is None:
        return None
    try:
        return parse_size(args.memory_budget)
    except ValueError as exc:
        raise InvalidRequestError(f"--memory-budget: {exc}") from None


def add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """Options of single-file checkpoints and VAE overrides (runtime.single_file)."""
    p.add_argument("--vae", default=None, metavar="FILE", help="replace the model's VAE with this VAE file")
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="single files: tokenizer folder, or an SDXL folder with tokenizer/ and tokenizer_2/ (default: CLIP's, "
        "SD 2's or SDXL's from the Hugging Face cache)",
    )
    p.add_argument("--prediction-type", default=None, choices=("epsilon", "v_prediction"),
                   help="single files: override the detected prediction type (SD 2.x, SDXL)")  # fmt: skip


def checkpoint_options(args: argparse.Namespace) -> dict:
    return {"vae": args.vae, "tokenizer": args.tokenizer, "prediction_type": args.prediction_type}


def checkpoint_source(args: argparse.Namespace):
    """What `export` reads: the model as given, or the diffusers folder of a single file / VAE override."""
    if not (Path(args.model).is_file() or args.vae or args.tokenizer or args.prediction_type):
        return args.model
    from ..single_file import prepare_checkpoint

    options = dict(checkpoint_options(args), allow_pickle=args.allow_pickle)
    return prepare_checkpoint(args.model, engines_dir_or_default(args.engines), **options)
