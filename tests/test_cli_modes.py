"""Hires fix and the invisible watermark through the CLI: sizes, metadata, and the watermark read back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import cli
from runtime.output import parse_parameters, read_parameters
from tests.conftest import needs_torch

pytestmark = needs_torch


@pytest.fixture(scope="module")
def engines(shared_engines):
    return shared_engines  # the session's exports of the tiny checkpoints (tests/conftest.py)


def base_args(model, engines, out, *extra):
    argv = ["--quiet", "txt2img", "--model", str(model), "--engines", str(engines), "--prompt", "a photo of a cat"]
    return [*argv, "--seed", "3", "--output", str(out), *extra]


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix(tiny_sd1, engines, tmp_path, upscaler):
    import runtime

    out = tmp_path / "hires.npy"
    hires = ["--hires-scale", "2", "--hires-upscaler", upscaler, "--hires-steps", "3", "--hires-strength", "0.5"]
    assert cli.main(base_args(tiny_sd1, engines, out, "--width", "48", "--height", "32", "--steps", "4", *hires)) == 0
    images = np.load(out)
    assert images.shape == (1, 64, 96, 3)
    sd = runtime.load(tiny_sd1, engines_dir=engines)
    result = sd.txt2img("a photo of a cat", seed=3, width=48, height=32, steps=4, hires_scale=2,
                        hires_upscaler=upscaler, hires_steps=3, hires_strength=0.5)  # fmt: skip
    assert np.array_equal(result.images, images)
    _, _, params = parse_parameters(result.infotexts[0])
    assert params["Size"] == "48x32" and params["Hires upscale"] == "2" and params["Hires upscaler"] == upscaler
    assert params["Hires steps"] == "3" and params["Denoising strength"] == "0.5"


def test_bad_hires_upscaler(tiny_sd1, engines, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert cli.main(base_args(tiny_sd1, engines, out, "--hires-scale", "2", "--hires-upscaler", "ESRGAN")) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown hires upscaler 'ESRGAN'" in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_watermark_round_trip(tiny_sd1, engines, tmp_path, capsys, suffix):
    pytest.importorskip("imwatermark", reason="the invisible-watermark package (watermark extra) is not installed")
    out = tmp_path / f"marked{suffix}"
    size = ["--width", "256", "--height", "256", "--cfg-scale", "1"]  # the watermark needs >= 256 x 256 pixels
    argv = base_args(tiny_sd1, engines, out, *size, "--steps", "1", "--watermark", "sdrt")
    assert cli.main(argv) == 0
    assert Image.open(out).size == (256, 256) and "Steps: 1" in read_parameters(out)
    capsys.readouterr()
    assert cli.main(["watermark-check", str(out)]) == 0
    assert capsys.readouterr().out.strip() == "sdrt"


def test_watermark_check_on_unmarked_image(tmp_path, capsys):
    pytest.importorskip("imwatermark", reason="the invisible-watermark package (watermark extra) is not installed")
    path = tmp_path / "plain.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(path)
    assert cli.main(["watermark-check", str(path)]) == 1
    assert capsys.readouterr().out.strip() == "no watermark found"


def _save_test_image(path, width, height):
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x / width, y / height, 0.5 + 0.4 * np.sin(x / 5.0)], axis=-1)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path)
    return path


def test_cli_depth2img_and_upscale(tiny_sd2_depth, tiny_x4_upscaler, engines, tmp_path):
    import runtime

    init = _save_test_image(tmp_path / "init.png", 48, 32)
    out = tmp_path / "depth.png"
    argv = ["--quiet", "depth2img", "--model", str(tiny_sd2_depth), "--engines", str(engines), "--prompt", "a cat"]
    assert cli.main([*argv, "--init-image", str(init), "--steps", "3", "--seed", "1", "--output", str(out)]) == 0
    assert Image.open(out).size == (48, 32) and "Depth map: estimated" in read_parameters(out)
    sd = runtime.load(tiny_sd2_depth, engines_dir=engines)
    given = sd.depth2img("a cat", str(init), depth_map=str(init), steps=3, seed=1)
    assert "Depth map: given" in given.infotexts[0]

    low = _save_test_image(tmp_path / "low.png", 16, 16)
    out = tmp_path / "up.png"
    argv = ["--quiet", "upscale", "--model", str(tiny_x4_upscaler), "--engines", str(engines), "--prompt", "a cat"]
    assert (
        cli.main([*argv, "--init-image", str(low), "--steps", "3", "--noise-level", "30", "--output", str(out)]) == 0
    )
    assert Image.open(out).size == (64, 64) and "Noise level: 30" in read_parameters(out)


def test_modes_refuse_the_wrong_model(tiny_x4_upscaler, tiny_sd1, engines, tmp_path, capsys):
    init = _save_test_image(tmp_path / "init.png", 32, 32)
    out = tmp_path / "x.png"
    base = ["--quiet", "txt2img", "--model", str(tiny_x4_upscaler), "--engines", str(engines), "--prompt", "a cat"]
    assert cli.main([*base, "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "error: txt2img does not run on an x4 upscaler (use upscale)"
    base = ["--quiet", "upscale", "--model", str(tiny_sd1), "--engines", str(engines), "--prompt", "a cat"]
    assert cli.main([*base, "--init-image", str(init), "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "error: upscale does not run on a regular model"
    assert not out.exists()
