"""Tiled VAE decode and encode against diffusers' AutoencoderKL with `enable_tiling()` on the same checkpoint.

The tiny checkpoint's VAE has sample_size 64 (a tile of 64 pixels, 32 latent pixels), so an 80x144 image runs in
2 x 3 overlapping tiles with cut-short edge tiles on both sides. diffusers is the reference for the tiled output
(vae.enable_tiling()) and for the untiled one (its default); the auto rule and the memory estimate are checked on
SD 1.5's shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import InvalidRequestError
from runtime.memory import SD15_FACTS, estimate
from runtime.vae_tiling import (
    VaeTiles,
    blend_columns,
    blend_rows,
    check_vae_tiling,
    model_tiles,
    tiles_of,
    use_tiling,
)
from tests.conftest import needs_torch

HEIGHT, WIDTH = 80, 144  # pixels; the tiny VAE's scale factor is 2: latents 40 x 72
SD15_INFO = {"vae_scale_factor": 8, "unet_sample_size": 64, "memory": SD15_FACTS}
GIB = 2**30


@pytest.fixture(scope="module")
def models(tiny_sd1, shared_engines):
    """sdrt's tiny SD 1 (onnxruntime) and diffusers' AutoencoderKL of the same folder."""
    import torch
    from diffusers import AutoencoderKL

    import runtime

    sd = runtime.load(tiny_sd1, engines_dir=shared_engines)
    vae = AutoencoderKL.from_pretrained(tiny_sd1, subfolder="vae").eval()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield sd, vae
    torch.set_num_threads(before)


def reference_decode(vae, latents: np.ndarray, tiling: bool) -> np.ndarray:
    import torch

    vae.enable_tiling() if tiling else vae.disable_tiling()
    scaled = torch.from_numpy(latents / np.float32(vae.config.scaling_factor))
    with torch.no_grad():
        image = vae.decode(scaled).sample.numpy()  # [B, 3, H, W]
    return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def reference_encode(vae, images: np.ndarray, seed: int, tiling: bool) -> np.ndarray:
    import torch

    vae.enable_tiling() if tiling else vae.disable_tiling()
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(images)).latent_dist
        return (
            posterior.sample(generator=torch.Generator("cpu").manual_seed(seed)) * vae.config.scaling_factor
        ).numpy()


def decode(sd, latents: np.ndarray, tiling: bool | None) -> np.ndarray:
    from runtime.pipelines.common import decode_latents

    sd.vae_tiling = tiling
    try:
        return decode_latents(sd, latents)
    finally:
        sd.vae_tiling = None


def encode(sd, images: np.ndarray, seed: int, tiling: bool | None) -> np.ndarray:
    from runtime.pipelines.common import encode_images
    from runtime.rng import TorchGenerator

    sd.vae_tiling = tiling
    try:
        return encode_images(sd, images, [TorchGenerator(seed)])
    finally:
        sd.vae_tiling = None


@needs_torch
def test_tiles_are_diffusers_tiles(models):
    sd, vae = models
    assert model_tiles(sd) == VaeTiles(vae.tile_sample_min_size, vae.tile_latent_min_size) == VaeTiles(64, 32)


def test_tiles_come_from_the_checkpoint_when_the_manifest_lacks_them(tmp_path):
    """A manifest without vae_sample_size: the source checkpoint's vae/config.json, kept in the model's info."""
    import json
    from types import SimpleNamespace

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"sample_size": 768}))
    manifest = SimpleNamespace(source={"path": str(tmp_path)})
    model = SimpleNamespace(info=dict(SD15_INFO), backend=SimpleNamespace(manifest=manifest))
    assert model_tiles(model) == VaeTiles(768, 96) and model.info["vae_sample_size"] == 768
    gone = SimpleNamespace(info=dict(SD15_INFO), backend=SimpleNamespace(manifest=SimpleNamespace(source={})))
    assert model_tiles(gone) == VaeTiles(512, 64)  # derived: the UNet's sample size x the VAE scale factor


@needs_torch
def test_tiled_decode_matches_diffusers_tiled(models):
    sd, vae = models
    latents = np.random.default_rng(0).standard_normal((2, 4, HEIGHT // 2, WIDTH // 2)).astype(np.float32)
    tiled = decode(sd, latents, True)
    expected = reference_decode(vae, latents, tiling=True)
    untiled = reference_decode(vae, latents, tiling=False)
    assert tiled.shape == expected.shape == (2, HEIGHT, WIDTH, 3)
    np.testing.assert_allclose(tiled, expected, rtol=1e-5, atol=2e-6)
    assert np.abs(expected - untiled).max() > 1e-2  # the tiles show: this comparison tells the paths apart


@needs_torch
def test_untiled_decode_is_unchanged(models):
    sd, vae = models
    latents = np.random.default_rng(1).standard_normal((1, 4, HEIGHT // 2, WIDTH // 2)).astype(np.float32)
    expected = reference_decode(vae, latents, tiling=False)
    for tiling in (None, False):  # auto: the tiny VAE's untiled estimate is far under the threshold
        np.testing.assert_allclose(decode(sd, latents, tiling), expected, rtol=1e-5, atol=2e-6)


@needs_torch
def test_tiled_encode_matches_diffusers_tiled(models):
    sd, vae = models
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH] / 16.0
    image = np.stack([np.sin(x + y), np.cos(x * 0.7 - y), np.sin(x * y / 8)])[None].astype(np.float32)  # in [-1, 1]
    tiled = encode(sd, image, 7, True)
    expected = reference_encode(vae, image, 7, tiling=True)
    untiled = reference_encode(vae, image, 7, tiling=False)
    assert tiled.shape == expected.shape == (1, 4, HEIGHT // 2, WIDTH // 2)
    np.testing.assert_allclose(tiled, expected, rtol=1e-5, atol=2e-6)
    assert np.abs(expected - untiled).max() > 1e-3
    for tiling in (None, False):
        np.testing.assert_allclose(encode(sd, image, 7, tiling), untiled, rtol=1e-5, atol=2e-6)


@needs_torch
@pytest.mark.parametrize("short", [3, 16])
def test_blends_match_diffusers(models, short):
    """Tiles shorter than the blend (the edge of an image) blend over their whole extent, as diffusers' do."""
    import torch

    _, vae = models
    rng = np.random.default_rng(short)
    above, tile = rng.standard_normal((2, 1, 3, 20, 9)).astype(np.float32)
    tile = np.ascontiguousarray(tile[:, :, :short])
    expected = vae.blend_v(torch.from_numpy(above), torch.from_numpy(tile.copy()), 8).numpy()
    blend_rows(above, tile, 8)
    np.testing.assert_array_equal(tile, expected)
    left, tile = rng.standard_normal((2, 1, 3, 9, 20)).astype(np.float32)
    tile = np.ascontiguousarray(tile[..., :short])
    expected = vae.blend_h(torch.from_numpy(left), torch.from_numpy(tile.copy()), 8).numpy()
    blend_columns(left, tile, 8)
    np.testing.assert_array_equal(tile, expected)


