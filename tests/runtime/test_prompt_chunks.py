"""Token chunks (A1111's tokenize_line / process_tokens) and emphasis (A1111's sd_emphasis) without a model.

A test-local word tokenizer makes every expected chunk derivable by hand: `tN` is one token with id 1000 + N,
"," is the comma token, any other word gets the next id from 5000.
"""

import re
from dataclasses import dataclass

import numpy as np
import pytest

from runtime.errors import InvalidRequestError
from runtime.prompts import (
    EMPHASIS_MODES,
    PromptChunks,
    apply_emphasis,
    empty_chunk,
    pad_to_chunks,
    target_token_count,
    tokenize_prompt,
)

BOS, EOS, COMMA = 49406, 49407, 267
S = 1 / 1.1


class WordTokenizer:
    bos_id, eos_id, pad_id, comma_id = BOS, EOS, EOS, COMMA  # SD1: padding with the end token

    def __init__(self):
        self.vocab = {}

    def encode(self, text):
        ids = []
        for word in re.findall(r",|[^\s,]+", text):
            if word == ",":
                ids.append(COMMA)
            elif re.fullmatch(r"t\d+", word):
                ids.append(1000 + int(word[1:]))
            else:
                ids.append(self.vocab.setdefault(word, 5000 + len(self.vocab)))
        return ids


class SD2WordTokenizer(WordTokenizer):
    pad_id = 0  # OpenCLIP pads with id 0


def words(first, count):
    return " ".join(f"t{i}" for i in range(first, first + count))


def ids(first, count):
    return [1000 + i for i in range(first, first + count)]


def chunk(prompt_ids, pad=EOS):
    """[BOS] + ids + end-token padding to 75 + [EOS], as hand-derived from A1111's next_chunk."""
    return [BOS, *prompt_ids, *[pad] * (75 - len(prompt_ids)), EOS]


# -- chunk boundaries --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_tokens", "expected_chunks"),
    [
        (0, [chunk([])]),
        (1, [chunk(ids(0, 1))]),
        (74, [chunk(ids(0, 74))]),
        (75, [chunk(ids(0, 75))]),
        (76, [chunk(ids(0, 75)), chunk(ids(75, 1))]),
        (150, [chunk(ids(0, 75)), chunk(ids(75, 75))]),
        (151, [chunk(ids(0, 75)), chunk(ids(75, 75)), chunk(ids(150, 1))]),
    ],
)
def test_chunk_boundaries(n_tokens, expected_chunks):
    result = tokenize_prompt(words(0, n_tokens), WordTokenizer())
    assert result.chunks == expected_chunks
    assert all(len(c) == 77 for c in result.chunks)
    assert result.multipliers == [[1.0] * 77] * len(expected_chunks)
    assert result.token_count == n_tokens


def test_empty_prompt_is_one_padding_chunk():
    for prompt in ("", "   ", "()"):
        result = tokenize_prompt(prompt, WordTokenizer())
        assert result.chunks == [[BOS] + [EOS] * 76]
        assert result.token_count == 0


def test_target_token_count():
    assert [target_token_count(n) for n in (0, 1, 75, 76, 150, 151)] == [75, 75, 75, 150, 150, 225]


# -- comma backtracking ------------------------------------------------------------------------------------------


def test_comma_inside_window_moves_the_tail_to_the_next_chunk():
    # 70 words, a comma (index 70), 10 words. When the 76th token arrives the chunk holds t0..t69 , t70..t73 and
    # the comma is 75 - 70 = 5 <= 20 tokens back: t70..t73 move to the next chunk.
    result = tokenize_prompt(words(0, 70) + ", " + words(70, 10), WordTokenizer())
    assert result.chunks == [chunk([*ids(0, 70), COMMA]), chunk(ids(70, 10))]
    assert result.token_count == 75 + 10


@pytest.mark.parametrize(("comma_at", "moves"), [(55, True), (54, False), (50, False), (74, True)])
def test_comma_window_edge(comma_at, moves):
    # the distance counted is 75 - comma index; A1111 moves when it is <= 20
    prompt = words(0, comma_at) + " , " + words(comma_at, 80 - comma_at)
    result = tokenize_prompt(prompt, WordTokenizer())
    if moves:
        assert result.chunks[0] == chunk([*ids(0, comma_at), COMMA])
        assert result.chunks[1] == chunk(ids(comma_at, 80 - comma_at))
        assert result.token_count == 75 + 80 - comma_at
    else:
        first = [*ids(0, comma_at), COMMA, *ids(comma_at, 74 - comma_at)]
        assert result.chunks == [chunk(first), chunk(ids(74, 6))]
        assert result.token_count == 81


def test_comma_backtracking_off_without_window_or_comma_token():
    prompt = words(0, 70) + ", " + words(70, 10)
    expected = [chunk([*ids(0, 70), COMMA, *ids(70, 4)]), chunk(ids(74, 6))]
    assert tokenize_prompt(prompt, WordTokenizer(), comma_padding_backtrack=0).chunks == expected
    no_comma = WordTokenizer()
    no_comma.comma_id = None
    assert tokenize_prompt(prompt, no_comma).chunks == expected


