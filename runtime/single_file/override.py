"""A diffusers folder with its VAE replaced by a VAE file: a new folder in the artifact cache whose other parts
link to the original's files, so only the VAE is written (and the export is keyed by the new combination)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..checkpoint import fingerprint, model_key
from ..errors import ModelError
from .convert import SOURCE_FILE, _building, _write_json, cache_root, check_vae_fits, variant_key, write_safetensors
from .hashing import SHORT_HASH, HashCache
from .keys import vae_map, vae_to_diffusers
from .reader import read_safetensors
from .vae import diffusers_vae_to_ldm, read_vae_file

SKIPPED_PARTS = ("vae", "safety_checker")


def with_vae(folder: Path, vae: Path, engines_dir: Path, allow_pickle: bool = False) -> Path:
    """A diffusers folder equal to `folder` but with the VAE of file `vae` (which must have the same shapes)."""
    root = cache_root(engines_dir)
    hashes = HashCache(root / "hashes.json")
    digest, vae_sha = fingerprint(folder), hashes.sha256(vae)
    name = model_key(folder, digest)
    target = root / f"{name}-{variant_key('diffusers', digest, vae_sha)}"
    if (target / SOURCE_FILE).is_file():
        return target
    other = read_vae_file(vae, allow_pickle)
    own = _own_vae(folder)
    if own is not None:
        check_vae_fits(other, own, vae)
    config = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    levels, per = len(config.get("block_out_channels", ())), config.get("layers_per_block", 0)
    if own is None and not _fits_config(other, config):
        raise ModelError(f"the VAE {vae} does not fit this model (its shapes differ from {folder / 'vae'})")
    weights = vae_to_diffusers(other, vae_map(levels, per))
    with _building(target) as work:
        _link_parts(folder, work)
        write_safetensors(work / "vae" / "diffusion_pytorch_model.safetensors", weights)
        _write_json(work / "vae" / "config.json", config)
        source = {"model": name.rsplit("-", 1)[0], "model_hash": digest[:SHORT_HASH]}
        _write_json(work / SOURCE_FILE, dict(source, vae=vae.stem, vae_hash=vae_sha[:SHORT_HASH]))
    hashes.save()
    return target


def _own_vae(folder: Path) -> dict[str, np.ndarray] | None:
    """The folder's VAE in LDM names, when it is stored as safetensors (None for .bin pickles)."""
    files = sorted((folder / "vae").glob("*.safetensors"))
    return diffusers_vae_to_ldm(read_safetensors(files[0])) if files else None


def _fits_config(vae: dict[str, np.ndarray], config: dict) -> bool:
    """Whether an LDM VAE's widths match a diffusers VAE config (used when the folder's weights are pickles)."""
    widths = [vae.get(f"encoder.down.{i}.block.0.conv1.weight", np.empty(0)).shape[:1] for i in range(8)]
    widths = [w[0] for w in widths if w]
    latent = vae["encoder.conv_out.weight"].shape[0] // 2 if "encoder.conv_out.weight" in vae else None
    return widths == list(config.get("block_out_channels", ())) and latent == config.get("latent_channels", 4)


def _link_parts(folder: Path, work: Path) -> None:
    """Link (or copy, where links are not allowed) every file of `folder` but the VAE into `work`."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative.parts[0] in SKIPPED_PARTS or any(part.startswith(".") for part in relative.parts):
            continue
        target = work / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(path.resolve(), target)
        except OSError:
            shutil.copy2(path, target)
