"""Peak working memory of a generation, estimated from the model's shapes before any work, and the memory budget.

The dominant terms, as ONNX Runtime's CPU provider computes an SD model in fp32:
* attention scores: rows x heads x tokens x (tokens + text tokens) x 4 bytes at the largest attention level of the
  UNet (tokens: latent pixels at that level), and tokens^2 x 4 bytes per image in the VAE decoder's mid block
  (one head over every latent pixel);
* convolution activations: rows x input channels x pixels x 4 bytes at each level, times the number of such
  tensors alive at once.
The coefficients were calibrated against the peak RSS of real runs of the tiny SD 1 and SD 2 test models at latent
sides 32 to 128 (tests/serving/test_resources.py checks that the estimate stays an upper bound within 2x). The
estimate covers the working memory of one request on top of the loaded weights; stages run one after another and
give their memory back (the sessions run without ONNX Runtime's memory arena), so the peak is the largest stage's.
A VAE call that runtime.vae_tiling tiles is estimated as one tile's call plus the host's copies of the whole image.
Where a component's attention runs fused (the onnxruntime backend's CPU graphs: MultiHeadAttention, which never
holds the scores), its attention term is that of the operator's own copies of queries, keys, values and output.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)

FLOAT_BYTES = 4
TEXT_TOKENS = 77  # tokens per prompt chunk
ATTENTION_FACTOR = 1.25  # the scores plus the softmax's working copy of part of them
UNET_CONV_FACTOR = 14  # live float tensors per (pixel x input channel) at a UNet level: skips, norms, conv buffers
# (the fused tiny UNet measured 29-41 MiB between runs at latent 64, against 38.5 estimated with 12)
VAE_CONV_FACTOR = 7  # the same in the VAE decoder (no skips); measured 6.0-6.5 on the fused tiny VAE between runs
FUSED_COPIES = 4  # [tokens, channels] float tensors a fused attention holds: queries, keys, values, output
TEXT_FACTOR = 16  # live [rows, 77, hidden] tensors in the text encoder
OVERHEAD_BYTES = 32 * 2**20  # latents, noise, images and copies on the host
IMAGE_COPIES = 4  # whole-image float32 copies a tiled VAE call holds on the host (joined, scaled, clipped, transposed)
BUDGET_FRACTION = 0.8  # of the memory available when the budget is first needed
GIB = 2**30

# SD 1.5's shapes: the estimate of a model whose manifest predates these facts (an upper bound for SD 1/2 sizes)
SD15_FACTS = {
    "unet_channels": [320, 640, 1280, 1280],
    "unet_heads": [8, 8, 8, 8],
    "unet_self_attention": [True, True, True, False],
    "unet_cross_attention": [True, True, True, False],
    "unet_mid_attention": True,
    "vae_channels": [128, 256, 512, 512],
    "vae_mid_attention": True,
    "text_hidden": 768,
    "text_heads": 12,
}


def memory_facts(unet: dict, vae: dict, text: dict) -> dict:
    """The shape facts the estimate needs, from the diffusers configs of the UNet, the VAE and the text encoder
    (they go into the manifest's model block as "memory")."""
    channels = list(unet.get("block_out_channels", SD15_FACTS["unet_channels"]))
    levels = len(channels)
    # diffusers reads attention_head_dim as the number of heads when num_attention_heads is unset (SD 1/2 configs)
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim") or 8
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    kinds = list(unet.get("down_block_types", ["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"]))
    cross = ["CrossAttn" in kind for kind in kinds]
    only_cross = unet.get("only_cross_attention", False)
    only_cross = list(only_cross) if isinstance(only_cross, (list, tuple)) else [only_cross] * levels
    mid = unet.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    mid_only_cross = unet.get("mid_block_only_cross_attention")
    return {
        "unet_channels": channels,
        "unet_heads": [int(h) for h in heads],
        "unet_self_attention": [c and not o for c, o in zip(cross, only_cross)],
        "unet_cross_attention": cross,
        "unet_mid_attention": bool(mid) and "CrossAttn" in str(mid) and not mid_only_cross,
        "vae_channels": list(vae.get("block_out_channels", SD15_FACTS["vae_channels"])),
        "vae_mid_attention": bool(vae.get("mid_block_add_attention", True)),
        "text_hidden": int(text.get("hidden_size", 768)),
        "text_heads": int(text.get("num_attention_heads", 12)),
    }


@dataclass(frozen=True)
class Estimate:
    """Peak working bytes per stage of one generation; `peak` is what the budget is compared with."""

    text_encoder: int
    unet: int
    vae: int

    @property
    def peak(self) -> int:
        return max(self.text_encoder, self.unet, self.vae) + OVERHEAD_BYTES


def model_facts(info: dict) -> dict:
    """The memory facts of a loaded model's info; an export older than them is estimated with SD 1.5's shapes."""
    facts = info.get("memory")
    if not facts:
        logger.debug("the manifest has no memory facts (an older export): estimating with SD 1.5's shapes")
        return SD15_FACTS
    return facts


def unet_bytes(facts: dict, latent_height: int, latent_width: int, rows: int, chunks: int, fused: bool = False) -> int:
    """Peak bytes of one UNet call on `rows` latents [rows, C, h, w] with `chunks` x 77 text tokens; `fused`: its
    attention runs as one operator that never holds the scores (MultiHeadAttention on the CPU graph)."""
    channels = facts["unet_channels"]
    context = TEXT_TOKENS * chunks
    attention, conv = 0, 0
    for level, width in enumerate(channels):
        pixels = math.ceil(latent_height / 2**level) * math.ceil(latent_width / 2**level)
        heads = facts["unet_heads"][level]
        if facts["unet_cross_attention"][level]:
            keys = context + (pixels if facts["unet_self_attention"][level] else 0)
            attention = max(attention, FUSED_COPIES * pixels * width if fused else heads * pixels * keys)
        skip = channels[min(level + 1, len(channels) - 1)]  # the up path concatenates the skip of this level
        conv = max(conv, pixels * (width + skip))
    if facts["unet_mid_attention"]:
        lowest = 2 ** (len(channels) - 1)
        pixels = math.ceil(latent_height / lowest) * math.ceil(latent_width / lowest)
        scores = facts["unet_heads"][-1] * pixels * (pixels + context)
        attention = max(attention, FUSED_COPIES * pixels * channels[-1] if fused else scores)
    return int(rows * FLOAT_BYTES * (ATTENTION_FACTOR * attention + UNET_CONV_FACTOR * conv))


def vae_bytes(facts: dict, latent_height: int, latent_width: int, images: int, fused: bool = False) -> int:
    """Peak bytes of one VAE decode of `images` latents [images, 4, h, w] (also a bound for the encoder, which
    works on fewer channels at full size); `fused`: as unet_bytes."""
    channels = list(reversed(facts["vae_channels"]))  # the decoder goes from the widest level to the image
    latent_pixels = latent_height * latent_width
    attention = 0
    if facts["vae_mid_attention"]:
        attention = FUSED_COPIES * latent_pixels * channels[0] if fused else latent_pixels**2
    conv = 0
    for level, width in enumerate(channels):
        inputs = max(width, channels[level - 1]) if level else width  # upsampled from the level before
        conv = max(conv, latent_pixels * 4**level * inputs)
    output = 3 * latent_pixels * 4 ** (len(channels) - 1)  # the decoded RGB image the call returns
    return int(images * FLOAT_BYTES * (ATTENTION_FACTOR * attention + VAE_CONV_FACTOR * conv + output))


def tiled_vae_bytes(
    facts: dict, tile_height: int, tile_width: int, height: int, width: int, images: int, fused: bool = False
) -> int:
    """Peak bytes of a tiled VAE decode or encode (runtime.vae_tiling): one image's call on one tile of
    tile_height x tile_width latent pixels, plus the host's copies of the whole output ([images, 3, H, W] float32:
    the tiles joined, scaled, clipped and transposed)."""
    return (
        vae_bytes(facts, tile_height, tile_width, 1, fused) + IMAGE_COPIES * images * 3 * height * width * FLOAT_BYTES
    )


def text_bytes(facts: dict, texts: int) -> int:
    """Peak bytes of one text-encoder call on `texts` chunks of 77 tokens."""
    per_text = TEXT_FACTOR * TEXT_TOKENS * facts["text_hidden"] + facts["text_heads"] * TEXT_TOKENS**2
    return int(texts * FLOAT_BYTES * per_text)


def estimate(
    info: dict,
    width: int,
    height: int,
    images: int,
    rows: int,
    chunks: int = 1,
    texts: int | None = None,
    vae_tiling: bool | None = None,
    fused: frozenset[str] = frozenset(),
) -> Estimate:
    """The estimate of generating `images` images of width x height, the UNet running on `rows` latents per call
    (images x (1 + AND terms) with guidance) with `chunks` x 77 text tokens; `texts`: prompts per text-encoder call.
    The VAE term is that of a tiled call where runtime.vae_tiling tiles this size (`vae_tiling`: the model's
    option, None: auto). `fused`: the components whose attention is one fused operator (runtime.backends: the
    onnxruntime backend's CPU graphs), without the attention scores' memory."""
    from .vae_tiling import tiles_of, use_tiling

    facts = model_facts(info)
    factor = info["vae_scale_factor"]
    latent_height, latent_width = math.ceil(height / factor), math.ceil(width / factor)
    vae_fused = "vae_decoder" in fused and "vae_encoder" in fused
    vae = vae_bytes(facts, latent_height, latent_width, images, vae_fused)
    tiles = tiles_of(info)
    if use_tiling(info, tiles, latent_height, latent_width, vae_tiling):
        tile_height, tile_width = min(latent_height, tiles.latent_size), min(latent_width, tiles.latent_size)
        vae = tiled_vae_bytes(facts, tile_height, tile_width, height, width, images, vae_fused)
    return Estimate(
        text_encoder=text_bytes(facts, texts if texts is not None else rows),
        unet=unet_bytes(facts, latent_height, latent_width, rows, chunks, "unet" in fused),
        vae=vae,
    )


def available_memory() -> int | None:
    """Bytes of memory the machine can still give (MemAvailable of /proc/meminfo, else free pages); None: unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def default_budget(backend) -> int | None:
    """The default memory budget of a loaded model: a fraction of its device's free memory (a GPU backend's
    `free_memory()`, where it has one), else of the host's available memory; None (no default budget) when neither
    is known, and for a GPU backend that reports nothing: the estimate is of ONNX Runtime's fp32 CPU work, which
    overstates what fused fp16 attention on a GPU needs."""
    from .backends import GPU_BACKENDS

    free_memory = getattr(backend, "free_memory", None)
    free = free_memory() if callable(free_memory) else None
    if free is None and getattr(backend, "name", None) not in GPU_BACKENDS:
        free = available_memory()
    return None if free is None else int(free * BUDGET_FRACTION)


def release_memory() -> None:
    """Give the heap pages freed by the last request back to the system (glibc's malloc_trim; elsewhere nothing).
    ONNX Runtime runs without its arena, so a request's buffers are freed when it ends, but glibc keeps freed heap
    pages (and raises its mmap threshold after large frees), so a server's RSS would drift with the sizes served."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once; None where the C library is not glibc."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def parse_size(text: str) -> int:
    """A memory size: bytes, or a number with a unit ("6G", "6GiB", "512M", "1.5 GB"); binary units either way."""
    value = str(text).strip().lower().replace(" ", "")
    units = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    number = value.rstrip("ibkmgt")
    unit = value[len(number) :].removesuffix("b").removesuffix("i")
    try:
        size = float(number) * units[unit]
    except (KeyError, ValueError):
        raise ValueError(f"not a memory size: {text!r} (examples: 6G, 512M, 1.5GiB)") from None
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"a memory size must be positive, not {text!r}")
    return int(size)


def format_bytes(size: int) -> str:
    """Bytes for people: '9.1 GiB', '312 MiB'."""
    if size >= GIB:
        return f"{size / GIB:.1f} GiB"
    return f"{max(1, round(size / 2**20))} MiB"
