"""fp16 export of SDXL (export/fp16.py) on the CPU: ONNX Runtime's CPU provider runs the fp16 graphs.

Reference: the fp32 export of the same tiny checkpoint (itself equal to diffusers, tests/runtime/test_sdxl_parity.py),
fed the same inputs. Both text encoders and the UNet are fp16 inside with float32 IO; the VAE stays fp32 because
SDXL's VAE config says force_upcast (diffusers' SDXL pipelines upcast it); a refiner folder (text encoder 2 only, no
tokenizer/) converts too. Measured on the tiny models: max abs error / max |reference| 2e-4 to 8e-4 (text encoders),
1.4e-3 (UNet; up to 9.6e-3 when time_ids are cast to fp16 at the input); the bound is 2e-2, as for SD 1.x
(tests/gpu/test_fp16_export.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch

REL_TOLERANCE = 2e-2
# non-integer timestep and size/crop ids: fp16 has steps of 0.5 near 1000, so their sin/cos embeddings must be fp32
TIMESTEP = 817.3
TIME_IDS = {6: [1017.3, 771.7, 3.3, 5.1, 1023.9, 769.2], 5: [1017.3, 771.7, 3.3, 5.1, 6.0]}


def _run(path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def _fp16_of(source: Path, engines: Path, tmp_path_factory, name: str) -> tuple[Path, Path]:
    """(fp32, fp16) folders: the session's shared fp32 export copied (the fp16 folder goes inside it), then fp16."""
    from export import export_model
    from export.fp16 import export_fp16

    shared = export_model(source, engines, progress=False)
    fp32 = tmp_path_factory.mktemp(name) / shared.name
    shutil.copytree(shared, fp32)
    return fp32, export_fp16(fp32, progress=False)


@pytest.fixture(scope="module")
def sdxl_pair(tiny_sdxl, shared_engines, tmp_path_factory):
    return _fp16_of(tiny_sdxl, shared_engines, tmp_path_factory, "sdxl-fp16")


@pytest.fixture(scope="module")
def refiner_pair(tiny_sdxl_refiner, shared_engines, tmp_path_factory):
    return _fp16_of(tiny_sdxl_refiner, shared_engines, tmp_path_factory, "sdxl-refiner-fp16")


def _feeds(folder: Path, component: str) -> dict[str, np.ndarray]:
    from export.specs import component_specs
    from runtime.manifest import read_manifest

    feeds = component_specs(read_manifest(folder).model)[component].sample_inputs(seed=11)
    if component == "unet":
        feeds["timestep"][:] = TIMESTEP
        ids = feeds["time_ids"]
        ids[:] = np.array(TIME_IDS[ids.shape[1]], np.float32)
    if component == "text_encoder_2":  # real token ids: start, words, end, then the "!" padding (id 0)
        ids = feeds["input_ids"]
        ids[:] = 0
        ids[:, 0], ids[:, 1:6], ids[:, 6] = 1, np.arange(10, 15), 2
    return feeds


@needs_torch
@pytest.mark.parametrize(
    "case, component",
    [("sdxl", "text_encoder"), ("sdxl", "text_encoder_2"), ("sdxl", "unet"),
     ("refiner", "text_encoder_2"), ("refiner", "unet")],
)  # fmt: skip
def test_fp16_component_matches_fp32(request, case, component):
    fp32, fp16 = request.getfixturevalue(f"{case}_pair")
    feeds = _feeds(fp32, component)
    ref = _run(fp32 / "onnx" / f"{component}.onnx", feeds)
    got = _run(fp16 / "onnx" / f"{component}.onnx", feeds)
    assert len(got) == len(ref)
    for r, g in zip(ref, got):
        assert g.dtype == np.float32 and g.shape == r.shape  # the graph's IO stays float32
        assert np.isfinite(g).all()
        assert 0 < _rel_error(g, r) < REL_TOLERANCE  # computed in fp16, close to fp32


