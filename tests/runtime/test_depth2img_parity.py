"""depth2img parity: sdrt against diffusers' StableDiffusionDepth2ImgPipeline on the tiny SD 2 depth checkpoint.

Batch 2 (seeds s, s + 1, one generator per image), 10 steps, CFG 6, two samplers, with a given depth map and with
the checkpoint's DPT estimating the depth: mean absolute difference <= 5e-5 and max <= 2e-3 on float images in
[0, 1]. The host-side pieces are checked on their own: the bicubic resize against torch's F.interpolate (to float32
rounding), the DPT preprocessing against transformers' DPTImageProcessorPil (bit for bit).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.runtime.test_txt2img_parity import CFG, NEGATIVE, PROMPT, SEED, STEPS

# diffusers asks for float32 autocast around its DPT on the CPU, which torch declines with this warning
pytestmark = [needs_torch, pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")]

WIDTH, HEIGHT = 40, 24  # the DPT sees 32 x 32: narrower (antialiased) and taller (interpolated)
STRENGTH = 0.7
CASES = [("Euler", "default"), ("DPM++ 2M", "Karras")]


def init_image(width=WIDTH, height=HEIGHT):
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.4 * np.sin(x / 5.0) * np.cos(y / 7.0)], axis=-1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def depth_map():
    """A smooth depth map of another size and scale than the image: [1, 17, 23]."""
    y, x = np.mgrid[0:17, 0:23]
    return (3.0 + np.sin(x / 4.0) + 0.05 * y * y)[None].astype(np.float32)


def reference(folder, sampler, schedule, depth=None, batch=2):
    import diffusers
    import torch

    from runtime.samplers import resolve_sampler

    spec, schedule_type = resolve_sampler(sampler, schedule)
    pipe = diffusers.StableDiffusionDepth2ImgPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    scheduler_class = getattr(diffusers, spec.diffusers_class)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **spec.diffusers_kwargs(schedule_type))
    return pipe(
        PROMPT,
        image=init_image(),
        depth_map=None if depth is None else torch.from_numpy(depth),
        strength=STRENGTH,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        num_images_per_prompt=batch,
        generator=[torch.Generator("cpu").manual_seed(SEED + i) for i in range(batch)],
        output_type="np",
    ).images


def generate(sd, sampler, schedule, depth=None, seed=SEED):
    from runtime.images import to_model_input
    from runtime.pipelines.depth2img import depth2img
    from runtime.request import Img2ImgRequest

    request = Img2ImgRequest(
        PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, seed=seed, batch_size=2,
        width=WIDTH, height=HEIGHT, sampler=sampler, schedule=schedule, strength=STRENGTH,
    )  # fmt: skip
    return depth2img(sd, request, to_model_input(init_image()), depth)


def assert_close(images, expected):
    assert images.shape == expected.shape == (2, HEIGHT, WIDTH, 3)
    diff = np.abs(images.astype(np.float64) - expected)
    assert diff.mean() <= 5e-5 and diff.max() <= 2e-3, f"mean {diff.mean():.2e}, max {diff.max():.2e}"
    assert expected.std() > 0.01


@pytest.fixture(scope="module")
def engines(shared_engines):
    return shared_engines  # the session's exports of the tiny checkpoints (tests/conftest.py)


@pytest.fixture(scope="module")
def depth_model(tiny_sd2_depth, engines):
    import runtime

    return runtime.load(tiny_sd2_depth, engines_dir=engines)


@pytest.mark.parametrize("source", ["depth map", "estimator"])
@pytest.mark.parametrize(("sampler", "schedule"), CASES)
def test_depth2img_matches_diffusers(tiny_sd2_depth, depth_model, source, sampler, schedule):
    depth = depth_map() if source == "depth map" else None
    assert_close(generate(depth_model, sampler, schedule, depth), reference(tiny_sd2_depth, sampler, schedule, depth))


def test_torch_backend_matches_diffusers(tiny_sd2_depth):
    import runtime

    sd = runtime.load(tiny_sd2_depth, backend="torch")
    assert_close(generate(sd, "Euler", "default"), reference(tiny_sd2_depth, "Euler", "default"))


def test_the_depth_channel_steers_the_image(depth_model):
    flipped = depth_map()[:, :, ::-1]
    a, b = generate(depth_model, "Euler", "default", depth_map()), generate(depth_model, "Euler", "default", flipped)
    assert np.abs(a - b).mean() > 1e-3


@pytest.fixture(scope="module")
def no_estimator(tiny_sd2_depth, tmp_path_factory):
    """The depth checkpoint without its depth estimator and image processor."""
    folder = tmp_path_factory.mktemp("no-estimator") / "tiny-sd2-depth-bare"
    shutil.copytree(tiny_sd2_depth, folder)
    shutil.rmtree(folder / "depth_estimator")
    shutil.rmtree(folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(depth_estimator=[None, None], feature_extractor=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_without_estimator_a_depth_map_is_required(no_estimator, depth_model, engines):
    import runtime
    from runtime.errors import InvalidRequestError

    sd = runtime.load(no_estimator, engines_dir=engines)
    assert sd.info["depth_estimator"] is None
    with pytest.raises(InvalidRequestError, match="no depth estimator: give a depth map") as caught:
        generate(sd, "Euler", "default")
    assert "\n" not in str(caught.value)
    with_map = generate(sd, "Euler", "default", depth_map())
    np.testing.assert_allclose(with_map, generate(depth_model, "Euler", "default", depth_map()), atol=1e-5)


@pytest.mark.parametrize(
    ("depth", "message"),
    [
        (np.full((1, 9, 9), 2.0, np.float32), "the depth map is flat"),
        (np.ones((3, 9, 9), np.float32), r"n dividing 2, not \(3, 9, 9\)"),
    ],
)
def test_bad_depth_maps(depth_model, depth, message):
    from runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=message):
        generate(depth_model, "Euler", "default", depth)


def test_depth2img_needs_a_depth_model(tiny_sd1, engines):
    import runtime
    from runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="depth2img needs a depth model"):
        generate(runtime.load(tiny_sd1, engines_dir=engines), "Euler", "default", depth_map())


@pytest.mark.parametrize("size", [(12, 20), (5, 3), (48, 64), (17, 23)])
def test_bicubic_is_torchs(size):
    import torch

    from runtime.depth import torch_bicubic

    x = np.random.default_rng(0).normal(0, 100, (2, 17, 23)).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size, mode="bicubic")[:, 0].numpy()
    # float32 rounding apart (torch's compiled kernel orders and fuses its multiply-adds its own way): a few ulps
    assert np.abs(torch_bicubic(x, *size) - expected).max() <= 2e-6 * np.abs(expected).max()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"resample": 2, "size": {"height": 48, "width": 20}},
        {"keep_aspect_ratio": True, "ensure_multiple_of": 8, "image_mean": [0.4, 0.5, 0.6], "image_std": [0.2] * 3},
    ],
)
def test_dpt_preprocessing_is_transformers(settings):
    """Against the PIL image processor, which the tiny checkpoint names (and DPTImageProcessor falls back to
    without torchvision): the same resize of the 8-bit image, rescale and normalisation."""
    from transformers import DPTImageProcessorPil

    from runtime.depth import dpt_pixel_values
    from runtime.images import to_model_input

    settings = dict({"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}, **settings)
    image = init_image(37, 23)
    expected = DPTImageProcessorPil(**settings)(images=[image], return_tensors="np").pixel_values
    assert np.array_equal(dpt_pixel_values(to_model_input(image), settings), expected)
