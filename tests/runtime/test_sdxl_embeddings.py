"""SDXL textual inversion: A1111's SDXL embedding files ({"clip_l": [n, D1], "clip_g": [n, D2]}) in prompts.

Parity: an embedding of random vectors used in a prompt gives the images of diffusers' StableDiffusionXLPipeline with
the same vectors loaded by load_textual_inversion, clip_l into text_encoder/tokenizer and clip_g into
text_encoder_2/tokenizer_2 (mean absolute difference <= 2e-5, max <= 1e-3), on onnxruntime (text encoder 2's
exported graph takes the clip_g rows as token_overrides) and on the torch backend. Loading: files that do not fit an
SDXL model's two widths are skipped with A1111's width (the sum of both parts); a refiner takes clip_g only.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from runtime.errors import ModelError
from runtime.prompts.embeddings import load_embeddings
from tests.conftest import needs_torch
from tests.runtime.test_txt2img_parity import NEGATIVE, SEED, assert_parity

pytestmark = needs_torch

NAME = "horsestyle"  # the embedding's file stem, its name in prompts
PROMPT = f"a photo of an astronaut riding a {NAME} horse"
VECTORS = 2
WIDTH, HEIGHT = 64, 48
STEPS, CFG = 6, 6.0


def sdxl_vectors(width_l: int, width_g: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {  # about as large as the tiny encoders' own token embeddings
        "clip_l": (0.5 * rng.standard_normal((VECTORS, width_l))).astype(np.float32),
        "clip_g": (0.5 * rng.standard_normal((VECTORS, width_g))).astype(np.float32),
    }


@pytest.fixture(scope="module")
def widths(tiny_sdxl) -> tuple[int, int]:
    import json

    def hidden(folder: str) -> int:
        return json.loads((tiny_sdxl / folder / "config.json").read_text())["hidden_size"]

    return hidden("text_encoder"), hidden("text_encoder_2")


@pytest.fixture(scope="module")
def embedding(tmp_path_factory, widths):
    folder = tmp_path_factory.mktemp("sdxl-embeddings")
    parts = sdxl_vectors(*widths)
    save_file(parts, str(folder / f"{NAME}.safetensors"))
    return folder, parts


@pytest.fixture(scope="module")
def reference(tiny_sdxl, embedding) -> np.ndarray:
    """diffusers' SDXL pipeline with clip_l in text encoder 1 and clip_g in text encoder 2, Euler a: [2, H, W, 3]."""
    import diffusers
    import torch

    from runtime.samplers import resolve_sampler

    _, parts = embedding
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(
        torch.from_numpy(parts["clip_l"]), token=NAME, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        torch.from_numpy(parts["clip_g"]), token=NAME, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    spec, schedule_type = resolve_sampler("Euler a", "default")
    config = pipe.scheduler.config
    pipe.scheduler = getattr(diffusers, spec.diffusers_class).from_config(
        config, **spec.diffusers_kwargs(schedule_type)
    )
    out = pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        num_images_per_prompt=2,
        generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(2)],
        height=HEIGHT,
        width=WIDTH,
        output_type="np",
    )
    return out.images


def generate(sd, prompt: str = PROMPT) -> np.ndarray:
    result = sd.txt2img(
        prompt,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        cfg_scale=CFG,
        seed=SEED,
        batch_size=2,
        width=WIDTH,
        height=HEIGHT,
        sampler="Euler a",
    )
    return result.images


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_embedding_matches_diffusers_load_textual_inversion(
    tiny_sdxl, shared_engines, embedding, reference, backend, tmp_path
):
    import runtime

    sd = runtime.load(tiny_sdxl, backend=backend, engines_dir=shared_engines)
    assert sd.load_embeddings(embedding[0]) == [NAME]
    images = generate(sd)
    assert_parity(images, reference)
    if backend == "onnxruntime":  # the vectors made these images: without them the name's own tokens give others
        assert sd.load_embeddings(tmp_path) == []
        assert np.abs(generate(sd) - images).mean() > 1e-3


