"""An exported upscaler model on a CPU backend: spandrel's model call on the host side, A1111's tiling, and the
memory estimate checked before any work.

The model call is spandrel's ImageModelDescriptor.__call__: pad the image to the model's size requirements (reflect,
then replicate where reflect cannot reach), apply the padding the architecture applies to its own input (recorded
at export, export.upscalers.probe), run the model, clamp to [0, 1], crop to the input size times the scale.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import NumericalError, ResourceError
from ..memory import BUDGET_FRACTION, available_memory, format_bytes
from .tiling import check_tiling, upscale_grid, upscale_weighted

logger = logging.getLogger(__name__)

FLOAT_BYTES = 4
ACTIVATION_COPIES = 4  # live tensors as large as the largest module output during one model call
IMAGE_COPIES = 4  # whole-output uint8 RGB images alive in a grid pass (tiles, the row, the combined image, a copy)
NUMPY_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap", "constant": "constant"}


def pad_input(x: np.ndarray, requirements: dict, padding: dict | None) -> np.ndarray:
    """`x` float32 [1, C, h, w] padded on the right and bottom as spandrel pads it for the model, then as the model
    pads its own input."""
    h, w = x.shape[2:]
    width, height = max(requirements["minimum"], w), max(requirements["minimum"], h)
    multiple = requirements["multiple_of"]
    width, height = math.ceil(width / multiple) * multiple, math.ceil(height / multiple) * multiple
    if requirements["square"]:
        width = height = max(width, height)
    pad_w, pad_h = width - w, height - h
    if pad_w or pad_h:
        reflect_w, reflect_h = min(pad_w, w - 1), min(pad_h, h - 1)
        x = np.pad(x, ((0, 0), (0, 0), (0, reflect_h), (0, reflect_w)), mode="reflect")
        x = np.pad(x, ((0, 0), (0, 0), (0, pad_h - reflect_h), (0, pad_w - reflect_w)), mode="edge")
    if padding:
        m = padding["multiple"]
        extra_h, extra_w = (m - x.shape[2] % m) % m, (m - x.shape[3] % m) % m
        if extra_h or extra_w:
            mode = NUMPY_PAD_MODES[padding["mode"]]
            options = {"constant_values": padding["value"]} if mode == "constant" else {}
            x = np.pad(x, ((0, 0), (0, 0), (0, extra_h), (0, extra_w)), mode=mode, **options)
    return np.ascontiguousarray(x, dtype=np.float32)


class ModelUpscaler:
    """An upscaler model file, exported, on a CPU backend. `upscale(image, scale)` is A1111's Upscaler.upscale."""

    def __init__(self, name: str, path: Path, meta: dict, session, tile_size: int, tile_overlap: int,
                 memory_budget: int | None = None, progress: bool = False):  # fmt: skip
        check_tiling(tile_size, tile_overlap)
        self.name, self.path, self.meta, self.session = name, Path(path), meta, session
        self.scale = int(meta["scale"])  # the model's own factor
        self.tile_size, self.tile_overlap = tile_size, tile_overlap
        self.memory_budget = memory_budget  # bytes; None: a fraction of the memory available at the first upscale
        self.progress = progress
        self.interrupt_hook = None  # a callable: True stops between tiles (the pass then returns its input)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """spandrel's model call: float32 BGR [1, 3, h, w] in [0, 1] -> [1, 3, h * s, w * s] in [0, 1]."""
        h, w = x.shape[2:]
        padded = pad_input(x, self.meta["size_requirements"], self.meta.get("input_padding"))
        upscaled = self.session.run({"image": padded}, ["upscaled"])["upscaled"]  # [1, 3, H * s, W * s]
        if not np.isfinite(upscaled).all():
            raise NumericalError(f"the upscaler {self.name} produced NaN/Inf values")
        return np.clip(upscaled, 0.0, 1.0)[:, :, : h * self.scale, : w * self.scale]

    def do_upscale(self, image: Image.Image, scale: float) -> Image.Image:
        """One pass of the model over the whole image, tiled as A1111 tiles this architecture; interrupted
        (interrupt_hook), the pass returns its input as A1111's does."""
        from tqdm import tqdm

        with tqdm(desc=f"upscale ({self.name})", unit="tile", disable=not self.progress) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            try:
                if self.meta["tiling"] == "weighted":
                    return upscale_weighted(self._run, image, self.tile_size, self.tile_overlap, self.scale, progress)
                return upscale_grid(self._run, image, self.tile_size, self.tile_overlap, progress)
            except _Interrupted:
                logger.info("upscale interrupted after %d of %s tiles", bar.n, bar.total)
                return image

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self.interrupt_hook is not None and self.interrupt_hook():
            raise _Interrupted
        return self(x)

    def upscale(self, image: Image.Image, scale: float) -> Image.Image:
        from . import upscale_passes

        self.check_memory(image.width, image.height, scale)
        return upscale_passes(self, image, scale)

    # ---- memory -----------------------------------------------------------------------------------------------

    def estimate(self, width: int, height: int, scale: float, tile_size: int | None = None) -> int:
        """Peak working bytes of upscale(image of width x height, scale): the largest of A1111's model passes (one
        model call on a tile, plus the host's whole-image buffers of that pass)."""
        from . import pass_sizes

        tile_size = self.tile_size if tile_size is None else tile_size
        return max(self._pass_bytes(w, h, tile_size) for w, h in pass_sizes(width, height, scale, self.scale))

    def _pass_bytes(self, width: int, height: int, tile_size: int) -> int:
        s = self.scale
        out_pixels = width * height * s * s
        if self.meta["tiling"] == "weighted":
            side_h = side_w = min(tile_size, width, height) if tile_size > 0 else 0
            side_h, side_w = (side_h, side_w) if tile_size > 0 else (height, width)
            host = 2 * 3 * out_pixels * FLOAT_BYTES + 2 * 3 * out_pixels  # the float canvases, the uint8 result
        else:
            side_h, side_w = (tile_size, tile_size) if tile_size > 0 else (height, width)
            host = IMAGE_COPIES * 3 * out_pixels
        return self._call_bytes(side_w, side_h) + host

    def _call_bytes(self, width: int, height: int) -> int:
        """One model call on a width x height image: its activations, the padded input and the output."""
        pixels = math.ceil(width / 16 + 1) * 16 * math.ceil(height / 16 + 1) * 16  # at most this after padding
        activations = ACTIVATION_COPIES * self.meta["memory"]["bytes_per_pixel"] * pixels
        return int(activations + 3 * pixels * FLOAT_BYTES * (1 + 2 * self.scale**2))

    def check_memory(self, width: int, height: int, scale: float) -> None:
        """ResourceError, before any work, when the estimate is over the memory budget; it names the largest tile
        size that fits."""
        if self.memory_budget is None:
            available = available_memory()
            self.memory_budget = None if available is None else int(available * BUDGET_FRACTION)
        budget = self.memory_budget
        need = self.estimate(width, height, scale)
        if budget is None or need <= budget:
            return
        message = (f"upscaling {width}x{height} by {scale:g} with {self.name} needs ~{format_bytes(need)} of "
                   f"working memory, over the memory budget of {format_bytes(budget)}")  # fmt: skip
        largest = self.tile_size if self.tile_size > 0 else max(width, height)
        fitting = [t for t in range(largest - 16, self.tile_overlap, -16) if self.estimate(width, height, scale, t)
                   <= budget]  # fmt: skip
        hint = f"; a tile size of at most {fitting[0]} fits" if fitting else "; no tile size fits at this size"
        raise ResourceError(message + hint)


class _Interrupted(Exception):
    pass
