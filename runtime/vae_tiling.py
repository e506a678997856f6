"""Tiled VAE decode and encode: diffusers' AutoencoderKL with `enable_tiling()`, computed on the host over tiles.

A large latent is cut into square tiles that overlap by a quarter of a tile; each tile runs through the VAE
session on its own, and every tile's first rows and columns are blended linearly with the last ones of the tile
above and the tile to its left before the tiles are cropped and joined. Working memory is then that of one tile
(a 2048x2048 SD 1.5 decode in about the memory of a 512x512 one) instead of growing with the square of the latent
pixels (the decoder's mid-block attention). The output equals diffusers' tiled output on the same checkpoint; it is
close to, but not the same as, the untiled output (each tile sees only its own neighbourhood).

When to tile (`vae_tiling` of the loaded model: None, True or False):
* True: as diffusers with `vae.enable_tiling()`: whenever the image is larger than one tile in some side;
* False: never, whatever the size (diffusers' default);
* None (auto, the default): only when the image is larger than one tile in some side AND the untiled call's
  estimated working memory (runtime.memory.vae_bytes, one image) exceeds AUTO_TILING_BYTES. Ordinary sizes
  (SD 1.5 up to 768x768) therefore decode untiled and stay equal to diffusers' default output; the decision
  depends on the model and the image size only (never on the batch, the machine's free memory or the requests
  a server batches together), so one request always gives the same image.

The tile is the VAE config's `sample_size` in pixels (diffusers' `tile_sample_min_size`) and that divided by the
VAE's scale factor in latent pixels (`tile_latent_min_size`); the model facts carry it as `vae_sample_size`, and a
manifest without that fact is read from the source checkpoint's vae/config.json when the folder still exists, else
taken as the UNet's sample size times the VAE scale factor (SD 1.5's configs agree: 64 x 8 = 512).
A tiled call runs one image of a batch at a time, so its memory does not grow with the batch either.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InvalidRequestError

logger = logging.getLogger(__name__)

OVERLAP_FACTOR = 0.25  # diffusers' tile_overlap_factor: tiles overlap by this fraction of a tile
AUTO_TILING_BYTES = int(4.6 * 2**30)  # auto mode tiles above this estimated untiled working memory per image
# (SD 1.5: 784 px decodes untiled, 792 px and larger tiled)


@dataclass(frozen=True)
class VaeTiles:
    """The tile geometry of one VAE, in diffusers' terms."""

    sample_size: int  # pixels per tile side (tile_sample_min_size)
    latent_size: int  # latent pixels per tile side (tile_latent_min_size)
    overlap: float = OVERLAP_FACTOR

    def decode_steps(self) -> tuple[int, int, int, int]:
        """(tile, stride, blend, keep) of a decode: latent tile side and stride, image rows blended and kept."""
        blend = int(self.sample_size * self.overlap)
        return self.latent_size, int(self.latent_size * (1 - self.overlap)), blend, self.sample_size - blend

    def encode_steps(self) -> tuple[int, int, int, int]:
        """(tile, stride, blend, keep) of an encode: image tile side and stride, latent rows blended and kept."""
        blend = int(self.latent_size * self.overlap)
        return self.sample_size, int(self.sample_size * (1 - self.overlap)), blend, self.latent_size - blend


def tiles_of(info: dict) -> VaeTiles:
    """The tiles of a model from its facts (`vae_sample_size`, else UNet sample size x VAE scale factor)."""
    factor = info["vae_scale_factor"]
    sample_size = info.get("vae_sample_size") or info["unet_sample_size"] * factor
    return VaeTiles(sample_size=int(sample_size), latent_size=int(sample_size / factor))


def model_tiles(model) -> VaeTiles:
    """The tiles of a loaded model; a manifest without `vae_sample_size` gets it from the source checkpoint's
    vae/config.json when that folder is still there (kept in model.info, so the memory estimate reads it too)."""
    info = model.info
    if "vae_sample_size" not in info:
        sample_size = _checkpoint_sample_size(model)
        if sample_size is not None:
            info["vae_sample_size"] = sample_size
    return tiles_of(info)


