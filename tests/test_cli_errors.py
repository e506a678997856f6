"""Bad input through the CLI: one line on stderr, exit status 2, and no output file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import cli
from tests.conftest import needs_torch

pytestmark = needs_torch


@pytest.fixture(scope="module")
def artifacts(tiny_sd1, shared_engines):
    """The session's export of the tiny sd1 checkpoint (read only: tests that break it work on a copy)."""
    from export import export_model

    return export_model(tiny_sd1, shared_engines, progress=False)


def run_cli(capsys, *argv):
    code = cli.main(["--quiet", *argv])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def txt2img_args(model, out, *extra):
    return [
        "txt2img",
        "--model",
        str(model),
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--seed",
        "1",
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        str(out),
        *extra,
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--width", "36"], "width must be a multiple of 8, not 36"),
        (["--height", "30"], "height must be a multiple of 8, not 30"),
        (["--steps", "0"], "steps must be between 1 and"),
        (["--batch-size", "0"], "batch size must be between 1 and"),
        (["--cfg-scale", "nan"], "cfg scale must be a number"),
        (["--sampler", "Euler b"], "unknown sampler"),
        (["--seed", "-2"], "seed must be -1 (random) or between 0 and"),
    ],
)
def test_bad_request(capsys, artifacts, tmp_path, extra, message):
    out = tmp_path / "x.png"
    code, err = run_cli(capsys, *txt2img_args(artifacts, out, *extra))
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not out.exists()


def test_unknown_sampler_lists_valid_ones(capsys, artifacts, tmp_path):
    code, err = run_cli(capsys, *txt2img_args(artifacts, tmp_path / "x.png", "--sampler", "nope"))
    assert code == 2
    for name in ("DDIM", "Euler a", "DPM++ 2M"):
        assert name in err


def test_missing_model_part(capsys, tiny_sd1, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd1, broken)
    shutil.rmtree(broken / "unet")
    code, err = run_cli(capsys, *txt2img_args(broken, tmp_path / "x.png", "--engines", str(tmp_path / "e")))
    assert code == 2 and "unet" in err and len(err.splitlines()) == 1


def test_missing_model(capsys, tmp_path):
    code, err = run_cli(capsys, *txt2img_args(tmp_path / "nothing-here", tmp_path / "x.png"))
    assert code == 2 and "not found" in err


def test_hub_id_not_cached(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    code, err = run_cli(capsys, *txt2img_args("someone/some-model", tmp_path / "x.png"))
    assert code == 2 and "`hf download someone/some-model`" in err and len(err.splitlines()) == 1
    assert str(tmp_path / "hub") in err  # where it looked


def test_corrupt_onnx_in_artifact_folder(capsys, artifacts, tmp_path):
    broken = tmp_path / "artifacts"
    shutil.copytree(artifacts, broken)
    unet = broken / "onnx" / "unet.onnx"
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 3])
    out = tmp_path / "x.png"
    code, err = run_cli(capsys, *txt2img_args(broken, out))
    assert code == 2 and "unet" in err and "re-export" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_corrupt_onnx_from_checkpoint_is_rebuilt(capsys, tiny_sd1, artifacts, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(artifacts, engines / artifacts.name)
    unet = engines / artifacts.name / "onnx" / "unet.onnx"
    unet.write_bytes(b"not an onnx model")
    out = tmp_path / "x.npy"
    code, err = run_cli(capsys, *txt2img_args(tiny_sd1, out, "--engines", str(engines)))
    assert code == 0, err
    assert np.load(out).shape == (1, 32, 32, 3)
    assert unet.stat().st_size > 1000  # exported again


def test_output_folder_missing(capsys, artifacts, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "x.png"
    code, err = run_cli(capsys, *txt2img_args(artifacts, out))
    assert code == 2 and "does not exist" in err
    assert not out.parent.exists()


def test_unknown_output_format(capsys, artifacts, tmp_path):
    code, err = run_cli(capsys, *txt2img_args(artifacts, tmp_path / "x.gif"))
    assert code == 2 and ".gif" in err
    assert list(tmp_path.iterdir()) == []


def test_nan_image_is_an_error(capsys, artifacts, tmp_path, monkeypatch):
    from runtime.backends.onnxruntime import OnnxRuntimeSession

    original = OnnxRuntimeSession.run

    def nan_vae(self, feeds, outputs=None):
        result = original(self, feeds, outputs)
        if self.component == "vae_decoder":
            result["image"][:, :, :2] = np.nan
        return result

    monkeypatch.setattr(OnnxRuntimeSession, "run", nan_vae)
    out = tmp_path / "x.png"
    code, err = run_cli(capsys, *txt2img_args(artifacts, out))
    assert code == 2 and "NaN" in err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def pickle_checkpoint(tiny_sd1, tmp_path_factory):
    """The tiny checkpoint re-saved with .bin (pickle) weights only."""
    import diffusers

    folder = tmp_path_factory.mktemp("pickled") / "tiny-bin"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    pipe.save_pretrained(folder, safe_serialization=False)
    shutil.rmtree(folder / "tokenizer")
    shutil.copytree(tiny_sd1 / "tokenizer", folder / "tokenizer")
    for path in folder.rglob("*.safetensors"):  # transformers 5 writes safetensors whatever it is asked
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(path), path.with_name(path.stem.replace("model", "pytorch_model") + ".bin"))
        path.unlink()
    assert not list(folder.rglob("*.safetensors"))
    return folder


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_pickle_weights_need_opt_in(capsys, pickle_checkpoint, tmp_path, backend):
    out = tmp_path / "x.npy"
    argv = txt2img_args(pickle_checkpoint, out, "--backend", backend, "--engines", str(tmp_path / "e"))
    code, err = run_cli(capsys, *argv)
    assert code == 2 and ".bin (pickle)" in err and "--allow-pickle" in err and len(err.splitlines()) == 1
    assert not out.exists()
    code, err = run_cli(capsys, *argv, "--allow-pickle")
    assert code == 0, err
    assert np.load(out).shape == (1, 32, 32, 3)
