"""runtime.tokenizer against transformers' CLIPTokenizer loaded from the same folder (exact ids)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.tiny import EOS_TOKEN, write_tiny_tokenizer
from runtime.errors import ModelError
from runtime.tokenizer import ClipTokenizer

transformers = pytest.importorskip("transformers")

LONG = ", ".join(["a photo of an astronaut riding a horse on the moon"] * 12)
TEXTS = [
    "a photo of an astronaut riding a horse on the moon",
    "A PHOTO of An AsTrOnAuT",
    "masterpiece, best quality,,, 4k!!! ... ?! --- ###",
    "it's the cat's toy; don't, we're, they've, I'm, you'll, he'd",
    "IT'S DON'T 'S 'T",
    "1234567890 8k 4K 3.14 1,000,000",
    "  leading and   multiple   spaces  ",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em space",
    "café résumé naïve É",
    "cafe\u0301 (combining accent, NFC)",
    "日本 の 写真, 中文, 한국어",
    "emoji 🎉🐱‍👤 ❤️ ✨",
    "",
    " ",
    "\n\t",
    LONG,
    "(emphasis:1.2), [less], ((more)), {curly}, \\(escaped\\)",
    "a,b ,c , d,, e ,",
    "<|startoftext|> inside <|endoftext|> text",
    "pad ! token! !! excl",
    "ŉ ǰ ß ﬁ Σ ς σ İ",  # lower-casing edge cases
]


@pytest.fixture(scope="module", params=[EOS_TOKEN, "!"], ids=["sd1", "sd2"])
def tokenizer_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    write_tiny_tokenizer(folder, pad_token=request.param)
    return folder


def _reference(folder: Path, texts: list[str]) -> np.ndarray:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    return np.array(tokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids)


def test_ids_equal_transformers(tokenizer_folder: Path) -> None:
    ours = ClipTokenizer.from_folder(tokenizer_folder)(TEXTS)
    expected = _reference(tokenizer_folder, TEXTS)
    assert ours.dtype == np.int32 and ours.shape == (len(TEXTS), 77)
    for text, got, want in zip(TEXTS, ours, expected):
        assert got.tolist() == want.tolist(), text


def test_encode_equals_transformers_without_specials_or_truncation(tokenizer_folder: Path) -> None:
    reference = transformers.CLIPTokenizer.from_pretrained(tokenizer_folder)
    ours = ClipTokenizer.from_folder(tokenizer_folder)
    for text in TEXTS:
        assert ours.encode(text) == reference(text, add_special_tokens=False).input_ids, text
    assert len(ours.encode(LONG)) > 75


def test_special_ids_match_transformers(tokenizer_folder: Path) -> None:
    reference = transformers.CLIPTokenizer.from_pretrained(tokenizer_folder)
    ours = ClipTokenizer.from_folder(tokenizer_folder)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        reference.bos_token_id,
        reference.eos_token_id,
        reference.pad_token_id,
    )
    assert ours.max_length == 77
    assert ours.comma_id == reference.convert_tokens_to_ids(",</w>") and ours.comma_id is not None
    assert ours.encode("a, b")[1] == ours.comma_id


def test_truncation_and_padding(tokenizer_folder: Path) -> None:
    ours = ClipTokenizer.from_folder(tokenizer_folder)
    long_row, empty_row = ours([LONG, ""])
    assert long_row[0] == ours.bos_id and long_row[-1] == ours.eos_id
    assert long_row[1:-1].tolist() == ours.encode(LONG)[:75]
    assert empty_row[:2].tolist() == [ours.bos_id, ours.eos_id]
    assert (empty_row[2:] == ours.pad_id).all()
    assert ours([]).shape == (0, 77)


def test_tokenizer_json_folder(tokenizer_folder: Path, tmp_path: Path) -> None:
    # a folder as transformers' save_pretrained writes it: tokenizer.json + configs
    saved = tmp_path / "saved"
    transformers.CLIPTokenizer.from_pretrained(tokenizer_folder).save_pretrained(saved)
    assert (saved / "tokenizer.json").is_file()
    (saved / "vocab.json").unlink(missing_ok=True)
    (saved / "merges.txt").unlink(missing_ok=True)
    expected = _reference(tokenizer_folder, TEXTS)
    assert ClipTokenizer.from_folder(saved)(TEXTS).tolist() == expected.tolist()


def test_configs_with_added_token_dicts_and_max_length(tokenizer_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    write_tiny_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<|startoftext|>", "lstrip": False}
    config["model_max_length"] = 32
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").unlink()
    ours = ClipTokenizer.from_folder(folder)
    assert ours.max_length == 32 and ours([LONG]).shape == (1, 32)
    reference = transformers.CLIPTokenizer.from_pretrained(folder)
    assert ours.bos_id == reference.bos_token_id


@pytest.mark.parametrize("broken", ["missing_folder", "no_merges", "bad_vocab", "bad_config", "bad_json"])
def test_unreadable_folders_raise_model_error(broken: str, tmp_path: Path) -> None:
    folder = tmp_path / "tok"
    write_tiny_tokenizer(folder)
    if broken == "missing_folder":
        folder = tmp_path / "nowhere"
    elif broken == "no_merges":
        (folder / "merges.txt").unlink()
    elif broken == "bad_vocab":
        (folder / "vocab.json").write_text("[1, 2")
    elif broken == "bad_config":
        (folder / "tokenizer_config.json").write_text("{not json")
    else:
        (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ModelError) as info:
        ClipTokenizer.from_folder(folder)
    assert "\n" not in str(info.value)
