"""The CLI on single files: a generation through the default backend (ONNX Runtime, after an export of the converted
folder) with A1111's hashes in the PNG, and one-line errors (exit 2, nothing cached) for files that are not
Stable Diffusion 1.x/2.x checkpoints."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from safetensors.numpy import save_file

from cli import main
from tests.conftest import needs_torch

ARGS = ["--prompt", "a photo of a cat", "--steps", "3", "--seed", "5", "--width", "48", "--height", "32"]


def _run(capsys, model, engines, output, *extra) -> tuple[int, str]:
    code = main(["--quiet", "txt2img", "--model", str(model), "--engines", str(engines), "--output", str(output),
                 "--sampler", "Euler", *ARGS, *extra])  # fmt: skip
    return code, capsys.readouterr().err


@needs_torch
@pytest.mark.slow
def test_cli_single_file_onnxruntime(tiny_models, tmp_path, capsys):
    from PIL import Image

    import runtime
    from runtime.output import read_parameters

    folder, single_file = tiny_models("sd1")
    output, engines = tmp_path / "out.png", tmp_path / "engines"
    assert main(["--quiet", "export", "--model", str(single_file), "--engines", str(engines)]) == 0
    exported = [p for p in engines.iterdir() if (p / "manifest.json").is_file()]
    assert len(exported) == 1 and exported[0].name.startswith(f"{single_file.stem}-")
    code, err = _run(capsys, single_file, engines, output)  # reuses the export
    assert code == 0, err
    assert [p for p in engines.iterdir() if (p / "manifest.json").is_file()] == exported
    digest = hashlib.sha256(single_file.read_bytes()).hexdigest()
    assert f"Model hash: {digest[:10]}, Model: {single_file.stem}," in read_parameters(output)
    sd = runtime.load(folder, backend="torch")
    options = dict(steps=3, seed=5, width=48, height=32, sampler="Euler")
    expected = sd.txt2img("a photo of a cat", **options).images[0]
    image = np.asarray(Image.open(output).convert("RGB"), dtype=np.float64) / 255
    assert np.abs(image - expected).max() <= 2 / 255  # ONNX Runtime vs torch, then 8-bit rounding


def _sdxl_like() -> dict[str, np.ndarray]:
    zeros = np.zeros((4, 4), np.float32)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": np.zeros((320, 4, 3, 3), np.float32),
        "model.diffusion_model.label_emb.0.0.weight": zeros,
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": zeros,
        "conditioner.embedders.1.model.ln_final.weight": zeros[0],
    }


def _bad_file(kind: str, tmp_path, request) -> tuple[object, str]:
    """A file of the given kind and a part of the error line it must produce."""
    path = tmp_path / f"{kind}.safetensors"
    if kind == "truncated":  # a real single file cut in half (needs torch to build it)
        data = request.getfixturevalue("tiny_models")("sd1")[1].read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated"
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
        return path, "not a safetensors file"
    if kind == "unrelated":
        save_file({"linear.weight": np.ones((3, 3), np.float32)}, path)
        return path, "not a Stable Diffusion checkpoint"
    if kind == "sdxl":  # SDXL's layout with its text encoders cut short
        save_file(_sdxl_like(), path)
        return path, "the checkpoint is incomplete"
    if kind == "unknown-family":  # an SD 1.x text encoder with a 6-channel UNet
        unet = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((32, 6, 3, 3), np.float32)}
        save_file({**unet, "cond_stage_model.transformer.text_model.final_layer_norm.weight": np.ones(64)}, path)
        return path, "unknown model family"
    if kind == "pickle":
        path = tmp_path / "model.ckpt"
        path.write_bytes(b"PK\x03\x04 not really")
        return path, "--allow-pickle"
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    return path, "not a checkpoint file"


BAD_FILES = ["truncated", "random-bytes", "unrelated", "sdxl", "unknown-family", "pickle", "text"]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_cli_refuses_bad_files(kind, tmp_path, request, capsys):
    path, message = _bad_file(kind, tmp_path, request)
    capsys.readouterr()  # drop what building a tiny model printed
    engines, output = tmp_path / "engines", tmp_path / "out.png"
    code, err = _run(capsys, path, engines, output)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not engines.exists() and not output.exists()


def test_cli_rejects_a_vae_that_is_missing(tmp_path, capsys, tiny_models):
    _, single_file = tiny_models("sd1")
    code, err = _run(capsys, single_file, tmp_path / "engines", tmp_path / "o.png", "--vae", str(tmp_path / "no.pt"))
    assert code == 2 and "VAE file" in err and not (tmp_path / "engines").exists()
