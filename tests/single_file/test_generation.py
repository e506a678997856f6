"""sdrt on single files: the same images as from the diffusers folder; A1111 hashes in the infotext; the SD 2
v-prediction probe; inpainting models; VAE overrides (equal to diffusers with the VAE swapped); pickled checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import needs_torch
from tests.runtime.test_txt2img_parity import assert_parity, reference_images

pytestmark = needs_torch

PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry, low quality"
OPTIONS = dict(negative_prompt=NEGATIVE, steps=4, cfg_scale=6.0, seed=1234, width=48, height=32, sampler="Euler")


def _txt2img(model, engines, backend="torch", batch=1, **load_options):
    import runtime

    sd = runtime.load(model, backend=backend, engines_dir=engines, **load_options)
    return sd, sd.txt2img(PROMPT, batch_size=batch, **OPTIONS)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and b.std() > 0.01
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_sd1_single_file_equals_folder(tiny_models, tmp_path):
    folder, single_file = tiny_models("sd1")
    _, expected = _txt2img(folder, tmp_path, batch=2)
    sd, result = _txt2img(single_file, tmp_path, batch=2)
    _assert_same(result.images, expected.images)
    assert sd.info["prediction_type"] == "epsilon" and sd.info["unet_in_channels"] == 4
    assert f"Model hash: {_sha256(single_file)[:10]}, Model: {single_file.stem}," in result.infotexts[0]
    assert "VAE hash" not in result.infotexts[0]


def test_sd2_v_single_file_equals_folder(tiny_models, tmp_path):
    folder, single_file = tiny_models("sd2-v")
    _, expected = _txt2img(folder, tmp_path)
    sd, result = _txt2img(single_file, tmp_path, prediction_type="v_prediction")
    _assert_same(result.images, expected.images)
    assert sd.info["prediction_type"] == "v_prediction" and sd.info["source"]["prediction_type_from"] == "given"
    assert sd.info["text_hidden_size"] == 64 and sd.info["variant"] == "sd-v"


def test_sd2_probe_follows_a1111(tiny_models, tmp_path):
    """Without an override, SD 2 is probed as A1111 does; the test runs A1111's rule on the original UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from runtime.single_file import prepare_checkpoint

    folder, single_file = tiny_models("sd2-v")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x = torch.ones((1, 4, 8, 8)) * 0.5
    with torch.no_grad():
        out = unet(x, torch.asarray([999]), encoder_hidden_states=torch.ones((1, 2, 64)) * 0.5).sample
    expected = "v_prediction" if (out - x).mean().item() < -1 else "epsilon"
    converted = prepare_checkpoint(single_file, tmp_path)
    source = json.loads((converted / "sdrt_source.json").read_text())
    assert (source["prediction_type"], source["prediction_type_from"]) == (expected, "probe")
    scheduler = json.loads((converted / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == expected


def test_inpainting_single_file(tiny_models, tmp_path):
    from PIL import Image

    folder, single_file = tiny_models("sd1-inpaint")
    image = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), ((8, 8), (16, 16))))
    results = []
    for model in (folder, single_file):
        import runtime

        sd = runtime.load(model, backend="torch", engines_dir=tmp_path)
        assert sd.info["unet_in_channels"] == 9 and sd.info["pipeline_class"] == "StableDiffusionInpaintPipeline"
        results.append(sd.inpaint(PROMPT, image, mask, strength=1.0, **OPTIONS).images)
    _assert_same(results[1], results[0])


@pytest.fixture(scope="module")
def other_vae(tiny_models, tmp_path_factory):
    """Another random VAE: as an LDM file (`encoder.*`, as VAE files are shared), as a diffusers-layout file, and
    the sd1 folder with it swapped in (what diffusers runs as the reference)."""
    import torch
    from safetensors.numpy import save_file

    from tests.single_file.ldm import ldm_vae, make_vae

    folder, _ = tiny_models("sd1")
    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(7)
    vae = make_vae()
    weights = {k: v.numpy() for k, v in vae.state_dict().items()}
    ldm_file, diffusers_file = root / "other-vae.safetensors", root / "other-vae-diffusers.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in ldm_vae(weights, dict(vae.config), prefix="").items()}, ldm_file)
    save_file(weights, diffusers_file)
    swapped = root / "tiny-sd1-other-vae"
    shutil.copytree(folder, swapped, ignore=shutil.ignore_patterns("vae"))
    vae.save_pretrained(swapped / "vae", safe_serialization=True)
    return ldm_file, diffusers_file, swapped


