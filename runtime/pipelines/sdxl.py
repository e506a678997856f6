"""SDXL text conditioning, as the A1111 web UI builds it; for a plain prompt of one chunk it is what diffusers'
StableDiffusionXLPipeline.encode_prompt computes.

Both text encoders read the prompt (each through its own tokenizer: the second pads with "!"), chunked the same way as
SD 1.x prompts (75 tokens, BREAK, any length; runtime/prompts): each chunk runs through both encoders, their
penultimate states are concatenated along the features and the chunks along the tokens ([n, 77 k, D1 + D2]); the second
encoder's pooled, projected output of the FIRST chunk is the UNet's `text_embeds` ([n, P]). A1111 emphasis applies per
encoder and chunk, before the concatenation; the pooled output is taken before emphasis. Prompt editing, alternation
and AND work as for SD 1.x (pipelines.conditioning builds the per-step table, each batch with its pooled text). The
negative prompt is encoded the same way, except that an empty one is all zeros when the model's
`force_zeros_for_empty_prompt` says so (as long as the prompt); otherwise the shorter of the prompt and the negative is
padded with the empty prompt's chunks (A1111's pad_cond_uncond, as for SD 1.x). Clip skip does not change SDXL
conditioning (A1111 applies it to SDXL only with its "Clip skip SDXL" setting, off by default). An SDXL refiner has the
second encoder only: its states alone are the UNet's context.

The UNet's `time_ids` (sdxl_time_ids) are the same in every mode: the generation size as original and target size,
crop (0, 0); a refiner's end with the aesthetic score instead of the target size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidRequestError
from ..prompts import apply_fixes
from ..prompts.embeddings import overridden_ids
from .conditioning import CHUNK_TOKENS, Conditioning, encode_chunks, tokenize_groups

if TYPE_CHECKING:
    from ..api import StableDiffusion

# where SDXL runs: the GPU backends take text encoder 2 and the UNet's text_embeds/time_ids too; openvino not yet
SDXL_BACKENDS = ("onnxruntime", "openvino", "torch", "torch-cuda", "onnxruntime-cuda", "tensorrt")
SDXL_MODES = ("txt2img", "img2img", "inpaint", "outpaint")  # what SDXL models run so far
PENULTIMATE = -2  # SDXL conditions on the layer before the last of both encoders, without the final norm
# A refiner's (requires_aesthetics_score) time ids end with an aesthetic score instead of the target size: these
# are diffusers' StableDiffusionXLImg2ImgPipeline defaults and A1111's sdxl_refiner_high/low_aesthetic_score
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


def is_sdxl(info: dict) -> bool:
    return info.get("family") == "sdxl"


def is_refiner(info: dict) -> bool:
    """An SDXL refiner-style model: the aesthetic-score time ids (requires_aesthetics_score), and as SDXL's refiner
    is published, text encoder 2 only."""
    sdxl = info.get("sdxl") or {}
    return bool(sdxl.get("requires_aesthetics_score")) or not sdxl.get("two_encoders", True)


def tokenizer_folder(info: dict) -> str:
    """The folder of the tokenizer a model's prompts are counted and parsed with: SDXL refiners have only the second
    encoder's."""
    sdxl = info.get("sdxl") or {}
    return "tokenizer" if sdxl.get("two_encoders", True) else "tokenizer_2"


def check_sdxl_mode(info: dict, mode: str) -> None:
    """InvalidRequestError when an SDXL model meets a mode sdrt does not run on it: modes not in SDXL_MODES, and on
    a refiner anything but img2img (a refiner refines: img2img, or the refiner of an SDXL base's txt2img)."""
    if mode not in SDXL_MODES:
        refuse_sdxl(info, mode)
    if is_sdxl(info) and is_refiner(info) and mode != "img2img":
        raise InvalidRequestError(
            f"{mode} on an SDXL refiner is not supported: a refiner runs img2img, or as the refiner of an SDXL base "
            "model's txt2img (refiner=, --refiner)"
        )


def refuse_sdxl(info: dict, what: str) -> None:
    """InvalidRequestError naming what an SDXL model cannot do yet."""
    if is_sdxl(info):
        raise InvalidRequestError(
            f"{what} on SDXL models is not supported yet (SDXL runs {', '.join(SDXL_MODES)} so far)"
        )


