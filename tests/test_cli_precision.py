"""`precision`: load(precision=) and --precision refuse what a backend does not offer, in one line and before any
work (a model path that does not exist is never looked at); a precision other than fp32 is named in the infotext."""

from __future__ import annotations

import importlib.util

import pytest

import cli
from tests.conftest import needs_torch

HAS_SERVE = importlib.util.find_spec("fastapi") is not None and importlib.util.find_spec("uvicorn") is not None
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed (openvino extra)")

REFUSED = [
    ("onnxruntime", "bf16", "the onnxruntime backend computes in fp32 or int8, not precision 'bf16'"),
    ("onnxruntime", "fp8", "the onnxruntime backend computes in fp32 or int8, not precision 'fp8'"),
    pytest.param("openvino", "int8", "the openvino backend computes in fp32 or bf16, not precision 'int8'",
                 marks=needs_openvino),
    pytest.param("torch", "bf16", "the torch backend computes in fp32, not precision 'bf16'", marks=needs_torch),
]  # fmt: skip


@pytest.mark.parametrize(("backend", "precision", "message"), REFUSED)
def test_load_refuses(tmp_path, backend, precision, message):
    import runtime
    from runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError) as caught:
        runtime.load(tmp_path / "no-model", backend=backend, precision=precision)
    assert str(caught.value) == message


def test_gpu_backend_points_at_its_fp16_export(monkeypatch):
    from runtime import backends
    from runtime.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"tensorrt backend computes in fp32, .* `export --precision fp16`"):
        backends.check_precision("tensorrt", "fp16")


def run_cli(capsys, *argv) -> tuple[int, list[str]]:
    code = cli.main(["--quiet", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("command", ["txt2img", "img2img", "inpaint", "depth2img", "upscale", "outpaint"])
def test_generation_commands_refuse(capsys, tmp_path, command):
    out = tmp_path / "out.png"
    extra = {"img2img": ["--init-image", "x.png"], "inpaint": ["--init-image", "x.png", "--mask", "m.png"],
             "depth2img": ["--init-image", "x.png"], "upscale": ["--init-image", "x.png"],
             "outpaint": ["--init-image", "x.png", "--extend", "8,8,0,0"]}.get(command, [])  # fmt: skip
    argv = [command, "--model", str(tmp_path / "no-model"), "--prompt", "a cat", "--output", str(out), *extra]
    code, lines = run_cli(capsys, *argv, "--backend", "onnxruntime", "--precision", "bf16")
    assert code == 2 and lines == ["error: the onnxruntime backend computes in fp32 or int8, not precision 'bf16'"]
    assert not out.exists()


@pytest.mark.skipif(not HAS_SERVE, reason="serve needs fastapi and uvicorn (serve extra)")
def test_serve_refuses_before_loading(capsys, tmp_path):
    code, lines = run_cli(capsys, "serve", "--model", str(tmp_path / "no-model"), "--precision", "fp16")
    assert code == 2 and lines == ["error: the onnxruntime backend computes in fp32 or int8, not precision 'fp16'"]


@needs_torch
def test_precision_in_infotext(tiny_sd1, shared_engines):
    """The infotext names a precision other than fp32 (the pipeline here computes in fp32: only the key is
    checked), and none for fp32."""
    import runtime
    from runtime.api import StableDiffusion

    model = runtime.load(tiny_sd1, engines_dir=shared_engines)
    labelled = StableDiffusion(model.name, model.key, model.info, model.tokenizer, model.backend, False, "bf16")
    options = dict(steps=1, seed=1, width=32, height=32)
    assert "Backend: onnxruntime, Precision: bf16," in labelled.txt2img("a cat", **options).infotexts[0]
    assert "Precision" not in model.txt2img("a cat", **options).infotexts[0]
