"""LoRA images against diffusers with the same LoRA loaded and fused at the same weight, on both backends.

Reference: diffusers' `pipe.load_lora_weights(file)` + `pipe.fuse_lora(lora_scale=w)` (PEFT underneath); diffusers
converts kohya keys itself, so it also checks sdrt's kohya mapping. Several LoRAs are fused one after another
(fuse, then unload the adapter, keeping the fused weights). Same tolerances as the txt2img parity tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import struct

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = [needs_torch, pytest.mark.slow]
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="diffusers' LoRA loading needs peft")

BACKENDS = ("onnxruntime", "torch")
PROMPT, NEGATIVE = "a photo of a cat", "blurry"
GENERATION = dict(negative_prompt=NEGATIVE, seed=7, steps=4, cfg_scale=6.0, width=32, height=32, sampler="Euler")


def reference(checkpoint, loras=(), negative=NEGATIVE) -> np.ndarray:
    """diffusers' images with `loras` [(file, te scale, unet scale)] fused in turn."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    for i, (path, te, unet) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"lora{i}")
        for component, scale in (("unet", unet), ("text_encoder", te)):
            pipe.fuse_lora(components=[component], lora_scale=scale, adapter_names=[f"lora{i}"])
        pipe.unload_lora_weights()
    out = pipe(PROMPT, negative_prompt=negative, num_inference_steps=4, guidance_scale=6.0, height=32, width=32,
               generator=torch.Generator("cpu").manual_seed(7), output_type="np")  # fmt: skip
    return out.images


def assert_parity(images: np.ndarray, expected: np.ndarray) -> None:
    diff = np.abs(images.astype(np.float64) - expected)
    assert diff.mean() <= 2e-5 and diff.max() <= 1e-3, f"mean {diff.mean():.2e}, max {diff.max():.2e}"


@pytest.fixture(scope="module")
def base_reference(tiny_sd1):
    return reference(tiny_sd1)


SINGLE = [("kohya_a", 0.8), ("peft_a", -0.6)]


@needs_peft
@pytest.mark.parametrize("name, weight", SINGLE)
def test_single_lora_matches_diffusers(lora_models, lora_dir, tiny_sd1, base_reference, name, weight):
    path = lora_dir / f"{name}.safetensors"
    expected = reference(tiny_sd1, [(path, weight, weight)])
    assert np.abs(expected - base_reference).max() > 0.02  # the LoRA visibly changes the image
    for backend in BACKENDS:
        result = lora_models[backend].txt2img(PROMPT, loras=[(path, weight)], **GENERATION)
        assert_parity(result.images, expected)


@needs_peft
def test_several_loras_add_up(lora_models, lora_dir, tiny_sd1, base_reference):
    files = [(lora_dir / "kohya_a.safetensors", 0.7), (lora_dir / "peft_a.safetensors", 0.5),
             (lora_dir / "kohya_b.safetensors", -0.4)]  # fmt: skip
    expected = reference(tiny_sd1, [(p, w, w) for p, w in files])
    for backend in BACKENDS:
        assert_parity(lora_models[backend].txt2img(PROMPT, loras=files, **GENERATION).images, expected)


