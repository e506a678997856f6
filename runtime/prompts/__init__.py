"""The A1111 prompt language in pure Python/numpy: attention, editing schedules, AND, token chunks, emphasis."""

from runtime.prompts.attention import BREAK, BREAK_WEIGHT, parse_attention
from runtime.prompts.chunks import (
    CHUNK_LENGTH,
    COMMA_PADDING_BACKTRACK,
    EMBEDDING_PLACEHOLDER_ID,
    Embedding,
    EmbeddingLookup,
    PromptChunks,
    PromptTokenizer,
    empty_chunk,
    pad_to_chunks,
    target_token_count,
    tokenize_prompt,
)
from runtime.prompts.describe import describe_prompt
from runtime.prompts.embeddings import EmbeddingDatabase, TextualInversion, apply_fixes, load_embeddings
from runtime.prompts.emphasis import EMPHASIS_MODES, apply_emphasis, check_emphasis_mode
from runtime.prompts.schedule import get_schedule, schedule_index, split_and

__all__ = [
    "BREAK",
    "BREAK_WEIGHT",
    "CHUNK_LENGTH",
    "COMMA_PADDING_BACKTRACK",
    "EMBEDDING_PLACEHOLDER_ID",
    "EMPHASIS_MODES",
    "Embedding",
    "EmbeddingDatabase",
    "EmbeddingLookup",
    "PromptChunks",
    "PromptTokenizer",
    "TextualInversion",
    "apply_fixes",
    "apply_emphasis",
    "check_emphasis_mode",
    "describe_prompt",
    "empty_chunk",
    "get_schedule",
    "load_embeddings",
    "pad_to_chunks",
    "parse_attention",
    "schedule_index",
    "split_and",
    "target_token_count",
    "tokenize_prompt",
]