def test_files_that_do_not_fit_are_skipped(tmp_path, widths):
    width_l, width_g = widths
    save_file(sdxl_vectors(width_l, width_g, seed=1), str(tmp_path / "fits.safetensors"))
    save_file(sdxl_vectors(width_l, width_g + 8), str(tmp_path / "other_g.safetensors"))
    save_file(sdxl_vectors(width_l + 8, width_g), str(tmp_path / "other_l.safetensors"))
    save_file({"emb_params": np.ones((1, width_l), np.float32)}, str(tmp_path / "sd1.safetensors"))

    database = load_embeddings(tmp_path, width_l, hidden_size_2=width_g)
    assert sorted(database.embeddings) == ["fits"]
    assert database.skipped == {"other_g": width_l + width_g + 8, "other_l": width_l + 8 + width_g, "sd1": width_l}
    parts = sdxl_vectors(width_l, width_g, seed=1)
    fits = database.embeddings["fits"]
    np.testing.assert_array_equal(fits.vec, parts["clip_l"])
    np.testing.assert_array_equal(fits.vec_2, parts["clip_g"])

    refiner = load_embeddings(tmp_path, None, hidden_size_2=width_g)  # text encoder 2 only: clip_g in its slots
    assert sorted(refiner.embeddings) == ["fits", "other_l"]
    np.testing.assert_array_equal(refiner.embeddings["fits"].vec, parts["clip_g"])

    sd1 = load_embeddings(tmp_path, width_l)  # an SD 1.x model of that width skips every SDXL file
    assert sorted(sd1.embeddings) == ["sd1"]
    assert sd1.skipped["fits"] == width_l + width_g

    from types import SimpleNamespace

    from runtime.server.a1111 import embeddings

    listed = embeddings(SimpleNamespace(embeddings=database))  # /sdapi/v1/embeddings: A1111's shape is D1 + D2
    assert listed["loaded"]["fits"]["shape"] == width_l + width_g and listed["loaded"]["fits"]["vectors"] == 2
    assert embeddings(SimpleNamespace(embeddings=refiner))["loaded"]["fits"]["shape"] == width_g


def test_parts_of_unequal_length_are_refused(tmp_path, widths):
    parts = sdxl_vectors(*widths)
    parts["clip_g"] = parts["clip_g"][:1]
    save_file(parts, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ModelError, match="same number of vectors"):
        load_embeddings(tmp_path, widths[0], hidden_size_2=widths[1])


def test_refiner_reads_the_base_embeddings(tiny_sdxl, tiny_sdxl_refiner, shared_engines, embedding):
    """A1111 keeps one set of embeddings: handed over to a refiner that loaded none, the prompt's embedding reaches
    the refiner's text encoder too (its clip_g part), as diffusers' base + refiner with the vectors loaded in each."""
    import torch

    import runtime
    from tests.runtime.test_sdxl_img2img import diffusers_pipe, generators

    folder, parts = embedding
    base = runtime.load(tiny_sdxl, engines_dir=shared_engines)
    refiner = runtime.load(tiny_sdxl_refiner, engines_dir=shared_engines)
    base.load_embeddings(folder)
    options = dict(negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=SEED, batch_size=2, width=WIDTH)
    result = base.txt2img(PROMPT, **options, height=HEIGHT, sampler="Euler a", refiner=refiner, refiner_switch_at=0.5)
    assert NAME in refiner.embeddings.embeddings

    pipe = diffusers_pipe("StableDiffusionXLPipeline", tiny_sdxl, "Euler a", "default", add_watermarker=False)
    second = diffusers_pipe("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_refiner, "Euler a", "default",
                            add_watermarker=False)  # fmt: skip
    clip_l, clip_g = torch.from_numpy(parts["clip_l"]), torch.from_numpy(parts["clip_g"])
    pipe.load_textual_inversion(clip_l, token=NAME, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token=NAME, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    second.load_textual_inversion(clip_g, token=NAME, text_encoder=second.text_encoder_2,
                                  tokenizer=second.tokenizer_2)  # fmt: skip
    common = {"negative_prompt": NEGATIVE, "num_inference_steps": STEPS, "guidance_scale": CFG,
              "num_images_per_prompt": 2, "generator": generators(2)}  # fmt: skip
    latents = pipe(PROMPT, **common, width=WIDTH, height=HEIGHT, denoising_end=0.5, output_type="latent").images
    expected = second(PROMPT, image=latents, **common, denoising_start=0.5, output_type="np").images
    assert_parity(result.images, expected)
