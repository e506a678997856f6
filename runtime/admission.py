"""Admission: a request is measured against the prompt limits and the memory budget before any work is done.

`admit(model, request)` runs at the start of every generation method (and in runtime.serving before a request is
queued). It refuses, with a ResourceError that names what fits:
* a prompt over the prompt limits: characters first (no tokenising of a 10 MiB prompt), then AND terms, then
  75-token chunks per text;
* a request whose estimated peak working memory (runtime.memory) exceeds the model's memory budget.
`allocation_errors` wraps the generation methods: an allocation that fails anyway becomes an AllocationError naming
the size that was asked for, instead of a backend error.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

from .errors import AllocationError, InvalidRequestError, ResourceError
from .memory import Estimate, default_budget, estimate, format_bytes, memory_facts
from .prompts import get_schedule, split_and, tokenize_prompt
from .prompts.chunks import CHUNK_LENGTH
from .request import size_multiple


@dataclass(frozen=True)
class PromptLimits:
    """The largest prompt accepted (each of the prompt and the negative prompt)."""

    max_chars: int = 20_000  # checked before anything else
    max_chunks: int = 20  # 75-token chunks per text: 1500 tokens
    max_and_terms: int = 16  # AND sub-prompts of the prompt; each is one more UNet row per image

    def __post_init__(self):
        for name in ("max_chars", "max_chunks", "max_and_terms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, not {value!r}")


@dataclass(frozen=True)
class PromptSize:
    terms: int  # AND sub-prompts of the positive prompt
    chunks: int  # the most 75-token chunks of any text the request encodes
    texts: int  # distinct texts per text-encoder call (prompt-editing schedules, AND terms, negative, empty)
    combos: int  # distinct UNet text batches (combinations of scheduled texts)


@dataclass(frozen=True)
class Admission:
    """What admit() measured: the request's passes (width, height) and the estimate of the largest."""

    mode: str
    sizes: tuple[tuple[int, int], ...]
    batch: int
    rows: int  # UNet rows per image
    prompt: PromptSize
    estimate: Estimate
    budget: int | None
    vae_tiling: bool | None = None  # the model's option (runtime.vae_tiling): None is auto
    fused: frozenset[str] = frozenset()  # components whose attention runs fused (the backend's fused_attention())


def check_prompt_text(prompt: str, negative_prompt: str, limits: PromptLimits, kind: str = "") -> int:
    """The cheap checks (no tokenizer): characters, then AND terms; returns the number of AND terms. `kind`: what
    the messages call the prompts ("hires " for the hires pass's)."""
    for name, text in ((f"{kind}prompt", prompt), (f"{kind}negative prompt", negative_prompt)):
        if len(text) > limits.max_chars:
            raise ResourceError(f"the {name} has {len(text)} characters; at most {limits.max_chars} are accepted")
    terms = len(split_and(prompt))
    if terms > limits.max_and_terms:
        raise ResourceError(f"the {kind}prompt has {terms} AND terms; at most {limits.max_and_terms} are accepted")
    return terms


def prompt_size(model, request, limits: PromptLimits, steps: int, kind: str = "") -> PromptSize:
    """Check a request's prompts against `limits` and measure them (chunks counted on the unscheduled text of each
    AND term, which holds every alternative: an upper bound of any step's text)."""
    terms = check_prompt_text(request.prompt, request.negative_prompt, limits, kind)
    guided = request.cfg_scale > 1.0 or terms > 1
    texts = [
        (f"AND term {i + 1} of the {kind}prompt" if terms > 1 else f"{kind}prompt", t)
        for i, (t, _) in enumerate(split_and(request.prompt))
    ]
    if guided:
        texts.append((f"{kind}negative prompt", request.negative_prompt))
    chunks, distinct, combos = 1, 1, 1
    for name, text in texts:
        tokens = tokenize_prompt(text, model.tokenizer, emphasis=request.emphasis, embedding_at=model.embedding_lookup)
        count = len(tokens.chunks)
        if count > limits.max_chunks:
            raise ResourceError(
                f"the {name} is {tokens.token_count} tokens ({count} chunks of {CHUNK_LENGTH}); at most "
                f"{limits.max_chunks} chunks ({limits.max_chunks * CHUNK_LENGTH} tokens) are accepted"
            )
        chunks = max(chunks, count)
        scheduled = len(get_schedule(text, steps))
        distinct += scheduled
        combos = min(steps, combos * scheduled)
    return PromptSize(terms, chunks, distinct, combos)


