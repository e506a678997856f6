"""Text conditioning the A1111 way: prompt editing, AND, emphasis, BREAK, any length, clip skip.

The result is a small table, computed once per request: the distinct UNet text batches (one per distinct
combination of scheduled texts) and, for every UNet call, which batch it uses. The denoiser only indexes
that table, so prompt editing costs nothing per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..backends import TextTables
from ..errors import InvalidRequestError
from ..prompts import (
    EmbeddingLookup,
    PromptChunks,
    PromptTokenizer,
    apply_emphasis,
    apply_fixes,
    check_emphasis_mode,
    get_schedule,
    pad_to_chunks,
    schedule_index,
    split_and,
    tokenize_prompt,
)

if TYPE_CHECKING:
    from ..api import StableDiffusion

CHUNK_TOKENS = 77  # BOS + 75 + EOS
SECOND_ORDER = frozenset({"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"})  # two UNet calls per step


@dataclass(frozen=True)
class Conditioning:
    batches: list[np.ndarray]  # distinct UNet text batches, each [(1 + m) B, 77k, D], uncond first when guided
    call_batch: np.ndarray  # int [calls]: the batch the c-th UNet call uses (the last entry holds after that)
    cond_weights: np.ndarray  # float32 [m]: AND weights of the m sub-prompts
    guided: bool  # whether the batches hold an uncond part
    pooled: list[np.ndarray] | None = None  # SDXL: per batch, the UNet's text_embeds [(1 + m) B, P] (pipelines.sdxl)


def schedule_steps(sampler: str, steps: int) -> int:
    """The step count A1111 builds prompt-editing schedules over: UNet calls for second-order samplers."""
    return steps * 2 if sampler in SECOND_ORDER else steps


def encode_groups(model: StableDiffusion, groups: list[list[str]], emphasis: str, clip_skip: int) -> list[np.ndarray]:
    """Encode each group of texts as A1111 encodes one batch: returns per group [n, 77 k, D] (k: its max chunks).

    Chunk i of every group runs in one text-encoder call; emphasis is then applied per group, whose mean
    rescaling spans the group's texts (A1111 rescales over the whole batch it encoded together).
    """
    lookup = model.embedding_lookup  # textual inversion: embedding names -> vector slots
    tokenized = tokenize_groups(groups, model.tokenizer, emphasis, embedding_at=lookup)
    tables = model.backend.text_tables()

    def run(prompts: list[PromptChunks], i: int) -> np.ndarray:
        rows = [apply_fixes(tables.embed(np.array(p.chunks[i])), p.fixes[i]) for p in prompts]  # each [77, D]
        return _run_text_encoder(model, np.stack(rows), clip_skip, tables)  # [n, 77, D]

    return encode_chunks(tokenized, emphasis, run)


def tokenize_groups(
    groups: list[list[str]],
    tokenizer: PromptTokenizer,
    emphasis: str,
    chunks: list[int] | None = None,
    embedding_at: EmbeddingLookup | None = None,
) -> list[list[PromptChunks]]:
    """Each group's texts as token chunks, every text of a group padded with empty chunks to the group's most (or to
    `chunks[g]` when given: what two tokenizers of one model agree on)."""
    tokenized = [[tokenize_prompt(t, tokenizer, emphasis=emphasis, embedding_at=embedding_at) for t in group]
                 for group in groups]  # fmt: skip
    counts = chunks or [max(len(p.chunks) for p in group) for group in tokenized]
    return [[pad_to_chunks(p, k, tokenizer) for p in group] for group, k in zip(tokenized, counts)]


def encode_chunks(
    tokenized: list[list[PromptChunks]], emphasis: str, run: Callable[[list[PromptChunks], int], np.ndarray]
) -> list[np.ndarray]:
    """Per group [n, 77 k, D]: chunk i of every group that has one through one `run(prompts, i)` call ([n, 77, D]),
    then emphasis per group and chunk (A1111's process_tokens per chunk of a batch), chunks concatenated."""
    counts = [len(group[0].chunks) for group in tokenized]
    encoded: list[list[np.ndarray]] = [[] for _ in tokenized]
    for i in range(max(counts)):
        members = [g for g, k in enumerate(counts) if k > i]
        z = run([p for g in members for p in tokenized[g]], i)  # [n, 77, D]
        start = 0
        for g in members:
            n = len(tokenized[g])
            multipliers = np.array([p.multipliers[i] for p in tokenized[g]], dtype=np.float32)  # [n, 77]
            encoded[g].append(_emphasis(z[start : start + n], multipliers, emphasis))
            start += n
    return [np.concatenate(chunks, axis=1) for chunks in encoded]  # [n, 77 k, D]


def _emphasis(z: np.ndarray, multipliers: np.ndarray, mode: str) -> np.ndarray:
    return apply_emphasis(z, multipliers, mode).astype(np.float32, copy=False)


def _run_text_encoder(
    model: StableDiffusion, inputs_embeds: np.ndarray, clip_skip: int, tables: TextTables
) -> np.ndarray:
    """Token embeddings [n, 77, D] -> the text encoder's last layer, or layer -clip_skip plus the final norm."""
    session = model.backend.session("text_encoder")
    feeds = {"inputs_embeds": inputs_embeds.astype(np.float32, copy=False)}
    if clip_skip <= 1:
        return session.run(feeds, ["last_hidden_state"])["last_hidden_state"]
    hidden = session.run(feeds, ["hidden_states"])["hidden_states"]  # [L + 1, n, 77, D]
    if clip_skip > len(hidden) - 1:
        raise InvalidRequestError(f"clip skip must be between 1 and {len(hidden) - 1} for this model, not {clip_skip}")
    return _layer_norm(hidden[-clip_skip], tables.final_norm_weight, tables.final_norm_bias, tables.final_norm_eps)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    var = x64.var(axis=-1, keepdims=True)
    return ((x64 - mean) / np.sqrt(var + eps) * weight + bias).astype(np.float32)


def _pad_tokens(z: np.ndarray, length: int, empty: np.ndarray) -> np.ndarray:
    """Pad [n, 77 k, D] to `length` tokens with the empty prompt's encoding ([1, 77, D]) per missing chunk."""
    missing = (length - z.shape[1]) // CHUNK_TOKENS
    if missing == 0:
        return z
    pad = np.repeat(np.repeat(empty, missing, axis=1), len(z), axis=0)  # [n, 77 missing, D]
    return np.concatenate([z, pad], axis=1)


def build_conditioning(
    model: StableDiffusion,
    prompt: str,
    negative_prompt: str,
    batch: int,
    cfg_scale: float,
    steps: int,
    emphasis: str = "Original",
    clip_skip: int = 1,
) -> Conditioning:
    """All text batches a request needs, with the UNet-call -> batch table (steps: the schedule's step count).

    SDXL models (pipelines.sdxl.encode_sdxl_groups) also carry each batch's pooled text; clip skip does not apply to
    them (A1111 applies it to SDXL only with its "Clip skip SDXL" setting, off by default)."""
    check_emphasis_mode(emphasis)
    subprompts = split_and(prompt)  # [(text, weight)], AND on the positive prompt only
    guided = cfg_scale > 1.0 or len(subprompts) > 1
    schedules = [get_schedule(text, steps) for text, _ in subprompts]
    if guided:
        schedules.insert(0, get_schedule(negative_prompt, steps))
    groups = [[text for _, text in schedule] for schedule in schedules]
    pooled: list[np.ndarray] | None = None
    if model.info.get("family") == "sdxl":
        from .sdxl import encode_sdxl_groups

        encoded, pooled = encode_sdxl_groups(model, groups + [[""]], emphasis, negative=guided)
        pooled.pop()
    else:
        encoded = encode_groups(model, groups + [[""]], emphasis, clip_skip)
    empty = encoded.pop()  # [1, 77, D]
    length = max(z.shape[1] for z in encoded)
    encoded = [_pad_tokens(z, length, empty) for z in encoded]
    combos: dict[tuple[int, ...], int] = {}
    call_batch = []
    for call in range(steps):
        combo = tuple(schedule_index(schedule, call) for schedule in schedules)
        call_batch.append(combos.setdefault(combo, len(combos)))
    batches, pooled_batches = [], []
    for combo in combos:  # insertion order = batch index
        parts = [np.repeat(z[i : i + 1], batch, axis=0) for z, i in zip(encoded, combo)]  # each [B, 77k, D]
        batches.append(np.ascontiguousarray(np.concatenate(parts), dtype=np.float32))
        if pooled is not None:
            parts = [np.repeat(p[i : i + 1], batch, axis=0) for p, i in zip(pooled, combo)]  # each [B, P]
            pooled_batches.append(np.ascontiguousarray(np.concatenate(parts), dtype=np.float32))
    weights = np.array([w for _, w in subprompts], dtype=np.float32)
    return Conditioning(
        batches, np.array(call_batch, dtype=np.int64), weights, guided, pooled_batches if pooled is not None else None
    )
