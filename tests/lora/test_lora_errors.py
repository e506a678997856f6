"""Bad LoRAs: one clear LoraError (API) or one `error:` line and exit 2 (CLI), no output, the model unchanged."""

from __future__ import annotations

import numpy as np
import pytest

import cli
from runtime.errors import LoraError
from tests.conftest import needs_torch

pytestmark = needs_torch

GENERATION = dict(negative_prompt="blurry", seed=3, steps=2, cfg_scale=5.0, width=32, height=32, sampler="Euler")


def _save(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def bad_loras(tmp_path_factory, lora_dir):
    """name -> (file, the message's telling part)."""
    folder = tmp_path_factory.mktemp("bad-loras")
    good = (lora_dir / "kohya_a.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (folder / "garbage.safetensors").write_bytes(b"\xff" * 64)
    (folder / "empty.safetensors").write_bytes(b"")
    q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    _save(folder / "unknown_module.safetensors",
          {"lora_unet_not_a_module_at_all.lora_down.weight": np.ones((2, 8)),
           "lora_unet_not_a_module_at_all.lora_up.weight": np.ones((8, 2))})  # fmt: skip
    _save(folder / "wrong_shape.safetensors", {f"{q}.lora_down.weight": np.ones((4, 48)),
                                                f"{q}.lora_up.weight": np.ones((64, 4))})  # fmt: skip
    _save(folder / "other_format.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": np.ones((2, 2))})
    _save(folder / "half.safetensors", {f"{q}.lora_down.weight": np.ones((4, 64))})
    (folder / "picked.pt").write_bytes(b"not even a zip")
    (folder / "weights.bin").write_bytes(good)
    return {
        "truncated": (folder / "truncated.safetensors", "truncated or corrupt"),
        "garbage": (folder / "garbage.safetensors", "not a safetensors file"),
        "empty": (folder / "empty.safetensors", "not a safetensors file"),
        "unknown_module": (folder / "unknown_module.safetensors", "does not match this model: 1 of 1 layers"),
        "wrong_shape": (folder / "wrong_shape.safetensors", "does not match this model"),
        "other_format": (folder / "other_format.safetensors", "unsupported key"),
        "half": (folder / "half.safetensors", "lacks its up weight"),
        "missing": (folder / "missing.safetensors", "does not exist"),
        "pickle": (folder / "picked.pt", "pickle"),
        "suffix": (folder / "weights.bin", "must end in"),
    }


CASES = ["truncated", "garbage", "empty", "unknown_module", "wrong_shape", "other_format", "half", "missing", "pickle",
         "suffix"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_lora_file(lora_models, bad_loras, case):
    path, message = bad_loras[case]
    with pytest.raises(LoraError, match=message) as info:
        lora_models["onnxruntime"].txt2img("a cat", loras=[(path, 1.0)], **GENERATION)
    assert "\n" not in str(info.value)


def test_unknown_name_and_missing_folder(lora_models, lora_dir, tmp_path):
    model = lora_models["onnxruntime"]
    with pytest.raises(LoraError, match="no LoRA named 'nope' in"):
        model.txt2img("a cat <lora:nope:1>", lora_dir=lora_dir, **GENERATION)
    with pytest.raises(LoraError, match="no LoRA folder is set"):
        model.txt2img("a cat <lora:kohya_a:1>", **GENERATION)
    with pytest.raises(LoraError, match="does not exist"):
        model.txt2img("a cat <lora:kohya_a:1>", lora_dir=tmp_path / "absent", **GENERATION)
    with pytest.raises(LoraError, match="weight of LoRA"):
        model.txt2img("a cat", loras=[(lora_dir / "kohya_a.safetensors", "strong")], **GENERATION)


@pytest.mark.slow
def test_bad_lora_leaves_the_current_set(lora_models, lora_dir, bad_loras):
    """A LoRA that fails its checks changes no weight: the next request with the old set reuses it as it was."""
    model = lora_models["onnxruntime"]
    good = [(lora_dir / "kohya_a.safetensors", 0.5)]
    before = model.txt2img("a cat", loras=good, **GENERATION).images
    with pytest.raises(LoraError):
        model.txt2img("a cat", loras=good + [(bad_loras["wrong_shape"][0], 1.0)], **GENERATION)
    assert np.array_equal(model.txt2img("a cat", loras=good, **GENERATION).images, before)
    assert not np.array_equal(model.txt2img("a cat", **GENERATION).images, before)


def test_cli_bad_lora(tiny_sd1, lora_engines, bad_loras, lora_dir, tmp_path, capsys):
    out = tmp_path / "out.png"
    base = ["--quiet", "txt2img", "--model", str(tiny_sd1), "--engines", str(lora_engines), "--steps", "1",
            "--width", "32", "--height", "32", "--output", str(out)]  # fmt: skip
    for extra in (["--prompt", "x", "--lora", str(bad_loras["wrong_shape"][0]) + ":0.5"],
                  ["--prompt", "x <lora:nope:1>", "--lora-dir", str(lora_dir)]):  # fmt: skip
        code = cli.main(base + extra)
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and "\n" not in err, err
        assert not out.exists()


def test_cli_lora_and_lora_dir(tiny_sd1, lora_engines, lora_dir, tmp_path, capsys):
    """--lora FILE:WEIGHT and a prompt tag with --lora-dir write the image with A1111's Lora hashes."""
    from PIL import Image

    out = tmp_path / "out.png"
    code = cli.main(["--quiet", "txt2img", "--model", str(tiny_sd1), "--engines", str(lora_engines), "--steps", "1",
                     "--width", "32", "--height", "32", "--output", str(out), "--prompt", "x <lora:unet_only:0.5>",
                     "--lora-dir", str(lora_dir), "--lora", f"{lora_dir / 'peft_a.safetensors'}:0.25"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    parameters = Image.open(out).text["parameters"]
    assert parameters.startswith("x <lora:unet_only:0.5>\n")
    assert 'Lora hashes: "unet_only: ' in parameters and ", peft_a: " in parameters
