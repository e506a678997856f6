"""The A1111 prompt language end to end: sdrt's image equals diffusers fed with prompt_embeds built by hand.

The reference embeddings are built here from transformers' tokenizer and text encoder, chunk by chunk as
A1111 does (fragments tokenised alone, 75-token chunks wrapped in BOS/EOS, emphasis with the mean
rescale as a float64 formula), then handed to diffusers' StableDiffusionPipeline as prompt_embeds.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.runtime.test_txt2img_parity import HEIGHT, SEED, WIDTH, assert_parity

pytestmark = needs_torch

STEPS, CFG = 10, 6.0
NEGATIVE = "blurry"


class Reference:
    """transformers' CLIP pieces of a checkpoint, and a diffusers pipeline over the same folder."""

    def __init__(self, folder):
        import diffusers
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer

        self.torch = torch
        self.tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
        self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        self.pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)

    def chunk(self, fragments: list[tuple[str, float]]) -> tuple[list[int], list[float]]:
        """One 77-token chunk from (text, weight) fragments that fit in 75 tokens."""
        tok = self.tokenizer
        ids, weights = [], []
        for text, weight in fragments:
            fragment_ids = tok.encode(text, add_special_tokens=False)
            ids += fragment_ids
            weights += [weight] * len(fragment_ids)
        assert len(ids) <= 75
        ids = [tok.bos_token_id] + ids + [tok.eos_token_id] * (76 - len(ids))
        if tok.pad_token_id != tok.eos_token_id:  # SD2: everything after the first end token is padding
            first_end = ids.index(tok.eos_token_id)
            ids = ids[: first_end + 1] + [tok.pad_token_id] * (76 - first_end)
        return ids, [1.0] + weights + [1.0] * (76 - len(weights))

    def encode(self, chunks: list[tuple[list[int], list[float]]], clip_skip: int = 1) -> np.ndarray:
        """[1, 77 k, D]: each chunk through the text encoder, emphasis "Original" in float64."""
        out = []
        for ids, weights in chunks:
            with self.torch.no_grad():
                result = self.text_encoder(self.torch.tensor([ids]), output_hidden_states=True)
                if clip_skip == 1:
                    z = result.last_hidden_state
                else:
                    final_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
                    z = final_norm(result.hidden_states[-clip_skip])
            z = z.double().numpy()
            mean_before = z.mean()
            z = z * np.array(weights)[None, :, None]
            out.append(z * (mean_before / z.mean()))
        return np.concatenate(out, axis=1).astype(np.float32)

    def images(self, cond: np.ndarray, uncond: np.ndarray, callback=None) -> np.ndarray:
        torch = self.torch
        generator = torch.Generator("cpu").manual_seed(SEED)
        kwargs = {"callback_on_step_end": callback} if callback else {}
        return self.pipe(
            prompt_embeds=torch.from_numpy(cond),
            negative_prompt_embeds=torch.from_numpy(uncond),
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            generator=generator,
            height=HEIGHT,
            width=WIDTH,
            output_type="np",
            **kwargs,
        ).images


@pytest.fixture(scope="module")
def engines(shared_engines):
    return shared_engines  # the session's exports of the tiny checkpoints (tests/conftest.py)


@pytest.fixture(scope="module")
def sd1(tiny_sd1, engines):
    import runtime

    return runtime.load(tiny_sd1, engines_dir=engines), Reference(tiny_sd1)


@pytest.fixture(scope="module")
def sd2(tiny_sd2v, engines):
    import runtime

    return runtime.load(tiny_sd2v, engines_dir=engines), Reference(tiny_sd2v)


def generate(sd, prompt, **options):
    options = {"negative_prompt": NEGATIVE, "steps": STEPS, "cfg_scale": CFG, "seed": SEED, **options}
    return sd.txt2img(prompt, width=WIDTH, height=HEIGHT, sampler="Euler", **options).images


