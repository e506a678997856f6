"""SDXL text conditioning, as diffusers' StableDiffusionXLPipeline.encode_prompt computes it for a plain prompt.

Both text encoders read the prompt (each through its own tokenizer: the second pads with "!"); their penultimate
hidden states are concatenated along the features ([n, 77, D1 + D2]) and the second encoder's pooled, projected
output is the UNet's `text_embeds` ([n, P]). The negative prompt is encoded the same way, except that an empty one
is all zeros when the model's `force_zeros_for_empty_prompt` says so. A1111 emphasis applies per encoder, before
the concatenation; the pooled output is taken before emphasis (as the A1111 web UI does). An SDXL refiner has the
second encoder only: its states alone are the UNet's context.

The UNet's `time_ids` (sdxl_time_ids) are the same in every mode: the generation size as original and target size,
crop (0, 0); a refiner's end with the aesthetic score instead of the target size.

Not yet for SDXL (refused with one line): prompts over one chunk of 75 tokens (and BREAK), AND, prompt editing,
clip skip.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidRequestError
from ..prompts import apply_emphasis, apply_fixes, check_emphasis_mode, get_schedule, split_and, tokenize_prompt
from ..prompts.extra_networks import extract_lora_tags
from .conditioning import Conditioning

if TYPE_CHECKING:
    from ..api import StableDiffusion

SDXL_BACKENDS = ("onnxruntime", "torch")  # where SDXL runs so far
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


def sdxl_time_ids(info: dict, height: int, width: int, rows: int, guided: bool) -> np.ndarray:
    """SDXL's micro-conditioning, float32 [rows, 6] (or [rows, 5] for a refiner), as diffusers' SDXL pipelines give
    it by default and the A1111 web UI builds it: original size (h, w) = the generation size, crop top-left (0, 0),
    then the target size (h, w), or for a refiner the aesthetic score (6, the uncond rows' 2.5). `rows`: the UNet
    batch, its first half uncond when `guided`."""
    size = [height, width]
    if info["sdxl"].get("requires_aesthetics_score"):
        ids = np.array([[*size, 0, 0, AESTHETIC_SCORE]] * rows, dtype=np.float32)  # [rows, 5]
        if guided:
            ids[: rows // 2, 4] = NEGATIVE_AESTHETIC_SCORE
        return ids
    return np.tile(np.array([*size, 0, 0, *size], dtype=np.float32), (rows, 1))  # [rows, 6]


def sdxl_feeds(info: dict, conditioning: Conditioning, height: int, width: int) -> dict[str, np.ndarray] | None:
    """The UNet's extra feeds for an SDXL model (time_ids, one row per conditioning row), None for other models;
    height, width: the generation size in pixels."""
    if not is_sdxl(info):
        return None
    if conditioning.pooled is None:  # conditioning built by code that does not carry the pooled text
        raise InvalidRequestError("SDXL conditioning without its pooled text is not supported")
    rows = len(conditioning.batches[0])
    return {"time_ids": sdxl_time_ids(info, height, width, rows, conditioning.guided)}


def check_sdxl_backend(info: dict, backend: str) -> None:
    """InvalidRequestError when an SDXL model meets a backend that does not run SDXL yet."""
    if is_sdxl(info) and backend not in SDXL_BACKENDS:
        raise InvalidRequestError(
            f"SDXL models on the {backend} backend are not supported yet: use --backend {' or '.join(SDXL_BACKENDS)}"
        )


def sdxl_without_loras(method: Callable) -> Callable:
    """A generation method that refuses LoRAs (`loras=`, `<lora:...>` tags) on SDXL models before with_loras would
    apply them."""

    @functools.wraps(method)
    def generate(self: StableDiffusion, prompt: str, *args, **options):
        if is_sdxl(self.info) and (options.get("loras") or extract_lora_tags(prompt)[1]):
            refuse_sdxl(self.info, "LoRA")
        return method(self, prompt, *args, **options)

    return generate


def check_sdxl_prompt(prompt: str, steps: int, clip_skip: int) -> None:
    """InvalidRequestError for the prompt language SDXL does not have yet: AND, prompt editing, clip skip."""
    if clip_skip > 1:
        raise InvalidRequestError("clip skip on SDXL models is not supported yet")
    if len(split_and(prompt)) > 1:
        raise InvalidRequestError("AND (composable prompts) on SDXL models is not supported yet")
    if len(get_schedule(prompt, steps)) > 1:
        raise InvalidRequestError(
            "prompt editing and alternation ([a:b:n], [a|b]) on SDXL models are not supported yet"
        )


def build_sdxl_conditioning(
    model: StableDiffusion,
    prompt: str,
    negative_prompt: str,
    batch: int,
    cfg_scale: float,
    steps: int,
    emphasis: str = "Original",
    clip_skip: int = 1,
) -> Conditioning:
    """One UNet text batch [(1 + guided) B, 77, D1 + D2] with its pooled text [(1 + guided) B, P], uncond first."""
    check_emphasis_mode(emphasis)
    guided = cfg_scale > 1.0
    texts = [prompt, negative_prompt] if guided else [prompt]
    for text in texts:
        check_sdxl_prompt(text, steps, clip_skip)
    zero_negative = guided and not negative_prompt and model.info["sdxl"]["force_zeros_for_empty_prompt"]
    hidden, pooled = encode_sdxl(model, texts[:1] if zero_negative else texts, emphasis)  # [n, 77, D], [n, P]
    if zero_negative:  # diffusers' force_zeros_for_empty_prompt: no text encoder run for it
        hidden = np.concatenate([hidden, np.zeros_like(hidden)])
        pooled = np.concatenate([pooled, np.zeros_like(pooled)])
    order = [1, 0] if guided else [0]  # uncond first
    text_batch = np.concatenate([np.repeat(hidden[i : i + 1], batch, axis=0) for i in order])  # [N, 77, D]
    pooled_batch = np.concatenate([np.repeat(pooled[i : i + 1], batch, axis=0) for i in order])  # [N, P]
    return Conditioning(
        [np.ascontiguousarray(text_batch, dtype=np.float32)],
        np.zeros(steps, dtype=np.int64),
        np.ones(1, dtype=np.float32),
        guided,
        pooled=[np.ascontiguousarray(pooled_batch, dtype=np.float32)],
    )


def encode_sdxl(model: StableDiffusion, texts: list[str], emphasis: str) -> tuple[np.ndarray, np.ndarray]:
    """Each text through both encoders: (penultimate states concatenated [n, 77, D1 + D2], pooled [n, P]); an SDXL
    refiner has text encoder 2 only: its states alone [n, 77, D2] (diffusers' encode_prompt without text_encoder)."""
    encoded = []
    if model.info["sdxl"].get("two_encoders", True):
        chunks_1 = [_one_chunk(tokenize_prompt(t, model.tokenizer, emphasis=emphasis)) for t in texts]
        tables = model.backend.text_tables()
        inputs_embeds = np.stack([apply_fixes(tables.embed(np.array(p.chunks[0])), p.fixes[0]) for p in chunks_1])
        hidden_1 = model.backend.session("text_encoder").run({"inputs_embeds": inputs_embeds}, ["hidden_states"])
        encoded.append((hidden_1, chunks_1))
    chunks_2 = [_one_chunk(tokenize_prompt(t, model.tokenizer_2, emphasis=emphasis)) for t in texts]
    ids_2 = np.array([p.chunks[0] for p in chunks_2], dtype=np.int32)  # [n, 77]
    encoded_2 = model.backend.session("text_encoder_2").run({"input_ids": ids_2}, ["hidden_states", "text_embeds"])
    encoded.append((encoded_2, chunks_2))
    z = [_emphasis(states["hidden_states"][PENULTIMATE], prompts, emphasis) for states, prompts in encoded]
    return np.concatenate(z, axis=-1), encoded_2["text_embeds"].astype(np.float32)  # [n, 77, D1 + D2], [n, P]


def _emphasis(z: np.ndarray, prompts: list, mode: str) -> np.ndarray:
    """A1111 emphasis on each text's own encoding (its mean rescale spans that text only)."""
    rows = [
        apply_emphasis(z[i : i + 1], np.array([p.multipliers[0]], dtype=np.float32), mode)
        for i, p in enumerate(prompts)
    ]
    return np.concatenate(rows).astype(np.float32, copy=False)  # [n, 77, D]


def _one_chunk(prompt):
    """The tokenized prompt when it fits one chunk of 75 tokens (what SDXL runs so far)."""
    if len(prompt.chunks) > 1:
        raise InvalidRequestError(
            "prompts over 75 tokens (or with BREAK) on SDXL models are not supported yet: shorten the prompt"
        )
    return prompt
