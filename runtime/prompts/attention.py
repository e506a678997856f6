"""Attention (emphasis) syntax of the A1111 prompt language: `(a)`, `[a]`, `(a:1.3)`, escapes and `BREAK`.

Follows modules/prompt_parser.py:parse_prompt_attention of AUTOMATIC1111/stable-diffusion-webui rule for rule,
including its quirks (a lone backslash vanishes, an unmatched `)` or `]` is literal text, a weight inside
brackets multiplies the `BREAK` marker too).
"""

from __future__ import annotations

import re

from runtime.errors import InvalidRequestError

BREAK = "BREAK"
BREAK_WEIGHT = -1.0  # the weight that marks a BREAK fragment (A1111 tests `weight == -1`)

ROUND_MULTIPLIER = 1.1  # `(a)`
SQUARE_MULTIPLIER = 1 / 1.1  # `[a]`

# One lexeme per match, tried in this order (the order decides, e.g. `\(` before `\`).
_LEXEME = re.compile(
    r"""
    \\[()\[\]\\]               # escaped bracket or backslash: the character itself
    | \\                       # a lone backslash: vanishes
    | [(\[]                    # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)   # `:weight)` closes a round bracket with an explicit weight
    | [)\]]                    # closing bracket
    | [^\\()\[\]:]+            # plain text (may contain BREAK)
    | :                        # a colon that closes nothing
    """,
    re.X,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pairs; BREAK becomes ("BREAK", -1.0); "" gives [("", 1.0)]."""
    fragments: list[list] = []  # [text, weight] pairs, mutated in place as brackets close
    open_round: list[int] = []  # index into `fragments` where each unclosed `(` starts
    open_square: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= multiplier

    for match in _LEXEME.finditer(text):
        lexeme, weight = match.group(0), match.group(1)
        if lexeme.startswith("\\"):
            fragments.append([lexeme[1:], 1.0])
        elif lexeme == "(":
            open_round.append(len(fragments))
        elif lexeme == "[":
            open_square.append(len(fragments))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), _parse_weight(weight))
        elif lexeme == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_MULTIPLIER)
        elif lexeme == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_SPLIT.split(lexeme)):
                if i > 0:
                    fragments.append([BREAK, BREAK_WEIGHT])
                fragments.append([part, 1.0])

    # Unbalanced brackets close at the end of the prompt: all round ones first, then all square ones.
    for start in open_round:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_MULTIPLIER)
    if not fragments:
        return [("", 1.0)]
    return _merge_equal_weights(fragments)


def _parse_weight(weight: str) -> float:
    try:
        return float(weight)
    except ValueError:  # `[.\d]+` also admits "." and "1.2.3"; A1111 raises here too
        raise InvalidRequestError(f"invalid attention weight {weight!r} in prompt") from None


def _merge_equal_weights(fragments: list[list]) -> list[tuple[str, float]]:
    """Join neighbours whose weights compare equal (exact float equality, as A1111)."""
    merged: list[list] = [list(fragments[0])]
    for text, weight in fragments[1:]:
        if merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, float(weight)) for text, weight in merged]