def _checkpoint_sample_size(model) -> int | None:
    backend = getattr(model, "backend", None)
    manifest = getattr(backend, "manifest", None)
    folder = (getattr(manifest, "source", None) or {}).get("path") or getattr(backend, "checkpoint", None)
    if not folder:
        return None
    try:
        size = json.loads((Path(folder) / "vae" / "config.json").read_text(encoding="utf-8")).get("sample_size")
    except (OSError, ValueError):
        return None
    size = size[0] if isinstance(size, (list, tuple)) else size
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def model_tiling(model, latent_height: int, latent_width: int) -> VaeTiles | None:
    """The tiles a VAE call of a loaded model on latent_height x latent_width runs in (by `model.vae_tiling`), or
    None when it runs untiled."""
    tiles = model_tiles(model)
    mode = check_vae_tiling(getattr(model, "vae_tiling", None))
    if not use_tiling(model.info, tiles, latent_height, latent_width, mode):
        return None
    logger.debug("VAE in %d-pixel tiles for latents %dx%d (vae_tiling %s)", tiles.sample_size, latent_height,
                 latent_width, mode)  # fmt: skip
    return tiles


def check_vae_tiling(value) -> bool | None:
    """A `vae_tiling` option: None (auto), True or False; anything else is an InvalidRequestError."""
    if value is not None and not isinstance(value, bool):
        raise InvalidRequestError(f"vae_tiling must be true, false or unset (auto), not {value!r}")
    return value


def use_tiling(
    info: dict,
    tiles: VaeTiles,
    latent_height: int,
    latent_width: int,
    mode: bool | None = None,
    threshold: int = AUTO_TILING_BYTES,
) -> bool:
    """Whether a VAE call on latents of latent_height x latent_width tiles (see the module's docstring)."""
    if mode is False or max(latent_height, latent_width) <= tiles.latent_size:
        return False
    if mode is True:
        return True
    from .memory import model_facts, vae_bytes

    return vae_bytes(model_facts(info), latent_height, latent_width, 1) > threshold


def blend_rows(above: np.ndarray, tile: np.ndarray, extent: int) -> None:
    """Fade `tile`'s first rows in from `above`'s last ones (diffusers' blend_v), in place. [B, C, H, W]"""
    extent = min(above.shape[2], tile.shape[2], extent)
    if extent <= 0:
        return
    weight = np.arange(extent) / extent  # float64, as Python's y / extent
    keep, take = (1 - weight).astype(np.float32)[:, None], weight.astype(np.float32)[:, None]  # [extent, 1]
    tile[:, :, :extent] = above[:, :, -extent:] * keep + tile[:, :, :extent] * take


def blend_columns(left: np.ndarray, tile: np.ndarray, extent: int) -> None:
    """Fade `tile`'s first columns in from `left`'s last ones (diffusers' blend_h), in place. [B, C, H, W]"""
    extent = min(left.shape[3], tile.shape[3], extent)
    if extent <= 0:
        return
    weight = np.arange(extent) / extent
    keep, take = (1 - weight).astype(np.float32), weight.astype(np.float32)  # [extent]
    tile[:, :, :, :extent] = left[:, :, :, -extent:] * keep + tile[:, :, :, :extent] * take


def run_tiled(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, steps: tuple[int, int, int, int]) -> np.ndarray:
    """`run` over overlapping tiles of x [B, C, H, W], blended and joined as diffusers' tiled_decode/_tiled_encode.

    Tiles start every `stride` pixels (the last ones cut short at the edge); one row of finished tiles is kept for
    the blend with the row below, so the host holds two rows of outputs at most."""
    tile, stride, blend, keep = steps
    bands, above = [], None
    for top in range(0, x.shape[2], stride):
        row: list[np.ndarray] = []
        for j, left in enumerate(range(0, x.shape[3], stride)):
            out = run(np.ascontiguousarray(x[:, :, top : top + tile, left : left + tile]))
            if above is not None:
                blend_rows(above[j], out, blend)
            if row:
                blend_columns(row[-1], out, blend)
            row.append(out)
        bands.append(np.concatenate([out[:, :, :keep, :keep] for out in row], axis=3))
        above = row
    return np.concatenate(bands, axis=2)


def decode_tiled(run: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, tiles: VaeTiles) -> np.ndarray:
    """Decode latents [B, 4, h, w] tile by tile, one image at a time -> images [B, 3, H, W]."""
    steps = tiles.decode_steps()
    return np.concatenate([run_tiled(run, latents[i : i + 1], steps) for i in range(len(latents))])


def encode_tiled(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, tiles: VaeTiles) -> np.ndarray:
    """Encode images [B, 3, H, W] tile by tile, one image at a time -> posterior parameters [B, 2C, h, w]."""
    steps = tiles.encode_steps()
    return np.concatenate([run_tiled(run, images[i : i + 1], steps) for i in range(len(images))])
