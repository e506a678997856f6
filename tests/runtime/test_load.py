"""runtime.load: the artifact cache it uses, when it exports again (only for a broken artifact) and what it says."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import ArtifactError, BackendUnavailableError, ModelError
from tests.conftest import needs_torch

SMALL = dict(steps=2, width=32, height=32, seed=1)


def test_default_engines_dir_follows_sdrt_home(monkeypatch, tmp_path):
    from runtime.cache import default_engines_dir, engines_dir_or_default

    monkeypatch.setenv("SDRT_HOME", str(tmp_path / "home"))
    assert default_engines_dir() == tmp_path / "home" / "engines"
    monkeypatch.delenv("SDRT_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_engines_dir() == tmp_path / "xdg" / "sdrt" / "engines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert default_engines_dir() == tmp_path / "user" / ".cache" / "sdrt" / "engines"  # as HF_HOME's default
    assert engines_dir_or_default(tmp_path / "given") == tmp_path / "given"  # an explicit folder wins


@pytest.fixture(scope="module")
def sd1_artifact(tiny_sd1, shared_engines) -> Path:
    from export import export_model

    return export_model(tiny_sd1, shared_engines, progress=False)


@pytest.fixture()
def engines_copy(sd1_artifact, tmp_path) -> Path:
    """An engines folder holding a copy of the tiny sd1 export, free to break."""
    engines = tmp_path / "engines"
    shutil.copytree(sd1_artifact, engines / sd1_artifact.name)
    return engines


@pytest.fixture()
def fake_export(monkeypatch, sd1_artifact) -> list:
    """export.export_model replaced by a copy of the good export (the real re-export is tested through the CLI in
    tests/test_cli_errors.py); returns the list of the calls."""
    import export

    calls = []

    def export_model(checkpoint, engines_dir, force=False, progress=True, allow_pickle=False):
        calls.append(force)
        target = Path(engines_dir) / sd1_artifact.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(sd1_artifact, target)
        return target

    monkeypatch.setattr(export, "export_model", export_model)
    return calls


@needs_torch
def test_load_uses_sdrt_home_by_default(tiny_sd1, sd1_artifact, shared_engines, sdrt_home, capfd):
    """The session's $SDRT_HOME holds the export: loading without engines_dir finds it (nothing is written to the
    current folder), and the API prints nothing, no progress bar, unless asked."""
    import runtime

    assert shared_engines == sdrt_home / "engines" and sd1_artifact.parent == shared_engines
    before = sorted(p.name for p in Path.cwd().iterdir())
    capfd.readouterr()
    images = runtime.load(tiny_sd1).txt2img("a cat", **SMALL).images
    assert images.shape == (1, 32, 32, 3)
    assert capfd.readouterr().err == ""
    assert sorted(p.name for p in Path.cwd().iterdir()) == before


def corrupt(unet: Path, kind: str) -> None:
    data = unet.read_bytes()
    if kind == "truncated":
        unet.write_bytes(data[: len(data) // 3])
    else:  # the same size: only loading it can tell
        unet.write_bytes(bytes(len(data)))


@needs_torch
@pytest.mark.parametrize(
    ("kind", "found"),
    [("truncated", "bytes where its manifest says"), ("same size", "is not a loadable ONNX model")],
)
def test_broken_artifact_is_exported_again_with_one_warning(
    tiny_sd1, engines_copy, sd1_artifact, fake_export, caplog, kind, found
):
    import runtime

    corrupt(engines_copy / sd1_artifact.name / "onnx" / "unet.onnx", kind)
    with caplog.at_level(logging.INFO, logger="runtime.cache"):
        sd = runtime.load(tiny_sd1, engines_dir=engines_copy)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    (line,) = warnings
    assert "unet.onnx" in line and found in line and line.endswith(f"exporting {tiny_sd1} again"), line
    assert "re-export with --force" not in line  # it is being done, not advised
    assert len(fake_export) == 1
    assert np.isfinite(sd.txt2img("a cat", **SMALL).images).all()


@needs_torch
@pytest.mark.parametrize(
    "error", [BackendUnavailableError("no device"), ModelError("engine failed"), ArtifactError("broken file")]
)
def test_only_an_artifact_error_exports_again(tiny_sd1, engines_copy, fake_export, monkeypatch, error):
    """A backend, device or engine failure while opening the sessions is raised as it is: exporting again cannot
    fix it (issue 13). Only ArtifactError re-exports, once."""
    import runtime.api

    opened = []

    def open_backend(*args, **kwargs):
        opened.append(1)
        if len(opened) == 1:
            raise error
        return real_open(*args, **kwargs)

    real_open = runtime.api.open_backend
    monkeypatch.setattr(runtime.api, "open_backend", open_backend)
    if isinstance(error, ArtifactError):
        runtime.api.load(tiny_sd1, engines_dir=engines_copy)
        assert fake_export == [True] and len(opened) == 2
    else:
        with pytest.raises(type(error)):
            runtime.api.load(tiny_sd1, engines_dir=engines_copy)
        assert fake_export == [] and len(opened) == 1


@needs_torch
def test_missing_artifact_folder_is_exported_without_a_warning(tiny_sd1, tmp_path, fake_export, caplog):
    import runtime

    with caplog.at_level(logging.INFO, logger="runtime.cache"):
        runtime.load(tiny_sd1, engines_dir=tmp_path / "engines")
    assert fake_export == [False]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "first use" in caplog.text


def test_corrupt_onnx_file_raises_artifact_error(tmp_path):
    from runtime.backends.onnxruntime import OnnxRuntimeSession

    path = tmp_path / "unet.onnx"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="unet.onnx is not a loadable ONNX model"):
        OnnxRuntimeSession(path, "unet", ["CPUExecutionProvider"])


def test_unreadable_manifest_raises_artifact_error(tmp_path):
    from runtime.manifest import MANIFEST_NAME, read_manifest

    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        read_manifest(tmp_path)


@needs_torch
def test_progress_bars_when_asked_are_labelled_by_mode(tiny_sd1, sd1_artifact, capfd):
    from PIL import Image

    import runtime

    sd = runtime.load(tiny_sd1, progress=True)
    capfd.readouterr()
    sd.outpaint("a cat", Image.new("RGB", (32, 32), "gray"), extend=(8, 8, 0, 0), steps=2, seed=1)
    err = capfd.readouterr().err
    assert "outpaint:" in err and "inpaint:" not in err
