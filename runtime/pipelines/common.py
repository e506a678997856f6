"""Steps every pipeline mode shares: encode the prompt, prepare latents, denoise, decode."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..denoiser import Denoiser
from ..errors import NumericalError
from ..rng import TorchGenerator, batch_randn
from ..samplers import SamplerSpec, Schedule, sample

if TYPE_CHECKING:
    from ..api import StableDiffusion


def encode_texts(model: StableDiffusion, texts: list[str]) -> np.ndarray:
    """CLIP embeddings of each text, [n, 77, D]."""
    input_ids = model.tokenizer(texts)  # int32 [n, 77]
    session = model.backend.session("text_encoder")
    return session.run({"input_ids": input_ids}, ["last_hidden_state"])["last_hidden_state"]


def text_conditioning(
    model: StableDiffusion, prompt: str, negative_prompt: str, batch: int, guided: bool
) -> np.ndarray:
    """Embeddings for the UNet batch: [2B, 77, D] uncond first when guided, else [B, 77, D]."""
    texts = [prompt, negative_prompt] if guided else [prompt]
    embeddings = encode_texts(model, texts)  # [1 or 2, 77, D]
    cond = np.repeat(embeddings[:1], batch, axis=0)  # [B, 77, D]
    if not guided:
        return cond
    uncond = np.repeat(embeddings[1:], batch, axis=0)  # [B, 77, D]
    return np.concatenate([uncond, cond])  # [2B, 77, D]


def image_generators(seed: int, batch: int) -> list[TorchGenerator]:
    """One seeded stream per image: image i uses seed + i."""
    return [TorchGenerator(seed + i) for i in range(batch)]


def run_sampler(
    spec: SamplerSpec, denoiser: Denoiser, x: np.ndarray, schedule: Schedule, generators: list[TorchGenerator]
) -> np.ndarray:
    """Sample from VE-space x down the schedule; return the latents the VAE decodes ([B, 4, h, w])."""
    shape = x.shape[1:]

    def noise() -> np.ndarray:
        return batch_randn(generators, shape)

    return schedule.latents(sample(spec, denoiser, x, schedule, noise))


def decode_latents(model: StableDiffusion, latents: np.ndarray) -> np.ndarray:
    """VAE decode: latents [B, 4, h, w] -> float32 images [B, H, W, 3] in [0, 1]; NaN or Inf is an error."""
    scaled = (latents / np.float32(model.info["vae_scaling_factor"])).astype(np.float32)
    image = model.backend.session("vae_decoder").run({"latent": scaled}, ["image"])["image"]  # [B, 3, H, W]
    if not np.isfinite(image).all():
        raise NumericalError("the VAE decoder produced NaN/Inf values (an overflow); no image was written")
    image = np.clip(image / 2 + 0.5, 0.0, 1.0)
    return np.ascontiguousarray(image.transpose(0, 2, 3, 1), dtype=np.float32)  # [B, H, W, 3]