@needs_peft
def test_separate_text_encoder_and_unet_weights(lora_models, lora_dir, tiny_sd1):
    expected = reference(tiny_sd1, [(lora_dir / "kohya_a.safetensors", 0.3, 1.1)])
    result = lora_models["onnxruntime"].txt2img(PROMPT + " <lora:kohya_a:0.3:1.1>", lora_dir=lora_dir, **GENERATION)
    assert_parity(result.images, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_switching_is_exact(lora_models, lora_dir, backend):
    """A -> B -> A gives A's images bit for bit; no LoRA and weight 0 give the base model's, also after LoRAs."""
    model = lora_models[backend]
    a, b = [(lora_dir / "kohya_a.safetensors", 0.8)], [(lora_dir / "peft_a.safetensors", 0.6)]
    base = model.txt2img(PROMPT, **GENERATION).images  # no LoRA: the base weights, whatever ran before
    first_a = model.txt2img(PROMPT, loras=a, **GENERATION).images
    with_b = model.txt2img(PROMPT, loras=b, **GENERATION).images
    second_a = model.txt2img(PROMPT, loras=a, **GENERATION).images
    assert np.array_equal(first_a, second_a)
    assert not np.array_equal(first_a, with_b) and not np.array_equal(first_a, base)
    assert np.array_equal(model.txt2img(PROMPT, **GENERATION).images, base)
    zero = model.txt2img(PROMPT, loras=[(lora_dir / "kohya_a.safetensors", 0.0)], **GENERATION).images
    assert np.array_equal(zero, base)


def addnet_hash(path) -> str:
    """kohya's safetensors hash (sha256 of the bytes after the header), the first 12 hex digits as A1111 shows."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + length :]).hexdigest()[:12]


def test_prompt_tag_and_infotext(lora_models, lora_dir):
    model = lora_models["onnxruntime"]
    prompt = "a photo <lora:kohya_a:0.8> of a cat<lora:unet_only>"
    tagged = model.txt2img(prompt, lora_dir=lora_dir, **GENERATION)
    files = [(lora_dir / "kohya_a.safetensors", 0.8), (lora_dir / "sub" / "unet_only.safetensors", 1.0)]
    explicit = model.txt2img("a photo  of a cat", loras=files, **GENERATION)
    assert np.array_equal(tagged.images, explicit.images)
    infotext = tagged.infotexts[0]
    assert infotext.startswith(prompt + "\nNegative prompt: blurry\n")  # A1111 keeps the tags in the infotext
    hashes = f"kohya_a: {addnet_hash(files[0][0])}, unet_only: {addnet_hash(files[1][0])}"
    assert f'Lora hashes: "{hashes}", Version: ' in infotext
    assert tagged.request.prompt == prompt


@needs_peft
def test_tag_in_negative_prompt_stays_text(lora_models, lora_dir, tiny_sd1):
    """A1111 parses extra networks in the positive prompt only: a negative tag loads nothing, its text remains."""
    model = lora_models["onnxruntime"]
    negative = "<lora:kohya_a:1> blurry"
    options = dict(GENERATION, negative_prompt=negative)
    result = model.txt2img(PROMPT, lora_dir=lora_dir, **options)
    assert np.array_equal(result.images, model.txt2img(PROMPT, **options).images)
    assert "Lora hashes" not in result.infotexts[0]
    assert_parity(result.images, reference(tiny_sd1, negative=negative))


def test_pickled_lora_with_allow_pickle(lora_models, lora_dir, tmp_path):
    """A torch.save'd kohya LoRA is read by the restricted unpickler and gives the .safetensors file's images."""
    import torch
    from safetensors.torch import load_file

    from runtime.errors import LoraError

    source = lora_dir / "kohya_a.safetensors"
    pickled = tmp_path / "kohya_a.pt"
    torch.save(load_file(str(source)), pickled)
    model = lora_models["onnxruntime"]
    with pytest.raises(LoraError, match="pickle"):
        model.txt2img(PROMPT, loras=[(pickled, 0.8)], **GENERATION)
    model.set_lora_dir(tmp_path, allow_pickle=True)
    try:
        from_pickle = model.txt2img(PROMPT + "<lora:kohya_a:0.8>", **GENERATION).images
    finally:
        model.set_lora_dir(None)
    assert np.array_equal(from_pickle, model.txt2img(PROMPT, loras=[(source, 0.8)], **GENERATION).images)


def test_ldm_module_names(lora_models, lora_dir):
    """kohya keys with LDM UNet names (lora_unet_input_blocks_3_1_...) apply the same weights as the diffusers-named
    file (diffusers itself reads no LDM names for SD 1.x; the names come from a table written in lora_files.py)."""
    model = lora_models["onnxruntime"]
    ldm = model.txt2img(PROMPT, loras=[(lora_dir / "kohya_a_ldm.safetensors", 0.8)], **GENERATION).images
    diffusers_named = model.txt2img(PROMPT, loras=[(lora_dir / "kohya_a.safetensors", 0.8)], **GENERATION).images
    assert np.array_equal(ldm, diffusers_named)


class OnlyApplyWeights:
    """A backend with the weight interface's one method (as the GPU backends have): LoRA merging must find the
    parameters through the artifact folder or the checkpoint folder instead of asking the backend."""

    def __init__(self, backend, expose: str):
        self._backend = backend
        self.name = backend.name
        self.apply_weights = backend.apply_weights
        self.session, self.text_tables = backend.session, backend.text_tables
        if expose == "folder":
            self.folder, self.manifest = backend.folder, backend.manifest
        else:
            self.checkpoint = backend.checkpoint


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_with_only_apply_weights(lora_models, lora_dir, backend):
    from runtime.api import StableDiffusion

    model = lora_models[backend]
    expose = "folder" if backend == "onnxruntime" else "checkpoint"
    bare = StableDiffusion(model.name, model.key, model.info, model.tokenizer, OnlyApplyWeights(model.backend, expose),
                           False)  # fmt: skip
    loras = [(lora_dir / "kohya_a.safetensors", 0.8), (lora_dir / "peft_a.safetensors", 0.3)]
    expected = model.txt2img(PROMPT, loras=loras, **GENERATION).images
    model.lora_state = None  # the model's own state no longer describes the shared backend
    assert np.array_equal(bare.txt2img(PROMPT, loras=loras, **GENERATION).images, expected)
    bare.txt2img(PROMPT, **GENERATION)  # back to base, through the bare model's state


def test_old_diffusers_format(lora_models, lora_dir):
    """The pre-PEFT diffusers keys (attn processors' to_q_lora, text encoder's lora_linear_layer) apply the same
    weights as PEFT keys with the same values."""
    model = lora_models["onnxruntime"]
    old = model.txt2img(PROMPT, loras=[(lora_dir / "old_format.safetensors", 0.9)], **GENERATION).images
    peft = model.txt2img(PROMPT, loras=[(lora_dir / "old_format_as_peft.safetensors", 0.9)], **GENERATION).images
    assert np.array_equal(old, peft)