def sdxl_time_ids(
    info: dict, height: int, width: int, rows: int, guided: bool, uncond_rows: int | None = None
) -> np.ndarray:
    """SDXL's micro-conditioning, float32 [rows, 6] (or [rows, 5] for a refiner), as diffusers' SDXL pipelines give
    it by default and the A1111 web UI builds it: original size (h, w) = the generation size, crop top-left (0, 0),
    then the target size (h, w), or for a refiner the aesthetic score (6, the uncond rows' 2.5). `rows`: the UNet
    batch, its first `uncond_rows` uncond when `guided` (default: the first half; with AND, B of (1 + m) B)."""
    size = [height, width]
    if info["sdxl"].get("requires_aesthetics_score"):
        ids = np.array([[*size, 0, 0, AESTHETIC_SCORE]] * rows, dtype=np.float32)  # [rows, 5]
        if guided:
            ids[: rows // 2 if uncond_rows is None else uncond_rows, 4] = NEGATIVE_AESTHETIC_SCORE
        return ids
    return np.tile(np.array([*size, 0, 0, *size], dtype=np.float32), (rows, 1))  # [rows, 6]


def sdxl_feeds(info: dict, conditioning: Conditioning, height: int, width: int) -> dict[str, np.ndarray] | None:
    """The UNet's extra feeds for an SDXL model (time_ids, one row per conditioning row), None for other models;
    height, width: the generation size in pixels."""
    if not is_sdxl(info):
        return None
    if conditioning.pooled is None:  # conditioning built by code that does not carry the pooled text
        raise InvalidRequestError("SDXL conditioning without its pooled text is not supported")
    rows = len(conditioning.batches[0])  # [uncond, cond_1 .. cond_m] of B rows each
    uncond_rows = rows // (len(conditioning.cond_weights) + 1)
    return {"time_ids": sdxl_time_ids(info, height, width, rows, conditioning.guided, uncond_rows)}


def check_sdxl_backend(info: dict, backend: str) -> None:
    """InvalidRequestError when an SDXL model meets a backend that does not run SDXL yet."""
    if is_sdxl(info) and backend not in SDXL_BACKENDS:
        raise InvalidRequestError(
            f"SDXL models on the {backend} backend are not supported yet: use --backend {', '.join(SDXL_BACKENDS)}"
        )


def encode_sdxl_groups(
    model: StableDiffusion, groups: list[list[str]], emphasis: str, negative: bool
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each group of texts as the A1111 web UI encodes one SDXL batch: per group the states [n, 77 k, D1 + D2] and
    the pooled text [n, P] (k: the group's most chunks; a refiner's states are text encoder 2's alone [n, 77 k, D2]).

    Both encoders chunk the texts the same way (75 tokens, BREAK, each chunk with its own start and end tokens and
    its emphasis); every chunk runs through both encoders, their penultimate states are concatenated per chunk and
    the chunks along the tokens; the pooled text is text encoder 2's of the first chunk. `negative`: groups[0] is
    the negative prompt's, all zeros when its texts are all empty and the model says force_zeros_for_empty_prompt:
    zeros as long as the longest group, which is what A1111 computes too (it runs such an uncond apart, unpadded,
    and zero context tokens add nothing to attention whatever their number).
    """
    zero = negative and model.info["sdxl"]["force_zeros_for_empty_prompt"] and not any(groups[0])
    texts = groups[1:] if zero else groups
    tokenizers = [model.tokenizer_2]
    if model.info["sdxl"].get("two_encoders", True):
        tokenizers.insert(0, model.tokenizer)
    # textual inversion: each tokenizer finds the embeddings' names; both put their vectors in the same slots
    lookups = [model.embedding_lookup if tokenizer is model.tokenizer else model.embeddings.lookup(tokenizer)
               for tokenizer in tokenizers]  # fmt: skip
    per_encoder = [tokenize_groups(texts, t, emphasis, embedding_at=lookup) for t, lookup in zip(tokenizers, lookups)]
    counts = [max(len(encoder[g][0].chunks) for encoder in per_encoder) for g in range(len(texts))]
    per_encoder = [tokenize_groups(texts, t, emphasis, counts, lookup) for t, lookup in zip(tokenizers, lookups)]
    states = []
    if len(tokenizers) == 2:
        tables = model.backend.text_tables()
        session_1 = model.backend.session("text_encoder")

        def run_1(prompts: list, i: int) -> np.ndarray:
            embeds = np.stack([apply_fixes(tables.embed(np.array(p.chunks[i])), p.fixes[i]) for p in prompts])
            return session_1.run({"inputs_embeds": embeds}, ["hidden_states"])["hidden_states"][PENULTIMATE]

        states.append(encode_chunks(per_encoder[0], emphasis, run_1))
    session_2 = model.backend.session("text_encoder_2")
    first_pooled: list[np.ndarray] = []

    width_2 = model.info["sdxl"]["text_hidden_size_2"]

    def run_2(prompts: list, i: int) -> np.ndarray:
        # ids [n, 77], -1 in textual-inversion slots, whose token embeddings are those rows of overrides [n, 77, D2]
        ids, overrides = (np.stack(parts) for parts in zip(*(overridden_ids(p.chunks[i], p.fixes[i], width_2)
                                                              for p in prompts)))  # fmt: skip
        out = session_2.run({"input_ids": ids, "token_overrides": overrides}, ["hidden_states", "text_embeds"])
        if i == 0:  # every group has a first chunk: this call holds all texts, in group order
            first_pooled.append(out["text_embeds"].astype(np.float32))
        return out["hidden_states"][PENULTIMATE]

    states.append(encode_chunks(per_encoder[-1], emphasis, run_2))
    hidden = [np.concatenate(parts, axis=-1) for parts in zip(*states)]  # per group [n, 77 k, D1 + D2]
    offsets = np.cumsum([0] + [len(group) for group in texts])
    pooled = [first_pooled[0][a:b] for a, b in zip(offsets[:-1], offsets[1:])]  # per group [n, P]
    if zero:  # force_zeros_for_empty_prompt: no text encoder run; as long as the longest group (diffusers' zeros_like)
        tokens = CHUNK_TOKENS * max(counts)
        hidden.insert(0, np.zeros((len(groups[0]), tokens, hidden[-1].shape[2]), dtype=np.float32))
        pooled.insert(0, np.zeros((len(groups[0]), pooled[-1].shape[1]), dtype=np.float32))
    return hidden, pooled
