"""A1111's extra-network tags (`<lora:name:weight>`): found and removed from the prompt before it is parsed.

As modules/extra_networks.py does: every `<kind:args>` match of `<(\\w+):([^>]+)>` is cut out of the text (any kind,
not only lora), its args split on ":", each "key=value" item named and the rest positional. Lora reads them as
extensions-builtin/Lora/extra_networks_lora.py does: name = positional[0]; te = positional[1] (default 1) unless
te=...; unet = positional[2] (default te) unless unet=... A1111 parses only the positive prompt this way; tags in
the negative prompt stay in its text and load nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidRequestError

RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class LoraTag:
    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0


def parse_extra_networks(prompt: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The prompt without its extra-network tags, and each tag's (kind, args split on ":") in order."""
    found: list[tuple[str, list[str]]] = []

    def cut(match: re.Match) -> str:
        found.append((match.group(1), match.group(2).split(":")))
        return ""

    return RE_EXTRA_NETWORK.sub(cut, prompt), found


def lora_tag(args: list[str]) -> LoraTag:
    """A `<lora:...>` tag's args -> name and multipliers; InvalidRequestError for a multiplier that is no number."""
    positional = [a for a in args if len(a.split("=", 2)) != 2]
    named = dict(a.split("=", 1) for a in args if len(a.split("=", 2)) == 2)
    if not positional:
        raise InvalidRequestError(f"<lora:{':'.join(args)}> names no LoRA")
    try:
        te = float(positional[1]) if len(positional) > 1 else 1.0
        te = float(named.get("te", te))
        unet = float(positional[2]) if len(positional) > 2 else te
        unet = float(named.get("unet", unet))
    except ValueError:
        raise InvalidRequestError(f"<lora:{':'.join(args)}>: the weights must be numbers") from None
    return LoraTag(positional[0], te, unet)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt as the text encoder sees it (every extra-network tag removed) and its LoRA tags."""
    text, networks = parse_extra_networks(prompt)
    return text, [lora_tag(args) for kind, args in networks if kind == "lora"]
