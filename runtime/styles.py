"""A1111's prompt styles: a CSV of named prompt and negative prompt snippets, applied to a request's prompts.

Sources followed (no code taken from them): A1111 `modules/styles.py` (StyleDatabase.load_from_csv, merge_prompts,
apply_styles_to_prompt). The file has a header row `name,prompt,negative_prompt` (the old `name,text` form is read
too); rows without a name or whose name starts with "#" are skipped. A style text holding `{prompt}` has the prompt
put in its place; any other is appended with ", " (empty parts left out). Styles apply in the order named.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from .errors import InvalidRequestError


def read_styles_csv(path: str | os.PathLike) -> tuple[dict, ...]:
    """The styles of an A1111 styles.csv, each {name, prompt, negative_prompt}; InvalidRequestError if unreadable."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            rows = list(csv.DictReader(file, skipinitialspace=True))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidRequestError(f"cannot read the styles file {path}: {exc}") from None
    styles: dict[str, dict] = {}
    for row in rows:
        name = (row.get("name") or "").strip()
        if not name or name.startswith("#"):
            continue
        prompt = row.get("prompt", row.get("text")) or ""
        styles[name] = {"name": name, "prompt": prompt, "negative_prompt": row.get("negative_prompt") or ""}
    return tuple(styles.values())


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """A1111's merge_prompts: `{prompt}` in the style is replaced by the prompt, else the two are joined by ", "."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, names: Sequence[str], styles: Sequence[dict]) -> tuple[str, str]:
    """The prompt and negative prompt with the named styles applied in order; an unknown name is an
    InvalidRequestError listing the known ones."""
    known = {style["name"]: style for style in styles}
    for name in names:
        style = known.get(name)
        if style is None:
            listed = ", ".join(repr(n) for n in known) or "none (serve --styles FILE)"
            raise InvalidRequestError(f"styles: unknown style {name!r}; known styles: {listed}")
        prompt = merge_prompts(style.get("prompt") or "", prompt)
        negative_prompt = merge_prompts(style.get("negative_prompt") or "", negative_prompt)
    return prompt, negative_prompt
