"""Single-file checkpoints (the original LDM layout A1111 and model sites use) and VAE overrides.

`prepare_checkpoint` turns what the user gave (a diffusers folder, a Hub id, or a `.safetensors`/`.ckpt` file, plus an
optional VAE file) into a diffusers folder: the folder itself, or a converted one in the artifact cache.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import resolve_checkpoint
from ..errors import InvalidRequestError, ModelError
from .convert import convert_single_file
from .families import PREDICTION_TYPES
from .override import with_vae
from .reader import is_single_file

__all__ = ["prepare_checkpoint", "is_single_file"]


def prepare_checkpoint(
    model: str | Path,
    engines_dir: Path,
    vae: str | Path | None = None,
    tokenizer: str | Path | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """A local diffusers folder for `model`, converting a single file and applying a VAE override as needed.

    `prediction_type` ("epsilon" or "v_prediction") overrides what is read from a single file (SD 2.x's probe,
    SDXL's `v_pred` marker); `tokenizer` is a tokenizer folder for single files (default: CLIP's, SD 2's or SDXL's
    tokenizers in the Hugging Face cache; an SDXL folder gives both its tokenizer/ and tokenizer_2/)."""
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise InvalidRequestError(
            f"prediction type must be one of {', '.join(PREDICTION_TYPES)}, not {prediction_type!r}"
        )
    path = Path(model).expanduser()
    # the model is looked for before the VAE: a user checks the model path first
    folder = None if path.is_file() else resolve_checkpoint(model)
    vae_path = Path(vae).expanduser() if vae else None
    if vae_path is not None and not vae_path.is_file():
        raise ModelError(f"VAE file {vae_path} not found: there is no file {vae_path.absolute()}")
    if folder is None:
        if not is_single_file(path):
            raise ModelError(f"{path} is not a checkpoint file (.safetensors, or .ckpt/.pt with --allow-pickle)")
        given_tokenizer = Path(tokenizer).expanduser() if tokenizer else None
        return convert_single_file(path, Path(engines_dir), vae_path, given_tokenizer, prediction_type, allow_pickle)
    if tokenizer or prediction_type:
        raise InvalidRequestError("--tokenizer and --prediction-type apply to single-file checkpoints only")
    return folder if vae_path is None else with_vae(folder, vae_path, Path(engines_dir), allow_pickle)
