"""sdrt's engine cache policy (export/tensorrt_build.py): keys, file names, what is rebuilt and when.

These tests inject a stand-in builder object in place of TensorRT: they exercise sdrt's own cache logic (which
engines a request needs, their keys, reuse, rebuild of unreadable plans, atomic writes), not TensorRT, which is
not installed here. TensorRT itself is exercised by tests/gpu/test_tensorrt_backend.py where it exists.
"""

from __future__ import annotations

import json
import logging

import pytest

from runtime.errors import InvalidRequestError
from tests.conftest import needs_torch

pytestmark = needs_torch


class StandInBuilder:
    """Returns a recognisable byte string per build and counts the builds; `can_deserialize` accepts only its own
    complete plans (a truncated or foreign file is refused, as TensorRT's deserializer would)."""

    def __init__(self, version: str = "10.99.0", compute_capability: str = "90", fail_on: str | None = None):
        self.version, self.compute_capability, self.fail_on = version, compute_capability, fail_on
        self.built: list[str] = []

    def build(self, onnx_path, spec, timing_cache) -> bytes:
        assert onnx_path.is_file()
        if spec.component == self.fail_on:
            raise RuntimeError("build failed")
        self.built.append(spec.component)
        return f"PLAN {self.version} {spec.component} {spec.profile} END".encode()

    def can_deserialize(self, plan: bytes) -> bool:
        return plan.startswith(f"PLAN {self.version} ".encode()) and plan.endswith(b" END")


def _ensure(sd1_fp32, sd1_fp16, builder, **request):
    from export.tensorrt_build import build_request, ensure_engines

    return ensure_engines(sd1_fp32, sd1_fp16, build_request(**request), builder, sd1_fp32 / "t.cache", progress=False)


@pytest.fixture()
def artifacts(sd1_fp32, sd1_fp16):
    yield sd1_fp32, sd1_fp16
    for path in (sd1_fp32 / "tensorrt").glob("*"):
        path.unlink()


def test_engine_names_carry_component_precision_profile_version_and_gpu(artifacts):
    builder = StandInBuilder()
    plans = _ensure(*artifacts, builder, batch_size=1, width=64, height=64)
    names = {component: path.name for component, path in plans.items()}
    # tiny SD1: VAE scale factor 2 (64 px -> 32 latent), the VAE in fp16 as diffusers' SD pipeline runs it
    assert names == {
        "text_encoder": "text_encoder.fp16.b1-16.o3.trt10.99.0.sm90.plan",
        "unet": "unet.fp16.r1-2-h32-w32-t1.o3.trt10.99.0.sm90.plan",
        "vae_decoder": "vae_decoder.fp16.b1-h32-w32.o3.trt10.99.0.sm90.plan",
        "vae_encoder": "vae_encoder.fp16.b1-h32-w32.o3.trt10.99.0.sm90.plan",
    }
    sidecar = json.loads(plans["unet"].with_suffix(".json").read_text())
    # rows: 1 (one image, cfg <= 1) .. 2 (uncond + cond), optimum 2; [*, 4, 32, 32] latents; 77 tokens x 32 features
    assert sidecar["shapes"]["sample"] == [[1, 4, 32, 32], [2, 4, 32, 32], [2, 4, 32, 32]]
    assert sidecar["shapes"]["encoder_hidden_states"] == [[1, 77, 32], [2, 77, 32], [2, 77, 32]]
    assert sidecar["shapes"]["timestep"] == [[1], [2], [2]]
    text = json.loads(plans["text_encoder"].with_suffix(".json").read_text())
    assert text["shapes"]["inputs_embeds"] == [[1, 77, 32], [2, 77, 32], [16, 77, 32]]
    assert sorted(builder.built) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


def test_cached_engines_are_reused_and_only_what_changed_is_rebuilt(artifacts):
    builder = StandInBuilder()
    _ensure(*artifacts, builder, width=64, height=64)
    builder.built.clear()
    _ensure(*artifacts, builder, width=64, height=64)
    assert builder.built == []
    _ensure(*artifacts, builder, width=64, height=64, token_chunks=2)  # only the UNet's profile changes
    assert builder.built == ["unet"]
    builder.built.clear()
    _ensure(*artifacts, builder, width=96, height=64)  # a new size: UNet and VAE, never the text encoder
    assert sorted(builder.built) == ["unet", "vae_decoder", "vae_encoder"]
    builder.built.clear()
    _ensure(*artifacts, StandInBuilder(version="11.0.0"))  # another TensorRT: new keys for everything
    other = StandInBuilder(compute_capability="89")
    _ensure(*artifacts, other)
    assert len(other.built) == 4


