"""The denoiser: wraps the UNet session into `(x, sigma, t) -> denoised` for the samplers.

It does everything the samplers must not know about: input scaling (x lives in VE space,
x = x0 + sigma * eps; the UNet sees x / sqrt(sigma^2 + 1)), classifier-free guidance (uncond first,
then cond, in one batch of 2B) and the eps / v parameterisation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .backends import Session
from .errors import ModelError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _nothing() -> None:
    pass


class Denoiser:
    def __init__(
        self,
        unet: Session,
        text_embeddings: np.ndarray,  # [2B, 77k, D] (uncond first) with guidance, else [B, 77k, D]
        cfg_scale: float,
        prediction_type: str,
        extra_channels: np.ndarray | None = None,  # [N, c, h, w] concatenated after the latents (inpaint, depth ...)
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"unsupported prediction type {prediction_type!r}; sdrt knows {PREDICTION_TYPES}")
        self.unet = unet
        self.text_embeddings = np.ascontiguousarray(text_embeddings, dtype=np.float32)
        self.cfg_scale = float(cfg_scale)
        self.guided = cfg_scale > 1.0  # then text_embeddings holds uncond and cond halves
        self.v_prediction = prediction_type == "v_prediction"
        self.extra_channels = extra_channels
        self.calls = 0  # UNet evaluations so far (the benchmark reads it)
        self.on_call: Callable[[], None] = _nothing  # progress hook, called after each UNet evaluation

    def __call__(self, x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        c_in = 1.0 / np.sqrt(sigma * sigma + 1.0)
        x_in = (x * np.float32(c_in)).astype(np.float32, copy=False)  # [B, 4, h, w]
        if self.guided:
            x_in = np.concatenate([x_in, x_in])  # [2B, 4, h, w]
        if self.extra_channels is not None:
            x_in = np.concatenate([x_in, self.extra_channels], axis=1)  # [N, 4 + c, h, w]
        timestep = np.full((len(x_in),), t, dtype=np.float32)
        feeds = {"sample": x_in, "timestep": timestep, "encoder_hidden_states": self.text_embeddings}
        model_output = self.unet.run(feeds, ["noise_pred"])["noise_pred"]  # [N, 4, h, w]
        self.calls += 1
        self.on_call()
        if self.guided:
            uncond, cond = np.split(model_output, 2)
            model_output = uncond + np.float32(self.cfg_scale) * (cond - uncond)  # [B, 4, h, w]
        if self.v_prediction:
            c_skip = 1.0 / (sigma * sigma + 1.0)
            c_out = -sigma * c_in
            return x * np.float32(c_skip) + model_output * np.float32(c_out)
        return x - np.float32(sigma) * model_output
