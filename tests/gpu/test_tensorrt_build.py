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
    # tiny SD1: VAE scale factor 2 (64 px -> 32 latent), force_upcast VAE kept fp32
    assert names == {
        "text_encoder": "text_encoder.fp16.b1-16.o3.trt10.99.0.sm90.plan",
        "unet": "unet.fp16.b2-h32-w32-t1.o3.trt10.99.0.sm90.plan",
        "vae_decoder": "vae_decoder.fp32.b1-h32-w32.o3.trt10.99.0.sm90.plan",
        "vae_encoder": "vae_encoder.fp32.b1-h32-w32.o3.trt10.99.0.sm90.plan",
    }
    sidecar = json.loads(plans["unet"].with_suffix(".json").read_text())
    # [2 x batch, 4, 32, 32] latents, 77 tokens x 32 features (tiny CLIP width), all three profile points equal
    assert sidecar["shapes"]["sample"] == [[2, 4, 32, 32]] * 3
    assert sidecar["shapes"]["encoder_hidden_states"] == [[2, 77, 32]] * 3
    assert sidecar["shapes"]["timestep"] == [[2]] * 3
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
    assert plans["unet"].name == "unet.fp16.b2-dyn32-64-t1.o3.trt10.99.0.sm90.plan"
    shapes = json.loads(plans["unet"].with_suffix(".json").read_text())["shapes"]["sample"]
    assert shapes == [[2, 4, 32, 32], [2, 4, 32, 32], [2, 4, 64, 64]]  # min, opt (the native 64 px), max


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(batch_size=0), "--batch-size"),
        (dict(token_chunks=9), "--token-chunks"),
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
