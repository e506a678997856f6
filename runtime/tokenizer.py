"""The CLIP BPE tokenizer of a checkpoint's `tokenizer/` folder, on the `tokenizers` library (no transformers).

Ids equal `transformers.CLIPTokenizer.from_pretrained(folder)(texts, padding="max_length", max_length=77,
truncation=True).input_ids`: the folder's `tokenizer.json` when it has one, otherwise the pipeline transformers
builds from `vocab.json` + `merges.txt`: NFC, whitespace runs -> one space, lower-case; CLIP's split regex;
byte-level BPE with a `</w>` end-of-word suffix; bos/eos/unk/pad as special tokens matched before all that
(so SD2's pad token "!" is always its own token, as in transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from runtime.errors import ModelError

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, other symbol runs.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_DEFAULTS = {  # transformers' CLIPTokenizer defaults
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
DEFAULT_MAX_LENGTH = 77  # CLIP's context length
_UNSET_MAX_LENGTH = 10**6  # transformers writes a huge model_max_length when none was given
COMMA_TOKEN = ",</w>"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read tokenizer file {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"tokenizer file {path} is not a JSON object")
    return data


def _token_text(value: object) -> str | None:
    """A special token as configs store it: a string or a serialised AddedToken {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_config(folder: Path) -> tuple[dict[str, str], int]:
    """Special tokens and model_max_length: tokenizer_config.json, overridden by special_tokens_map.json."""
    tokens, max_length = dict(_DEFAULTS), DEFAULT_MAX_LENGTH
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if not (folder / name).is_file():
            continue
        config = _read_json(folder / name)
        for key in _DEFAULTS:
            text = _token_text(config.get(key))
            if text is not None:
                tokens[key] = text
        length = config.get("model_max_length")
        if isinstance(length, (int, float)) and 2 < length < _UNSET_MAX_LENGTH:
            max_length = int(length)
    return tokens, max_length


def _clip_pipeline(folder: Path, unk_token: str) -> Tokenizer:
    """The CLIP pipeline transformers builds from vocab.json + merges.txt."""
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab, merges):
        if not path.is_file():
            raise ModelError(f"tokenizer folder {folder} has neither tokenizer.json nor {path.name}")
    try:
        model = BPE.from_file(
            str(vocab),
            str(merges),
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=unk_token,
            dropout=None,
        )
    except Exception as e:  # the Rust side raises plain Exception on malformed files
        raise ModelError(f"cannot read the BPE vocabulary in {folder}: {e}") from None
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


def _load_tokenizer_json(path: Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception on malformed files
        raise ModelError(f"cannot read tokenizer file {path}: {e}") from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class ClipTokenizer:
    """CLIP tokenisation to fixed-length int32 id rows: BOS + ids[:max_length - 2] + EOS, then padding."""

    def __init__(self, tokenizer: Tokenizer, special_tokens: dict[str, str], max_length: int = DEFAULT_MAX_LENGTH):
        tokens = [special_tokens[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")]
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(tokens)])
        self._tokenizer = tokenizer
        self.bos_id, self.eos_id, _, self.pad_id = (self._id(t) for t in tokens)
        self.comma_id: int | None = tokenizer.token_to_id(COMMA_TOKEN)
        self.max_length = max_length

    def _id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelError(f"tokenizer has no id for its special token {token!r}")
        return token_id

    @classmethod
    def from_folder(cls, folder: Path) -> ClipTokenizer:
        """Load a checkpoint's tokenizer/ folder (tokenizer.json, or vocab.json + merges.txt, plus configs)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelError(f"tokenizer folder {folder} does not exist")
        special_tokens, max_length = _read_config(folder)
        if (folder / "tokenizer.json").is_file():
            tokenizer = _load_tokenizer_json(folder / "tokenizer.json")
        else:
            tokenizer = _clip_pipeline(folder, special_tokens["unk_token"])
        return cls(tokenizer, special_tokens, max_length)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS and without truncation."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: list[str]) -> np.ndarray:
        """int32 [B, max_length]: BOS + ids[:max_length - 2] + EOS, padded with pad_id."""
        if isinstance(texts, str):
            raise TypeError("ClipTokenizer() takes a list of texts; use encode() for one text")
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        out = np.full((len(encodings), self.max_length), self.pad_id, dtype=np.int32)  # [B, 77]
        for row, encoding in zip(out, encodings):
            ids = [self.bos_id, *encoding.ids[: self.max_length - 2], self.eos_id]
            row[: len(ids)] = ids
        return out
