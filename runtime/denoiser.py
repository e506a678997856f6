"""The denoiser: wraps the UNet session into `(x, sigma, t) -> denoised` for the samplers.

It does everything the samplers must not know about: input scaling (x lives in VE space,
x = x0 + sigma * eps; the UNet sees x / sqrt(sigma^2 + 1)), classifier-free guidance (uncond first,
then cond, in one batch of 2B) and the eps / v parameterisation.

Feeds contract with the sessions (what lets GPU sessions upload as little as possible per step):
* per-generation constants (each text-conditioning batch, class_labels and any other extra feed) are read-only
  arrays, made so once here, and passed as the very same object on every call: a session may skip re-uploading an
  array it has seen (`is`) when it is read-only;
* `sample` and `timestep` are writeable buffers the denoiser owns and refills in place every call (the extra
  channels of inpaint / depth2img / upscale are written into `sample` once); a session must copy what it needs
  from them during `run`;
* the session's outputs are read before the next call and never kept, so they may be buffers it reuses.
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


def _ignore(running: bool) -> None:
    pass


def read_only(array: np.ndarray) -> np.ndarray:
    """`array` itself made read-only when it owns its C-contiguous memory, else a read-only contiguous copy (a view
    could change under the session through its base)."""
    array = np.asarray(array)
    if array.base is not None or not array.flags.c_contiguous:
        array = np.array(array, order="C")
    array.flags.writeable = False
    return array


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
        self.batches = [read_only(b) for b in conditioning.batches]  # text batches, each [N, 77k, D]
        self.call_batch = [int(c) for c in conditioning.call_batch]  # the c-th call uses batches[call_batch[c]]
        # SDXL: the pooled text of each batch, fed as text_embeds [N, P] beside it; None for other models
        pooled = getattr(conditioning, "pooled", None)
        self.pooled = None if pooled is None else [read_only(p) for p in pooled]
        self.guided = conditioning.guided  # batches hold [uncond, cond_1 .. cond_m], B rows each
        self.copies = len(conditioning.cond_weights) + int(self.guided)  # latent copies per UNet call
        self.scales = [np.float32(cfg_scale * w) for w in conditioning.cond_weights]  # guidance per sub-prompt
        self.v_prediction = prediction_type == "v_prediction"
        self.extra_channels = extra_channels
        self.extra_feeds = extra_feeds or {}
        self.calls = 0  # UNet evaluations so far: indexes call_batch
        self.on_call: Callable[[], None] = _nothing  # progress hook, called after each UNet evaluation
        # called with True right before each UNet call and False right after it: runtime.rng.NoiseAhead draws the
        # sampler's next noise only while the UNet runs
        self.on_unet: Callable[[bool], None] = _ignore

    @property
    def extra_channels(self) -> np.ndarray | None:
        return self._extra_channels

    @extra_channels.setter
    def extra_channels(self, channels: np.ndarray | None) -> None:
        self._extra_channels = None if channels is None else read_only(channels)  # [N, c, h, w]
        self._buffers: tuple[np.ndarray, ...] | None = None  # see _buffers_for

    @property
    def extra_feeds(self) -> dict[str, np.ndarray]:
        return self._extra_feeds

    @extra_feeds.setter
    def extra_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        self._extra_feeds = {name: read_only(value) for name, value in feeds.items()}

    def _buffers_for(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """The per-step feeds for x [B, C, h, w], allocated once: (sample [N, C + c, h, w] with the extra channels in
        place, its latent channels as [1 + m, B, C, h, w], timestep [N], guided [B, C, h, w])."""
        buffers = self._buffers
        if buffers is not None and buffers[3].shape == x.shape:
            return buffers
        extra = self._extra_channels
        n = self.copies * len(x)
        channels = x.shape[1] + (0 if extra is None else extra.shape[1])
        sample = np.empty((n, channels, *x.shape[2:]), dtype=np.float32)
        if extra is not None:
            sample[:, x.shape[1] :] = extra
        latents = sample[:, : x.shape[1]].reshape(self.copies, *x.shape)  # splitting axis 0: always a view
        self._buffers = sample, latents, np.empty(n, dtype=np.float32), np.empty(x.shape, dtype=np.float32)
        return self._buffers

    def __call__(self, x: np.ndarray, sigma: float, t: float) -> np.ndarray:
        sample, latents, timestep, guided = self._buffers_for(x)
        np.multiply(x, np.float32(1.0 / np.sqrt(sigma * sigma + 1.0)), out=latents)  # c_in x in every copy
        timestep.fill(t)
        batch = self.call_batch[min(self.calls, len(self.call_batch) - 1)]
        feeds = {"sample": sample, "timestep": timestep, "encoder_hidden_states": self.batches[batch]}  # [N, 77k, D]
        if self.pooled is not None:
            feeds["text_embeds"] = self.pooled[batch]  # [N, P]
        feeds.update(self._extra_feeds)
        self.on_unet(True)
        model_output = self.unet.run(feeds, ["noise_pred"])["noise_pred"]  # [N, C, h, w]
        self.on_unet(False)
        self.calls += 1
        self.on_call()
        if self.guided:
            model_output = self._guide(model_output, len(x), guided)  # [B, C, h, w]
        if self.v_prediction:
            c_in = 1.0 / np.sqrt(sigma * sigma + 1.0)
            denoised = x * np.float32(1.0 / (sigma * sigma + 1.0))  # c_skip x
            denoised += _scaled(model_output, np.float32(-sigma * c_in), guided)  # + c_out v
            return denoised
        return x - _scaled(model_output, np.float32(sigma), guided)

    def _guide(self, model_output: np.ndarray, b: int, out: np.ndarray) -> np.ndarray:
        """uncond + sum_i w_i cfg (cond_i - uncond) into `out`, from the [(1 + m) B, ...] output."""
        uncond = model_output[:b]
        np.subtract(model_output[b : 2 * b], uncond, out=out)
        out *= self.scales[0]
        out += uncond
        for k, scale in enumerate(self.scales[1:], start=2):  # AND sub-prompts
            out += scale * (model_output[k * b : (k + 1) * b] - uncond)
        return out


def _scaled(model_output: np.ndarray, factor: np.float32, own: np.ndarray) -> np.ndarray:
    """factor * model_output, in place when model_output is the denoiser's own buffer `own`."""
    if model_output is own:
        own *= factor
        return own
    return model_output * factor