def rows_per_image(request, prompt: PromptSize) -> int:
    """UNet rows per image: the AND terms, plus the unconditional row when guided."""
    guided = request.cfg_scale > 1.0 or prompt.terms > 1
    return prompt.terms + (1 if guided else 0)


def request_estimate(
    info: dict,
    width: int,
    height: int,
    batch: int,
    rows: int,
    prompt: PromptSize,
    vae_tiling: bool | None = None,
    fused: frozenset[str] = frozenset(),
) -> Estimate:
    """The estimate of one pass at width x height of `batch` images with `rows` UNet rows per image; `vae_tiling`:
    the model's tiling option (None: auto); `fused`: the components whose attention runs fused (runtime.memory)."""
    base = estimate(info, width, height, batch, batch * rows, prompt.chunks, prompt.texts, vae_tiling, fused)
    conditioning = prompt.combos * batch * rows * prompt.chunks * 77 * info["text_hidden_size"] * 4
    return Estimate(base.text_encoder + conditioning, base.unet + conditioning, base.vae)


def fused_components(model) -> frozenset[str]:
    """The components of `model` whose loaded session runs attention fused (the backend's `fused_attention()`)."""
    fused_attention = getattr(getattr(model, "backend", None), "fused_attention", None)
    return frozenset(fused_attention()) if callable(fused_attention) else frozenset()


def memory_budget(model) -> int | None:
    """The model's budget in bytes: `model.memory_budget` if set, else the default measured on first use."""
    if getattr(model, "memory_budget", None) is None:
        model.memory_budget = default_budget(model.backend)
    return model.memory_budget


def txt2img_passes(request, scale: float | None, width: int = 0, height: int = 0) -> tuple[tuple[int, int], ...]:
    """The (width, height) of each pass of a validated txt2img request: its own, and the hires fix's target."""
    if not (scale or width or height):
        return ((request.width, request.height),)
    from .pipelines.hires import hires_target

    return (request.width, request.height), hires_target(request.width, request.height, scale, width, height)


def admit(
    model,
    request,
    mode: str = "txt2img",
    sizes: tuple[tuple[int, int], ...] = (),
    record: bool = True,
    hires_prompts: tuple[str | None, str | None] = (None, None),
) -> Admission:
    """Refuse `request` (a validated request) with a ResourceError when its prompts or its estimated memory are over
    the model's limits; `sizes`: the (width, height) of every pass (default: the request's); `hires_prompts`: the
    hires pass's own prompt and negative prompt (None: the request's). Returns what it measured; `record`: also keep
    it as model.admission (the request about to run, named by allocation errors)."""
    from .pipelines.conditioning import schedule_steps

    if "memory" not in model.info:
        model.info["memory"] = _checkpoint_facts(model)
    limits = getattr(model, "prompt_limits", None) or PromptLimits()
    steps = schedule_steps(request.sampler, request.steps)
    prompt = prompt_size(model, request, limits, steps)
    if any(text is not None for text in hires_prompts):  # the second pass encodes its own texts
        second = replace(request, prompt=hires_prompts[0] or request.prompt,
                         negative_prompt=hires_prompts[1] or request.negative_prompt)  # fmt: skip
        other = prompt_size(model, second, limits, steps, "hires ")
        prompt = PromptSize(
            *(max(getattr(prompt, f), getattr(other, f)) for f in ("terms", "chunks", "texts", "combos"))
        )
    sizes = sizes or ((request.width, request.height),)
    rows = rows_per_image(request, prompt)
    budget = memory_budget(model)
    tiling, fused = getattr(model, "vae_tiling", None), fused_components(model)
    estimates = [request_estimate(model.info, w, h, request.batch_size, rows, prompt, tiling, fused) for w, h in sizes]
    worst = max(range(len(sizes)), key=lambda i: estimates[i].peak)
    admission = Admission(
        mode, tuple(sizes), request.batch_size, rows, prompt, estimates[worst], budget, tiling, fused
    )
    if budget is not None and estimates[worst].peak > budget:
        raise ResourceError(_refusal(model.info, admission, sizes[worst]))
    check_shapes = getattr(getattr(model, "backend", None), "check_request", None)  # engines of fixed profiles
    if check_shapes is not None:
        check_shapes(admission)
    if record:
        model.admission = admission
    return admission


