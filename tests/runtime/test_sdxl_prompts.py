"""The A1111 prompt language on SDXL: any length, BREAK, emphasis per chunk, editing, AND, clip skip.

The parity reference builds the conditioning the way the A1111 web UI does for SDXL, by hand in torch with the tiny
checkpoint's own CLIP text models: the prompt cut into 75-token chunks (BREAK closes one), each chunk tokenised with
its own start/end tokens and run through both encoders, the penultimate states concatenated per chunk and the chunks
along the tokens, the pooled text from text encoder 2's first chunk; a shorter negative padded with the empty
prompt's chunks. diffusers' StableDiffusionXLPipeline then samples from those embeddings; sdrt's image must equal its
(mean <= 2e-5, max <= 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.runtime.test_txt2img_parity import SEED, assert_parity

pytestmark = needs_torch

WIDTH, HEIGHT, STEPS, CFG = 64, 48, 6, 6.0
# three chunks: BREAK closes the first; 30 x "the red photo" is 90 one-token words, cut after 75 (no comma there)
FIRST, WEIGHT = "a photo of an astronaut riding a horse", 1.3
PROMPT = "a photo of an (astronaut:1.3) riding a horse BREAK " + "the red photo " * 30
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, shared_engines):
    import runtime

    return runtime.load(tiny_sdxl, engines_dir=shared_engines)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _chunk_states(pipe, text: str, weighted: tuple[str, str] | None = None):
    """One chunk through both encoders: penultimate states [1, 77, D1 + D2] (A1111 "Original" emphasis per encoder
    when `weighted` = (text before the weighted word, the word)) and text encoder 2's pooled text [1, P]."""
    import torch

    states = []
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        # BOS, the text's ids, EOS, padding: the end token for encoder 1, "!" (id 0) for encoder 2, as A1111 pads
        ids = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert ids[0, -1] in (tokenizer.eos_token_id, tokenizer.pad_token_id)  # the text fits one chunk
        with torch.no_grad():
            output = encoder(ids, output_hidden_states=True)
        z = output.hidden_states[-2].double()
        if weighted is not None:
            start = 1 + len(tokenizer(weighted[0], add_special_tokens=False).input_ids)
            stop = start + len(tokenizer(weighted[1], add_special_tokens=False).input_ids)
            before = z.mean()
            z[:, start:stop] *= WEIGHT
            z = z * (before / z.mean())
        states.append(z.float())
    return torch.cat(states, dim=-1), output.text_embeds


def reference_conditioning(pipe, negative: str):
    """(prompt_embeds [1, 231, D], pooled [1, P], negative_prompt_embeds or None, negative pooled or None)."""
    import torch

    words = ("the red photo " * 30).split()
    assert len(pipe.tokenizer(" ".join(words), add_special_tokens=False).input_ids) == 90  # one token a word
    chunks = [
        _chunk_states(pipe, FIRST, ("a photo of an", "astronaut")),
        _chunk_states(pipe, " ".join(words[:75])),
        _chunk_states(pipe, " ".join(words[75:])),
    ]
    embeds, pooled = torch.cat([c[0] for c in chunks], dim=1), chunks[0][1]
    if not negative:  # diffusers' force_zeros_for_empty_prompt: it makes the zeros itself
        return embeds, pooled, None, None
    negative_states, negative_pooled = _chunk_states(pipe, negative)
    empty, _ = _chunk_states(pipe, "")
    return embeds, pooled, torch.cat([negative_states, empty, empty], dim=1), negative_pooled


@pytest.mark.parametrize("negative", [NEGATIVE, ""], ids=["negative", "empty-negative"])
def test_long_prompt_with_break_matches_hand_built_conditioning(sdxl, pipe, negative):
    import diffusers
    import torch

    embeds, pooled, negative_embeds, negative_pooled = reference_conditioning(pipe, negative)
    assert embeds.shape[1] == 3 * 77
    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    expected = pipe(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative_embeds,
        negative_pooled_prompt_embeds=negative_pooled,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        generator=torch.Generator("cpu").manual_seed(SEED),
        height=HEIGHT,
        width=WIDTH,
        output_type="np",
    ).images
    images = sdxl.txt2img(PROMPT, negative_prompt=negative, steps=STEPS, cfg_scale=CFG, seed=SEED, width=WIDTH,
                          height=HEIGHT, sampler="Euler a").images  # fmt: skip
    assert_parity(images, expected)


def _conditioning(sdxl, prompt: str, negative: str = "", cfg: float = CFG, steps: int = 4, **options):
    from runtime.pipelines.conditioning import build_conditioning

    return build_conditioning(sdxl, prompt, negative, 1, cfg, steps, **options)


def test_prompt_editing_switches_between_the_plain_prompts(sdxl):
    """[cat:dog:0.5] over 4 steps ends "a cat" at step int(0.5 * 4) = 2 and A1111 uses an entry while the step is
    <= its end: calls 0-2 get "a cat"'s conditioning, call 3 "a dog"'s, each with its own pooled text (the plain
    prompts' conditioning is the parity-tested one)."""
    edited = _conditioning(sdxl, "a [cat:dog:0.5]", "blurry")
    cat, dog = _conditioning(sdxl, "a cat", "blurry"), _conditioning(sdxl, "a dog", "blurry")
    assert edited.call_batch.tolist() == [0, 0, 0, 1]
    for index, plain in ((0, cat), (1, dog)):
        np.testing.assert_allclose(edited.batches[index], plain.batches[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(edited.pooled[index], plain.pooled[0], rtol=0, atol=1e-6)
    assert np.abs(cat.pooled[0] - dog.pooled[0]).max() > 1e-3  # the pooled text follows the edit


def test_and_stacks_each_sub_prompt_with_its_pooled_text(sdxl):
    """ "a cat AND a dog :0.5": rows [uncond, cat, dog], each with its own states and pooled text, weights 1 and 0.5;
    the rows equal each text's own conditioning. The generation runs with the (1 + 2) B-row UNet batch."""
    both = _conditioning(sdxl, "a cat AND a dog :0.5", "blurry")
    cat, dog = _conditioning(sdxl, "a cat", "blurry"), _conditioning(sdxl, "a dog", "blurry")
    np.testing.assert_allclose(both.cond_weights, [1.0, 0.5])
    np.testing.assert_allclose(both.batches[0], np.concatenate([cat.batches[0], dog.batches[0][1:]]), atol=1e-6)
    np.testing.assert_allclose(both.pooled[0], np.concatenate([cat.pooled[0], dog.pooled[0][1:]]), atol=1e-6)
    images = sdxl.txt2img("a cat AND a dog :0.5", steps=2, width=WIDTH, height=HEIGHT, seed=SEED).images
    assert images.shape == (1, HEIGHT, WIDTH, 3) and np.isfinite(images).all()


def test_refiner_time_ids_mark_only_the_uncond_rows_with_and():
    """With AND the UNet batch is [uncond, cond_1, cond_2] of B rows: only the first B get the negative aesthetic
    score (2.5), as each of A1111's cond batches gets the positive one (6)."""
    from runtime.pipelines.conditioning import Conditioning
    from runtime.pipelines.sdxl import sdxl_feeds

    info = {"family": "sdxl", "sdxl": {"requires_aesthetics_score": True}}
    rows = np.zeros((6, 77, 8), dtype=np.float32)  # B = 2, two sub-prompts
    conditioning = Conditioning([rows], np.zeros(2, np.int64), np.ones(2, np.float32), True, [rows[:, 0]])
    ids = sdxl_feeds(info, conditioning, 48, 64)["time_ids"]
    assert ids[:, 4].tolist() == [2.5, 2.5, 6.0, 6.0, 6.0, 6.0]


def test_clip_skip_leaves_sdxl_conditioning_unchanged(sdxl):
    """A1111 applies Clip skip to SDXL only with its "Clip skip SDXL" setting, off by default: same conditioning."""
    plain = _conditioning(sdxl, "a cat", "blurry")
    skipped = _conditioning(sdxl, "a cat", "blurry", clip_skip=2)
    np.testing.assert_array_equal(skipped.batches[0], plain.batches[0])
    np.testing.assert_array_equal(skipped.pooled[0], plain.pooled[0])


def test_shorter_prompt_is_padded_with_the_empty_prompts_chunks(sdxl):
    """A two-chunk negative with a one-chunk prompt: the prompt's rows get the empty prompt's chunk appended."""
    cond = _conditioning(sdxl, "a cat", "blurry BREAK dark")
    empty = _conditioning(sdxl, "", "", cfg=1.0)  # the empty prompt alone, unguided: encoded, not zeros
    plain = _conditioning(sdxl, "a cat", "", cfg=1.0)
    assert cond.batches[0].shape[1] == 2 * 77
    np.testing.assert_allclose(cond.batches[0][1, :77], plain.batches[0][0], atol=1e-6)
    np.testing.assert_allclose(cond.batches[0][1, 77:], empty.batches[0][0], atol=1e-6)
