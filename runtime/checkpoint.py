"""Finding and describing a diffusers checkpoint folder from its JSON files alone (no torch).

`resolve_checkpoint` turns what a user typed (a folder or a Hub id) into a local diffusers folder;
`describe_checkpoint` reads its configs into the model facts the runtime needs (they go into the manifest);
`fingerprint` is the cheap identity of its files that names the artifact cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .errors import InvalidRequestError, ModelError
from .memory import memory_facts

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")  # SDXL's second (projected, OpenCLIP bigG) text encoder
DEPTH_ESTIMATOR = "depth_estimator"  # SD 2 depth's DPT model (optional part)
DEPTH_PREPROCESSOR = "feature_extractor/preprocessor_config.json"  # its image processor's settings
LOW_RES_SCHEDULER = "low_res_scheduler/scheduler_config.json"  # the x4 upscaler's noise schedule for the low-res image
DEFAULT_MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's default
WEIGHT_SUFFIXES = (".safetensors", ".bin")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")  # what a missing path ending so was meant to be
SOURCE_FILE = "sdrt_source.json"  # in folders converted from a single file: the source's names and hashes
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAMPLE_BYTES = 1 << 20  # bytes read at each of 8 places of a large weight file for its fingerprint


def resolve_checkpoint(model: str | os.PathLike) -> Path:
    """A local diffusers folder for `model`: the folder itself, or a Hub id found in the Hugging Face cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        check_checkpoint_folder(path)
        return path
    if path.exists():
        raise ModelError(
            f"{path} is a file; sdrt expects a diffusers folder (model_index.json, unet/, vae/, ...) or a single-file "
            "checkpoint (.safetensors, or .ckpt with --allow-pickle)"
        )
    text = str(model)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise ModelError(f"single-file checkpoint {text} not found: there is no file {path.absolute()}")
    if not _HUB_ID.match(text) or _looks_like_path(path):
        raise ModelError(f"model {text!r} not found: there is no folder {path.absolute()}{_siblings(path)}")
    cached = _hub_cache_snapshot(text)
    if cached is None:
        raise ModelError(
            f"model {text!r} not found: there is no folder {path.absolute()}, and no Hub model {text} in the Hugging "
            f"Face cache ({hub_cache_root()}); sdrt does not download weights: run `hf download {text}` first"
        )
    check_checkpoint_folder(cached)
    return cached


def _looks_like_path(path: Path) -> bool:
    """A name a Hub id cannot be: absolute, relative to `.`/`~`, or under a folder that exists here."""
    text = str(path)
    return path.is_absolute() or text.startswith((".", "~")) or (path.parent != Path(".") and path.parent.is_dir())


def _siblings(path: Path) -> str:
    """`(models/ holds: a, b)` when the missing folder's parent exists: the likely typo is in the last name."""
    parent = path.parent
    if parent == Path(".") or not parent.is_dir():
        return ""
    names = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f" ({parent.as_posix()}/ holds: {shown})" if names else f" ({parent.as_posix()}/ holds no folders)"


def hub_cache_root() -> Path:
    """The Hugging Face hub cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    root = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub"
    return Path(root).expanduser()


def _hub_cache_snapshot(repo_id: str) -> Path | None:
    """The newest cached snapshot of a Hub model repository, without touching the network."""
    repo = hub_cache_root() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if (snapshot / "model_index.json").is_file():
            return snapshot
    snapshots = sorted((repo / "snapshots").glob("*/model_index.json"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1].parent if snapshots else None


def check_checkpoint_folder(folder: Path) -> None:
    """Raise ModelError naming the first missing part of a diffusers Stable Diffusion folder."""
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"{folder} is not a diffusers checkpoint: model_index.json is missing")
    sdxl = is_sdxl_folder(folder)
    # an SDXL refiner has the second text encoder only (no text_encoder/, tokenizer/)
    one_encoder = sdxl and not (folder / "text_encoder").is_dir() and not (folder / "tokenizer").is_dir()
    required = tuple(p for p in REQUIRED_PARTS if not (one_encoder and p in ("text_encoder", "tokenizer")))
    for part in required + (SDXL_PARTS if sdxl else ()):
        if not (folder / part).is_dir():
            raise ModelError(f"{folder} has no {part}/ folder: the checkpoint is incomplete")
    encoders = ("text_encoder",) if not one_encoder else ()
    for part in ("unet", "vae") + encoders + (SDXL_PARTS[:1] if sdxl else ()):
        if not (folder / part / "config.json").is_file():
            raise ModelError(f"{folder / part} has no config.json: the checkpoint is incomplete")
        if not any(p.suffix in WEIGHT_SUFFIXES for p in (folder / part).iterdir()):
            raise ModelError(f"{folder / part} holds no weights (.safetensors or .bin)")
    if not _scheduler_config_path(folder).is_file():
        raise ModelError(f"{folder / 'scheduler'} has no scheduler_config.json")
    if (folder / DEPTH_ESTIMATOR).is_dir():  # optional: without it, depth2img needs a depth map
        if not any(p.suffix in WEIGHT_SUFFIXES for p in (folder / DEPTH_ESTIMATOR).iterdir()):
            raise ModelError(f"{folder / DEPTH_ESTIMATOR} holds no weights (.safetensors or .bin)")
        if not (folder / DEPTH_PREPROCESSOR).is_file():
            raise ModelError(f"{folder} has a depth estimator but no {DEPTH_PREPROCESSOR} (its image preprocessing)")


def is_sdxl_folder(folder: Path) -> bool:
    """Whether a diffusers folder holds an SDXL model: its pipeline class, a second text encoder, or a UNet with
    SDXL's "text_time" added conditioning (pooled text embeddings and size/crop ids)."""
    index = _read_json(folder / "model_index.json")
    unet_config = folder / "unet" / "config.json"
    unet = _read_json(unet_config) if unet_config.is_file() else {}
    return (
        str(index.get("_class_name", "")).startswith("StableDiffusionXL")
        or (index.get("text_encoder_2") or [None])[0] is not None
        or unet.get("addition_embed_type") == "text_time"
    )


