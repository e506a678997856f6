"""Emphasis: applying the per-token attention weights to the text encoder output (A1111's modules/sd_emphasis.py)."""

from __future__ import annotations

import numpy as np

from runtime.errors import InvalidRequestError

# "Original": weight every token vector, then rescale so the mean of the whole batch is unchanged.
# "No norm":  weight every token vector, no rescale.
# "Ignore":   parse brackets but leave the encoder output alone.
# "None":     brackets are literal text (only tokenisation changes); the output is left alone.
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


def check_emphasis_mode(mode: str) -> str:
    """`mode` if it is one of EMPHASIS_MODES, else InvalidRequestError naming the valid ones."""
    if mode not in EMPHASIS_MODES:
        valid = ", ".join(repr(m) for m in EMPHASIS_MODES)
        raise InvalidRequestError(f"unknown emphasis mode {mode!r}; valid modes: {valid}")
    return mode


def apply_emphasis(z: np.ndarray, multipliers: np.ndarray, mode: str = "Original") -> np.ndarray:
    """Weight the encoder output of one chunk: z [B, 77, D], multipliers [B, 77] -> [B, 77, D].

    "Original" is A1111's formula: m0 = mean(z); z = z * w; z = z * (m0 / mean(z)), where both means run over
    every element of the batch (all B prompts, 77 tokens and D channels together), not per prompt. Computed in
    float32 (float64 for float64 input) with float64 means. A1111 returns float32 too (the float32 multipliers
    promote a float16 z), but it takes m0 in z's own dtype; here m0 is not rounded to float16.
    """
    check_emphasis_mode(mode)
    if z.ndim != 3 or multipliers.shape != z.shape[:2]:
        raise ValueError(f"emphasis needs z [B, T, D] and multipliers [B, T], got {z.shape} and {multipliers.shape}")
    dtype = np.result_type(z.dtype, np.float32)
    z = z.astype(dtype, copy=False)
    if mode in ("Ignore", "None"):
        return z
    original_mean = z.mean(dtype=np.float64)
    weighted = z * multipliers.astype(dtype)[:, :, None]  # [B, 77, D]
    if mode == "No norm":
        return weighted
    return weighted * dtype.type(original_mean / weighted.mean(dtype=np.float64))