def test_unreadable_plan_is_rebuilt_with_one_line(artifacts, caplog):
    builder = StandInBuilder()
    plans = _ensure(*artifacts, builder, width=64, height=64)
    plans["unet"].write_bytes(plans["unet"].read_bytes()[:10])  # truncated
    builder.built.clear()
    with caplog.at_level(logging.WARNING, logger="export.tensorrt_build"):
        _ensure(*artifacts, builder, width=64, height=64)
    assert builder.built == ["unet"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unet" in warnings[0] and "rebuilding" in warnings[0]
    assert builder.can_deserialize(plans["unet"].read_bytes())


def test_failed_build_leaves_no_plan_behind(artifacts):
    sd1_fp32, _ = artifacts
    with pytest.raises(RuntimeError):
        _ensure(*artifacts, StandInBuilder(fail_on="unet"), width=64, height=64)
    files = sorted(p.name for p in (sd1_fp32 / "tensorrt").iterdir())
    assert not any(name.startswith("unet") for name in files)
    assert not any(name.endswith(".tmp") for name in files)
    assert "text_encoder.fp16.b1-16.o3.trt10.99.0.sm90.plan" in files


def test_dynamic_profile_spans_the_pixel_range(artifacts):
    plans = _ensure(*artifacts, StandInBuilder(), dynamic="64..128", width=None, height=None)
    assert plans["unet"].name == "unet.fp16.r1-2-dyn32-64-t1.o3.trt10.99.0.sm90.plan"
    shapes = json.loads(plans["unet"].with_suffix(".json").read_text())["shapes"]["sample"]
    assert shapes == [[1, 4, 32, 32], [2, 4, 32, 32], [2, 4, 64, 64]]  # min, opt (the native 64 px), max


def test_unet_profile_covers_unguided_and_prompts_and_long_prompts(artifacts):
    # B = 2 images, m = 3 AND terms, K = 3 chunks: rows 1 .. (1 + 3) x 2 = 8, sequence 77 .. 3 x 77 = 231 tokens
    plans = _ensure(*artifacts, StandInBuilder(), batch_size=2, and_terms=3, token_chunks=3, width=64, height=64)
    assert plans["unet"].name == "unet.fp16.r1-8-h32-w32-t1-3.o3.trt10.99.0.sm90.plan"
    shapes = json.loads(plans["unet"].with_suffix(".json").read_text())["shapes"]
    assert shapes["sample"] == [[1, 4, 32, 32], [4, 4, 32, 32], [8, 4, 32, 32]]
    assert shapes["encoder_hidden_states"] == [[1, 77, 32], [4, 77, 32], [8, 231, 32]]
    assert shapes["timestep"] == [[1], [4], [8]]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(batch_size=0), "--batch-size"),
        (dict(token_chunks=9), "--token-chunks"),
        (dict(and_terms=0), "--and-terms"),
        (dict(opt_level=6), "--opt-level"),
        (dict(width=512), "both --width and --height"),
        (dict(width=512, height=512, dynamic="256..1024"), "--dynamic replaces"),
        (dict(dynamic="1024"), "MIN..MAX"),
        (dict(dynamic="1024..256"), "MIN is larger"),
        (dict(width=500, height=512), "multiples of 8"),
    ],
)
def test_build_request_errors(options, message):
    from export.tensorrt_build import build_request

    with pytest.raises(InvalidRequestError, match=message):
        build_request(**options)


def _admission(batch: int, rows: int, terms: int, chunks: int, sizes=((64, 64),), mode: str = "txt2img"):
    from runtime.admission import Admission, PromptSize

    return Admission(mode, sizes, batch, rows, PromptSize(terms, chunks, 1, 1), estimate=None, budget=None)


def test_a_request_no_unet_engine_takes_is_refused_before_any_work_with_the_build_command(artifacts):
    from runtime.backends.tensorrt import TensorRTBackend
    from runtime.manifest import read_manifest

    sd1_fp32, _ = artifacts
    for plan in (sd1_fp32 / "tensorrt").glob("unet.*"):
        plan.unlink()  # only the engines built below
    _ensure(*artifacts, StandInBuilder(), batch_size=2, token_chunks=1, width=64, height=64)
    backend = TensorRTBackend.__new__(TensorRTBackend)  # the profile check reads only the manifest and sidecars
    backend.folder, backend.manifest = sd1_fp32, read_manifest(sd1_fp32)
    backend.key_suffix = ".trt10.99.0.sm90.plan"
    backend.check_request(_admission(batch=1, rows=1, terms=1, chunks=1))  # cfg <= 1: one row
    backend.check_request(_admission(batch=2, rows=2, terms=1, chunks=1))  # guided: 4 rows = (1 + 1) x 2
    refusals = {
        "--and-terms 2 ": _admission(batch=2, rows=3, terms=2, chunks=1),  # 6 rows > 4
        "--token-chunks 2 ": _admission(batch=1, rows=2, terms=1, chunks=2),  # 154 tokens > 77
        "--width 96 --height 64": _admission(batch=1, rows=2, terms=1, chunks=1, sizes=((64, 64), (96, 64))),
    }
    for option, admission in refusals.items():
        with pytest.raises(InvalidRequestError) as info:
            backend.check_request(admission)
        message = str(info.value)
        assert "\n" not in message and option in message and "python cli.py build" in message, message
    backend.check_request(_admission(batch=4, rows=2, terms=1, chunks=3, mode="upscale"))  # not a UNet-size check
