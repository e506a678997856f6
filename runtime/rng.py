"""torch's CPU normal generator in numpy: the same noise as `torch.randn(shape, generator=g)` without torch.

A torch CPU generator is an mt19937 engine seeded with the low 32 bits of the seed, plus one cached normal
sample. `torch.randn` on float32 takes one of two paths (aten/src/ATen/native/cpu/DistributionTemplates.h):

* n >= 16 (`normal_fill`): n float uniforms, each `(r & 0xFFFFFF) * 2**-24` from one 32-bit draw, turned
  into normals by Box-Muller over blocks of 16 (u[j] gives the radius, u[j + 8] the angle). When n is not
  a multiple of 16, 16 fresh uniforms then recompute the last 16 outputs. The cache is not touched.
* n < 16 (`normal_distribution<double>`): per element, the cached normal if there is one; otherwise two
  53-bit double uniforms (each from two 32-bit draws), u1 gives the angle, u2 the radius
  (`sqrt(-2 log1p(-u2))`), the cosine is returned and the sine cached for the next element.
"""

from __future__ import annotations

import contextlib
import math
import queue
import secrets
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from runtime.errors import InvalidRequestError

SEED_MIN = -(2**63)  # torch.manual_seed accepts [-2**63, 2**64); negatives wrap as two's complement
SEED_MAX = 2**64 - 1
_BLOCK = 16  # Box-Muller block of torch's vectorised path
_FLOAT_BITS = 24  # float32 mantissa digits
_DOUBLE_BITS = 53  # float64 mantissa digits


def _engine_seed(seed: int) -> int:
    """The 32-bit mt19937 seed torch derives from `seed`; rejects what torch.manual_seed rejects."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidRequestError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    if not SEED_MIN <= seed <= SEED_MAX:
        raise InvalidRequestError(f"seed {seed} is out of range [-2**63, 2**64)")
    return (seed % 2**64) & 0xFFFFFFFF


def _numel(shape: int | Sequence[int]) -> int:
    dims = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if any(int(d) < 0 for d in dims):
        raise InvalidRequestError(f"noise shape {dims} has a negative dimension")
    return math.prod(int(d) for d in dims)


class TorchGenerator:
    """A numpy stream equal to `torch.Generator("cpu").manual_seed(seed)` for float32 `randn`."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._engine = np.random.MT19937()
        self._engine._legacy_seeding(_engine_seed(seed))  # init_genrand: the std::mt19937 seeding torch uses
        self._cached_normal: float | None = None  # torch's next_double_normal_sample

    def state(self) -> tuple[dict, float | None]:
        """A snapshot of the stream's position (restore() returns to it)."""
        return self._engine.state, self._cached_normal

    def restore(self, state: tuple[dict, float | None]) -> None:
        self._engine.state, self._cached_normal = state

    def clone(self) -> TorchGenerator:
        """An independent stream at this one's position: it draws what this one would draw next."""
        twin = TorchGenerator(self.seed)
        twin.restore(self.state())
        return twin

    def _draw32(self, n: int) -> np.ndarray:
        """`n` raw 32-bit mt19937 outputs as uint64."""
        return self._engine.random_raw(n)

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        """Standard normal float32 noise of `shape`, advancing the stream exactly as torch.randn does."""
        n = _numel(shape)
        flat = self._fill_blocks(n) if n >= _BLOCK else self._fill_scalar(n)
        return flat.reshape(shape)

    def _fill_blocks(self, n: int) -> np.ndarray:
        """torch's `normal_fill` for n >= 16: vectorised Box-Muller over blocks of 16 uniforms."""
        uniforms = self._float_uniforms(n)  # [n] float64, exact float32 values
        out = np.empty(n, dtype=np.float64)
        full = n - n % _BLOCK
        out[:full] = _box_muller_16(uniforms[:full])
        if full != n:  # recompute the last 16 values from 16 fresh uniforms
            out[n - _BLOCK :] = _box_muller_16(self._float_uniforms(_BLOCK))
        return out.astype(np.float32)

    def _float_uniforms(self, n: int) -> np.ndarray:
        """`uniform_real_distribution<float>(0, 1)`: the low 24 bits of one 32-bit draw times 2**-24."""
        return (self._draw32(n) & ((1 << _FLOAT_BITS) - 1)).astype(np.float64) * 2.0**-_FLOAT_BITS

    def _fill_scalar(self, n: int) -> np.ndarray:
        """torch's serial `normal_distribution<double>` for n < 16, with the cached second sample."""
        out = np.empty(n, dtype=np.float64)
        for i in range(n):
            if self._cached_normal is not None:
                out[i], self._cached_normal = self._cached_normal, None
                continue
            u1, u2 = self._double_uniforms()
            radius = math.sqrt(-2.0 * math.log1p(-u2))
            theta = 2.0 * math.pi * u1
            self._cached_normal = radius * math.sin(theta)
            out[i] = radius * math.cos(theta)
        return out.astype(np.float32)

    def _double_uniforms(self) -> tuple[float, float]:
        """Two `uniform_real_distribution<double>(0, 1)`: low 53 bits of (hi << 32 | lo) times 2**-53."""
        hi1, lo1, hi2, lo2 = (int(r) for r in self._draw32(4))
        mask = (1 << _DOUBLE_BITS) - 1
        return ((hi1 << 32 | lo1) & mask) * 2.0**-_DOUBLE_BITS, ((hi2 << 32 | lo2) & mask) * 2.0**-_DOUBLE_BITS


