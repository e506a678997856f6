"""Steps every pipeline mode shares: encode the prompt, prepare latents, denoise, decode."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..denoiser import Denoiser
from ..errors import NumericalError
from ..rng import TorchGenerator, noise_source
from ..samplers import SamplerSpec, Schedule, sample
from ..vae_tiling import decode_tiled, encode_tiled, model_tiling

if TYPE_CHECKING:
    from ..api import StableDiffusion


def image_generators(seed: int, batch: int) -> list[TorchGenerator]:
    """One seeded stream per image: image i uses seed + i."""
    return [TorchGenerator(seed + i) for i in range(batch)]


class SamplingInterrupted(Exception):
    """Raised from a sampler callback to end sampling after step `i`; run_sampler returns the latents at x."""

    def __init__(self, i: int, x: np.ndarray):
        super().__init__(f"sampling interrupted after step {i + 1}")
        self.i = i
        self.x = x


def run_sampler(
    spec: SamplerSpec,
    denoiser: Denoiser,
    x: np.ndarray,
    schedule: Schedule,
    generators: list[TorchGenerator],
    callback: Callable[[int, np.ndarray], np.ndarray] | None = None,  # after step i: may replace x
    interrupted: Callable[[], bool] | None = None,  # asked after each step: True ends sampling there
) -> np.ndarray:
    """Sample from VE-space x down the schedule; return the latents the VAE decodes ([B, 4, h, w]).

    When `interrupted()` answers True after step i (A1111's interrupt, diffusers' `pipe._interrupt`), the remaining
    steps are skipped and the latents after step i are returned, as diffusers would decode them."""

    def after_step(i: int, x: np.ndarray) -> np.ndarray:
        if callback is not None:
            x = callback(i, x)
        if i + 1 < schedule.steps and interrupted():
            raise SamplingInterrupted(i, x)
        return x

    # stochastic samplers' noise is drawn ahead on a worker, in each stream's order (runtime.rng.NoiseAhead)
    with noise_source(generators, x.shape[1:], ahead=spec.stochastic) as noise:
        denoiser.on_unet = noise.model_running
        if interrupted is None:
            return schedule.latents(sample(spec, denoiser, x, schedule, noise, callback=callback))
        try:
            return schedule.latents(sample(spec, denoiser, x, schedule, noise, callback=after_step))
        except SamplingInterrupted as stop:
            return schedule.latents_after(stop.i, stop.x)


def decode_latents(model: StableDiffusion, latents: np.ndarray) -> np.ndarray:
    """VAE decode: latents [B, 4, h, w] -> float32 images [B, H, W, 3] in [0, 1]; NaN or Inf is an error.

    A large latent is decoded in tiles as diffusers' `vae.enable_tiling()` does, by `model.vae_tiling` (None: auto,
    True, False; runtime.vae_tiling says when). Whether a GPU backend's fp16 decode overflowed and was computed again
    in fp32 (NanGuard.retried) is recorded as `model.vae_retried`, which the infotext reports."""
    scaled = (latents / np.float32(model.info["vae_scaling_factor"])).astype(np.float32)
    session = model.backend.session("vae_decoder")
    retried = False

    def decode(latent: np.ndarray) -> np.ndarray:
        nonlocal retried
        image = session.run({"latent": latent}, ["image"])["image"]  # [B, 3, H, W]
        retried = retried or bool(getattr(session, "retried", False))
        return image

    tiles = model_tiling(model, *scaled.shape[2:])
    image = decode(scaled) if tiles is None else decode_tiled(decode, scaled, tiles)
    model.vae_retried = retried  # this decode's; a batch's requests all read it
    if not np.isfinite(image).all():
        raise NumericalError("the VAE decoder produced NaN/Inf values (an overflow); no image was written")
    image = np.clip(image / 2 + 0.5, 0.0, 1.0)
    return np.ascontiguousarray(image.transpose(0, 2, 3, 1), dtype=np.float32)  # [B, H, W, 3]


def encode_images(model: StableDiffusion, images: np.ndarray, generators: list[TorchGenerator]) -> np.ndarray:
    """VAE encoder + posterior sample per image from its own stream, times the scaling factor.

    images: float32 [1 or B, 3, H, W] in [-1, 1] (one image is used for every stream) -> latents [B, 4, h, w].
    A large image is encoded in tiles as diffusers' `vae.enable_tiling()` does (see decode_latents).
    """
    session = model.backend.session("vae_encoder")

    def encode(image: np.ndarray) -> np.ndarray:
        return session.run({"image": image}, ["latent_parameters"])["latent_parameters"]  # [n, 2 * 4, h, w]

    images = images.astype(np.float32)
    factor = model.info["vae_scale_factor"]
    tiles = model_tiling(model, images.shape[2] // factor, images.shape[3] // factor)
    moments = encode(images) if tiles is None else encode_tiled(encode, images, tiles)
    mean, logvar = np.split(moments, 2, axis=1)  # each [n, 4, h, w]
    std = np.exp(np.float32(0.5) * np.clip(logvar, -30.0, 20.0))
    n = len(moments)
    samples = [mean[i % n] + std[i % n] * g.randn(mean.shape[1:]) for i, g in enumerate(generators)]
    return np.stack(samples) * np.float32(model.info["vae_scaling_factor"])  # [B, 4, h, w]
