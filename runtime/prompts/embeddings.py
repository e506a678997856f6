"""Textual-inversion embeddings: load the files, find their names in prompts, write their vectors into a chunk.

Follows A1111's modules/textual_inversion/textual_inversion.py (EmbeddingDatabase, create_embedding_from_data) and
sd_hijack.py (EmbeddingsWithFixes). An embedding's name is its file's stem; a diffusers concept file
({"<token>": vector}) is also known by its token. Where a name's token ids appear in a prompt, chunking puts one
placeholder slot per vector (chunks.py), and `apply_fixes` writes the vectors into those slots of the token
embeddings, which the text encoder then takes instead of looked-up ids.

SDXL embeddings (A1111's {"clip_l": [n, D1], "clip_g": [n, D2]}) hold vectors for both text encoders: clip_l's go
into text encoder 1's slots as above, clip_g's into the same slots of text encoder 2 (`overridden_ids`).

Formats: .safetensors (A1111/kohya {"emb_params": [n, D]}, diffusers learned_embeds), and torch pickles .pt/.bin
(A1111 {"string_to_param": {"*": [n, D]}, ...}, the original textual-inversion repo's ParameterDict form, diffusers
{"<token>": [D] or [n, D]}), read without torch and only when allowed (runtime/torch_pickle.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import ModelError
from runtime.prompts.chunks import PromptTokenizer

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
NOT_TOKEN_NAMES = ("emb_params", "*")  # single keys that name no token (kohya's, A1111's)


@dataclass(frozen=True, eq=False)
class TextualInversion:
    """One embedding under one name: `vectors` token slots, each replaced by a row of `vec`."""

    name: str
    vec: np.ndarray  # float32 [vectors, D]
    path: Path  # the file it came from
    vec_2: np.ndarray | None = None  # SDXL: text encoder 2's vectors (clip_g), float32 [vectors, D2]

    @property
    def vectors(self) -> int:
        return self.vec.shape[0]


@dataclass(frozen=True)
class EmbeddingDatabase:
    """The embeddings of one folder that fit one text encoder, by name."""

    embeddings: dict[str, TextualInversion] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # name -> width D of embeddings made for another model

    def lookup(self, tokenizer: PromptTokenizer) -> EmbeddingIndex:
        """The `embedding_at` hook of tokenize_prompt (an EmbeddingLookup) for prompts tokenised by `tokenizer`."""
        return EmbeddingIndex(self.embeddings.values(), tokenizer)


class EmbeddingIndex:
    """(ids of a prompt fragment, position) -> (embedding whose name's ids start there, how many ids) or (None, 0).

    Like A1111's find_embedding_at_position: candidates share the first id; the longest name is tried first.
    """

    def __init__(self, embeddings: Iterable[TextualInversion], tokenizer: PromptTokenizer):
        self._by_first_id: dict[int, list[tuple[tuple[int, ...], TextualInversion]]] = {}
        for embedding in embeddings:
            ids = tuple(tokenizer.encode(embedding.name))
            if ids:
                self._by_first_id.setdefault(ids[0], []).append((ids, embedding))
        for candidates in self._by_first_id.values():
            candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)  # stable: load order on ties

    def __call__(self, ids: list[int], position: int) -> tuple[TextualInversion | None, int]:
        for name_ids, embedding in self._by_first_id.get(ids[position], ()):
            if tuple(ids[position : position + len(name_ids)]) == name_ids:
                return embedding, len(name_ids)
        return None, 0


def apply_fixes(token_embeds: np.ndarray, fixes: Iterable[tuple[int, TextualInversion]]) -> np.ndarray:
    """Token embeddings of one chunk [77, D] with each embedding's vectors written at its slots (a new array).

    A fix's offset counts prompt tokens, so its first slot is offset + 1, after BOS; vectors that would reach past
    the chunk's end are cut (A1111's EmbeddingsWithFixes).
    """
    out = np.array(token_embeds, dtype=np.float32)  # [77, D]
    for offset, embedding in fixes:
        if embedding.vec.shape[1] != out.shape[1]:
            raise ValueError(f"embedding {embedding.name!r} has width {embedding.vec.shape[1]}, not {out.shape[1]}")
        count = min(out.shape[0] - offset - 1, embedding.vectors)
        out[offset + 1 : offset + 1 + count] = embedding.vec[:count]
    return out


def overridden_ids(
    ids: list[int], fixes: Iterable[tuple[int, TextualInversion]], width: int
) -> tuple[np.ndarray, np.ndarray]:
    """SDXL text encoder 2's inputs for one chunk: its ids (int32 [77]) with -1 in each embedding's slots, and the
    rows that replace their token embeddings there (float32 [77, D2], the embeddings' clip_g vectors; zeros
    elsewhere). Slots are those apply_fixes writes, cut at the chunk's end the same way."""
    out_ids = np.array(ids, dtype=np.int32)  # [77]
    rows = np.zeros((len(out_ids), width), dtype=np.float32)  # [77, D2]
    for offset, embedding in fixes:
        if embedding.vec_2 is None or embedding.vec_2.shape[1] != width:
            raise ValueError(f"embedding {embedding.name!r} has no text encoder 2 vectors of width {width}")
        count = min(len(out_ids) - offset - 1, embedding.vectors)
        out_ids[offset + 1 : offset + 1 + count] = -1
        rows[offset + 1 : offset + 1 + count] = embedding.vec_2[:count]
    return out_ids, rows