def pad_with_empty(ref: Reference, z: np.ndarray, chunks: int) -> np.ndarray:
    """Pad to `chunks` chunks with the empty prompt's encoding, as sdrt pads cond and uncond to one length."""
    empty = ref.encode([ref.chunk([])])
    return np.concatenate([z] + [empty] * (chunks - z.shape[1] // 77), axis=1)


def test_emphasis(sd1):
    sd, ref = sd1
    fragments = [("a photo of a ", 1.0), ("cat", 1.5), (" and a ", 1.0), ("dog", 1 / 1.1), (" ", 1.0)]
    fragments.append(("in snow", 1.3 * 1.1))
    cond = ref.encode([ref.chunk(fragments)])
    uncond = ref.encode([ref.chunk([(NEGATIVE, 1.0)])])
    images = generate(sd, "a photo of a (cat:1.5) and a [dog] ((in snow:1.3))")
    assert_parity(images, ref.images(cond, uncond))


def test_break_starts_a_new_chunk(sd1):
    sd, ref = sd1
    cond = ref.encode([ref.chunk([("a photo of a cat", 1.0)]), ref.chunk([("a dog in the garden", 1.0)])])
    uncond = pad_with_empty(ref, ref.encode([ref.chunk([(NEGATIVE, 1.0)])]), 2)
    images = generate(sd, "a photo of a cat BREAK a dog in the garden")
    assert_parity(images, ref.images(cond, uncond))


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_prompt_longer_than_75_tokens(request, variant):
    sd, ref = request.getfixturevalue(variant)
    words = "astronaut riding horse on the moon highly detailed"
    prompt = " ".join([words] * 24)
    ids = ref.tokenizer.encode(prompt, add_special_tokens=False)
    assert 150 < len(ids) <= 225  # three chunks, no commas: plain 75-token splits
    pieces = [ids[i : i + 75] for i in range(0, len(ids), 75)]
    chunks = [ref.chunk([(ref.tokenizer.decode(piece), 1.0)]) for piece in pieces]
    assert [c[0][1 : 1 + len(p)] for c, p in zip(chunks, pieces)] == pieces  # decode/encode round trip held
    cond = ref.encode(chunks)
    uncond = pad_with_empty(ref, ref.encode([ref.chunk([(NEGATIVE, 1.0)])]), 3)
    assert_parity(generate(sd, prompt), ref.images(cond, uncond))


def test_long_prompt_costs_one_text_encoder_call_per_chunk(sd1):
    sd, _ = sd1
    session = sd.backend.session("text_encoder")
    calls = []
    original = session.run

    def counting(feeds, outputs=None):
        calls.append(len(next(iter(feeds.values()))))
        return original(feeds, outputs)

    session.run = counting
    try:
        generate(sd, " ".join(["astronaut riding horse on the moon highly detailed"] * 24), steps=2)
    finally:
        del session.run
    assert len(calls) == 3  # chunk 1 (with the negative prompt and the empty prompt), chunk 2, chunk 3


def test_prompt_editing_switches_embeddings_at_the_scheduled_step(sd1):
    sd, ref = sd1
    torch = ref.torch
    cat = ref.encode([ref.chunk([("a photo of a cat", 1.0)])])
    dog = ref.encode([ref.chunk([("a photo of a dog", 1.0)])])
    uncond = ref.encode([ref.chunk([(NEGATIVE, 1.0)])])

    def switch_to_dog(pipe, step, timestep, tensors):
        # [cat:dog:0.5] over 10 steps ends "cat" at step 5: A1111 uses it for calls 0..5 (0-based)
        if step == 5:
            return {"prompt_embeds": torch.from_numpy(np.concatenate([uncond, dog]))}
        return {}

    reference = ref.images(cat, uncond, callback=switch_to_dog)
    images = generate(sd, "a photo of a [cat:dog:0.5]")
    assert_parity(images, reference)
    unswitched = ref.images(cat, uncond)
    assert np.abs(images - unswitched).max() > 10 * np.abs(images - reference).max()  # the switch is visible


def test_all_weights_one_equals_plain_prompt(sd1):
    sd, _ = sd1
    plain = generate(sd, "a photo of a cat")
    assert np.array_equal(generate(sd, "a photo of a (cat:1.0)"), plain)


def test_clip_skip(sd1):
    """A1111 clip skip 2: the second-to-last hidden state plus the final layer norm (built by hand here:
    diffusers 0.42's own clip_skip reads text_encoder.text_model, which transformers 5 no longer has)."""
    sd, ref = sd1
    cond = ref.encode([ref.chunk([("a photo of a cat", 1.0)])], clip_skip=2)
    uncond = ref.encode([ref.chunk([(NEGATIVE, 1.0)])], clip_skip=2)
    assert_parity(generate(sd, "a photo of a cat", clip_skip=2), ref.images(cond, uncond))


def test_textual_inversion(tiny_sd1, engines, tmp_path):
    """An A1111 .safetensors embedding used by name equals its vectors placed in the token sequence by hand."""
    import torch
    from safetensors.torch import save_file

    import runtime

    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(5)) * 0.5
    (tmp_path / "ti").mkdir()
    save_file({"emb_params": vectors}, tmp_path / "ti" / "shinystyle.safetensors")
    sd = runtime.load(tiny_sd1, engines_dir=engines)
    assert sd.load_embeddings(tmp_path / "ti") == ["shinystyle"]
    images = generate(sd, "a photo of a cat, shinystyle")

    ref = Reference(tiny_sd1)
    table = ref.text_encoder.get_input_embeddings()
    vocab = table.weight.shape[0]
    ref.text_encoder.resize_token_embeddings(vocab + 2)
    with torch.no_grad():
        ref.text_encoder.get_input_embeddings().weight[vocab:] = vectors
    ids, weights = ref.chunk([("a photo of a cat,", 1.0)])
    ids[ids.index(ref.tokenizer.eos_token_id) : ids.index(ref.tokenizer.eos_token_id) + 2] = [vocab, vocab + 1]
    cond = ref.encode([(ids, weights)])
    uncond = ref.encode([ref.chunk([(NEGATIVE, 1.0)])])
    assert_parity(images, ref.images(cond, uncond))
    assert np.abs(images - generate(sd, "a photo of a cat,")).max() > 1e-3  # the embedding matters


def test_clip_skip_out_of_range(sd1):
    from runtime.errors import InvalidRequestError

    sd, _ = sd1
    with pytest.raises(InvalidRequestError, match="clip skip must be between 1 and 3"):
        generate(sd, "a cat", clip_skip=4)