def test_comma_as_first_token_of_a_chunk_is_forgotten():
    # A comma arriving when the chunk is full is recorded, then the chunk closes and resets last_comma, so the
    # comma at the start of chunk 2 never triggers backtracking.
    prompt = words(0, 75) + " , " + words(75, 80)
    result = tokenize_prompt(prompt, WordTokenizer())
    assert result.chunks[1] == chunk([COMMA, *ids(75, 74)])
    assert result.chunks[2] == chunk(ids(149, 6))


def test_comma_window_keeps_weights_with_their_tokens():
    prompt = words(0, 70) + ", [" + words(70, 10) + "]"
    result = tokenize_prompt(prompt, WordTokenizer())
    assert result.multipliers[0] == [1.0] * 77
    assert result.multipliers[1] == [1.0, *[S] * 10, *[1.0] * 66]


# -- BREAK -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected_chunks", "token_count"),
    [
        ("t0 BREAK t1", [chunk(ids(0, 1)), chunk(ids(1, 1))], 76),
        ("t0 BREAK", [chunk(ids(0, 1))], 75),
        ("BREAK t0", [chunk([]), chunk(ids(0, 1))], 76),
        ("BREAK", [chunk([])], 75),
        ("t0 BREAK BREAK t1", [chunk(ids(0, 1)), chunk([]), chunk(ids(1, 1))], 151),
        ("t0,BREAK,t1", [chunk([1000, COMMA]), chunk([COMMA, 1001])], 77),
    ],
)
def test_break_closes_the_chunk(prompt, expected_chunks, token_count):
    result = tokenize_prompt(prompt, WordTokenizer())
    assert result.chunks == expected_chunks
    assert result.token_count == token_count


def test_break_inside_a_word_or_a_weight_is_text():
    tokenizer = WordTokenizer()
    assert len(tokenize_prompt("t0BREAKt1", tokenizer).chunks) == 1
    weighted = tokenize_prompt("(t0 BREAK t1)", tokenizer)  # the marker got weight -1.1: tokenised as a word
    assert len(weighted.chunks) == 1
    assert weighted.chunks[0][1:4] == [1000, tokenizer.vocab["BREAK"], 1001]
    assert weighted.multipliers[0][1:5] == [1.1, -1.1, 1.1, 1.0]


def test_break_after_a_full_chunk_adds_no_empty_chunk():
    # the full chunk is only closed when the next token arrives; BREAK closes it instead
    result = tokenize_prompt(words(0, 75) + " BREAK " + words(75, 1), WordTokenizer())
    assert result.chunks == [chunk(ids(0, 75)), chunk(ids(75, 1))]
    assert result.token_count == 76


# -- multipliers -------------------------------------------------------------------------------------------------


def test_multipliers_follow_the_attention_fragments():
    result = tokenize_prompt("(t0) t1 [t2] (t3 t4:1.5)", WordTokenizer())
    assert result.chunks == [chunk(ids(0, 5))]
    assert result.multipliers == [[1.0, 1.1, 1.0, S, 1.5, 1.5, *[1.0] * 71]]


def test_emphasis_none_reads_brackets_literally():
    tokenizer = WordTokenizer()
    result = tokenize_prompt("(t0) BREAK t1", tokenizer, emphasis="None")
    assert result.chunks == [chunk([tokenizer.vocab["(t0)"], tokenizer.vocab["BREAK"], 1001])]
    assert result.multipliers == [[1.0] * 77]
    ignored = tokenize_prompt("(t0) BREAK t1", WordTokenizer(), emphasis="Ignore")
    assert ignored.chunks == [chunk([1000]), chunk([1001])]


def test_unknown_emphasis_mode_is_an_invalid_request():
    with pytest.raises(InvalidRequestError, match="unknown emphasis mode 'Strong'; valid modes: 'Original'"):
        tokenize_prompt("a", WordTokenizer(), emphasis="Strong")


# -- SD2 padding -------------------------------------------------------------------------------------------------


def test_sd2_pads_after_the_first_end_token():
    tokenizer = SD2WordTokenizer()
    assert tokenize_prompt("t0", tokenizer).chunks == [[BOS, 1000, EOS, *[0] * 74]]
    assert tokenize_prompt(words(0, 75), tokenizer).chunks == [chunk(ids(0, 75))]  # no room for padding
    assert tokenize_prompt("", tokenizer).chunks == [[BOS, EOS, *[0] * 75]]
    two = tokenize_prompt(words(0, 76), tokenizer)
    assert two.chunks == [chunk(ids(0, 75)), [BOS, 1075, EOS, *[0] * 74]]
    assert two.multipliers == [[1.0] * 77] * 2


def test_sd2_end_token_typed_in_the_prompt_cuts_the_chunk():
    class Literal(SD2WordTokenizer):
        def encode(self, text):
            return [EOS if w == "<end>" else 1000 + int(w[1:]) for w in text.split()]

    assert tokenize_prompt("t0 <end> t1", Literal()).chunks == [[BOS, 1000, EOS, *[0] * 74]]


# -- padding to a common chunk count -----------------------------------------------------------------------------


