"""Textual-inversion embeddings: every file format against the tensors written, name matching, apply_fixes.

Files are written here with torch.save (as A1111, diffusers and the original textual-inversion repo save them) and
safetensors; they are read back without torch. Names are matched with the tiny checkpoints' real CLIP BPE tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from export.tiny import write_tiny_tokenizer
from runtime.errors import ModelError
from runtime.prompts import EMBEDDING_PLACEHOLDER_ID, tokenize_prompt
from runtime.prompts.embeddings import TextualInversion, apply_fixes, load_embeddings
from runtime.tokenizer import ClipTokenizer

D = 8  # the text encoder width these tests load embeddings for
REPO = Path(__file__).resolve().parents[2]


def vectors(n: int, width: int = D, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> ClipTokenizer:
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    write_tiny_tokenizer(folder)
    return ClipTokenizer.from_folder(folder)


# --- formats ---------------------------------------------------------------------------------------------------


def write_a1111_pt(path: Path, vec: np.ndarray) -> None:
    """As A1111's Embedding.save: a trained tensor (requires_grad) under string_to_param["*"]."""
    import torch

    tensor = torch.from_numpy(vec).requires_grad_(True)
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": tensor},
        "name": path.stem,
        "step": 1500,
        "sd_checkpoint": "abcd1234",
        "sd_checkpoint_name": "model",
    }
    torch.save(data, path)


def write_original_repo_pt(path: Path, vec: np.ndarray) -> None:
    """As the original textual-inversion repo's EmbeddingManager.save: a ParameterDict and token-id tensors."""
    import torch

    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.from_numpy(vec))})
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": params}, path)


def write_diffusers_bin(path: Path, vec: np.ndarray, token: str) -> None:
    import torch

    torch.save({token: torch.from_numpy(vec[0] if len(vec) == 1 else vec)}, path)


def write_half_pt(path: Path, vec: np.ndarray) -> None:
    import torch

    torch.save({"string_to_param": {"*": torch.from_numpy(vec).to(torch.bfloat16)}}, path)


