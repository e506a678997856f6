"""Prompt editing `[from:to:when]`, alternation `[a|b]` and `AND` composition of the A1111 prompt language.

A1111 (modules/prompt_parser.py) parses with a lark Earley grammar; this is a hand-written recursive descent over
the same language. Where a bracket group reads both as an edit/alternation and as literal brackets
(`x[[a:b:3]:c]:2]`), lark's pick depends on the process's string-hash seed; here the outermost group that parses
wins, which is always one of lark's picks (checked by differential fuzzing against lark 1.1.2, A1111's pin).

    start:     (prompt | raw run of `[ ] ( ) :`)*      -- outermost bracket group that parses wins, else raw chars
    prompt:    (emphasized | scheduled | alternate | plain)*
    emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"     -- kept verbatim
    scheduled: "[" [prompt ":"] prompt ":" WS? NUMBER WS? "]"
    alternate: "[" prompt ("|" prompt?)+ "]"
    plain:     run of anything but `\\ [ ] ( ) : |`, or backslash + any char but newline

A prompt that does not parse (a `|` outside an alternation, a trailing backslash) is used literally.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from runtime.errors import InvalidRequestError

MAX_NESTING = 100  # bracket depth beyond which a prompt is refused (A1111 hits Python's recursion limit)

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
# lark's common.SIGNED_NUMBER, with the optional whitespace and the closing bracket of a scheduled group
_WHEN = re.compile(r"\s*([+-]?(?:[0-9]+[eE][+-]?[0-9]+|(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+))\s*\]")
_RAW = "[]():"
_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


@dataclass
class _Scheduled:
    before: list | None  # nodes shown while step <= when (None: nothing)
    after: list  # nodes shown after `when`
    when_text: str  # the NUMBER as written: a "." makes it a fraction of the steps
    when: int = 0  # resolved by _resolve_steps


@dataclass
class _Alternate:
    options: list  # list of node lists, cycled one per step


class _ParseError(Exception):
    """The prompt is outside the grammar; the caller uses it literally."""


class _Parser:
    """Recursive descent over one prompt; nodes are str (verbatim text), _Scheduled or _Alternate."""

    def __init__(self, text: str):
        self.text = text
        self.memo: dict[int, tuple[object, int] | None] = {}  # bracket group at pos -> (node, end) or None

    def parse(self) -> list:
        nodes, pos = self.prompt(0, 0)
        while pos < len(self.text):
            char = self.text[pos]
            if char not in _RAW:  # `|`, or a backslash that escapes nothing
                raise _ParseError(f"unexpected {char!r} at {pos}")
            nodes.append(char)
            more, pos = self.prompt(pos + 1, 0)
            nodes += more
        return nodes

    def prompt(self, pos: int, depth: int) -> tuple[list, int]:
        """Parse items from pos up to the first character no item can start with; return (nodes, end)."""
        nodes: list = []
        while pos < len(self.text):
            plain = _PLAIN.match(self.text, pos)
            if plain:
                nodes.append(plain.group(0))
                pos = plain.end()
                continue
            group = self.group(pos, depth) if self.text[pos] in "([" else None
            if group is None:
                break
            node, pos = group
            nodes += node if isinstance(node, list) else [node]
        return nodes, pos

    def group(self, pos: int, depth: int) -> tuple[object, int] | None:
        if pos not in self.memo:
            if depth >= MAX_NESTING:
                raise InvalidRequestError(f"prompt nests brackets deeper than {MAX_NESTING} levels")
            parse = self.round if self.text[pos] == "(" else self.square
            self.memo[pos] = parse(pos, depth + 1)
        return self.memo[pos]

    def round(self, pos: int, depth: int) -> tuple[list, int] | None:
        """`(prompt)` or `(prompt:prompt)`: emphasis, kept verbatim (only nested edits are resolved)."""
        inner, end = self.prompt(pos + 1, depth)
        nodes = ["(", *inner]
        if self._at(end, ":"):
            second, end = self.prompt(end + 1, depth)
            nodes += [":", *second]
        if not self._at(end, ")"):
            return None
        return [*nodes, ")"], end + 1

    def square(self, pos: int, depth: int) -> tuple[object, int] | None:
        first, end = self.prompt(pos + 1, depth)
        if self._at(end, "]"):
            return ["[", *first, "]"], end + 1
        if self._at(end, "|"):
            return self.alternate(first, end, depth)
        if self._at(end, ":"):
            return self.scheduled(first, end + 1, depth)
        return None

    def alternate(self, first: list, pos: int, depth: int) -> tuple[_Alternate, int] | None:
        options = [first]
        while self._at(pos, "|"):
            option, pos = self.prompt(pos + 1, depth)
            options.append(option)
        if not self._at(pos, "]"):
            return None
        return _Alternate(options), pos + 1

    def scheduled(self, first: list, pos: int, depth: int) -> tuple[_Scheduled, int] | None:
        when = _WHEN.match(self.text, pos)
        if when:  # [to:when]
            return _Scheduled(None, first, when.group(1)), when.end()
        second, end = self.prompt(pos, depth)
        when = _WHEN.match(self.text, end + 1) if self._at(end, ":") else None
        if when:  # [from:to:when]
            return _Scheduled(first, second, when.group(1)), when.end()
        return None

    def _at(self, pos: int, char: str) -> bool:
        return pos < len(self.text) and self.text[pos] == char


def _walk(nodes: list):
    """Every _Scheduled and _Alternate in the tree, including those inside branches not taken."""
    for node in nodes:
        if isinstance(node, _Scheduled):
            yield node
            yield from _walk(node.before or [])
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _resolve_steps(nodes: list, steps: int, int_offset: int, fraction_offset: float, old: bool) -> list[int]:
    """Set each group's `when` in steps and return the sorted steps at which the text changes (incl. `steps`)."""
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
            continue
        value = float(node.when_text)
        if old:
            value = value * steps if value < 1 else value
        elif "." in node.when_text:
            value = (value - fraction_offset) * steps
        else:
            value = value - int_offset
        # A1111 computes min(steps, int(value)); int() of an infinite float raises there, here it saturates.
        node.when = min(steps, int(value)) if math.isfinite(value) else (steps if value > 0 else -1)
        if node.when >= 1:
            ends.add(node.when)
    return sorted(ends)


