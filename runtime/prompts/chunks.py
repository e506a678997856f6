"""Prompt text -> CLIP token chunks of 77 ids with per-token emphasis multipliers.

Follows FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line and process_tokens of A1111's
modules/sd_hijack_clip.py: every attention fragment is tokenised on its own; tokens fill chunks of 75; when a
chunk is full and a comma lies within the last `comma_padding_backtrack` tokens, the tokens after that comma move
to the next chunk; BREAK closes the chunk; each chunk is padded with the end token and wrapped as
[BOS] + 75 + [EOS]. For SD2 (pad id != end id) every id after the first end token becomes the pad id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from runtime.errors import InvalidRequestError
from runtime.prompts.attention import BREAK, BREAK_WEIGHT, parse_attention
from runtime.prompts.emphasis import check_emphasis_mode

CHUNK_LENGTH = 75  # prompt tokens per chunk; with BOS and EOS a chunk is 77 ids
COMMA_PADDING_BACKTRACK = 20  # A1111's default "Prompt word wrap length limit"; 0 turns comma backtracking off
EMBEDDING_PLACEHOLDER_ID = 0  # id written into the slots of a textual-inversion vector (A1111 writes 0)


class PromptTokenizer(Protocol):
    """What chunking needs from a CLIP tokenizer (runtime/tokenizer.py provides it)."""

    bos_id: int
    eos_id: int
    pad_id: int  # == eos_id for SD1 (CLIP ViT-L), 0 for SD2 (OpenCLIP)
    comma_id: int | None  # id of ",</w>"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS."""
        ...


class Embedding(Protocol):
    """A textual-inversion embedding as chunking sees it (runtime/prompts/embeddings.py loads them)."""

    name: str
    vectors: int  # how many token slots it occupies


# (token ids of one fragment, position) -> (embedding starting there or None, ids it spans)
EmbeddingLookup = Callable[[list[int], int], tuple[Embedding | None, int]]


@dataclass
class PromptChunks:
    """A prompt as chunks of 77 token ids; what the text encoder runs once per chunk."""

    chunks: list[list[int]]  # [n_chunks][77] ids: BOS, 75 prompt/padding ids, EOS
    multipliers: list[list[float]]  # [n_chunks][77] emphasis weights; 1.0 for BOS/EOS/padding
    token_count: int  # prompt tokens as A1111 counts them: 75 per closed chunk plus those in the last
    fixes: list[list[tuple[int, Embedding]]] = field(default_factory=list)  # per chunk: (offset, embedding)


@dataclass
class _Builder:
    """The chunk being filled; mirrors the locals of A1111's tokenize_line."""

    tokenizer: PromptTokenizer
    result: PromptChunks = field(default_factory=lambda: PromptChunks([], [], 0))
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)
    last_comma: int = -1  # index in `tokens` of the last comma, -1 when none since the chunk began

    def close_chunk(self, is_last: bool = False) -> None:
        self.result.token_count += len(self.tokens) if is_last else CHUNK_LENGTH
        padding = CHUNK_LENGTH - len(self.tokens)
        ids = [self.tokenizer.bos_id, *self.tokens, *[self.tokenizer.eos_id] * padding, self.tokenizer.eos_id]
        self.result.chunks.append(_pad_after_end(ids, self.tokenizer))
        self.result.multipliers.append([1.0, *self.weights, *[1.0] * padding, 1.0])
        self.result.fixes.append(self.fixes)
        self.tokens, self.weights, self.fixes, self.last_comma = [], [], [], -1

    def backtrack_to_comma(self) -> None:
        """Close the chunk after its last comma; the tokens after the comma start the next chunk."""
        cut = self.last_comma + 1
        tokens, weights = self.tokens[cut:], self.weights[cut:]
        self.tokens, self.weights = self.tokens[:cut], self.weights[:cut]
        self.close_chunk()
        self.tokens, self.weights = tokens, weights


def tokenize_prompt(
    text: str,
    tokenizer: PromptTokenizer,
    *,
    emphasis: str = "Original",
    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
    embedding_at: EmbeddingLookup | None = None,
) -> PromptChunks:
    """Chunks of one prompt text (one scheduled text, after AND splitting), as A1111's tokenize_line.

    `emphasis="None"` reads the text literally (no brackets, escapes or BREAK); every other mode parses attention.
    `embedding_at` is the textual-inversion hook (EmbeddingDatabase.lookup): given a fragment's ids and a position
    it returns the embedding starting there and how many ids its name spans; the embedding then takes `vectors`
    slots holding EMBEDDING_PLACEHOLDER_ID, recorded in `fixes`.
    """
    if check_emphasis_mode(emphasis) == "None":
        fragments = [(text, 1.0)]
    else:
        fragments = parse_attention(text)
    builder = _Builder(tokenizer)
    for fragment, weight in fragments:
        if fragment == BREAK and weight == BREAK_WEIGHT:
            builder.close_chunk()
            continue
        _add_fragment(builder, tokenizer.encode(fragment), weight, comma_padding_backtrack, embedding_at)
    if builder.tokens or not builder.result.chunks:
        builder.close_chunk(is_last=True)
    return builder.result


def _add_fragment(
    builder: _Builder, ids: list[int], weight: float, backtrack: int, embedding_at: EmbeddingLookup | None
) -> None:
    comma_id = builder.tokenizer.comma_id
    position = 0
    while position < len(ids):
        token = ids[position]
        if token == comma_id:
            builder.last_comma = len(builder.tokens)
        elif (
            backtrack != 0
            and len(builder.tokens) == CHUNK_LENGTH
            and builder.last_comma != -1
            and len(builder.tokens) - builder.last_comma <= backtrack
        ):
            builder.backtrack_to_comma()
        if len(builder.tokens) == CHUNK_LENGTH:
            builder.close_chunk()

        embedding, span = embedding_at(ids, position) if embedding_at is not None else (None, 0)
        if embedding is None:
            builder.tokens.append(token)
            builder.weights.append(weight)
            position += 1
            continue
        slots = int(embedding.vectors)
        if slots > CHUNK_LENGTH:  # A1111 builds an over-long chunk here
            raise InvalidRequestError(
                f"embedding {embedding.name!r} has {slots} vectors; a chunk holds {CHUNK_LENGTH}"
            )
        if len(builder.tokens) + slots > CHUNK_LENGTH:
            builder.close_chunk()
        builder.fixes.append((len(builder.tokens), embedding))
        builder.tokens += [EMBEDDING_PLACEHOLDER_ID] * slots
        builder.weights += [weight] * slots
        position += span


def _pad_after_end(ids: list[int], tokenizer: PromptTokenizer) -> list[int]:
    """SD2: every id after the first end token becomes the pad id (A1111's process_tokens); SD1 unchanged."""
    if tokenizer.pad_id == tokenizer.eos_id:
        return ids
    first_end = ids.index(tokenizer.eos_id)
    return ids[: first_end + 1] + [tokenizer.pad_id] * (len(ids) - first_end - 1)


def empty_chunk(tokenizer: PromptTokenizer) -> tuple[list[int], list[float]]:
    """A1111's empty_chunk: [BOS] + 76 x [EOS] (SD2: [BOS, EOS] + 75 x pad) with all multipliers 1.0.

    The same ids as the chunk of the empty prompt "", whose encoding A1111 also uses for pad_cond_uncond.
    """
    ids = [tokenizer.bos_id] + [tokenizer.eos_id] * (CHUNK_LENGTH + 1)
    return _pad_after_end(ids, tokenizer), [1.0] * (CHUNK_LENGTH + 2)


def pad_to_chunks(prompt: PromptChunks, n_chunks: int, tokenizer: PromptTokenizer) -> PromptChunks:
    """`prompt` extended with empty chunks to `n_chunks` (as A1111 does for texts encoded in one batch).

    token_count is unchanged. Raises ValueError when the prompt already has more chunks.
    """
    missing = n_chunks - len(prompt.chunks)
    if missing < 0:
        raise ValueError(f"prompt has {len(prompt.chunks)} chunks, more than the {n_chunks} asked for")
    ids, weights = empty_chunk(tokenizer)
    return PromptChunks(
        chunks=prompt.chunks + [list(ids) for _ in range(missing)],
        multipliers=prompt.multipliers + [list(weights) for _ in range(missing)],
        token_count=prompt.token_count,
        fixes=prompt.fixes + [[] for _ in range(missing)],
    )


def target_token_count(token_count: int) -> int:
    """The token count at which one more chunk is needed (A1111's counter shows `token_count/target`)."""
    return -(-max(token_count, 1) // CHUNK_LENGTH) * CHUNK_LENGTH
