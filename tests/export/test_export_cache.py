"""The artifact cache around export_model: reuse, force, new keys, atomic failure, and refusals."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import BackendUnavailableError, ModelError
from tests.conftest import needs_torch

pytestmark = needs_torch

OLD = 1_000_000_000  # an mtime (2001) that no write during the test can produce


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def age_files(folder: Path) -> None:
    for path in files_under(folder):
        os.utime(path, (OLD, OLD))


def leftovers(folder: Path) -> list[Path]:
    """Temporary files or work folders an export may leave behind."""
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_second_export_reuses_the_folder_untouched(sd1_export, engines_dir, caplog):
    from export import export_model

    age_files(sd1_export.artifact)
    with caplog.at_level(logging.INFO, logger="export.onnx_export"):
        again = export_model(sd1_export.source, engines_dir, progress=False)
    assert again == sd1_export.artifact
    assert all(p.stat().st_mtime == OLD for p in files_under(again))
    assert "reusing" in caplog.text


def change_one_tensor(checkpoint: Path) -> None:
    """Add 1 to one VAE weight, saved as safetensors again."""
    from safetensors.numpy import load_file, save_file

    path = checkpoint / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.float32(1)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_changed_source_failure_recovery_and_force(sd1_export, tmp_path, monkeypatch):
    """A changed weight gives a new key; a failure midway leaves no manifest and no temp files; force rewrites."""
    from export import export_model, onnx_export
    from runtime.checkpoint import fingerprint, model_key

    copy = shutil.copytree(sd1_export.source, tmp_path / sd1_export.source.name)
    assert model_key(copy, fingerprint(copy)) == sd1_export.artifact.name  # same files, same key
    change_one_tensor(copy)
    engines = tmp_path / "engines"

    real_export_component = onnx_export.export_component

    def fail_at_unet(spec, *args):
        if spec.name == "unet":
            raise RuntimeError("injected failure")
        return real_export_component(spec, *args)

    monkeypatch.setattr(onnx_export, "export_component", fail_at_unet)
    with pytest.raises(RuntimeError, match="injected"):
        export_model(copy, engines, progress=False)
    (folder,) = engines.iterdir()
    assert folder.name != sd1_export.artifact.name
    assert (folder / "onnx" / "text_encoder.onnx").is_file()  # written before the failure
    assert not (folder / "manifest.json").exists()
    assert leftovers(folder) == []

    monkeypatch.undo()
    assert export_model(copy, engines, progress=False) == folder
    assert (folder / "manifest.json").is_file()

    age_files(folder)
    assert export_model(copy, engines, force=True, progress=False) == folder
    assert all(p.stat().st_mtime != OLD for p in files_under(folder))
    assert leftovers(folder) == []


def test_missing_unet_is_a_model_error(tiny_sd1, tmp_path):
    from export import export_model

    copy = shutil.copytree(tiny_sd1, tmp_path / "broken", ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(ModelError, match="unet") as error:
        export_model(copy, tmp_path / "engines", progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "engines").exists()


def test_pickle_weights_are_refused_unless_allowed(tiny_sd1, tmp_path):
    import torch
    from safetensors.torch import load_file

    from export import export_model
    from export.onnx_export import load_module, weight_formats

    copy = shutil.copytree(tiny_sd1, tmp_path / "pickled")
    safetensors = copy / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(safetensors)), copy / "unet" / "diffusion_pytorch_model.bin")
    safetensors.unlink()
    with pytest.raises(ModelError, match="allow_pickle=True") as error:
        export_model(copy, tmp_path / "engines", progress=False)
    assert "\n" not in str(error.value)
    formats = weight_formats(copy, allow_pickle=True)
    assert formats == {"text_encoder": True, "unet": False, "vae": True}
    assert load_module("unet", copy, formats["unet"]).unet.config.in_channels == 4


def test_without_torch_export_says_what_to_install(tiny_sd1, tmp_path, monkeypatch):
    from export import export_model

    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(BackendUnavailableError, match=r"pip install"):
        export_model(tiny_sd1, tmp_path / "engines", progress=False)


def test_large_models_are_saved_with_external_data(tiny_sd1, tmp_path, monkeypatch):
    """The >2 GiB path, forced on the tiny VAE decoder: weights in vae_decoder.onnx.data, same numbers."""
    import onnxruntime as ort
    import torch

    from export import onnx_clean
    from export.onnx_export import export_component, load_module
    from export.specs import component_specs
    from runtime.checkpoint import describe_checkpoint

    monkeypatch.setattr(onnx_clean, "EXTERNAL_DATA_THRESHOLD", 0)
    spec = component_specs(describe_checkpoint(tiny_sd1))["vae_decoder"]
    module = load_module("vae_decoder", tiny_sd1, True)
    (tmp_path / "work").mkdir()
    info = export_component(spec, lambda: module, tmp_path, tmp_path / "work")
    model, data = tmp_path / info.file, tmp_path / "onnx" / "vae_decoder.onnx.data"
    assert data.stat().st_size > 10 * model.stat().st_size
    assert info.sha256 == hashlib.sha256(model.read_bytes() + data.read_bytes()).hexdigest()
    latent = np.random.default_rng(0).standard_normal((2, 4, 24, 16)).astype(np.float32)
    (image,) = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"latent": latent})
    with torch.no_grad():
        expected = module(torch.from_numpy(latent)).numpy()
    assert np.max(np.abs(image - expected)) <= 1e-4
