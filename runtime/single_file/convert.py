"""Single-file checkpoint -> diffusers folder in the artifact cache, written once (temp folder + rename).

`<engines>/single-file/<stem>-<sha256[:10]>-<variant>/` holds model_index.json, unet/ vae/ text_encoder/ (config.json
+ float32 safetensors), tokenizer/ (SDXL: also text_encoder_2/ and tokenizer_2/; its refiner: those alone),
scheduler/ and `sdrt_source.json` (the A1111 model and VAE names and hashes the
infotext reports). `<variant>` hashes everything else that changes the result: the VAE override, the prediction type
override, an explicit tokenizer, and the converter's version. The rest of sdrt treats the folder like any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..checkpoint import SOURCE_FILE  # the A1111 names and hashes of the source files
from ..errors import ModelError
from .configs import text_config, unet_config, unet_layout, vae_config
from .families import SD2_EPS, Family, detect_family, with_prediction_type
from .hashing import SHORT_HASH, HashCache
from .keys import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    SDXL_REFINER_PREFIX,
    UNET_PREFIX,
    rename_all,
    unet_map,
    vae_map,
    vae_to_diffusers,
)
from .probe import probe_prediction_type
from .reader import read_tensors
from .text import clip_to_diffusers, open_clip_to_diffusers
from .tokenizers import TOKENIZER_FILES, copy_tokenizer, find_tokenizer, special_ids
from .vae import read_vae_file, split_vae

logger = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump when the converted folders change, so old ones are not reused
CACHE_FOLDER = "single-file"
SD2_BASE_STEP = 875000  # diffusers: an SD 2 Lightning checkpoint at this step is SD 2 base (epsilon)
V_PRED_MARKER = "v_pred"  # an empty tensor v-prediction SDXL fine-tunes carry (ComfyUI reads it the same way)


def cache_root(engines_dir: Path) -> Path:
    return Path(engines_dir) / CACHE_FOLDER


def variant_key(*parts: object) -> str:
    """8 hex digits naming what besides the checkpoint's bytes shapes the converted folder."""
    return hashlib.sha256(json.dumps([CONVERTER_VERSION, *parts]).encode()).hexdigest()[:8]


def folder_hash(folder: Path | None) -> str | None:
    """sha256 of a tokenizer folder's files (an explicit --tokenizer is part of the cache key)."""
    if folder is None:
        return None
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        for path in (Path(folder) / name, Path(folder) / "tokenizer" / name, Path(folder) / "tokenizer_2" / name):
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def convert_single_file(
    path: Path,
    engines_dir: Path,
    vae: Path | None = None,
    tokenizer: Path | None = None,
    prediction_type: str | None = None,
    allow_pickle: bool = False,
) -> Path:
    """The diffusers folder of single-file checkpoint `path` (converted now unless the cache has it)."""
    root = cache_root(engines_dir)
    hashes = HashCache(root / "hashes.json")
    sha = hashes.sha256(path)
    vae_sha = hashes.sha256(vae) if vae is not None else None
    key = variant_key(sha, vae_sha, prediction_type, folder_hash(tokenizer))
    target = root / f"{_safe_name(path.stem)}-{sha[:SHORT_HASH]}-{key}"
    if (target / SOURCE_FILE).is_file():
        return target
    source = {"model": path.stem, "model_hash": sha[:SHORT_HASH], "sha256": sha}
    if vae is not None:
        source.update(vae=vae.stem, vae_hash=vae_sha[:SHORT_HASH])
    tensors, step = read_tensors(path, allow_pickle)
    with _building(target) as work:
        source.update(_write_parts(work, path, tensors, step, vae, tokenizer, prediction_type, allow_pickle))
        _write_json(work / SOURCE_FILE, source)
    hashes.save()
    logger.info("converted %s (%s) to %s", path, source["family"], target)
    return target


def _write_parts(
    work: Path,
    path: Path,
    tensors: dict[str, np.ndarray],
    step: int | None,
    vae: Path | None,
    tokenizer: Path | None,
    prediction_type: str | None,
    allow_pickle: bool,
) -> dict:
    """Write every part of the diffusers folder into `work`; return the family facts for sdrt_source.json."""
    unet = _section(tensors, UNET_PREFIX)
    conv_in = unet.get("input_blocks.0.0.weight")
    family = detect_family(set(tensors), conv_in.shape[1] if conv_in is not None and conv_in.ndim == 4 else None)
    pooled_dim = None
    for text, prefix, part in _text_encoders(family):
        config = _write_text_encoder(work, _section(tensors, prefix), text, part, tokenizer)
        pooled_dim = config["projection_dim"]  # SDXL: text encoder 2's, which the UNet's added conditioning reads
    layout = unet_layout(unet)
    write_safetensors(
        work / "unet" / "diffusion_pytorch_model.safetensors", rename_all(unet, unet_map(layout).to_diffusers, "UNet")
    )
    _write_json(work / "unet" / "config.json", unet_config(unet, family, layout, pooled_dim))  # what the probe loads
    _write_vae(work, split_vae(tensors), vae, family, allow_pickle, path)
    chosen, how = _prediction_type(family, prediction_type, step, work / "unet", V_PRED_MARKER in tensors)
    family = with_prediction_type(family, chosen)
    _write_json(work / "unet" / "config.json", unet_config(unet, family, layout, pooled_dim))  # SD 2 v: upcast
    _write_pipeline(work, family)
    return {"family": family.name, "prediction_type": chosen, "prediction_type_from": how}


def _section(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}


def _text_encoders(family: Family) -> list[tuple[str, str, str]]:
    """(text encoder kind, tensor prefix, diffusers part) of each text encoder of the family."""
    if family.text == "sdxl":
        return [("clip", SDXL_CLIP_PREFIX, "text_encoder"), ("open_clip_g", SDXL_OPEN_CLIP_PREFIX, "text_encoder_2")]
    if family.text == "sdxl_refiner":
        return [("open_clip_g", SDXL_REFINER_PREFIX, "text_encoder_2")]
    return [(family.text, CLIP_PREFIX if family.text == "clip" else OPEN_CLIP_PREFIX, "text_encoder")]


def _write_text_encoder(
    work: Path, tensors: dict[str, np.ndarray], text: str, part: str, tokenizer: Path | None
) -> dict:
    """Write one text encoder (`part`: text_encoder or text_encoder_2) and its tokenizer; return its config."""
    folder, pad = find_tokenizer(text, tokenizer)
    tokenizer_part = work / part.replace("text_encoder", "tokenizer")
    vocab = copy_tokenizer(folder, tokenizer_part, pad)
    bos, eos, pad_id = special_ids(tokenizer_part, vocab)
    config = text_config(tensors, text, bos, eos, pad_id)
    if max(vocab.values(), default=0) >= config["vocab_size"]:
        raise ModelError(
            f"the tokenizer in {folder} has ids up to {max(vocab.values())}, beyond the text encoder's "
            f"{config['vocab_size']} token embeddings: it does not belong to this model"
        )
    if text == "clip":
        weights = clip_to_diffusers(tensors)
    else:
        weights = open_clip_to_diffusers(tensors, sdxl=text == "open_clip_g")
    write_safetensors(work / part / "model.safetensors", weights)
    _write_json(work / part / "config.json", config)
    return config


def _write_vae(
    work: Path, own: dict[str, np.ndarray], override: Path | None, family: Family, allow_pickle: bool, path: Path
) -> None:
    """The checkpoint's VAE, or the override file's when one is given (it must have the same shapes)."""
    if override is not None:
        other = read_vae_file(override, allow_pickle)
        if own:
            check_vae_fits(other, own, override)
        own = other
    if not own:
        raise ModelError(f"{path} has no VAE (first_stage_model.*): give one with --vae")
    config = vae_config(own, family)
    levels = len(config["block_out_channels"])
    write_safetensors(
        work / "vae" / "diffusion_pytorch_model.safetensors",
        vae_to_diffusers(own, vae_map(levels, config["layers_per_block"])),
    )
    _write_json(work / "vae" / "config.json", config)


