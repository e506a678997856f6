"""SDXL txt2img parity: sdrt (onnxruntime) against diffusers' StableDiffusionXLPipeline on the tiny SDXL checkpoint.

Same folder, same seeds (CPU torch.Generator per image), same scheduler config: mean absolute difference <= 2e-5 and
max <= 1e-3 on float images in [0, 1] (assert_parity). A1111 emphasis is checked on the conditioning against
diffusers' own encode_prompt with the emphasis formula applied; what SDXL cannot do yet is refused in one line
(the prompt language: tests/runtime/test_sdxl_prompts.py).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from runtime.errors import InvalidRequestError
from tests.conftest import needs_torch
from tests.runtime.test_txt2img_parity import NEGATIVE, PROMPT, SEED, assert_parity

pytestmark = needs_torch

WIDTH, HEIGHT = 64, 48  # non-square
STEPS, CFG = 6, 6.0


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl, shared_engines):
    import runtime

    return runtime.load(tiny_sdxl, engines_dir=shared_engines)


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler.config  # the checkpoint's scheduler config, which each case's scheduler reads


def reference_images(pipe, sampler: str, schedule: str, negative_prompt: str | None, cfg: float = CFG) -> np.ndarray:
    """diffusers' SDXL pipeline, the sampler's scheduler on the checkpoint's config: float images [2, H, W, 3]."""
    import diffusers
    import torch

    from runtime.samplers import resolve_sampler

    pipe, config = pipe
    spec, schedule_type = resolve_sampler(sampler, schedule)
    scheduler = getattr(diffusers, spec.diffusers_class).from_config(config, **spec.diffusers_kwargs(schedule_type))
    pipe.scheduler = scheduler
    generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(2)]
    out = pipe(
        PROMPT,
        negative_prompt=negative_prompt,
        num_inference_steps=STEPS,
        guidance_scale=cfg,
        num_images_per_prompt=2,
        generator=generators,
        height=HEIGHT,
        width=WIDTH,
        output_type="np",
    )
    return out.images


def generate(sd, sampler: str, schedule: str, negative_prompt: str, cfg: float = CFG) -> np.ndarray:
    result = sd.txt2img(
        PROMPT,
        negative_prompt=negative_prompt,
        steps=STEPS,
        cfg_scale=cfg,
        seed=SEED,
        batch_size=2,
        width=WIDTH,
        height=HEIGHT,
        sampler=sampler,
        schedule=schedule,
    )
    return result.images


@pytest.mark.parametrize(
    ("sampler", "schedule", "negative", "cfg"),
    [
        ("Euler a", "default", NEGATIVE, CFG),
        ("DPM++ 2M", "Karras", NEGATIVE, CFG),
        ("DDIM", "default", NEGATIVE, CFG),
        ("UniPC", "default", "", CFG),  # empty negative: zeros (force_zeros_for_empty_prompt), diffusers' None
        ("Euler", "default", NEGATIVE, 1.0),  # no guidance: the prompt's rows only
    ],
)
def test_txt2img_matches_diffusers(sdxl, pipe, sampler, schedule, negative, cfg):
    images = generate(sdxl, sampler, schedule, negative, cfg)
    assert_parity(images, reference_images(pipe, sampler, schedule, negative or None, cfg))


def test_torch_backend_matches_diffusers(tiny_sdxl, shared_engines, pipe):
    """The reference backend runs the checkpoint's own modules, SDXL's second text encoder and added inputs too."""
    import runtime

    sd = runtime.load(tiny_sdxl, backend="torch", engines_dir=shared_engines)
    images = generate(sd, "DPM++ 2M", "Karras", NEGATIVE)
    assert_parity(images, reference_images(pipe, "DPM++ 2M", "Karras", NEGATIVE))


def test_openvino_backend_matches_diffusers(tiny_sdxl, shared_engines, pipe):
    """OpenVINO's CPU plugin over the same fp32 ONNX files: text encoder 2 and the UNet's added inputs included."""
    import importlib.util

    import runtime

    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino not installed (openvino extra)")
    sd = runtime.load(tiny_sdxl, backend="openvino", engines_dir=shared_engines)
    images = generate(sd, "Euler a", "default", NEGATIVE)
    assert_parity(images, reference_images(pipe, "Euler a", "default", NEGATIVE))


def test_family_facts(sdxl):
    info = sdxl.info
    assert (info["family"], info["variant"], info["vae_scaling_factor"]) == ("sdxl", "sdxl", 0.13025)
    assert info["sdxl"]["text_projection_dim"] + 6 * info["sdxl"]["addition_time_embed_dim"] == 80
    assert info["sdxl"]["force_zeros_for_empty_prompt"] is True