@pytest.mark.slow
def test_vae_override_equals_diffusers_with_the_vae_swapped(tiny_models, other_vae, tmp_path):
    folder, single_file = tiny_models("sd1")
    ldm_file, diffusers_file, swapped = other_vae
    reference = reference_images(swapped, "Euler", "default", batch=1, steps=OPTIONS["steps"])
    _, plain = _txt2img(single_file, tmp_path)
    for model, vae in ((single_file, ldm_file), (folder, diffusers_file)):
        sd, result = _txt2img(model, tmp_path, vae=vae)
        assert_parity(result.images, reference)
        assert f"VAE hash: {_sha256(vae)[:10]}, VAE: {vae.stem}," in result.infotexts[0]
        assert np.abs(result.images - plain.images).max() > 0.05  # the VAE really changed the image


def test_vae_that_does_not_fit_is_refused(tiny_models, tmp_path):
    from safetensors.numpy import save_file

    from runtime.errors import ModelError

    folder, single_file = tiny_models("sd1")
    vae = tmp_path / "wrong-vae.safetensors"
    save_file({"decoder.conv_in.weight": np.zeros((64, 8, 3, 3), np.float32)}, vae)
    engines = tmp_path / "engines"
    for model in (single_file, folder):
        with pytest.raises(ModelError, match="does not fit"):
            _txt2img(model, engines, vae=vae)
    assert not engines.exists()


class _RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _torch_save(path, state: dict, **extra) -> None:
    import torch

    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    torch.save({"state_dict": tensors, "global_step": np.int64(470000), "epoch": 3, **extra}, path)


def test_malicious_pickle_is_refused_without_running(tiny_models, tmp_path):
    import torch

    from runtime.errors import ModelError

    marker = tmp_path / "marker"
    evil = tmp_path / "evil.ckpt"
    _torch_save(evil, {"model.diffusion_model.out.2.bias": np.zeros(4, np.float32)}, payload=_RunsCode(marker))
    engines = tmp_path / "engines"
    with pytest.raises(ModelError, match="pickle"):
        _txt2img(evil, engines)
    with pytest.raises(ModelError, match="system.*refused"):
        _txt2img(evil, engines, allow_pickle=True)
    assert not marker.exists() and not engines.exists()
    torch.load(evil, weights_only=False)  # the file really runs code when unpickled the usual way
    assert marker.exists()


def _lightning_callback(monkeypatch):
    """A stand-in for pytorch_lightning's ModelCheckpoint, pickled under its real name as Lightning saves it."""
    import sys
    import types

    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.best_model_path = None, "/logs/last.ckpt"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    return ModelCheckpoint()


@pytest.mark.slow
def test_benign_ckpt_equals_safetensors(tiny_models, tmp_path, monkeypatch):
    """A Lightning-style checkpoint (state_dict, numpy global_step, a callback object) reads with allow_pickle."""
    from tests.single_file.ldm import single_file_state

    folder, single_file = tiny_models("sd1")
    ckpt = tmp_path / "tiny-sd1.ckpt"
    _torch_save(ckpt, single_file_state(folder), callbacks={"ModelCheckpoint": _lightning_callback(monkeypatch)})
    _, expected = _txt2img(single_file, tmp_path)
    sd, result = _txt2img(ckpt, tmp_path, allow_pickle=True)
    _assert_same(result.images, expected.images)
    assert f"Model hash: {_sha256(ckpt)[:10]}, Model: tiny-sd1," in result.infotexts[0]


@pytest.mark.slow
def test_depth_and_upscaler_single_files(tiny_models, tmp_path):
    """SD 2 depth (5 channels; single files carry no usable depth estimator, so a depth map is given) and the x4
    upscaler (7 channels, noise-level class labels, a 3-level VAE): the same images as from the folders."""
    from PIL import Image

    import runtime

    rng = np.random.default_rng(3)
    image = Image.fromarray((rng.random((32, 48, 3)) * 255).astype(np.uint8))
    depth = rng.random((32, 48)).astype(np.float32)
    small = image.resize((12, 8))
    options = {k: v for k, v in OPTIONS.items() if k not in ("width", "height")}
    for variant, run in (
        ("sd2-depth", lambda sd: sd.depth2img(PROMPT, image, depth_map=depth, strength=0.8, **OPTIONS)),
        ("x4-upscaler", lambda sd: sd.upscale(PROMPT, small, noise_level=30, **options)),
    ):
        folder, single_file = tiny_models(variant)
        expected = run(runtime.load(folder, backend="torch", engines_dir=tmp_path)).images
        sd = runtime.load(single_file, backend="torch", engines_dir=tmp_path)
        assert sd.info["variant"] == {"sd2-depth": "depth", "x4-upscaler": "upscale-x4"}[variant]
        _assert_same(run(sd).images, expected)
