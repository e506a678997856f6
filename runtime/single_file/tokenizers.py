"""The tokenizer a single file needs but does not contain: given as a folder, or found in the Hugging Face cache.

SD 1.x uses CLIP ViT-L/14's tokenizer; SD 2.x uses OpenCLIP's, which is the same BPE vocabulary padded with "!"
(id 0) instead of the end token. Without an SD 2 tokenizer in the cache, CLIP-L's is used with that padding.
SDXL uses CLIP-L's as `tokenizer` and OpenCLIP-bigG's (the same vocabulary, padded with "!") as `tokenizer_2`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelError

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json")
CLIP_L = ("openai/clip-vit-large-patch14", "")
SD1_REPOS = (
    CLIP_L,
    ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
    ("runwayml/stable-diffusion-v1-5", "tokenizer"),
    ("CompVis/stable-diffusion-v1-4", "tokenizer"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
)
SD2_REPOS = (
    ("stabilityai/stable-diffusion-2-1", "tokenizer"),
    ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
    ("stabilityai/stable-diffusion-2", "tokenizer"),
    ("stabilityai/stable-diffusion-2-base", "tokenizer"),
    ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", ""),
)
SDXL_2_REPOS = (
    ("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
    ("stabilityai/stable-diffusion-xl-refiner-1.0", "tokenizer_2"),
    ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""),
)
SD2_PAD_TOKEN = "!"


def hub_cache_root() -> Path:
    """The Hugging Face hub cache folder (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    root = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub"
    return Path(root).expanduser()


def _is_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def _cached(repo_id: str, subfolder: str) -> Path | None:
    """The tokenizer folder of a cached Hub repository snapshot (refs/main first, else the newest), or None."""
    repo = hub_cache_root() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    snapshots = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else []
    snapshots += sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for snapshot in snapshots:
        folder = snapshot / subfolder if subfolder else snapshot
        if _is_tokenizer(folder):
            return folder
    return None


def find_tokenizer(text: str, given: Path | None) -> tuple[Path, str | None]:
    """(tokenizer folder, pad token to force or None) for a "clip" (SD 1.x, SDXL's first), "open_clip" (SD 2.x) or
    "open_clip_g" (SDXL's second) text encoder. SDXL's second always pads with "!", as its published tokenizer_2."""
    bigg = text == "open_clip_g"
    force = SD2_PAD_TOKEN if bigg else None
    if given is not None:
        given = Path(given).expanduser()
        sub = "tokenizer_2" if bigg and _is_tokenizer(given / "tokenizer_2") else "tokenizer"
        folder = given / sub if _is_tokenizer(given / sub) else given
        if not _is_tokenizer(folder):
            raise ModelError(f"--tokenizer {given}: no tokenizer there (vocab.json + merges.txt, or tokenizer.json)")
        return folder, force
    repos = {"open_clip": SD2_REPOS, "open_clip_g": SDXL_2_REPOS + SD2_REPOS}.get(text, SD1_REPOS)
    for repo_id, subfolder in repos:
        folder = _cached(repo_id, subfolder)
        if folder is not None:
            return folder, force
    if text in ("open_clip", "open_clip_g"):
        folder = _cached(*CLIP_L)
        if folder is not None:
            return folder, SD2_PAD_TOKEN
    need = {
        "open_clip": "stabilityai/stable-diffusion-2-1 (or openai/clip-vit-large-patch14)",
        "open_clip_g": "stabilityai/stable-diffusion-xl-base-1.0 (or openai/clip-vit-large-patch14)",
    }.get(text, CLIP_L[0])
    raise ModelError(
        f"a single-file checkpoint has no tokenizer and none is in the Hugging Face cache ({hub_cache_root()}): "
        f"run `huggingface-cli download {need.split(' ')[0]}` or pass --tokenizer DIR"
    )


def copy_tokenizer(source: Path, target: Path, pad_token: str | None) -> dict:
    """Copy the tokenizer files to `target` (pad token forced when given); return its {token: id} vocabulary."""
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())
    if pad_token is not None:
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = target / name
            data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            data["pad_token"] = pad_token
            path.write_text(json.dumps(data, indent=2), encoding="utf-8")
        if (target / "vocab.json").is_file():  # tokenizer.json's padding would disagree; vocab.json + merges.txt do
            (target / "tokenizer.json").unlink(missing_ok=True)
    return read_vocab(target)


def read_vocab(folder: Path) -> dict:
    """The {token: id} vocabulary of a tokenizer folder."""
    try:
        if (folder / "vocab.json").is_file():
            return json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        return json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"the tokenizer in {folder} is unreadable: {exc}") from exc


def special_ids(folder: Path, vocab: dict) -> tuple[int, int, int]:
    """(bos, eos, pad) token ids from the tokenizer's special tokens map."""
    path = folder / "special_tokens_map.json"
    special = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def token(name: str, default: str) -> str:
        value = special.get(name, default)
        return value.get("content", default) if isinstance(value, dict) else value

    bos, eos = token("bos_token", "<|startoftext|>"), token("eos_token", "<|endoftext|>")
    pad = token("pad_token", eos)
    missing = [t for t in (bos, eos, pad) if t not in vocab]
    if missing:
        raise ModelError(f"the tokenizer in {folder} lacks the special tokens {missing}")
    return vocab[bos], vocab[eos], vocab[pad]