def test_auto_tiles_only_large_images():
    tiles = tiles_of(SD15_INFO)
    assert tiles == VaeTiles(512, 64)  # SD 1.5's VAE config: sample_size 512, 4 levels
    for side, auto in ((512, False), (768, False), (1024, True), (2048, True)):
        assert use_tiling(SD15_INFO, tiles, side // 8, side // 8) is auto, side
        assert use_tiling(SD15_INFO, tiles, side // 8, side // 8, False) is False
        assert use_tiling(SD15_INFO, tiles, side // 8, side // 8, True) is (side > 512)  # as enable_tiling()
    assert use_tiling(SD15_INFO, tiles, 64, 72, threshold=0)  # one side past a tile is enough
    assert not use_tiling(SD15_INFO, tiles, 64, 64, threshold=0)


def test_memory_estimate_follows_tiling():
    tiled = estimate(SD15_INFO, 2048, 2048, images=1, rows=2)
    untiled = estimate(SD15_INFO, 2048, 2048, images=1, rows=2, vae_tiling=False)
    native = estimate(SD15_INFO, 512, 512, images=1, rows=2)
    assert untiled.vae > 40 * GIB  # the mid-block attention over 256 x 256 latent pixels alone is 20 GiB
    assert native.vae < tiled.vae < native.vae + 0.5 * GIB  # one 512x512 tile plus the whole image's copies
    assert estimate(SD15_INFO, 2048, 2048, images=1, rows=2, vae_tiling=True).vae == tiled.vae
    assert (
        estimate(SD15_INFO, 768, 768, images=1, rows=2).vae
        == estimate(SD15_INFO, 768, 768, images=1, rows=2, vae_tiling=False).vae
    )  # auto leaves 768x768 untiled
    forced = estimate(SD15_INFO, 768, 768, images=1, rows=2, vae_tiling=True)
    assert forced.vae < estimate(SD15_INFO, 768, 768, images=1, rows=2).vae


def test_vae_tiling_option_is_checked():
    assert [check_vae_tiling(v) for v in (None, True, False)] == [None, True, False]
    with pytest.raises(InvalidRequestError, match="vae_tiling must be true, false or unset"):
        check_vae_tiling("yes")
    with pytest.raises(InvalidRequestError, match="not 1"):
        check_vae_tiling(1)


@needs_torch
def test_cli_and_admission_follow_the_option(models, tiny_sd1, tmp_path, capsys):
    """`--vae-tiling on|off` gives the image of the API with vae_tiling True|False (the tiled one is diffusers' with
    enable_tiling(), above), and admission estimates the VAE as that option tiles it."""
    import cli
    from runtime.admission import admit
    from runtime.request import Txt2ImgRequest

    sd, _ = models
    options = dict(prompt="a cat", steps=1, seed=3, width=WIDTH, height=HEIGHT)
    estimates = {}
    for flag, tiling in (("on", True), ("off", False)):
        sd.vae_tiling = tiling
        try:
            expected = sd.txt2img(**options).images
            request = Txt2ImgRequest(**options)
            estimates[flag] = admit(sd, request, record=False).estimate.vae
        finally:
            sd.vae_tiling = None
        out = tmp_path / f"{flag}.npy"
        argv = ["--quiet", "txt2img", "--model", str(tiny_sd1), "--prompt", "a cat", "--steps", "1", "--seed", "3"]
        argv += ["--width", str(WIDTH), "--height", str(HEIGHT), "--vae-tiling", flag, "--output", str(out)]
        assert cli.main(argv) == 0, capsys.readouterr().err
        np.testing.assert_array_equal(np.load(out), expected)
    assert estimates["on"] < estimates["off"]  # the tiled VAE's estimate is one tile's, not the whole image's