def check_vae_fits(vae: dict[str, np.ndarray], reference: dict[str, np.ndarray], path: Path) -> None:
    """ModelError unless the VAE (LDM names) has exactly the tensors and shapes of the model's own VAE."""
    shapes = {k: v.shape for k, v in vae.items()}
    wanted = {k: v.shape for k, v in reference.items()}
    if shapes != wanted:
        differ = sorted(set(shapes) ^ set(wanted)) or sorted(k for k in wanted if shapes[k] != wanted[k])
        raise ModelError(f"the VAE {path} does not fit this model (first difference: {differ[0]!r})")


def _prediction_type(
    family: Family, given: str | None, step: int | None, unet_folder: Path, marked: bool = False
) -> tuple[str, str]:
    """(prediction type, how it was decided): given > a `v_pred` marker tensor > SD 2 base's training step >
    A1111's probe > the family's."""
    if given is not None:
        return given, "given"
    if marked:
        return "v_prediction", V_PRED_MARKER
    default = family.scheduler.get("prediction_type", "epsilon")
    if family is not SD2_EPS:  # only SD 2.x base models come in both kinds
        return default, "family"
    if step == SD2_BASE_STEP:
        return "epsilon", "global_step"
    probed = probe_prediction_type(unet_folder)
    if probed is None:
        logger.warning("cannot probe v-prediction without torch; assuming v_prediction (pass --prediction-type)")
        return "v_prediction", "default"
    return probed, "probe"


def _write_pipeline(work: Path, family: Family) -> None:
    """scheduler/ (and the x4 upscaler's low_res_scheduler/) configs and model_index.json."""
    _write_json(work / "scheduler" / "scheduler_config.json", family.scheduler)
    if family.sdxl:
        _write_json(work / "model_index.json", _sdxl_index(family))
        return
    index = {
        "_class_name": family.pipeline_class,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", family.scheduler["_class_name"]],
    }
    if family.low_res_scheduler is not None:
        from .families import X4_MAX_NOISE_LEVEL

        _write_json(work / "low_res_scheduler" / "scheduler_config.json", family.low_res_scheduler)
        index.update(low_res_scheduler=["diffusers", "DDPMScheduler"], max_noise_level=X4_MAX_NOISE_LEVEL)
    elif family.pipeline_class != "StableDiffusionDepth2ImgPipeline":
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    _write_json(work / "model_index.json", index)


def _sdxl_index(family: Family) -> dict:
    """model_index.json as SDXL's published folders have it (base 1.0, refiner 1.0, inpainting 0.1)."""
    encoder_1 = [None, None] if family.text == "sdxl_refiner" else ["transformers", "CLIPTextModel"]
    tokenizer_1 = [None, None] if family.text == "sdxl_refiner" else ["transformers", "CLIPTokenizer"]
    index = {
        "_class_name": family.pipeline_class,
        "text_encoder": encoder_1,
        "tokenizer": tokenizer_1,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", family.scheduler["_class_name"]],
        "force_zeros_for_empty_prompt": family.text != "sdxl_refiner",
    }
    if family.pipeline_class != "StableDiffusionXLPipeline":
        index["requires_aesthetics_score"] = family.text == "sdxl_refiner"
    return index


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write float tensors as float32 safetensors, one tensor at a time (no second copy of the whole model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header, offset = {}, 0
    for name in sorted(tensors):
        size = int(np.prod(tensors[name].shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name], dtype="<f4").reshape(-1).data)


@contextmanager
def _building(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target`, renamed to it on success and removed on any failure."""
    created = [p for p in (target.parent.parent, target.parent) if not p.exists()]  # removed again if left empty
    work = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    work.mkdir(parents=True)
    try:
        yield work
        try:
            work.rename(target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():  # not a concurrent conversion of the same file
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
        for folder in reversed(created):
            _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only when nothing is there (a failed first conversion leaves no cache folder behind)
    except OSError:
        pass


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "model"
