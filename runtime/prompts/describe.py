"""A JSON-ready summary of how sdrt reads a prompt (for `cli.py parse-prompt`)."""

from __future__ import annotations

from runtime.prompts.attention import parse_attention
from runtime.prompts.chunks import PromptTokenizer, tokenize_prompt
from runtime.prompts.schedule import get_schedule, split_and


def describe_prompt(
    prompt: str, steps: int = 20, tokenizer: PromptTokenizer | None = None, *, emphasis: str = "Original"
) -> dict:
    """{"attention", "schedule", "and"} and, with a tokenizer, {"chunks", "tokens"}.

    attention: [[text, weight], ...] of the text in effect at step 1 (the first schedule entry).
    schedule:  [[end_step, text], ...] of the whole prompt (AND not split, as for a negative prompt).
    and:       [[sub-prompt, weight], ...] from splitting on AND (how a positive prompt is composed).
    chunks, tokens: the most over every AND sub-prompt and every scheduled text of each, as A1111's token
        counter reports them (tokens = 75 per closed chunk plus the tokens of the last chunk).
    """
    schedule = get_schedule(prompt, steps)
    summary = {
        "attention": [[text, weight] for text, weight in parse_attention(schedule[0][1])],
        "schedule": [[end_step, text] for end_step, text in schedule],
        "and": [[text, weight] for text, weight in split_and(prompt)],
    }
    if tokenizer is not None:
        texts = [text for subprompt, _ in split_and(prompt) for _, text in get_schedule(subprompt, steps)]
        counted = [tokenize_prompt(text, tokenizer, emphasis=emphasis) for text in texts]
        longest = max(counted, key=lambda chunks: chunks.token_count)
        summary["chunks"] = len(longest.chunks)
        summary["tokens"] = longest.token_count
    return summary