def _checkpoint_facts(model) -> dict | None:
    """The memory facts of a model whose manifest predates them, from its source checkpoint's configs when that
    folder still exists; None (runtime.memory estimates SD 1.5's shapes) otherwise."""
    import json
    from pathlib import Path

    manifest = getattr(model.backend, "manifest", None)
    folder = Path((getattr(manifest, "source", None) or {}).get("path", "") or "")
    try:
        configs = [json.loads((folder / part / "config.json").read_text()) for part in ("unet", "vae", "text_encoder")]
    except (OSError, ValueError):
        return None
    return memory_facts(*configs)


def fits_together(info: dict, admissions: list[Admission], images: int) -> bool:
    """Whether `images` images of admitted requests of one size stay within the budget when they run as one batch
    (runtime.serving): estimated with the largest prompt and the most UNet rows per image among them."""
    budget = admissions[0].budget
    if budget is None:
        return True
    prompts = [a.prompt for a in admissions]
    terms, chunks, combos = (max(getattr(p, name) for p in prompts) for name in ("terms", "chunks", "combos"))
    prompt = PromptSize(terms, chunks, sum(p.texts for p in prompts), combos)
    rows = max(a.rows for a in admissions)
    tiling, fused = admissions[0].vae_tiling, admissions[0].fused
    return all(
        request_estimate(info, w, h, images, rows, prompt, tiling, fused).peak <= budget
        for w, h in admissions[0].sizes
    )


def largest_fitting(info: dict, width: int, height: int, fits_size) -> tuple[int, int] | None:
    """The largest (width, height) with the same aspect ratio (sides multiples of the model's size multiple) for
    which `fits_size(w, h)` holds; None when not even the smallest does."""
    multiple = size_multiple(info)
    longest = max(width, height)
    for side in range(longest - multiple, multiple - 1, -multiple):
        w = max(multiple, math.floor(width * side / longest / multiple) * multiple)
        h = max(multiple, math.floor(height * side / longest / multiple) * multiple)
        if fits_size(w, h):
            return w, h
    return None


def _refusal(info: dict, admission: Admission, size: tuple[int, int]) -> str:
    width, height = size
    budget, batch, rows, prompt = admission.budget, admission.batch, admission.rows, admission.prompt
    tiling, fused = admission.vae_tiling, admission.fused
    need = admission.estimate.peak
    what = f"{width}x{height}" + (f" (batch {batch})" if batch > 1 else "")
    if len(admission.sizes) > 1 and size != admission.sizes[0]:
        what = f"the hires pass at {what}"
    message = f"{what} needs ~{format_bytes(need)} of working memory, over the memory budget of {format_bytes(budget)}"

    def need_of(w: int, h: int, images: int) -> int:
        return request_estimate(info, w, h, images, rows, prompt, tiling, fused).peak

    if batch > 1 and need_of(width, height, 1) <= budget:
        fitting_batch = max(b for b in range(1, batch) if need_of(width, height, b) <= budget)
        return f"{message}; at most batch {fitting_batch} fits at this size"
    smaller = largest_fitting(info, width, height, lambda w, h: need_of(w, h, 1) <= budget)
    if smaller is None:
        return f"{message}; no size fits (raise --memory-budget or shorten the prompt)"
    return f"{message}; at most {smaller[0]}x{smaller[1]} fits" + (" at batch 1" if batch > 1 else "")


def allocation_errors(method):
    """Decorate a generation method: an allocation failure (AllocationError from a backend, numpy's MemoryError)
    becomes an AllocationError naming the request's size and the estimate."""

    @functools.wraps(method)
    def wrapper(model, *args, **kwargs):
        model.admission = None
        try:
            return method(model, *args, **kwargs)
        except (AllocationError, MemoryError) as exc:
            raise AllocationError(_out_of_memory(model.admission, exc)) from exc

    return wrapper


def batch_out_of_memory(admissions: list[Admission], exc: BaseException) -> str:
    """The message of an allocation failure in a batch of admitted requests (runtime.serving) run together."""
    images = sum(a.batch for a in admissions)
    return _out_of_memory(admissions[0], exc, images)


def _out_of_memory(admission: Admission | None, exc: BaseException, images: int | None = None) -> str:
    reason = str(exc) if isinstance(exc, AllocationError) else f"an allocation failed ({type(exc).__name__})"
    if admission is None:
        return f"out of memory: {reason}"
    width, height = max(admission.sizes, key=lambda s: s[0] * s[1])
    budget = "no budget" if admission.budget is None else f"budget {format_bytes(admission.budget)}"
    return (
        f"out of memory generating {width}x{height} (batch {images or admission.batch}): {reason}; the estimate was "
        f"~{format_bytes(admission.estimate.peak)} ({budget}): lower the memory budget or the size"
    )
