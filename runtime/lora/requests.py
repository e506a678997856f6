"""LoRA in requests: `<lora:name:te:unet>` prompt tags (looked up in a LoRA folder) and explicit (file, weight)
pairs, activated on the model's backend before a generation and written into its infotext as A1111 does."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import LoraError
from ..output import format_parameters
from ..prompts.extra_networks import LoraTag, extract_lora_tags
from .apply import LoraState, LoraUse
from .files import LORA_SUFFIXES, PICKLE_SUFFIXES

LoraArgument = str | Path | tuple  # "file.safetensors", "file:0.8", (file, weight) or (file, te, unet)


def find_lora(name: str, folder: Path | None, allow_pickle: bool) -> Path:
    """The file of LoRA `name` in `folder` (by file stem, searched recursively as A1111 does; .safetensors first,
    .pt/.ckpt only with allow_pickle); LoraError naming the folder when there is none."""
    if folder is None:
        raise LoraError(f"the prompt asks for LoRA {name!r} but no LoRA folder is set (--lora-dir, lora_dir=)")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise LoraError(f"the LoRA folder {folder} does not exist")
    suffixes = LORA_SUFFIXES if allow_pickle else tuple(s for s in LORA_SUFFIXES if s not in PICKLE_SUFFIXES)
    for suffix in suffixes:
        matches = sorted(p for p in folder.rglob(f"*{suffix}") if p.stem == name and p.is_file())
        if matches:
            return matches[0]
    hint = "" if allow_pickle else " (.pt/.ckpt files count only with --allow-pickle)"
    raise LoraError(f"no LoRA named {name!r} in {folder}{hint}")


def lora_argument(value: LoraArgument) -> LoraUse:
    """An explicit LoRA: a path, "path:weight", (path, weight) or (path, te weight, unet weight)."""
    if isinstance(value, tuple):
        if len(value) not in (2, 3):
            raise LoraError(f"a LoRA is (file, weight) or (file, te weight, unet weight), not {value!r}")
        path, te, unet = Path(value[0]), value[1], value[-1]
    else:
        text = str(value)
        head, sep, tail = text.rpartition(":")
        path, te = (Path(head), tail) if sep and _is_number(tail) else (Path(text), 1.0)
        unet = te
    try:
        return LoraUse(path, float(te), float(unet), path.stem)
    except (TypeError, ValueError):
        raise LoraError(f"the weight of LoRA {path} must be a number, not {te!r}") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def tag_use(tag: LoraTag, folder: Path | None, allow_pickle: bool) -> LoraUse:
    return LoraUse(find_lora(tag.name, folder, allow_pickle), tag.te_multiplier, tag.unet_multiplier, tag.name)


def lora_hashes(uses: Sequence[LoraUse], state: LoraState) -> str:
    """A1111's "Lora hashes" value: `alias: shorthash, ...` with ":" and "," removed from the alias."""
    items = []
    for use in uses:
        alias = use.alias.replace(":", "").replace(",", "")
        if alias:
            items.append(f"{alias}: {state.short_hash(use)}")
    return ", ".join(items)


def with_loras(method: Callable[..., Any]) -> Callable[..., Any]:
    """Give a generation method of StableDiffusion the LoRA options: tags in its prompt, `loras=[...]` and
    `lora_dir=`. The text encoder sees the prompt without the tags; the infotext keeps them (A1111's does) and
    gains "Lora hashes"."""

    @functools.wraps(method)
    def generate(self, prompt: str, *args, loras: Sequence[LoraArgument] = (), lora_dir=None, **options):
        text, uses = activate_loras(self, prompt, loras, lora_dir)
        result = method(self, text, *args, **options)
        if not uses and text == prompt:
            return result
        return _with_infotext(result, prompt, lora_hashes(uses, self.lora_state) if uses else "")

    return generate


def activate_loras(
    model, prompt: str = "", loras: Sequence[LoraArgument] = (), lora_dir=None
) -> tuple[str, list[LoraUse]]:
    """Put on `model`'s backend exactly the LoRAs of `prompt`'s tags and `loras` (none: the base weights); return
    the prompt without its tags and the LoRAs. Code that runs pipelines directly calls this first."""
    text, tags = extract_lora_tags(prompt)
    folder = lora_dir if lora_dir is not None else getattr(model, "lora_dir", None)
    allow_pickle = getattr(model, "lora_allow_pickle", False)
    uses = [tag_use(tag, folder, allow_pickle) for tag in tags] + [lora_argument(a) for a in loras]
    if getattr(model, "lora_state", None) is None:
        model.lora_state = LoraState(model.backend)
    model.lora_state.activate(uses, allow_pickle)
    return text, uses


def _with_infotext(result, prompt: str, hashes: str):
    """The result with the original prompt (tags included) and "Lora hashes" (before "Version") in its infotext."""
    params = dict(result.parameters)
    version = params.pop("Version", None)
    params.update({"Lora hashes": hashes or None, "Version": version})
    negative = result.request.negative_prompt
    infotexts = [format_parameters(prompt, negative, dict(params, Seed=seed)) for seed in result.seeds]
    return replace(result, infotexts=infotexts, parameters=params, request=replace(result.request, prompt=prompt))
