"""Several txt2img requests in one UNet batch: per-row prompts, negative prompts and seeds.

Requests share every setting except prompt, negative prompt, seed and batch size (`batch_key`). Each request
keeps its own conditioning table (runtime.pipelines.conditioning, encoded alone as a single request would be)
and its own seeded streams; the merged batch lays rows out as the denoiser expects, copy-major:
[uncond of request 1..R, cond_1 of request 1..R, ...]. A group of one runs exactly txt2img_latents' steps, so
its image is bit-identical to `StableDiffusion.txt2img`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..pipelines.common import decode_latents, image_generators
from ..pipelines.conditioning import Conditioning, build_conditioning, schedule_steps
from ..pipelines.txt2img import sample_latents
from ..request import Txt2ImgRequest, sampler_of

if TYPE_CHECKING:
    from ..api import StableDiffusion

PER_ROW_FIELDS = ("prompt", "negative_prompt", "seed", "batch_size")  # what may differ inside one batch
EXTRA_NETWORK_TAGS = ("<lora:", "<lyco:", "<hypernet:")  # prompts that change weights never share a batch
StepCallback = Callable[[int, int, np.ndarray], None]  # (step index i, step count n, x [B, 4, h, w])


def batch_key(request: Txt2ImgRequest) -> tuple | None:
    """Everything but the per-row fields of a validated request; None when it must run alone."""
    if type(request) is not Txt2ImgRequest or request.subseed_strength or request.seed_resize_from is not None:
        return None  # variation noise is per request (runtime.pipelines.variation)
    text = f"{request.prompt}\n{request.negative_prompt}".lower()
    if any(tag in text for tag in EXTRA_NETWORK_TAGS):
        return None
    return tuple(
        (f.name, getattr(request, f.name)) for f in dataclasses.fields(request) if f.name not in PER_ROW_FIELDS
    )


def _shape_of(conditioning: Conditioning) -> tuple:
    """What must agree for two conditionings to share UNet calls: guidance, AND weights and token length."""
    return conditioning.guided, tuple(conditioning.cond_weights.tolist()), conditioning.batches[0].shape[1]


def merge_conditioning(parts: list[Conditioning], rows: list[int]) -> Conditioning:
    """One table for several requests of `rows[r]` images each; every part must have the same _shape_of."""
    first = parts[0]
    copies = len(first.cond_weights) + int(first.guided)
    combos: dict[tuple[int, ...], int] = {}
    call_batch = []
    for call in range(len(first.call_batch)):
        combo = tuple(int(part.call_batch[call]) for part in parts)
        call_batch.append(combos.setdefault(combo, len(combos)))
    batches = [_merged([part.batches for part in parts], combo, rows, copies) for combo in combos]  # in index order
    pooled = None  # SDXL: the pooled text [(1 + m) B, P] of each batch, merged the same way
    if first.pooled is not None:
        pooled = [_merged([part.pooled for part in parts], combo, rows, copies) for combo in combos]
    return Conditioning(batches, np.array(call_batch, dtype=np.int64), first.cond_weights, first.guided, pooled)


def _merged(tables: list[list[np.ndarray]], combo: tuple[int, ...], rows: list[int], copies: int) -> np.ndarray:
    """Batch combo[r] of each part's table, copy by copy (uncond rows of every part, then each sub-prompt's):
    [copies * sum(rows), ...]."""
    slabs = []
    for copy in range(copies):
        for table, index, n in zip(tables, combo, rows):
            slabs.append(table[index][copy * n : (copy + 1) * n])  # [n, ...]
    return np.ascontiguousarray(np.concatenate(slabs), dtype=np.float32)


def plan_groups(model: StableDiffusion, requests: list[Txt2ImgRequest]) -> list[tuple[list[int], list[Conditioning]]]:
    """Encode each request's prompts and split the requests (same batch_key) into groups that can share UNet
    calls: [(request indices, their conditionings)]."""
    spec, _ = sampler_of(requests[0])
    steps = schedule_steps(spec.name, requests[0].steps)
    groups: dict[tuple, tuple[list[int], list[Conditioning]]] = {}
    for index, r in enumerate(requests):
        conditioning = build_conditioning(
            model, r.prompt, r.negative_prompt, r.batch_size, r.cfg_scale, steps, r.emphasis, r.clip_skip
        )
        members, parts = groups.setdefault(_shape_of(conditioning), ([], []))
        members.append(index)
        parts.append(conditioning)
    return list(groups.values())


def txt2img_group(
    model: StableDiffusion,
    requests: list[Txt2ImgRequest],
    conditionings: list[Conditioning],
    on_step: StepCallback | None = None,
    interrupted: Callable[[], bool] | None = None,
) -> list[np.ndarray]:
    """Images float32 [B_r, H, W, 3] per request, from one sampler run over all their rows (txt2img_latents'
    steps with merged conditioning and per-row seeded streams). `on_step(i, n, x)` runs after each step and may
    raise to stop the run; `interrupted()`, asked after each step, True: decode the latents of that step."""
    first = requests[0]
    rows = [r.batch_size for r in requests]
    conditioning = merge_conditioning(conditionings, rows)
    generators = [g for r in requests for g in image_generators(r.seed, r.batch_size)]

    def callback(i: int, x: np.ndarray) -> np.ndarray:
        if on_step is not None:
            on_step(i, first.steps, x)  # a schedule has one entry per requested step
        return x

    latents = sample_latents(model, first, conditioning, generators, callback, interrupted)  # [sum B_r, 4, h, w]
    images = decode_latents(model, latents)  # [sum B_r, H, W, 3]
    return np.split(images, np.cumsum(rows)[:-1])
