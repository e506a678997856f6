"""Depth conditioning for depth2img, as diffusers' StableDiffusionDepth2ImgPipeline.prepare_depth_map makes it.

The depth comes from the caller or from the checkpoint's DPT model. For DPT the image goes through its image
processor's steps, reproduced on the host from the processor's saved settings: 8-bit pixels resized by Pillow (the
very call transformers' PIL image processor makes), rescaled and normalised in float32. The depth is then resized
to the latent size with torch's bicubic interpolation (reproduced below to float32 rounding) and min-max scaled to
[-1, 1] per image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidRequestError, ModelError

if TYPE_CHECKING:
    from .api import StableDiffusion

# DPTImageProcessor's defaults, for keys a saved preprocessor_config.json leaves out
DPT_DEFAULTS = {
    "do_resize": True,
    "size": {"height": 384, "width": 384},
    "resample": 3,  # PIL.Image.Resampling.BICUBIC
    "keep_aspect_ratio": False,
    "ensure_multiple_of": 1,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "do_pad": False,
}


def estimate_depth(model: StableDiffusion, image: np.ndarray) -> np.ndarray:
    """The checkpoint's depth estimate of image (float32 [1, 3, H, W] in [-1, 1]): float32 [1, S, S], relative."""
    depth = model.info.get("depth_estimator")
    if not depth:
        raise InvalidRequestError("this depth model ships no depth estimator: give a depth map (--depth-map)")
    pixel_values = dpt_pixel_values(image, depth["preprocessor"])  # [1, 3, S, S]
    session = model.backend.session("depth_estimator")
    return session.run({"pixel_values": pixel_values}, ["predicted_depth"])["predicted_depth"]


def dpt_pixel_values(image: np.ndarray, preprocessor: dict) -> np.ndarray:
    """What DPTImageProcessor (PIL backend) makes of the 8-bit image behind `image` (float32 [1, 3, H, W] in
    [-1, 1], as runtime.images.to_model_input gives it): float32 [1, 3, S, S]."""
    from PIL import Image

    config = dict(DPT_DEFAULTS, **preprocessor)
    if config["do_pad"]:
        raise ModelError("the depth estimator's image processor pads its input (do_pad), which sdrt does not do")
    pixels = np.clip(np.rint((image[0].astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)  # [3, H, W]
    if config["do_resize"]:
        height, width = _dpt_size(pixels.shape[1], pixels.shape[2], config)
        resized = Image.fromarray(pixels.transpose(1, 2, 0)).resize((width, height), resample=config["resample"])
        pixels = np.asarray(resized).transpose(2, 0, 1)  # [3, S, S]
    values = pixels.astype(np.float32)
    if config["do_rescale"]:
        values = (pixels.astype(np.float64) * config["rescale_factor"]).astype(np.float32)
    if config["do_normalize"]:
        mean = np.array(config["image_mean"], dtype=np.float32)[:, None, None]
        std = np.array(config["image_std"], dtype=np.float32)[:, None, None]
        values = (values - mean) / std
    return np.ascontiguousarray(values[None], dtype=np.float32)  # [1, 3, S, S]


def _dpt_size(height: int, width: int, config: dict) -> tuple[int, int]:
    """DPT's resize target: the configured size, optionally keeping the aspect ratio, in multiples of a number."""
    size = config["size"]
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if "height" not in size or "width" not in size:
        raise ModelError(f"the depth estimator's image processor has a size sdrt does not know: {size}")
    scale_h, scale_w = size["height"] / height, size["width"] / width
    if config["keep_aspect_ratio"]:  # scale as little as possible
        scale_h = scale_w = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    multiple = config["ensure_multiple_of"]
    return round(scale_h * height / multiple) * multiple, round(scale_w * width / multiple) * multiple


def depth_condition(depth_map: np.ndarray, height: int, width: int, batch: int) -> np.ndarray:
    """The UNet's depth channel: depth_map float [H', W'] or [n, H', W'] (any scale, n = 1 or a divisor of batch)
    -> float32 [batch, 1, height, width] in [-1, 1] (latent size)."""
    depth = np.asarray(depth_map, dtype=np.float32)
    depth = depth[None] if depth.ndim == 2 else depth
    if depth.ndim != 3 or batch % len(depth):
        raise InvalidRequestError(f"a depth map must be [H, W] or [n, H, W], n dividing {batch}, not {depth.shape}")
    flat = depth.min(axis=(1, 2)) == depth.max(axis=(1, 2))  # resized, it would be float rounding noise
    if not np.isfinite(depth).all() or flat.any():
        raise InvalidRequestError("the depth map is flat or not finite: it gives no depth to follow")
    depth = torch_bicubic(depth, height, width)  # [n, h, w]
    low = depth.min(axis=(1, 2), keepdims=True)
    high = depth.max(axis=(1, 2), keepdims=True)
    if np.any(high == low):
        raise InvalidRequestError("the depth map is flat at the latent size: it gives no depth to follow")
    depth = np.float32(2.0) * (depth - low) / (high - low) - np.float32(1.0)
    return np.concatenate([depth[:, None]] * (batch // len(depth)))  # [B, 1, h, w], maps repeated in turn


def _cubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's bicubic taps (A = -0.75, align_corners=False) in float32: indices int [4, out], weights [4, out]."""
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    real = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)  # source coordinate of each output pixel
    index = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    t = np.clip(real - index.astype(f32), f32(0), f32(1))
    a = f32(-0.75)

    def near(x):  # |x| <= 1
        return ((a + f32(2)) * x - (a + f32(3))) * x * x + f32(1)

    def far(x):  # 1 < |x| < 2
        return ((a * x - f32(5) * a) * x + f32(8) * a) * x - f32(4) * a

    t_opposite = f32(1) - t
    weights = np.stack([far(t + f32(1)), near(t), near(t_opposite), far(t_opposite + f32(1))])  # [4, out]
    indices = np.clip(index[None] + np.arange(-1, 3)[:, None], 0, in_size - 1)  # [4, out]: edge pixels repeat
    return indices, weights.astype(f32)


def torch_bicubic(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """`F.interpolate(x[:, None], (height, width), mode="bicubic", align_corners=False)[:, 0]` for float32
    [N, H, W], to float32 rounding (within about 1e-6 of the largest value): torch's taps and weights, summed along
    the width inside and the height outside."""
    x = images.astype(np.float32, copy=False)
    ix, wx = _cubic_taps(x.shape[2], width)
    iy, wy = _cubic_taps(x.shape[1], height)
    rows = x[:, :, ix[0]] * wx[0]  # [N, H, width]
    for j in range(1, 4):
        rows = rows + x[:, :, ix[j]] * wx[j]
    out = rows[:, iy[0], :] * wy[0][:, None]  # [N, height, width]
    for i in range(1, 4):
        out = out + rows[:, iy[i], :] * wy[i][:, None]
    return out
