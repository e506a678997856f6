"""`cli.py check` (runtime/check.py): per-output errors against the fp32 reference, NaN/Inf flags, exit codes.

The passing case is ONNX Runtime's CPU provider on the fp16 export (fp16 vs fp32 with the same seeded inputs); the
failing cases perturb the candidate's outputs by a known amount, so the reported error is known independently.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch


class _Perturbed:
    """A stand-in session: the reference's own outputs, plus `offset` (or NaN) on one output."""

    def __init__(self, session, output: str, offset: float):
        self.session, self.output, self.offset = session, output, offset

    def run(self, feeds, outputs=None):
        values = self.session.run(feeds, outputs)
        values[self.output] = values[self.output] + np.float32(self.offset)
        return values


@needs_torch
def test_cli_check_fp16_onnxruntime_passes(sd1_fp32, sd1_fp16, capsys):
    import cli

    assert cli.main(["--quiet", "check", "--model", str(sd1_fp32), "--backend", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("text_encoder", "unet", "vae_"))]
    assert len(rows) == 5 and all(line.endswith("ok") for line in rows)
    unet = next(line for line in rows if line.startswith("unet"))
    assert float(unet.split("max abs ")[1].split()[0]) > 0  # fp16 really differs from fp32
    assert "check passed" in out


@needs_torch
def test_check_reports_the_error_it_is_given(sd1_fp32):
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.check import TOLERANCES, check_inputs, check_sessions, failure_line

    backend = OnnxRuntimeBackend(sd1_fp32)
    from export.specs import component_specs

    specs = {"unet": component_specs(backend.manifest.model)["unet"]}
    feeds = check_inputs(specs, backend.text_tables(), 1, 64, 64)
    ref = {"unet": backend.session("unet")}
    reports = check_sessions(ref, {"unet": _Perturbed(ref["unet"], "noise_pred", 0.25)}, feeds, TOLERANCES["fp16"])
    (report,) = reports
    assert report.max_abs == pytest.approx(0.25, rel=1e-5) and report.mean_abs == pytest.approx(0.25, rel=1e-5)
    scale = np.abs(ref["unet"].run(dict(feeds["unet"]))["noise_pred"]).max()
    assert report.relative == pytest.approx(0.25 / scale, rel=1e-5)
    assert not report.passed
    assert failure_line(reports).startswith("check failed: unet noise_pred differs")

    nan = check_sessions(ref, {"unet": _Perturbed(ref["unet"], "noise_pred", np.nan)}, feeds, TOLERANCES["fp16"])
    assert not nan[0].finite and "NaN/Inf" in nan[0].line()
    assert failure_line(nan) == "check failed: unet noise_pred has NaN/Inf values"


@needs_torch
def test_cli_check_fails_with_one_line_and_exit_2(sd1_fp32, monkeypatch, capsys):
    import cli
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    class Broken(OnnxRuntimeBackend):
        def session(self, component):
            session = super().session(component)
            return _Perturbed(session, "image", np.nan) if component == "vae_decoder" else session

    monkeypatch.setattr("runtime.backends.open_backend", lambda *a, **k: Broken(sd1_fp32))
    code = cli.main(["--quiet", "check", "--model", str(sd1_fp32), "--backend", "onnxruntime", "--precision", "fp32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["error: check failed: vae_decoder image has NaN/Inf values"]


def test_cli_check_and_build_without_tensorrt_exit_2(tmp_path, capsys):
    pytest.importorskip("onnx")
    import importlib.util

    import cli

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here")
    for argv in (["build", "--model", str(tmp_path)], ["check", "--model", str(tmp_path), "--backend", "tensorrt"],
                 ["txt2img", "--model", str(tmp_path), "--prompt", "x", "--backend", "tensorrt",
                  "--output", str(tmp_path / "x.png")]):  # fmt: skip
        assert cli.main(["--quiet", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "'tensorrt' package" in err[0], err
    assert not (tmp_path / "x.png").exists()