def _scheduler_config_path(folder: Path) -> Path:
    return folder / "scheduler" / "scheduler_config.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc


def describe_checkpoint(folder: Path) -> dict:
    """The model facts of a diffusers SD folder, from its JSON configs (this is the manifest's `model` block)."""
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    text_part = "text_encoder" if (folder / "text_encoder").is_dir() else "text_encoder_2"  # an SDXL refiner: only 2
    text = _read_json(folder / text_part / "config.json")
    scheduler = _read_json(_scheduler_config_path(folder))
    vae_scale_factor = 2 ** (len(vae.get("block_out_channels", [128, 256, 512, 512])) - 1)
    sdxl = _sdxl(folder, index, unet) if is_sdxl_folder(folder) else None
    unet_downsamples = sum(1 for kind in unet.get("down_block_types", ())[:-1])  # the last block keeps its size
    return {
        "pipeline_class": index.get("_class_name", "StableDiffusionPipeline"),
        "variant": "sdxl" if sdxl else _variant(index, unet, scheduler),
        "family": "sdxl" if sdxl else "sd",  # "sd": SD 1.x / 2.x
        "prediction_type": scheduler.get("prediction_type", "epsilon"),
        "scheduler_config": {k: v for k, v in scheduler.items() if not k.startswith("_")},
        "unet_in_channels": unet.get("in_channels", 4),
        "latent_channels": unet.get("out_channels", 4),
        "unet_sample_size": unet.get("sample_size", 64),
        "latent_size_multiple": 2**unet_downsamples,
        "cross_attention_dim": unet.get("cross_attention_dim", 768),
        "vae_scale_factor": vae_scale_factor,
        "vae_scaling_factor": vae.get("scaling_factor", 0.18215),
        "vae_force_upcast": bool(vae.get("force_upcast", True)),
        "text_hidden_size": text.get("hidden_size", 768),
        "text_num_layers": text.get("num_hidden_layers", 12),
        "text_max_length": text.get("max_position_embeddings", 77),
        "memory": memory_facts(unet, vae, text),  # shapes for the memory estimate (runtime.memory)
        "unet_num_class_embeds": unet.get("num_class_embeds"),  # the x4 upscaler's noise-level labels, else None
        "depth_estimator": _depth_estimator(folder),
        "source": _source(folder),
        "sdxl": sdxl,  # SDXL's second text encoder and added conditioning, else None
        **_low_res_noise(folder, index, unet),
    }