def test_emphasis_matches_formula_on_diffusers_embeddings(sdxl, pipe):
    """ "(astronaut:1.3)": per encoder, z *= weight per token then z *= mean before / mean after (A1111 "Original"),
    on diffusers' penultimate states of each encoder; the pooled text is unweighted."""
    import torch

    from runtime.pipelines.conditioning import build_conditioning

    pipe, _ = pipe
    conditioning = build_conditioning(sdxl, "a photo of an (astronaut:1.3) riding a horse", "", 1, 1.0, STEPS)
    start = 1 + len(pipe.tokenizer("a photo of an", add_special_tokens=False).input_ids)
    stop = start + len(pipe.tokenizer("astronaut", add_special_tokens=False).input_ids)
    expected = []
    with torch.no_grad():
        for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
            output = encoder(ids, output_hidden_states=True)
            z = output.hidden_states[-2].double()
            before = z.mean()
            z[:, start:stop] *= 1.3
            expected.append(z * (before / z.mean()))
    pooled = output.text_embeds.numpy()
    np.testing.assert_allclose(conditioning.batches[0], torch.cat(expected, dim=-1).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(conditioning.pooled[0], pooled, atol=1e-5, rtol=0)
    plain = build_conditioning(sdxl, PROMPT, "", 1, 1.0, STEPS)
    assert np.abs(plain.batches[0] - conditioning.batches[0]).max() > 1e-2  # the weight changed the embeddings


def test_unsupported_modes_are_refused(sdxl):
    from PIL import Image

    image = Image.new("RGB", (64, 64))
    for mode, call in {
        "depth2img": lambda: sdxl.depth2img("a cat", image),
        "upscale": lambda: sdxl.upscale("a cat", image),
    }.items():
        with pytest.raises(InvalidRequestError, match=f"^{mode} on SDXL models is not supported yet"):
            call()


def _config_copy(tiny_sdxl, target, edit):
    """The checkpoint's JSON configs (no weights) with `edit(configs)` applied: enough for family detection."""
    for path in tiny_sdxl.rglob("*.json"):
        destination = target / path.relative_to(tiny_sdxl)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, destination)
    edit(target)
    return target


def test_incomplete_folders_and_odd_unets_are_refused(tiny_sdxl, tmp_path):
    from runtime.checkpoint import check_checkpoint_folder, describe_checkpoint
    from runtime.errors import ModelError

    # a tokenizer/ without its text_encoder/ is an incomplete base, not a refiner (which has neither)
    broken = _config_copy(tiny_sdxl, tmp_path / "broken", lambda f: shutil.rmtree(f / "text_encoder"))
    with pytest.raises(ModelError, match="has no text_encoder/ folder"):
        check_checkpoint_folder(broken)

    def eight_channels(folder):
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps(dict(config, in_channels=8)))

    odd = _config_copy(tiny_sdxl, tmp_path / "odd", eight_channels)
    with pytest.raises(InvalidRequestError, match="an SDXL model with 8 UNet input channels: not supported"):
        describe_checkpoint(odd)


def test_conditioning_without_pooled_text_is_refused(sdxl):
    """Conditioning built without the pooled text gets one line, not a UNet failure."""
    from dataclasses import replace

    from runtime.pipelines.common import image_generators
    from runtime.pipelines.conditioning import build_conditioning
    from runtime.pipelines.txt2img import sample_latents
    from runtime.request import Txt2ImgRequest, validate_txt2img

    request = validate_txt2img(Txt2ImgRequest("a cat", steps=2, width=64, height=64, seed=1), sdxl.info)
    conditioning = replace(build_conditioning(sdxl, "a cat", "", 1, 7.0, 2), pooled=None)
    with pytest.raises(InvalidRequestError, match="SDXL conditioning without its pooled text"):
        sample_latents(sdxl, request, conditioning, image_generators(1, 1))


def test_batched_serving_gives_each_request_its_own_image(sdxl):
    """Service batches compatible SDXL requests into one UNet run (the pooled text merged with the hidden states);
    each caller gets the images it gets alone."""
    from runtime.serving import Service, ServiceConfig
    from tests.serving.test_service import _gate

    options = dict(steps=2, width=WIDTH, height=HEIGHT, cfg_scale=CFG, sampler="Euler")
    requests = [("a red cube", "", 3, 1), ("a blue ball", "blurry", 5, 2), ("a green cone", "dark", 7, 1)]
    alone = [sdxl.txt2img(p, negative_prompt=n, seed=s, batch_size=b, **options).images for p, n, s, b in requests]
    hold, entered, release = _gate()  # keeps the worker busy until every request is queued: one batch then
    with Service(sdxl, ServiceConfig(max_batch_images=8)) as service:
        blocker = service.submit("txt2img", "hold", callback=hold, seed=1, **options)
        assert entered.wait(30)
        jobs = [service.submit("txt2img", p, negative_prompt=n, seed=s, batch_size=b, **options)
                for p, n, s, b in requests]  # fmt: skip
        release.set()
        results = [job.result(60) for job in jobs]
        blocker.result(60)
        assert service.counts["batches"] == 2  # the blocker, then the three requests together
    for result, expected in zip(results, alone):
        np.testing.assert_allclose(result.images, expected, rtol=0, atol=1e-5)


def test_align_your_steps_uses_the_sdxl_table(sdxl, monkeypatch):
    """A1111's Align Your Steps has its own sigma table for SDXL: the SDXL pipeline's schedule is built from it."""
    from export.configs import SD15_SCHEDULER
    from runtime.pipelines import txt2img as pipeline
    from runtime.samplers import make_schedule, resolve_sampler

    built = []
    monkeypatch.setattr(pipeline, "make_schedule", lambda *a, **k: built.append(make_schedule(*a, **k)) or built[-1])
    sdxl.txt2img("a cat", steps=4, width=WIDTH, height=HEIGHT, sampler="Euler", schedule="Align Your Steps", seed=1)
    spec, kind = resolve_sampler("Euler", "Align Your Steps")
    sd1, xl = (make_schedule(spec, kind, SD15_SCHEDULER, 4, family=f).sigmas for f in ("sd1", "sdxl"))
    assert not np.allclose(sd1, xl)  # the two tables differ
    np.testing.assert_allclose(built[0].sigmas[1:-1], xl[1:-1], rtol=1e-6)  # the SDXL table's levels