def load_embeddings(
    folder: Path, hidden_size: int | None, allow_pickle: bool = False, hidden_size_2: int | None = None
) -> EmbeddingDatabase:
    """Every embedding file under `folder` that fits the model (others are skipped with a warning): of width
    `hidden_size`; for an SDXL model (`hidden_size_2`: text encoder 2's width) SDXL files whose clip_g is that wide
    and whose clip_l is `hidden_size` wide (None: a refiner, text encoder 2 only).

    Pickle files (.pt, .bin) are refused unless `allow_pickle`; even then only tensors are read from them.
    Files of other types are ignored, as are empty files; an unreadable embedding file is a ModelError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"embeddings folder {folder} does not exist")
    embeddings: dict[str, TextualInversion] = {}
    skipped: dict[str, int] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        if suffix not in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES) or path.stat().st_size == 0:
            continue
        if suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise ModelError(
                f"refusing {path}: a pickle can run code when loaded; convert it to .safetensors, "
                "or pass allow_pickle=True if you trust it"
            )
        names, vec, vec_2, width = _vectors(path, _read(path))
        if hidden_size_2 is None:
            fits = vec_2 is None and width == hidden_size
        else:  # SDXL: both parts, each as wide as its text encoder
            fits = vec_2 is not None and vec_2.shape[1] == hidden_size_2 and hidden_size in (None, vec.shape[1])
        if not fits:
            wanted = hidden_size if hidden_size_2 is None else (hidden_size or 0) + hidden_size_2
            logger.warning("skipping embedding %s: width %d, this model's text encoders %d", path, width, wanted)
            skipped[names[0]] = width
            continue
        if hidden_size is None:  # a refiner: its one text encoder takes clip_g's vectors
            vec = vec_2
        for name in names:
            if name in embeddings:
                logger.warning("embedding name %r of %s replaces the one of %s", name, path, embeddings[name].path)
            embeddings[name] = TextualInversion(name, vec, path, vec_2)
    logger.info("loaded %d textual-inversion embeddings from %s", len(embeddings), folder)
    return EmbeddingDatabase(embeddings, skipped)


def _read(path: Path) -> Mapping:
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        from safetensors.numpy import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types, and TypeError for bfloat16
            raise ModelError(f"cannot read {path} ({str(exc).splitlines()[0][:160] or type(exc).__name__})") from None
    from runtime.torch_pickle import load_torch_file

    data = load_torch_file(path)
    if not isinstance(data, Mapping):
        raise ModelError(f"{path} holds a {type(data).__name__}, not an embedding dictionary")
    return data


def _vectors(path: Path, data: Mapping) -> tuple[list[str], np.ndarray, np.ndarray | None, int]:
    """(names, float32 [n, D], None, D) of an embedding file's contents, in A1111's order of formats.

    SDXL embeddings give (names, clip_l [n, D1], clip_g [n, D2], D1 + D2): the sum of both widths, as A1111 counts it.
    """
    names = [path.stem]
    if "string_to_param" in data:  # A1111, and the original repo's ParameterDict
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or len(params) != 1:
            raise ModelError(f"{path}: string_to_param must hold exactly one embedding")
        emb = next(iter(params.values()))
    elif "clip_g" in data and "clip_l" in data:  # SDXL
        parts = [data[key] for key in ("clip_l", "clip_g")]
        if not all(isinstance(part, np.ndarray) and part.ndim == 2 and np.issubdtype(part.dtype, np.floating)
                   for part in parts):  # fmt: skip
            raise ModelError(f"{path}: clip_g and clip_l must be [n, D] float tensors")
        if parts[0].shape[0] != parts[1].shape[0] or len(parts[0]) == 0:
            raise ModelError(f"{path}: clip_l and clip_g must hold the same number of vectors, at least one")
        vec, vec_2 = (np.array(part, dtype=np.float32) for part in parts)
        return names, vec, vec_2, vec.shape[1] + vec_2.shape[1]
    elif len(data) == 1 and isinstance(next(iter(data.values())), np.ndarray):  # diffusers, kohya's emb_params
        key, emb = next(iter(data.items()))
        if key not in NOT_TOKEN_NAMES and key != path.stem:
            names.append(str(key))
    else:
        raise ModelError(f"{path} is neither an A1111 textual-inversion embedding nor a one-tensor diffusers concept")
    if not isinstance(emb, np.ndarray) or emb.ndim not in (1, 2) or not np.issubdtype(emb.dtype, np.floating):
        raise ModelError(f"{path} holds no [n, D] float vectors")
    vec = np.array(emb.reshape(1, -1) if emb.ndim == 1 else emb, dtype=np.float32)  # [n, D], a copy
    if len(vec) == 0:
        raise ModelError(f"{path} holds an embedding of no vectors")
    return names, vec, None, vec.shape[1]