def _sdxl(folder: Path, index: dict, unet: dict) -> dict:
    """SDXL's facts: text encoder 2 (its width, depth and pooled projection), whether text encoder 1 is there (a
    refiner has only 2), the UNet's added conditioning (a refiner's time ids end with an aesthetic score instead of
    the target size: 5, not 6) and the pipeline's negative-prompt rule; SDXL models sdrt cannot run are refused."""
    if unet.get("in_channels", 4) not in (4, 9):  # 9: the SDXL inpainting UNet (latents, mask, masked image)
        raise InvalidRequestError(
            f"{folder} is an SDXL model with {unet.get('in_channels')} UNet input channels: not supported"
        )
    if unet.get("addition_embed_type") != "text_time":
        raise InvalidRequestError(f"{folder}: SDXL models without the UNet's text_time conditioning are not supported")
    text_2 = _read_json(folder / "text_encoder_2" / "config.json")
    time_embed_dim = unet.get("addition_time_embed_dim", 256)
    projection_dim = text_2.get("projection_dim", 1280)
    aesthetic = bool(index.get("requires_aesthetics_score", False))
    ids = 5 if aesthetic else 6
    expected = unet.get("projection_class_embeddings_input_dim")
    if expected is not None and expected != projection_dim + ids * time_embed_dim:
        raise ModelError(
            f"{folder}: the UNet's added conditioning takes {expected} features, not text_encoder_2's projection "
            f"({projection_dim}) + {ids} size/crop{'/aesthetic' if aesthetic else ''} ids x {time_embed_dim}"
        )
    return {
        "text_hidden_size_2": text_2.get("hidden_size", 1280),
        "text_num_layers_2": text_2.get("num_hidden_layers", 32),
        "text_projection_dim": projection_dim,
        "addition_time_embed_dim": time_embed_dim,
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
        "requires_aesthetics_score": aesthetic,  # time ids (h, w, top, left, score): a refiner's
        "two_encoders": (folder / "text_encoder").is_dir(),  # False: text encoder 2 only (SDXL's refiner)
        "time_ids": ids,
    }


def _source(folder: Path) -> dict | None:
    """A converted single file's (or VAE override's) A1111 names and hashes (runtime.single_file writes them)."""
    path = folder / SOURCE_FILE
    return _read_json(path) if path.is_file() else None


def _depth_estimator(folder: Path) -> dict | None:
    """The depth estimator's input size and its image processor's settings (None: the checkpoint has none)."""
    if not (folder / DEPTH_ESTIMATOR).is_dir():
        return None
    config = _read_json(folder / DEPTH_ESTIMATOR / "config.json")
    processor = _read_json(folder / DEPTH_PREPROCESSOR)
    return {
        "model_type": config.get("model_type", "dpt"),
        "image_size": config.get("image_size", 384),
        "preprocessor": {k: v for k, v in processor.items() if not k.startswith("_")},
    }


def _low_res_noise(folder: Path, index: dict, unet: dict) -> dict:
    """The x4 upscaler's low-res scheduler config and noise-level cap; nothing for other models."""
    if unet.get("in_channels") != 7:
        return {}
    if not (folder / LOW_RES_SCHEDULER).is_file():
        raise ModelError(f"{folder} looks like an x4 upscaler (7 UNet input channels) but has no {LOW_RES_SCHEDULER}")
    scheduler = _read_json(folder / LOW_RES_SCHEDULER)
    return {
        "low_res_scheduler_config": {k: v for k, v in scheduler.items() if not k.startswith("_")},
        "max_noise_level": index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL),
    }


def _variant(index: dict, unet: dict, scheduler: dict) -> str:
    channels = unet.get("in_channels", 4)
    if channels == 9:
        return "inpaint"
    if channels == 5:
        return "depth"
    if channels == 7:
        return "upscale-x4"
    return "sd-v" if scheduler.get("prediction_type") == "v_prediction" else "sd"


def fingerprint(folder: Path) -> str:
    """A sha256 hex digest naming the folder's contents: small files whole, large ones by size and 8 samples."""
    digest = hashlib.sha256()
    ignored = ("safety_checker",) if (folder / DEPTH_ESTIMATOR).is_dir() else ("safety_checker", "feature_extractor")
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not _ignored(p, folder, ignored)):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder).as_posix()}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= 8 * _SAMPLE_BYTES:
                digest.update(f.read())
                continue
            for k in range(8):
                f.seek((size - _SAMPLE_BYTES) * k // 7)
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def _ignored(path: Path, folder: Path, parts_ignored: tuple[str, ...]) -> bool:
    """Hidden files, and the parts sdrt never reads (the safety checker; the feature extractor unless it is the
    depth estimator's preprocessing)."""
    parts = path.relative_to(folder).parts
    return any(part.startswith(".") for part in parts) or parts[0] in parts_ignored


def model_key(folder: Path, digest: str) -> str:
    """The artifact cache entry name: the folder's name plus a short hash of its contents."""
    folder = folder.resolve()
    name = folder.parent.parent.name.removeprefix("models--") if folder.parent.name == "snapshots" else folder.name
    name = re.sub(r"[^\w.-]+", "_", name) or "model"
    return f"{name}-{digest[:10]}"