def test_empty_chunk_and_pad_to_chunks():
    assert empty_chunk(WordTokenizer()) == ([BOS] + [EOS] * 76, [1.0] * 77)
    assert empty_chunk(SD2WordTokenizer()) == ([BOS, EOS] + [0] * 75, [1.0] * 77)
    short = tokenize_prompt("(t0)", WordTokenizer())
    padded = pad_to_chunks(short, 3, WordTokenizer())
    assert padded.chunks == [chunk([1000]), [BOS] + [EOS] * 76, [BOS] + [EOS] * 76]
    assert padded.multipliers == [[1.0, 1.1, *[1.0] * 75], [1.0] * 77, [1.0] * 77]
    assert padded.token_count == 1
    assert pad_to_chunks(short, 1, WordTokenizer()) == short
    with pytest.raises(ValueError, match="prompt has 1 chunks, more than the 0 asked for"):
        pad_to_chunks(short, 0, WordTokenizer())


# -- textual-inversion hook --------------------------------------------------------------------------------------


@dataclass
class FakeEmbedding:
    name: str
    vectors: int


def test_embedding_hook_reserves_placeholder_slots():
    tokenizer = WordTokenizer()
    emb_id = tokenizer.encode("myemb")[0]
    emb = FakeEmbedding("myemb", 3)

    def embedding_at(fragment_ids, position):
        return (emb, 1) if fragment_ids[position] == emb_id else (None, 0)

    result = tokenize_prompt("t0 (myemb) t1", tokenizer, embedding_at=embedding_at)
    assert result.chunks == [chunk([1000, 0, 0, 0, 1001])]
    assert result.multipliers[0][:6] == [1.0, 1.0, 1.1, 1.1, 1.1, 1.0]
    assert result.fixes == [[(1, emb)]]
    # an embedding that does not fit in the current chunk starts the next one
    full = tokenize_prompt(words(0, 73) + " myemb", tokenizer, embedding_at=embedding_at)
    assert full.chunks == [chunk(ids(0, 73)), chunk([0, 0, 0])]
    assert full.fixes == [[], [(0, emb)]]
    assert full.token_count == 78
    too_long = FakeEmbedding("myemb", 76)
    with pytest.raises(InvalidRequestError, match="embedding 'myemb' has 76 vectors; a chunk holds 75"):
        tokenize_prompt("myemb", tokenizer, embedding_at=lambda fragment_ids, position: (too_long, 1))


def test_prompt_chunks_is_a_plain_dataclass():
    assert PromptChunks([[1]], [[1.0]], 1).fixes == []


# -- emphasis ----------------------------------------------------------------------------------------------------


def _emphasis_reference(z, w):
    """A1111's "Original" in float64 with explicit sums over every element of the batch."""
    z = z.astype(np.float64)
    weighted = z * w.astype(np.float64)[:, :, None]
    return weighted * ((z.sum() / z.size) / (weighted.sum() / weighted.size))


def test_emphasis_original_matches_the_float64_formula():
    rng = np.random.default_rng(0)
    z = rng.normal(0.1, 1.0, size=(2, 77, 16))
    w = rng.uniform(0.5, 1.5, size=(2, 77))
    np.testing.assert_allclose(apply_emphasis(z, w, "Original"), _emphasis_reference(z, w), rtol=1e-12)
    got32 = apply_emphasis(z.astype(np.float32), w, "Original")
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, _emphasis_reference(z.astype(np.float32), w), rtol=1e-5, atol=1e-6)


def test_emphasis_mean_runs_over_the_whole_batch():
    rng = np.random.default_rng(1)
    z = rng.normal(0.2, 1.0, size=(2, 77, 8))
    w = np.ones((2, 77))
    w[0, 1:5] = 1.5
    batched = apply_emphasis(z, w)
    alone = apply_emphasis(z[1:], w[1:])
    np.testing.assert_allclose(alone, z[1:], rtol=1e-12)  # all weights 1: unchanged
    assert not np.allclose(batched[1], z[1])  # prompt 0's weights rescale prompt 1 too
    np.testing.assert_allclose(batched.mean(), z.mean(), rtol=1e-12)


def test_emphasis_other_modes():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(1, 77, 4)).astype(np.float16)
    w = rng.uniform(0.5, 1.5, size=(1, 77))
    no_norm = apply_emphasis(z, w, "No norm")
    assert no_norm.dtype == np.float32
    np.testing.assert_allclose(no_norm, z.astype(np.float64) * w[:, :, None], rtol=1e-6)
    for mode in ("Ignore", "None"):
        out = apply_emphasis(z, w, mode)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, z.astype(np.float32))
    assert EMPHASIS_MODES == ("Original", "No norm", "Ignore", "None")


def test_emphasis_errors():
    z = np.zeros((1, 77, 4))
    with pytest.raises(InvalidRequestError, match=r"unknown emphasis mode 'original'; valid modes: 'Original', "):
        apply_emphasis(z, np.ones((1, 77)), "original")
    with pytest.raises(ValueError, match=r"emphasis needs z \[B, T, D\] and multipliers \[B, T\]"):
        apply_emphasis(z, np.ones((1, 76)))
