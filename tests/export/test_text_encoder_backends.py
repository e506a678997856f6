"""Both backends' text encoder on token embeddings, their text tables, and the artifact checks around them.

Reference: transformers' CLIPTextModel run on input ids, straight from the tiny checkpoint. Measured: onnxruntime
within 1.6e-6 of it, the torch backend exactly equal; the bound is 1e-4 as for the exported models.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from runtime.errors import ModelError
from runtime.manifest import FINAL_NORM_FILE, TEXT_TABLE_FILES, TOKEN_EMBEDDING_FILE
from tests.conftest import needs_torch
from tests.export.test_export import TOLERANCE, max_diff, reference

pytestmark = needs_torch


def backends(case):
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.backends.torch import TorchBackend

    return {"onnxruntime": OnnxRuntimeBackend(case.artifact), "torch": TorchBackend(case.source)}


def test_text_tables_are_the_clip_parts(export_case):
    model = reference(export_case.source, "text_encoder")
    norm = model.final_layer_norm
    for name, backend in backends(export_case).items():
        tables = backend.text_tables()
        assert np.array_equal(tables.token_embedding, model.get_input_embeddings().weight.detach().numpy()), name
        assert np.array_equal(tables.final_norm_weight, norm.weight.detach().numpy()), name
        assert np.array_equal(tables.final_norm_bias, norm.bias.detach().numpy()), name
        assert tables.final_norm_eps == norm.eps, name
        assert tables.token_embedding.dtype == np.float32 and not tables.token_embedding.flags.writeable, name
    assert isinstance(backends(export_case)["onnxruntime"].text_tables().token_embedding, np.memmap)


def test_sessions_take_token_embeddings_and_still_input_ids(export_case):
    import torch

    model = reference(export_case.source, "text_encoder")
    ids = np.random.default_rng(7).integers(0, model.config.vocab_size, size=(2, 77)).astype(np.int32)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids).long(), output_hidden_states=True)
    for name, backend in backends(export_case).items():
        session = backend.session("text_encoder")
        by_embeds = session.run({"inputs_embeds": backend.text_tables().embed(ids)})
        by_ids = session.run({"input_ids": ids})
        for output in ("last_hidden_state", "hidden_states"):
            assert np.array_equal(by_embeds[output], by_ids[output]), (name, output)
        assert max_diff(by_embeds["last_hidden_state"], expected.last_hidden_state) <= TOLERANCE, name
        assert max_diff(by_embeds["hidden_states"], torch.stack(expected.hidden_states)) <= TOLERANCE, name


def test_token_ids_outside_the_table_are_refused(sd1_export):
    tables = backends(sd1_export)["onnxruntime"].text_tables()
    vocab = tables.token_embedding.shape[0]
    assert tables.embed(np.array([[0, vocab - 1]])).shape == (1, 2, tables.token_embedding.shape[1])
    for bad in (-1, vocab):
        with pytest.raises(ValueError, match="token ids"):
            tables.embed(np.array([[0, bad]]))


@pytest.fixture
def artifact_copy(sd1_export, tmp_path):
    return shutil.copytree(sd1_export.artifact, tmp_path / sd1_export.artifact.name)


@pytest.mark.parametrize("table", TEXT_TABLE_FILES)
def test_a_missing_text_table_means_the_export_is_redone(sd1_export, artifact_copy, table):
    from export.onnx_export import is_reusable
    from runtime.backends.onnxruntime import OnnxRuntimeBackend
    from runtime.manifest import files_intact, read_manifest

    digest = read_manifest(artifact_copy).source["fingerprint"]
    assert is_reusable(artifact_copy, digest)
    (artifact_copy / table).unlink()
    assert not is_reusable(artifact_copy, digest)
    assert not files_intact(artifact_copy, read_manifest(artifact_copy))  # so runtime.load exports it again
    with pytest.raises(ModelError, match="re-export") as error:
        OnnxRuntimeBackend(artifact_copy).session("text_encoder")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("broken", ["corrupt norm", "wrong width", "old text encoder"])
def test_broken_text_encoder_artifacts_are_model_errors(artifact_copy, broken):
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    if broken == "corrupt norm":
        (artifact_copy / FINAL_NORM_FILE).write_bytes(b"PK\x03\x04 truncated")
    elif broken == "wrong width":
        np.save(artifact_copy / TOKEN_EMBEDDING_FILE, np.zeros((10, 5), dtype=np.float32))
    else:  # a model whose input is not inputs_embeds stands in for an export from before the change
        shutil.copy(artifact_copy / "onnx" / "vae_decoder.onnx", artifact_copy / "onnx" / "text_encoder.onnx")
    with pytest.raises(ModelError, match="re-export with --force") as error:
        OnnxRuntimeBackend(artifact_copy).session("text_encoder")
    assert "\n" not in str(error.value)
