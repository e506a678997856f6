"""The exported ONNX models against the torch modules they came from, and the manifest against the configs.

Reference: diffusers / transformers modules loaded straight from the tiny checkpoint, fp32, run by torch.
Measured on the tiny models: max abs difference about 1e-6 (VAE decoder about 5e-6); the bound is 1e-4.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = needs_torch

TOLERANCE = 1e-4
BATCHES = (1, 3)
IMAGE_SIZES = ((64, 64), (48, 80))  # pixels (height, width); the tiny VAE halves them, the UNet needs even latents
TIMESTEP = 817.3  # not an integer: the UNet must take float timesteps as they are


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


@cache
def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as torch in conftest: the test machine's cores are shared
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@cache
def reference(source: Path, part: str):
    """The diffusers / transformers module of `part`, fp32, eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    classes = {"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL}
    return classes[part].from_pretrained(source, subfolder=part, use_safetensors=True).eval()


def run_onnx(case, component: str, **feeds) -> list[np.ndarray]:
    return session(case.artifact / "onnx" / f"{component}.onnx").run(None, feeds)


def token_embedding(case) -> np.ndarray:
    return np.load(case.artifact / "onnx" / "text_encoder_token_embedding.npy")


def test_token_embedding_file_is_the_clip_table(export_case):
    model = reference(export_case.source, "text_encoder")
    table = token_embedding(export_case)
    assert table.dtype == np.float32
    assert np.array_equal(table, model.get_input_embeddings().weight.detach().numpy())


def test_text_encoder_on_looked_up_embeddings_matches_transformers_on_ids(export_case):
    """ONNX text encoder fed table[ids] == CLIPTextModel(input_ids): position embeddings, causal mask and all."""
    import torch

    model = reference(export_case.source, "text_encoder")
    table = token_embedding(export_case)
    rng = np.random.default_rng(0)
    for batch in BATCHES:
        ids = rng.integers(0, model.config.vocab_size, size=(batch, 77))
        last_hidden_state, hidden_states = run_onnx(export_case, "text_encoder", inputs_embeds=table[ids])
        with torch.no_grad():
            expected = model(torch.from_numpy(ids).long(), output_hidden_states=True)
        assert hidden_states.shape == (model.config.num_hidden_layers + 1, batch, 77, model.config.hidden_size)
        assert max_diff(last_hidden_state, expected.last_hidden_state) <= TOLERANCE
        assert max_diff(hidden_states[-1], expected.hidden_states[-1]) <= TOLERANCE
        assert max_diff(hidden_states, torch.stack(expected.hidden_states)) <= TOLERANCE


def test_final_norm_file_turns_the_last_hidden_state_into_the_output(export_case):
    """The host-side clip-skip path: LayerNorm(hidden_states[-1]) with the saved parameters == last_hidden_state."""
    ids = np.random.default_rng(1).integers(0, 300, size=(2, 77))
    embeds = token_embedding(export_case)[ids]  # [2, 77, D]
    last_hidden_state, hidden_states = run_onnx(export_case, "text_encoder", inputs_embeds=embeds)
    norm = np.load(export_case.artifact / "onnx" / "text_encoder_final_norm.npz")
    assert set(norm.files) == {"weight", "bias", "eps"}
    x = hidden_states[-1].astype(np.float64)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    normed = (x - mean) / np.sqrt(var + float(norm["eps"])) * norm["weight"] + norm["bias"]
    assert max_diff(normed, last_hidden_state) <= TOLERANCE


@pytest.mark.parametrize("chunks", [1, 2])
def test_unet_matches_diffusers(export_case, chunks):
    import torch

    unet = reference(export_case.source, "unet")
    rng = np.random.default_rng(chunks)
    for batch in BATCHES:
        for height, width in IMAGE_SIZES:
            sample = rng.standard_normal((batch, 4, height // 2, width // 2)).astype(np.float32)
            timestep = np.full(batch, TIMESTEP, dtype=np.float32)
            context = rng.standard_normal((batch, 77 * chunks, unet.config.cross_attention_dim)).astype(np.float32)
            (noise_pred,) = run_onnx(
                export_case, "unet", sample=sample, timestep=timestep, encoder_hidden_states=context
            )
            with torch.no_grad():
                expected = unet(torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(context))
            assert noise_pred.shape == sample.shape
            assert max_diff(noise_pred, expected.sample) <= TOLERANCE


def test_unet_keeps_the_fraction_of_the_timestep(export_case):
    """Rounding 817.3 to 817 would change the output by far more than the tolerance."""
    rng = np.random.default_rng(3)
    sample = rng.standard_normal((1, 4, 32, 32)).astype(np.float32)
    context = rng.standard_normal((1, 77, 32)).astype(np.float32)
    outputs = [
        run_onnx(export_case, "unet", sample=sample, timestep=np.array([t], np.float32), encoder_hidden_states=context)
        for t in (TIMESTEP, round(TIMESTEP))
    ]
    assert max_diff(outputs[0][0], outputs[1][0]) > 10 * TOLERANCE


def test_vae_decoder_matches_diffusers(export_case):
    import torch

    vae = reference(export_case.source, "vae")
    rng = np.random.default_rng(4)
    for batch in BATCHES:
        for height, width in IMAGE_SIZES:
            latent = rng.standard_normal((batch, 4, height // 2, width // 2)).astype(np.float32)
            (image,) = run_onnx(export_case, "vae_decoder", latent=latent)
            with torch.no_grad():
                expected = vae.decode(torch.from_numpy(latent)).sample
            assert image.shape == (batch, 3, height, width)
            assert max_diff(image, expected) <= TOLERANCE


def test_vae_encoder_gives_the_distribution_parameters(export_case):
    import torch

    vae = reference(export_case.source, "vae")
    rng = np.random.default_rng(5)
    for batch in BATCHES:
        for height, width in IMAGE_SIZES:
            image = rng.uniform(-1, 1, (batch, 3, height, width)).astype(np.float32)
            (parameters,) = run_onnx(export_case, "vae_encoder", image=image)
            with torch.no_grad():
                posterior = vae.encode(torch.from_numpy(image)).latent_dist
            assert parameters.shape == (batch, 8, height // 2, width // 2)
            assert max_diff(parameters, posterior.parameters) <= TOLERANCE
            assert max_diff(parameters[:, :4], posterior.mean) <= TOLERANCE  # mean first, then log-variance


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_manifest_says_what_the_configs_say(export_case):
    from runtime.manifest import COMPONENTS, read_manifest

    manifest = read_manifest(export_case.artifact)
    src = export_case.source
    vae, unet = read_json(src / "vae" / "config.json"), read_json(src / "unet" / "config.json")
    scheduler = read_json(src / "scheduler" / "scheduler_config.json")
    model = manifest.model
    assert model["latent_channels"] == vae["latent_channels"] == unet["out_channels"]
    assert model["vae_scaling_factor"] == vae["scaling_factor"]
    assert model["prediction_type"] == {"sd1": "epsilon", "sd2-v": "v_prediction"}[export_case.variant]
    assert model["scheduler_config"] == {k: v for k, v in scheduler.items() if not k.startswith("_")}
    assert manifest.source == {"path": str(src.resolve()), "fingerprint": manifest.source["fingerprint"]}
    assert manifest.model_key == export_case.artifact.name
    assert {"torch", "diffusers", "transformers", "onnx", "polygraphy"} <= set(manifest.tools)
    assert manifest.tools["opset"] == 17
    assert tuple(manifest.components) == COMPONENTS
    for component in manifest.components.values():
        path = export_case.artifact / component.file
        assert component.precision == "fp32"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == component.sha256
    for path in (src / "tokenizer").iterdir():
        assert (export_case.artifact / "tokenizer" / path.name).read_bytes() == path.read_bytes()


def test_onnx_graphs_carry_the_manifest_names_and_axes(export_case):
    import onnx

    from runtime.manifest import read_manifest

    def described(values) -> dict:
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

    manifest = read_manifest(export_case.artifact)
    for name, component in manifest.components.items():
        model = onnx.load(str(export_case.artifact / component.file))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17], name
        assert described(model.graph.input) == {k: v.shape for k, v in component.inputs.items()}
        assert described(model.graph.output) == {k: v.shape for k, v in component.outputs.items()}
        assert all(t.data_type != onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    unet = manifest.components["unet"]
    assert unet.inputs["encoder_hidden_states"].shape == ["batch", "sequence", 32]
    text_encoder = manifest.components["text_encoder"]
    assert {k: (v.dtype, v.shape) for k, v in text_encoder.inputs.items()} == {
        "inputs_embeds": ("float32", ["batch", 77, 32])
    }
    graph = onnx.load(str(export_case.artifact / text_encoder.file)).graph
    table_shape = token_embedding(export_case).shape
    assert all(tuple(t.dims) != table_shape for t in graph.initializer)  # the token lookup stays on the host