def _box_muller_16(uniforms: np.ndarray) -> np.ndarray:
    """torch's `normal_fill_16` on consecutive blocks of 16 uniforms, in float64."""
    blocks = uniforms.reshape(-1, 2, _BLOCK // 2)  # [blocks, (radius, angle), 8]
    radius = np.sqrt(-2.0 * np.log(1.0 - blocks[:, 0]))
    theta = (2.0 * np.pi) * blocks[:, 1]
    out = np.empty_like(blocks)
    out[:, 0] = radius * np.cos(theta)
    out[:, 1] = radius * np.sin(theta)
    return out.reshape(-1)


def batch_randn(generators: Sequence[TorchGenerator], shape_per_image: int | Sequence[int]) -> np.ndarray:
    """One draw of `shape_per_image` from each stream, stacked: [B, *shape_per_image] float32.

    Equals diffusers' `randn_tensor((B, *shape), generator=[g0, g1, ...])` on CPU.
    """
    if not generators:
        raise InvalidRequestError("batch_randn needs at least one generator")
    return np.stack([g.randn(shape_per_image) for g in generators])


class NoiseAhead:
    """`batch_randn(generators, shape_per_image)` per call, drawn ahead of need on a worker thread.

    The worker draws from clones of the streams, in the order the calls take them, one draw per ticket. Tickets are
    handed out by `model_running(True)` (the caller is about to wait on the model, e.g. a GPU UNet call that releases
    the GIL), keeping at most `depth` draws ahead, so the worker computes while the model runs and not during the
    caller's own step; a call that finds no draw under way asks for one and waits for it. close() stops the worker
    and leaves every real stream exactly where inline drawing would have left it: after the draws actually handed
    out (none: untouched), so later draws get the same numbers.
    """

    def __init__(self, generators: Sequence[TorchGenerator], shape_per_image: int | Sequence[int], depth: int = 2):
        if not generators:
            raise InvalidRequestError("NoiseAhead needs at least one generator")
        _numel(shape_per_image)  # a bad shape raises here, not on the worker
        self._generators = list(generators)
        self._shape = shape_per_image
        self._twins = [g.clone() for g in generators]
        self._depth = depth
        self._tickets: queue.SimpleQueue = queue.SimpleQueue()  # True: draw one more; None: stop
        self._results: queue.SimpleQueue = queue.SimpleQueue()  # (noise, stream states after it) or (error, None)
        self._ahead = 0  # draws asked for and not yet handed out
        self._taken: list | None = None  # stream states after the last draw handed out
        self._worker = threading.Thread(target=self._draw, name="sdrt-noise-ahead", daemon=True)
        self._worker.start()

    def _draw(self) -> None:
        while self._tickets.get():
            try:
                self._results.put((batch_randn(self._twins, self._shape), [t.state() for t in self._twins]))
            except Exception as exc:  # handed to the caller by the next __call__
                self._results.put((exc, None))
                return

    def model_running(self, running: bool) -> None:
        """True: the caller now waits on the model, so the worker may draw up to `depth` ahead; False: nothing."""
        while running and self._ahead < self._depth:
            self._tickets.put(True)
            self._ahead += 1

    def __call__(self) -> np.ndarray:
        if self._ahead == 0:  # nobody asked ahead: draw now
            self._tickets.put(True)
            self._ahead += 1
        noise, states = self._results.get()
        self._ahead -= 1
        if states is None:
            raise noise
        self._taken = states
        return noise

    def close(self) -> None:
        with contextlib.suppress(queue.Empty):  # draws asked for and not started are not needed any more
            while True:
                self._tickets.get_nowait()
        self._tickets.put(None)
        self._worker.join()
        if self._taken is not None:
            for generator, state in zip(self._generators, self._taken):
                generator.restore(state)
            self._taken = None


class _InlineNoise:
    """batch_randn per call, on the caller's thread."""

    def __init__(self, generators: Sequence[TorchGenerator], shape_per_image: int | Sequence[int]):
        self._generators, self._shape = generators, shape_per_image

    def model_running(self, running: bool) -> None:
        pass

    def __call__(self) -> np.ndarray:
        return batch_randn(self._generators, self._shape)


@contextlib.contextmanager
def noise_source(
    generators: Sequence[TorchGenerator], shape_per_image: int | Sequence[int], ahead: bool = True
) -> Iterator[NoiseAhead | _InlineNoise]:
    """A sampler's `noise()`: one batch_randn draw per call from the per-image streams; drawn ahead on a worker
    (NoiseAhead) when `ahead`, else inline. Both give the same arrays and leave the streams at the same place; both
    have `model_running(bool)`, for the denoiser to say when the worker may draw."""
    if not ahead:
        yield _InlineNoise(generators, shape_per_image)
        return
    noise = NoiseAhead(generators, shape_per_image)
    try:
        yield noise
    finally:
        noise.close()


def random_seed() -> int:
    """A fresh seed for `--seed -1`: 32 random bits, which already covers every distinct torch CPU stream."""
    return secrets.randbelow(2**32)
