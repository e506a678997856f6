"""Where a single file's tokenizer comes from: the Hugging Face cache (SD 2 falls back to CLIP-L's vocabulary padded
with "!", as OpenCLIP pads), an explicit --tokenizer folder, or a clear error naming what to download."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = needs_torch
OPTIONS = dict(steps=2, seed=9, width=48, height=32, sampler="Euler")


def _image(model, engines, **load_options):
    import runtime

    return runtime.load(model, backend="torch", engines_dir=engines, **load_options).txt2img("a cat", **OPTIONS).images


def test_sd2_uses_clip_l_padded_with_exclamation_marks(tiny_models, tmp_path, monkeypatch):
    from export.tiny import write_tiny_tokenizer
    from runtime.single_file import prepare_checkpoint

    folder, single_file = tiny_models("sd2-v")
    hub = tmp_path / "hub"
    write_tiny_tokenizer(hub / "models--openai--clip-vit-large-patch14" / "snapshots" / "1")  # pads with EOS
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    converted = prepare_checkpoint(single_file, tmp_path / "engines", prediction_type="v_prediction")
    assert json.loads((converted / "tokenizer" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    expected = _image(folder, tmp_path)
    np.testing.assert_allclose(_image(single_file, tmp_path / "engines", prediction_type="v_prediction"), expected)


def test_explicit_tokenizer_and_missing_tokenizer(tiny_models, tmp_path, monkeypatch):
    from runtime.errors import ModelError

    folder, single_file = tiny_models("sd1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    engines = tmp_path / "engines"
    with pytest.raises(ModelError, match="huggingface-cli download openai/clip-vit-large-patch14.*--tokenizer"):
        _image(single_file, engines)
    assert not engines.exists()
    np.testing.assert_allclose(_image(single_file, engines, tokenizer=folder), _image(folder, engines))
