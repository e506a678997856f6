"""What a new user meets first: help text, global options in either place, the artifact cache commands and the
messages for a model that is not where they said."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest

import cli
from tests.conftest import needs_torch


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_has_help_and_defaults_are_shown():
    for name, parser in subcommands().items():
        for action in parser._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    text = subcommands()["txt2img"].format_help()
    for shown in ("sampling steps (default: 20)", "(default: DPM++ 2M Karras)", "(default: 1)", "native size"):
        assert shown in " ".join(text.split()), shown
    tiny = " ".join(subcommands()["tiny-model"].format_help().split())
    for variant in ("sd1", "sd2-v", "sd15-shaped", "sd1-inpaint", "sd2-depth", "x4-upscaler", "sdxl"):
        assert variant in tiny


@pytest.mark.parametrize(
    "argv",
    [["--quiet", "txt2img", "--model", "m", "--prompt", "p"], ["txt2img", "--model", "m", "--prompt", "p", "--quiet"]],
)
def test_quiet_before_or_after_the_subcommand(argv):
    assert cli.build_parser().parse_args(argv).quiet is True


def test_not_quiet_by_default():
    assert cli.build_parser().parse_args(["samplers"]).quiet is False


@needs_torch
def test_quiet_after_the_subcommand_silences_the_torch_backend(tiny_sd1, tmp_path, capfd):
    """No progress bar (sdrt's or the libraries' weight loading) and no log line: only the result line."""
    out = tmp_path / "x.npy"
    argv = ["txt2img", "--model", str(tiny_sd1), "--prompt", "a cat", "--steps", "2", "--width", "32", "--height",
            "32", "--seed", "1", "--backend", "torch", "--output", str(out), "--quiet"]  # fmt: skip
    capfd.readouterr()
    assert cli.main(argv) == 0
    captured = capfd.readouterr()
    assert captured.err == ""
    assert captured.out.startswith(f"wrote {out}") and np.load(out).shape == (1, 32, 32, 3)


def test_cache_list_and_clear(tmp_path, capsys):
    engines = tmp_path / "engines"
    for entry in ("tiny-0123456789", "other-abcdef0123", "single-file/model-0123456789-sd1",
                  "upscalers/4x-ultra-0123456789"):  # fmt: skip
        (engines / entry / "onnx").mkdir(parents=True)
        (engines / entry / "onnx" / "unet.onnx").write_bytes(b"\0" * 2**20)
    (engines / "tiny-0123456789" / "manifest.json").write_text("{}")
    (engines / "upscalers" / "hashes.json").write_text("{}")  # the upscaler files' hash cache: not an entry
    (engines / "notes.txt").write_text("not an artifact")
    (engines / "my-folder").mkdir()

    assert cli.main(["cache", "list", "--engines", str(engines)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines[:-1]] == [
        "other-abcdef0123", "single-file/model-0123456789-sd1", "tiny-0123456789", "upscalers/4x-ultra-0123456789"
    ]  # fmt: skip
    assert "(unfinished export)" in lines[0] and "(single file)" in lines[1] and "(export)" in lines[2]
    assert "(upscaler)" in lines[3]
    assert lines[0].split()[0] == "1.0" and lines[-1].startswith("4 entries, 4.0 MiB in ")

    assert cli.main(["cache", "clear", "tiny-0123456789", "--engines", str(engines), "--quiet"]) == 0
    assert not (engines / "tiny-0123456789").exists() and (engines / "other-abcdef0123").exists()
    assert cli.main(["cache", "clear", "nope-0123456789", "--engines", str(engines)]) == 2
    assert "no cache entry named nope-0123456789" in capsys.readouterr().err
    assert cli.main(["cache", "clear", "--engines", str(engines)]) == 0
    assert sorted(p.name for p in engines.iterdir()) == ["my-folder", "notes.txt", "upscalers"]  # only artifacts go
    assert [p.name for p in (engines / "upscalers").iterdir()] == ["hashes.json"]


def test_cache_uses_sdrt_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDRT_HOME", str(tmp_path / "home"))
    assert cli.main(["cache", "list"]) == 0
    assert capsys.readouterr().out.strip() == f"0 entries, 0.0 MiB in {tmp_path / 'home' / 'engines'}"


def run_error(capsys, *argv) -> str:
    code = cli.main(["--quiet", "txt2img", "--prompt", "a cat", "--output", "x.png", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_mistyped_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    err = run_error(capsys, "--model", "models/nope")
    assert f"there is no folder {tmp_path / 'models' / 'nope'}" in err and "(models/ holds: tiny)" in err
    assert "download" not in err


def test_hub_id_names_the_folder_then_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    err = run_error(capsys, "--model", "someone/model")
    folder, cache, advice = (err.index(s) for s in ("no folder", str(tmp_path / "hub"), "`hf download someone/model`"))
    assert folder < cache < advice  # in the order a user checks


def test_missing_single_file_is_named_before_a_missing_vae(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = run_error(capsys, "--model", "x.safetensors", "--vae", "vae.safetensors")
    assert "single-file checkpoint x.safetensors not found" in err and "vae" not in err.lower()


@needs_torch
def test_missing_vae_of_a_present_model(tiny_sd1, tmp_path, capsys):
    err = run_error(capsys, "--model", str(tiny_sd1), "--vae", str(tmp_path / "vae.safetensors"))
    assert f"VAE file {tmp_path / 'vae.safetensors'} not found" in err


def test_gitignore_covers_the_readme_demo():
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    import subprocess

    paths = ["models/tiny/unet/config.json", "astronaut.png", "sdrt-output.png"]
    done = subprocess.run(["git", "check-ignore", *paths], cwd=root, capture_output=True, text=True)
    assert done.stdout.split() == paths