@needs_torch
def test_time_ids_embedding_stays_fp32(sdxl_pair, tmp_path):
    """The same UNet converted with time_ids cast to fp16 at the input (as any other float input) is far further from
    fp32 on ids that fp16 cannot hold (x.5 above 1024: 0.5 rad off in sin/cos) than the export's, which keeps their
    sin/cos path fp32 as timestep's. Measured: 9.6e-3 against 1.4e-3."""
    from export.fp16 import convert_component
    from export.specs import component_specs
    from runtime.manifest import read_manifest

    fp32, fp16 = sdxl_pair
    manifest = read_manifest(fp32)
    spec = component_specs(manifest.model)["unet"]
    shapes = {t.name: t.shape for t in spec.inputs + spec.outputs}
    out = tmp_path / "onnx" / "unet.onnx"
    convert_component(fp32 / "onnx" / "unet.onnx", out, manifest.components["unet"], shapes, tmp_path, ("timestep",))
    feeds = _feeds(fp32, "unet")
    feeds["time_ids"][:] = np.array([1536.5, 1024.5, 0.5, 64.5, 1536.5, 1024.5], np.float32)
    ref = _run(fp32 / "onnx" / "unet.onnx", feeds)[0]
    kept = _rel_error(_run(fp16 / "onnx" / "unet.onnx", feeds)[0], ref)
    cast = _rel_error(_run(out, feeds)[0], ref)
    assert kept < REL_TOLERANCE and cast > 4 * kept


@needs_torch
def test_sdxl_fp16_folder_keeps_the_upcast_vae_fp32_and_both_tokenizers(sdxl_pair):
    fp32, fp16 = sdxl_pair
    manifest = json.loads((fp16 / "manifest.json").read_text())
    precisions = {name: c["precision"] for name, c in manifest["components"].items()}
    source = Path(manifest["source"]["path"])
    assert json.loads((source / "vae" / "config.json").read_text())["force_upcast"]  # SDXL's VAE says so
    assert precisions == {"text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16",
                          "vae_decoder": "fp32", "vae_encoder": "fp32"}  # fmt: skip
    for name in ("vae_decoder", "vae_encoder"):  # the fp32 models themselves
        assert (fp16 / "onnx" / f"{name}.onnx").read_bytes() == (fp32 / "onnx" / f"{name}.onnx").read_bytes()
    for tokenizer in ("tokenizer", "tokenizer_2"):
        names = sorted(p.name for p in (source / tokenizer).iterdir())
        assert sorted(p.name for p in (fp16 / tokenizer).iterdir()) == names
    assert (fp16 / "tokenizer_2" / "vocab.json").read_bytes() == (source / "tokenizer_2" / "vocab.json").read_bytes()


@needs_torch
def test_refiner_fp16_folder_has_text_encoder_2_and_its_tokenizer_only(refiner_pair):
    from runtime.manifest import files_intact, read_manifest

    _, fp16 = refiner_pair
    manifest = read_manifest(fp16)
    assert {n: c.precision for n, c in manifest.components.items()} == {
        "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"}  # fmt: skip
    assert (fp16 / "tokenizer_2").is_dir() and not (fp16 / "tokenizer").exists()
    assert files_intact(fp16, manifest)


def test_an_fp16_safe_sdxl_vae_is_converted():
    """An SDXL VAE whose config says force_upcast false (an fp16-fixed VAE given with --vae) runs fp16, as diffusers
    then leaves it; SD 1.x's VAE runs fp16 whatever its config says (StableDiffusionPipeline never upcasts)."""
    from runtime.backends.gpu import vae_runs_fp16

    sdxl = {"sdxl": {"time_ids": 6}, "unet_num_class_embeds": None}
    assert not vae_runs_fp16(dict(sdxl, vae_force_upcast=True))
    assert vae_runs_fp16(dict(sdxl, vae_force_upcast=False))
    assert vae_runs_fp16({"sdxl": None, "unet_num_class_embeds": None, "vae_force_upcast": True})


@needs_torch
@pytest.mark.slow
def test_sdxl_fp16_end_to_end_image_close_to_fp32(sdxl_pair):
    import runtime

    fp32, fp16 = sdxl_pair
    options = dict(seed=7, steps=6, width=64, height=64, cfg_scale=5.0, sampler="Euler")
    ref = runtime.load(fp32).txt2img("a red house by a lake", **options).images
    got = runtime.load(fp16).txt2img("a red house by a lake", **options).images
    diff = np.abs(ref.astype(np.float64) - got)
    assert np.isfinite(got).all()
    assert 0 < diff.mean() < 1e-2 and diff.max() < 0.1
