"""`<lora:...>` prompt tags read as A1111 reads them.

Reference: A1111's modules/extra_networks.py (`re_extra_net = <(\\w+):([^>]+)>`, every match cut out of the
prompt, args split on ":", "key=value" items named) and extensions-builtin/Lora/extra_networks_lora.py (te =
positional[1] or te=, default 1; unet = positional[2] or unet=, default te). The expected values below were
worked out by hand from those rules.
"""

from __future__ import annotations

import pytest

from runtime.errors import InvalidRequestError
from runtime.prompts.extra_networks import LoraTag, extract_lora_tags

CASES = [
    # prompt, text the text encoder sees, tags
    ("a cat", "a cat", []),
    ("a cat <lora:style:0.8>", "a cat ", [LoraTag("style", 0.8, 0.8)]),
    ("<lora:style>a cat", "a cat", [LoraTag("style", 1.0, 1.0)]),
    ("a <lora:a:0.5> cat <lora:b:1.2>", "a  cat ", [LoraTag("a", 0.5, 0.5), LoraTag("b", 1.2, 1.2)]),
    ("x <lora:s:0.5:1.5>", "x ", [LoraTag("s", 0.5, 1.5)]),  # separate text-encoder and UNet multipliers
    ("x <lora:s:te=0.25>", "x ", [LoraTag("s", 0.25, 0.25)]),  # unet defaults to te
    ("x <lora:s:1:unet=0>", "x ", [LoraTag("s", 1.0, 0.0)]),
    ("x <lora:s:te=0.3:unet=0.7>", "x ", [LoraTag("s", 0.3, 0.7)]),
    ("x <lora:s:0.5:0.6:8>", "x ", [LoraTag("s", 0.5, 0.6)]),  # the 4th item (dyn dim) is not used
    ("x <lora:s:-1>", "x ", [LoraTag("s", -1.0, -1.0)]),
    ("x <lora:my lora-v2.1:0.4>", "x ", [LoraTag("my lora-v2.1", 0.4, 0.4)]),  # names may hold spaces and dots
    ("x <hypernet:h:1> y", "x  y", []),  # other extra networks are cut out too, and load nothing here
    ("x <lora:>", "x <lora:>", []),  # no args: not a tag ([^>]+ needs one character)
    ("x <lo-ra:s:1>", "x <lo-ra:s:1>", []),  # the kind must be \\w+
    ("x <lora:s:1", "x <lora:s:1", []),  # unclosed
    ("(x:1.2) <lora:s:1> [a:b:3]", "(x:1.2)  [a:b:3]", [LoraTag("s", 1.0, 1.0)]),  # the rest is the prompt's syntax
    ("x\n<lora:s:1>\ny", "x\n\ny", [LoraTag("s", 1.0, 1.0)]),
]


@pytest.mark.parametrize("prompt, text, tags", CASES)
def test_tags_as_a1111_reads_them(prompt, text, tags):
    assert extract_lora_tags(prompt) == (text, tags)


@pytest.mark.parametrize("prompt", ["x <lora:s:strong>", "x <lora:s:1:te=high>"])
def test_weight_that_is_not_a_number(prompt):
    with pytest.raises(InvalidRequestError, match="must be numbers"):
        extract_lora_tags(prompt)


def test_tag_without_a_name():
    with pytest.raises(InvalidRequestError, match="names no LoRA"):
        extract_lora_tags("x <lora:te=1>")