CASES = {  # case -> (file name, writer, names it is known by, vectors)
    "a1111 .pt": ("my-style.pt", write_a1111_pt, ["my-style"], 3),
    "a1111 .safetensors": ("my-style.safetensors", lambda p, v: save_file({"emb_params": v}, p), ["my-style"], 2),
    "original repo ParameterDict .pt": ("old-style.pt", write_original_repo_pt, ["old-style"], 2),
    "diffusers .safetensors, one vector": (
        "learned_embeds.safetensors",
        lambda p, v: save_file({"<cat-toy>": v[0]}, p),
        ["learned_embeds", "<cat-toy>"],
        1,
    ),
    "diffusers .bin, several vectors": (
        "learned_embeds.bin",
        lambda p, v: write_diffusers_bin(p, v, "<cat-toy>"),
        ["learned_embeds", "<cat-toy>"],
        4,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_each_format_reads_back_the_vectors_written(case, tmp_path):
    file_name, write, names, n = CASES[case]
    if file_name.endswith((".pt", ".bin")):
        pytest.importorskip("torch")
    vec = vectors(n)
    write(tmp_path / file_name, vec)
    database = load_embeddings(tmp_path, D, allow_pickle=True)
    assert sorted(database.embeddings) == sorted(names)
    for name in names:
        embedding = database.embeddings[name]
        assert embedding.name == name and embedding.vectors == n
        assert embedding.vec.dtype == np.float32 and np.array_equal(embedding.vec, vec)


def test_bfloat16_vectors_widen_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    vec = vectors(2)
    write_half_pt(tmp_path / "bf16.pt", vec)
    expected = torch.from_numpy(vec).to(torch.bfloat16).float().numpy()
    assert np.array_equal(load_embeddings(tmp_path, D, allow_pickle=True).embeddings["bf16"].vec, expected)


def test_strided_and_offset_tensors_of_a_torch_file(tmp_path):
    """Views are saved with their whole storage, an offset and strides: a transpose and a slice read back right."""
    torch = pytest.importorskip("torch")
    from runtime.torch_pickle import load_torch_file

    base = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    torch.save({"t": base.t(), "rows": base[2:4], "scalar": torch.tensor(7)}, tmp_path / "views.pt")
    data = load_torch_file(tmp_path / "views.pt")
    assert np.array_equal(data["t"], base.t().numpy()) and np.array_equal(data["rows"], base[2:4].numpy())
    assert data["scalar"].shape == () and int(data["scalar"]) == 7


def test_a_tensor_past_the_end_of_its_storage_is_refused():
    from runtime.torch_pickle import _rebuild_tensor

    storage = np.arange(6, dtype=np.float32)
    assert np.array_equal(_rebuild_tensor(storage, 2, (2, 2), (2, 1)), [[2, 3], [4, 5]])
    with pytest.raises(ModelError, match="past the end"):
        _rebuild_tensor(storage, 3, (2, 2), (2, 1))


def test_embeddings_of_another_width_are_skipped_with_a_warning(tmp_path, caplog):
    save_file({"emb_params": vectors(2)}, tmp_path / "fits.safetensors")
    save_file({"emb_params": vectors(2, width=12)}, tmp_path / "sd2-only.safetensors")
    save_file({"clip_g": vectors(2, width=12), "clip_l": vectors(2)}, tmp_path / "sdxl.safetensors")
    with caplog.at_level(logging.WARNING, logger="runtime.prompts.embeddings"):
        database = load_embeddings(tmp_path, D)
    assert list(database.embeddings) == ["fits"]
    assert database.skipped == {"sd2-only": 12, "sdxl": 12 + D}  # SDXL: both widths, as A1111 counts it
    assert "sd2-only.safetensors: width 12" in caplog.text


def test_other_files_are_ignored_and_unreadable_ones_are_model_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("not an embedding")
    (tmp_path / "empty.safetensors").write_bytes(b"")  # A1111 skips empty files
    assert load_embeddings(tmp_path, D).embeddings == {}
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ModelError, match="broken.safetensors") as error:
        load_embeddings(tmp_path, D)
    assert "\n" not in str(error.value)
    (tmp_path / "broken.safetensors").unlink()
    save_file({"a": vectors(1), "b": vectors(1)}, tmp_path / "two.safetensors")
    with pytest.raises(ModelError, match="neither an A1111"):
        load_embeddings(tmp_path, D)
    with pytest.raises(ModelError, match="does not exist"):
        load_embeddings(tmp_path / "missing", D)


# --- pickles -----------------------------------------------------------------------------------------------------


class Exploit:
    """Unpickling this calls os.mkdir(marker): what a malicious embedding would do, harmlessly."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pickles_are_refused_unless_allowed(tmp_path):
    pytest.importorskip("torch")
    write_a1111_pt(tmp_path / "style.pt", vectors(1))
    with pytest.raises(ModelError, match="allow_pickle=True") as error:
        load_embeddings(tmp_path, D)
    assert "\n" not in str(error.value)


def test_a_malicious_pickle_is_refused_even_when_pickles_are_allowed(tmp_path):
    torch = pytest.importorskip("torch")
    folder, marker = tmp_path / "embeddings", tmp_path / "pwned"
    folder.mkdir()
    torch.save({"string_to_param": {"*": torch.zeros(1, D)}, "name": Exploit(marker)}, folder / "evil.pt")
    with pytest.raises(ModelError, match="allow_pickle"):
        load_embeddings(folder, D)
    with pytest.raises(ModelError, match=r"posix\.mkdir.*refused") as error:
        load_embeddings(folder, D, allow_pickle=True)
    assert "\n" not in str(error.value)
    assert not marker.exists()
    torch.load(folder / "evil.pt", weights_only=False)  # the control: an unrestricted load runs the call
    assert marker.is_dir()


def test_loading_never_imports_torch(tmp_path):
    pytest.importorskip("torch")
    write_a1111_pt(tmp_path / "style.pt", vectors(2))
    save_file({"emb_params": vectors(3)}, tmp_path / "other.safetensors")
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from runtime.prompts.embeddings import load_embeddings\n"
        f"db = load_embeddings({str(tmp_path)!r}, {D}, allow_pickle=True)\n"
        "print(json.dumps({k: e.vectors for k, e in db.embeddings.items()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"other": 3, "style": 2}


# --- names in prompts ----------------------------------------------------------------------------------------------


@pytest.fixture
def database(tmp_path):
    """astro (1 vector), astro-cat (3 vectors, a longer name with astro's first token), zzz (2 vectors)."""
    for name, n in (("astro", 1), ("astro-cat", 3), ("zzz", 2)):
        save_file({"emb_params": vectors(n, seed=n)}, tmp_path / f"{name}.safetensors")
    return load_embeddings(tmp_path, D)


def chunk_of(tokenizer, *parts) -> list[int]:
    """[BOS] + the parts (texts tokenised, or lists of ids) + EOS padding to 77."""
    ids = [tokenizer.bos_id]
    for part in parts:
        ids += tokenizer.encode(part) if isinstance(part, str) else part
    return ids + [tokenizer.eos_id] * (77 - len(ids))


def test_names_match_longest_first_with_one_slot_per_vector(database, tokenizer):
    astro, astro_cat = database.embeddings["astro"], database.embeddings["astro-cat"]
    assert len(tokenizer.encode("astro")) == 3 and len(tokenizer.encode("astro-cat")) == 5  # multi-token names
    assert tokenizer.encode("astro-cat")[:3] == tokenizer.encode("astro")
    lookup = database.lookup(tokenizer)
    slot = EMBEDDING_PLACEHOLDER_ID

    longer = tokenize_prompt("a astro-cat riding", tokenizer, embedding_at=lookup)
    assert longer.chunks == [chunk_of(tokenizer, "a", [slot] * 3, "riding")]
    assert longer.fixes == [[(1, astro_cat)]]
    assert longer.token_count == 5

    shorter = tokenize_prompt("a astro riding", tokenizer, embedding_at=lookup)
    assert shorter.chunks == [chunk_of(tokenizer, "a", [slot], "riding")]
    assert shorter.fixes == [[(1, astro)]]


def test_two_embeddings_in_one_prompt_keep_their_weights(database, tokenizer):
    prompt = tokenize_prompt("(zzz:1.5) horse astro-cat", tokenizer, embedding_at=database.lookup(tokenizer))
    slot = EMBEDDING_PLACEHOLDER_ID
    assert prompt.chunks == [chunk_of(tokenizer, [slot] * 2, "horse", [slot] * 3)]
    assert prompt.fixes == [[(0, database.embeddings["zzz"]), (3, database.embeddings["astro-cat"])]]
    assert prompt.multipliers[0][:7] == [1.0, 1.5, 1.5, 1.0, 1.0, 1.0, 1.0]


def test_a_diffusers_token_name_matches_too(tmp_path, tokenizer):
    save_file({"<cat-toy>": vectors(1)[0]}, tmp_path / "learned_embeds.safetensors")
    database = load_embeddings(tmp_path, D)
    prompt = tokenize_prompt("a photo of <cat-toy> horse", tokenizer, embedding_at=database.lookup(tokenizer))
    assert prompt.fixes == [[(3, database.embeddings["<cat-toy>"])]]


def test_an_embedding_that_does_not_fit_moves_to_the_next_chunk(database, tokenizer):
    prompt = tokenize_prompt("horse " * 73 + "astro-cat", tokenizer, embedding_at=database.lookup(tokenizer))
    assert len(prompt.chunks) == 2
    assert prompt.fixes == [[], [(0, database.embeddings["astro-cat"])]]


# --- apply_fixes ---------------------------------------------------------------------------------------------------


def test_apply_fixes_writes_vectors_after_bos_and_cuts_at_the_chunk_end(tmp_path):
    token_embeds = np.arange(77 * D, dtype=np.float32).reshape(77, D)
    three = TextualInversion("three", vectors(3, seed=3), tmp_path)
    ten = TextualInversion("ten", vectors(10, seed=10), tmp_path)
    out = apply_fixes(token_embeds, [(2, three), (70, ten)])
    expected = np.concatenate(
        [
            token_embeds[:3],  # BOS and prompt tokens 0, 1
            three.vec,  # prompt tokens 2..4 = rows 3..5
            token_embeds[6:71],
            ten.vec[:6],  # prompt tokens 70..75 = rows 71..76; the other 4 vectors find no room
        ]
    )
    assert np.array_equal(out, expected)
    assert np.array_equal(token_embeds, np.arange(77 * D, dtype=np.float32).reshape(77, D))  # input untouched
    assert np.array_equal(apply_fixes(token_embeds, []), token_embeds)


def test_a_prompt_chunk_gets_the_vectors_where_its_placeholders_are(database, tokenizer):
    table = np.random.default_rng(5).standard_normal((tokenizer.vocab_size, D)).astype(np.float32)
    prompt = tokenize_prompt("a astro-cat riding", tokenizer, embedding_at=database.lookup(tokenizer))
    ids = np.array(prompt.chunks[0])
    out = apply_fixes(table[ids], prompt.fixes[0])  # [77, D]
    assert np.array_equal(out[2:5], database.embeddings["astro-cat"].vec)
    keep = np.r_[0:2, 5:77]
    assert np.array_equal(out[keep], table[ids[keep]])
