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
from .pipelines.conditioning import Conditioning

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _nothing() -> None:
    pass


class Denoiser:
    def __init__(
        self,
        unet: Session,
        conditioning: Conditioning,
        cfg_scale: float,
        prediction_type: str,
        extra_channels: np.ndarray | None = None,  # [N, c, h, w] concatenated after the latents (inpaint, depth ...)
        extra_feeds: dict[str, np.ndarray] | None = None,  # more UNet inputs of N rows, every call (class_labels ...)
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"unsupported prediction type {prediction_type!r}; sdrt knows {PREDICTION_TYPES}")
        self.unet = unet
        self.batches = conditioning.batches  # text batches; the c-th call uses batches[call_batch[c]]
        self.call_batch = conditioning.call_batch
        self.guided = conditioning.guided  # batches hold [uncond, cond_1 .. cond_m], B rows each
        self.copies = len(conditioning.cond_weights) + int(self.guided)  # latent copies per UNet call
        self.scales = [np.float32(cfg_scale * w) for w in conditioning.cond_weights]  # guidance per sub-prompt
        self.v_prediction = prediction_type == "v_prediction"
        self.extra_channels = extra_channels
        self.extra_feeds = extra_feeds or {}
        self.calls = 0  # UNet evaluations so far: indexes call_batch
        self.on_call: Callable[[], None] = _nothing  # progress hook, called after each UNet evaluation

    def __call__(self, x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        c_in = 1.0 / np.sqrt(sigma * sigma + 1.0)
        x_in = (x * np.float32(c_in)).astype(np.float32, copy=False)  # [B, 4, h, w]
        if self.copies > 1:
            x_in = np.concatenate([x_in] * self.copies)  # [(1 + m) B, 4, h, w]
        if self.extra_channels is not None:
            x_in = np.concatenate([x_in, self.extra_channels], axis=1)  # [N, 4 + c, h, w]
        timestep = np.full((len(x_in),), t, dtype=np.float32)
        text = self.batches[self.call_batch[min(self.calls, len(self.call_batch) - 1)]]  # [N, 77k, D]
        feeds = {"sample": x_in, "timestep": timestep, "encoder_hidden_states": text, **self.extra_feeds}
        model_output = self.unet.run(feeds, ["noise_pred"])["noise_pred"]  # [N, 4, h, w]
        self.calls += 1
        self.on_call()
        if self.guided:
            uncond, *conds = np.split(model_output, self.copies)  # each [B, 4, h, w]
            model_output = uncond + self.scales[0] * (conds[0] - uncond)
            for scale, cond in zip(self.scales[1:], conds[1:]):  # AND: uncond + sum_i w_i cfg (cond_i - uncond)
                model_output += scale * (cond - uncond)
        if self.v_prediction:
            c_skip = 1.0 / (sigma * sigma + 1.0)
            c_out = -sigma * c_in
            return x * np.float32(c_skip) + model_output * np.float32(c_out)
        return x - np.float32(sigma) * model_output