def _render(nodes: list, step: int) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, _Scheduled):
            parts.append(_render(node.before or [], step) if step <= node.when else _render(node.after, step))
        elif isinstance(node, _Alternate):
            parts.append(_render(node.options[(step - 1) % len(node.options)], step))
        else:
            parts.append(node)
    return "".join(parts)


def get_schedule(
    prompt: str, steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """(end_step, text) pairs: `text` is in effect up to and including `end_step`; the last end_step is the total.

    As A1111's get_learned_conditioning_prompt_schedules. `when` written with a "." is a fraction of the steps
    (`1.5` = 150 %), without one a step count. With `hires_steps` the schedule is for the hires pass: integers
    count on from the base steps and fractions from 1.0 (`[a:b:1.5]` switches half-way through the hires
    pass). `use_old_scheduling` is A1111's legacy rule (any `when` < 1 is a fraction, hires offsets ignored).
    """
    if steps < 1:
        raise InvalidRequestError(f"steps must be at least 1, got {steps}")
    if hires_steps is not None and hires_steps < 1:
        raise InvalidRequestError(f"hires steps must be at least 1, got {hires_steps}")
    if hires_steps is None or use_old_scheduling:
        int_offset, fraction_offset, total = 0, 0.0, steps
    else:
        int_offset, fraction_offset, total = steps, 1.0, hires_steps
    try:
        nodes = _Parser(prompt).parse()
    except _ParseError:
        return [(total, prompt)]
    ends = _resolve_steps(nodes, total, int_offset, fraction_offset, use_old_scheduling)
    return [(end, _render(nodes, end)) for end in ends]


def schedule_index(schedule: list[tuple[int, str]], step: int) -> int:
    """Index of the schedule entry A1111 uses at denoiser call `step` (0-based: the first with step <= end_step).

    Being 0-based against 1-based end steps, `[a:b:3]` shows `a` for four calls (0..3), as A1111 does.
    """
    for index, (end_step, _) in enumerate(schedule):
        if step <= end_step:
            return index
    return 0  # past the end: A1111 falls back to the first entry


def split_and(prompt: str) -> list[tuple[str, float]]:
    """`a :1.2 AND b` -> [("a", 1.2), (" b", 1.0)]: A1111's get_multicond_prompt_list for one prompt.

    Each sub-prompt keeps its leading whitespace and loses trailing whitespace and a trailing `:weight`.
    A1111 applies this to the positive prompt only; in a negative prompt `AND` is plain text.
    """
    parts = []
    for subprompt in _AND.split(prompt):
        text, weight = _AND_WEIGHT.search(subprompt).groups()
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts
