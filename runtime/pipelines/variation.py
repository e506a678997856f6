"""A1111's variation seeds: each image's initial noise slerped towards the noise of a second seed, optionally made at
another size and placed centred ("Variation seed", "Variation seed strength", "Seed resize from").

Source followed (no code taken from it): A1111 `modules/rng.py` (ImageRNG.first, slerp). Per image i:

* the image's own stream (seed + i) draws the noise at the generation size first, as without variation, so every
  later draw of that stream (VAE posterior, ancestral noise) is unchanged;
* with "Seed resize from" W x H, a fresh stream of seed + i draws noise at [C, H / f, W / f] instead (f: the VAE's
  scale factor; A1111 hard-codes its models' 8), which after the slerp is pasted centred into the first noise
  (cropped centred where larger);
* the variation noise is a fresh stream of subseed + i at the same shape; the two are combined by A1111's slerp,
  whose norms run along dim 1 of the per-image [C, h, w] tensor (the latent rows), with its lerp fallback
  `low * val + high * (1 - val)` when the mean cosine exceeds 0.9995.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..rng import TorchGenerator, batch_randn

if TYPE_CHECKING:
    from ..request import Txt2ImgRequest

SLERP_LERP_ABOVE = 0.9995  # A1111's threshold of the mean cosine above which slerp falls back to a lerp


def slerp(val: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's slerp of two [C, h, w] noises, the norms taken along axis 1; float32 like torch's."""
    low64, high64 = low.astype(np.float64), high.astype(np.float64)
    low_norm = low64 / np.linalg.norm(low64, axis=1, keepdims=True)
    high_norm = high64 / np.linalg.norm(high64, axis=1, keepdims=True)
    dot = (low_norm * high_norm).sum(axis=1)  # [C, w]
    if dot.mean() > SLERP_LERP_ABOVE:
        return (low64 * val + high64 * (1 - val)).astype(np.float32)
    omega = np.arccos(dot)
    so = np.sin(omega)
    res = (np.sin((1.0 - val) * omega) / so)[:, None] * low64 + (np.sin(val * omega) / so)[:, None] * high64
    return res.astype(np.float32)


def initial_noise(request: Txt2ImgRequest, generators: list[TorchGenerator], shape: tuple[int, ...]) -> np.ndarray:
    """The initial noise [B, *shape] of a request: each generator's next randn(shape), with the request's variation
    seed and seed resize applied (runtime.pipelines.variation). Without them: exactly batch_randn."""
    noise = batch_randn(generators, shape)  # [B, C, h, w]: each stream's first draw, as without variation
    strength = getattr(request, "subseed_strength", 0.0)
    resize = getattr(request, "seed_resize_from", None)
    if not strength and resize is None:
        return noise
    scale = request.width // shape[-1]  # the VAE's factor (A1111 divides by 8, its models' factor)
    small = shape if resize is None else (shape[0], resize[1] // scale, resize[0] // scale)
    for i, generator in enumerate(generators):
        base = noise[i] if resize is None else TorchGenerator(generator.seed).randn(small)
        if strength:
            base = slerp(strength, base, TorchGenerator(request.subseed + i).randn(small))
        noise[i] = base if resize is None else place_centred(noise[i], base)
    return noise


def place_centred(target: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """`noise` [C, h0, w0] pasted into a copy of `target` [C, h, w] around the centre, cropped centred where larger
    (A1111's dx/dy offsets)."""
    out = target.copy()
    dx, dy = (target.shape[2] - noise.shape[2]) // 2, (target.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    out[:, ty : ty + h, tx : tx + w] = noise[:, sy : sy + h, sx : sx + w]
    return out
