"""SDXL LoRA against diffusers: StableDiffusionXLPipeline with the same file loaded (`load_lora_weights`) and fused
(`fuse_lora`) into the UNet and both text encoders, on the tiny SDXL checkpoint; onnxruntime and torch backends.

Two random files: diffusers/PEFT keys (unet., text_encoder., text_encoder_2.; the UNet's SDXL add_embedding too) and
kohya keys as sd-scripts trains SDXL (lora_te1_, lora_te2_, lora_unet_ under the LDM/SGM block names, with alpha).
diffusers converts the kohya keys itself (its SGM block mapping), so the reference checks sdrt's mapping
independently. Text encoder 2's last layer reaches the image only through the pooled text (text_embeds), so a LoRA
there checks that path. Same tolerances as the SDXL txt2img parity tests.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.conftest import needs_torch

from .test_lora_parity import addnet_hash

pytestmark = [needs_torch, pytest.mark.slow]
needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="diffusers' LoRA loading needs peft")

PROMPT, NEGATIVE = "a photo of a cat", "blurry"
WIDTH, HEIGHT, STEPS, CFG, SEED = 64, 48, 4, 6.0, 11
GENERATION = dict(negative_prompt=NEGATIVE, seed=SEED, steps=STEPS, cfg_scale=CFG, width=WIDTH, height=HEIGHT,
                  sampler="Euler")  # fmt: skip

# diffusers module -> its name in the LDM/SGM UNet (kohya's SDXL names), for the tiny SDXL layout: one resnet per
# level, no attention in the first down level, attention in the first up level (worked out from sgm's UNetModel:
# input_blocks 1 = level 0 resnet, 2 = its downsampler, 3 = level 1 resnet + transformer; output_blocks 0, 1 = up
# level 0 resnet + transformer each)
UNET_LDM = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.3.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": "input_blocks.3.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.proj_in": "input_blocks.3.1.proj_in",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0": "middle_block.1.transformer_blocks.0.attn1.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v": "output_blocks.1.1.transformer_blocks.0.attn2.to_v",
    "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2": "output_blocks.0.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.attentions.0.proj_out": "output_blocks.0.1.proj_out",
    "down_blocks.1.resnets.0.time_emb_proj": "input_blocks.3.0.emb_layers.1",
    "add_embedding.linear_1": "label_emb.0.0",  # the added conditioning (text_embeds, time_ids)
}
PEFT_UNET = tuple(UNET_LDM)
TE_MODULES = (
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.v_proj",
    "text_model.encoder.layers.1.self_attn.out_proj",
    "text_model.encoder.layers.0.mlp.fc1",
)
TE2_MODULES = (*TE_MODULES, "text_model.encoder.layers.2.mlp.fc2")  # the last layer: the pooled text only


def _shapes(checkpoint) -> dict[str, dict[str, tuple[int, ...]]]:
    """component -> module -> weight shape, from the checkpoint's diffusers/transformers modules (a refiner: text
    encoder 2 and the UNet)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    def weights(modules, names):
        return {n: tuple((modules[n] if n in modules else modules[n.removeprefix("text_model.")]).weight.shape)
                for n in names}  # fmt: skip

    unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet")
    shapes = {"unet": weights(dict(unet.named_modules()), PEFT_UNET)}
    if (checkpoint / "text_encoder").is_dir():
        te = CLIPTextModel.from_pretrained(checkpoint, subfolder="text_encoder")
        shapes["text_encoder"] = weights(dict(te.named_modules()), TE_MODULES)
    te2 = CLIPTextModelWithProjection.from_pretrained(checkpoint, subfolder="text_encoder_2")
    shapes["text_encoder_2"] = weights(dict(te2.named_modules()), TE2_MODULES)
    return shapes


def _pair(rng, shape, rank, std=0.4):
    """(down [rank, in], up [out, rank]) for a Linear weight [out, in]."""
    down = rng.normal(0, std, (rank, shape[1])).astype(np.float32)
    return down, rng.normal(0, std, (shape[0], rank)).astype(np.float32)


def write_peft(path, shapes, seed, rank=4):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for component, modules in shapes.items():
        for module, shape in modules.items():
            down, up = _pair(rng, shape, rank)
            tensors[f"{component}.{module}.lora_A.weight"], tensors[f"{component}.{module}.lora_B.weight"] = down, up
    save_file(tensors, str(path))
    return path


def write_kohya_sdxl(path, shapes, seed, rank=4, alpha=2.0):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for component, modules in shapes.items():
        for module, shape in modules.items():
            name = UNET_LDM[module] if component == "unet" else module
            key = prefixes[component] + name.replace(".", "_")
            tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"] = _pair(rng, shape, rank)
            tensors[key + ".alpha"] = np.array(alpha, dtype=np.float32)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def sdxl_loras(tiny_sdxl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-loras")
    shapes = _shapes(tiny_sdxl)
    return {
        "peft": write_peft(folder / "sdxl_peft.safetensors", shapes, seed=21),
        "kohya": write_kohya_sdxl(folder / "sdxl_kohya.safetensors", shapes, seed=22),
    }


@pytest.fixture(scope="module")
def models(tiny_sdxl, shared_engines):
    """backend -> the tiny SDXL on it (own instances: their LoRA state is put back to base afterwards)."""
    import runtime

    loaded = {b: runtime.load(tiny_sdxl, backend=b, engines_dir=shared_engines) for b in ("onnxruntime", "torch")}
    yield loaded
    for model in loaded.values():
        if model.lora_state is not None:
            model.lora_state.activate([])


def reference(checkpoint, path, te: float, unet: float) -> np.ndarray:
    """diffusers' SDXL images with the LoRA fused at the given text-encoder and UNet scales."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(checkpoint, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(path), adapter_name="a")
    for components, scale in ((["unet"], unet), (["text_encoder", "text_encoder_2"], te)):
        pipe.fuse_lora(components=components, lora_scale=scale, adapter_names=["a"])
    pipe.unload_lora_weights()
    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, height=HEIGHT,
               width=WIDTH, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np")  # fmt: skip
    return out.images


def assert_parity(images: np.ndarray, expected: np.ndarray) -> None:
    diff = np.abs(images.astype(np.float64) - expected)
    assert diff.mean() <= 2e-5 and diff.max() <= 1e-3, f"mean {diff.mean():.2e}, max {diff.max():.2e}"


@needs_peft
@pytest.mark.parametrize(("name", "te", "unet"), [("peft", 0.8, 0.8), ("kohya", 0.7, 1.1)])
def test_sdxl_lora_matches_diffusers(models, sdxl_loras, tiny_sdxl, name, te, unet):
    path = sdxl_loras[name]
    expected = reference(tiny_sdxl, path, te, unet)
    base = models["onnxruntime"].txt2img(PROMPT, **GENERATION).images
    assert np.abs(expected - base).max() > 0.02  # the LoRA visibly changes the image
    for model in models.values():
        result = model.txt2img(PROMPT, loras=[(path, te, unet)], **GENERATION)
        assert_parity(result.images, expected)


@needs_peft
def test_text_encoder_2_alone_reaches_the_image(models, sdxl_loras, tiny_sdxl, tmp_path):
    """Only text encoder 2's LoRA layers (its states and pooled text): still equal to diffusers, and not the base."""
    from safetensors.numpy import load_file, save_file

    tensors = {k: v for k, v in load_file(str(sdxl_loras["kohya"])).items() if k.startswith("lora_te2_")}
    path = tmp_path / "te2_only.safetensors"
    save_file(tensors, str(path))
    expected = reference(tiny_sdxl, path, 1.0, 1.0)
    result = models["onnxruntime"].txt2img(PROMPT, loras=[(path, 1.0)], **GENERATION).images
    assert_parity(result, expected)
    assert np.abs(result - models["onnxruntime"].txt2img(PROMPT, **GENERATION).images).max() > 0.02


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_switching_is_exact(models, sdxl_loras, backend):
    """A -> B -> A gives A's images bit for bit; no LoRA gives the base model's again."""
    model = models[backend]
    a, b = [(sdxl_loras["kohya"], 0.8)], [(sdxl_loras["peft"], 0.6)]
    base = model.txt2img(PROMPT, **GENERATION).images
    first_a = model.txt2img(PROMPT, loras=a, **GENERATION).images
    with_b = model.txt2img(PROMPT, loras=b, **GENERATION).images
    second_a = model.txt2img(PROMPT, loras=a, **GENERATION).images
    assert np.array_equal(first_a, second_a)
    assert not np.array_equal(first_a, with_b) and not np.array_equal(first_a, base)
    assert np.array_equal(model.txt2img(PROMPT, **GENERATION).images, base)


def test_prompt_tag_and_lora_hashes(models, sdxl_loras):
    model = models["onnxruntime"]
    folder = sdxl_loras["kohya"].parent
    prompt = "a photo of a cat <lora:sdxl_kohya:0.8>"
    tagged = model.txt2img(prompt, lora_dir=folder, **GENERATION)
    explicit = model.txt2img("a photo of a cat ", loras=[(sdxl_loras["kohya"], 0.8)], **GENERATION)
    assert np.array_equal(tagged.images, explicit.images)
    assert tagged.infotexts[0].startswith(prompt + "\nNegative prompt: blurry\n")
    assert f'Lora hashes: "sdxl_kohya: {addnet_hash(sdxl_loras["kohya"])}", Version: ' in tagged.infotexts[0]


def test_sd1_lora_or_missing_file_on_sdxl_is_refused(models, tmp_path):
    """A LoRA for another model (SD 1.x's lora_te_ keys of another width) or no file: one LoraError line."""
    from safetensors.numpy import save_file

    from runtime.errors import LoraError

    model = models["onnxruntime"]
    other = tmp_path / "sd1.safetensors"
    key = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{key}.lora_down.weight": np.zeros((4, 768), np.float32),
               f"{key}.lora_up.weight": np.zeros((768, 4), np.float32)}, str(other))  # fmt: skip
    with pytest.raises(LoraError, match="does not match this model"):
        model.txt2img(PROMPT, loras=[(other, 1.0)], **GENERATION)
    with pytest.raises(LoraError, match="does not exist"):
        model.txt2img(PROMPT, loras=[(tmp_path / "missing.safetensors", 1.0)], **GENERATION)


def test_export_maps_text_encoder_2(models):
    """The export writes text encoder 2's weight map: every Linear weight of its layers and its projection reach an
    ONNX initializer (the module's own parameter list is the reference)."""
    from transformers import CLIPTextModelWithProjection

    from runtime.lora.weight_map import read_weight_map

    backend = models["onnxruntime"].backend
    mapped = {
        m.parameter for m in read_weight_map(backend.folder / "onnx" / "text_encoder_2.weight_map.json").values()
    }
    module = CLIPTextModelWithProjection.from_pretrained(
        models["torch"].backend.checkpoint, subfolder="text_encoder_2"
    )
    linear = {n for n, p in module.named_parameters() if p.ndim == 2 and "embeddings" not in n}
    assert len(linear) > 6 and linear <= mapped, sorted(linear - mapped)[:3]


@needs_peft
def test_refiner_lora_matches_diffusers(tiny_sdxl_refiner, tmp_path):
    """A refiner (text encoder 2 only): a kohya LoRA on text encoder 2 and the UNet gives img2img images equal to
    StableDiffusionXLImg2ImgPipeline with it fused; a LoRA with lora_te1_ keys names no module of it."""
    from safetensors.numpy import save_file

    import runtime
    from runtime.errors import LoraError
    from tests.runtime.test_sdxl_img2img import diffusers_pipe, generators, init_image
    from tests.runtime.test_txt2img_parity import SEED as IMAGE_SEED  # the seed generators(1) starts from

    shapes = _shapes(tiny_sdxl_refiner)
    path = write_kohya_sdxl(tmp_path / "refiner.safetensors", shapes, seed=23)
    refiner = runtime.load(tiny_sdxl_refiner, backend="torch")
    options = dict(strength=0.6, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler a")
    options.update(seed=IMAGE_SEED, batch_size=1)
    result = refiner.img2img(PROMPT, init_image(), loras=[(path, 0.9)], **options).images
    pipe = diffusers_pipe("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_refiner, "Euler a", "default",
                          add_watermarker=False)  # fmt: skip
    pipe.load_lora_weights(str(path), adapter_name="a")
    pipe.fuse_lora(components=["unet", "text_encoder_2"], lora_scale=0.9, adapter_names=["a"])
    pipe.unload_lora_weights()
    expected = pipe(PROMPT, image=init_image(), strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                    guidance_scale=CFG, generator=generators(1), output_type="np").images  # fmt: skip
    assert_parity(result, expected)
    base = refiner.img2img(PROMPT, init_image(), **options).images
    assert np.abs(result - base).max() > 0.02
    te1 = tmp_path / "te1.safetensors"
    key = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    width = shapes["text_encoder_2"][TE_MODULES[0]][1]
    save_file({f"{key}.lora_down.weight": np.zeros((4, width), np.float32),
               f"{key}.lora_up.weight": np.zeros((width, 4), np.float32)}, str(te1))  # fmt: skip
    with pytest.raises(LoraError, match="does not match this model"):
        refiner.img2img(PROMPT, init_image(), loras=[(te1, 1.0)], **options)


def test_gpu_backends_patch_text_encoder_2(tiny_sdxl_refiner, monkeypatch):
    """Without a GPU: torch-cuda's weight interface on the refiner's CPU modules writes text encoder 2's parameters
    and restores them bit for bit, never loading a text encoder the model lacks; TensorRT refits the text_encoder_2
    engines (refit_component stands in for the refitter) and refits them back to base."""
    import types

    import torch

    from runtime.backends import tensorrt_refit
    from runtime.backends.tensorrt import TensorRTBackend
    from runtime.backends.torch import _load
    from runtime.backends.torch_cuda import TorchCudaBackend

    cuda = TorchCudaBackend.__new__(TorchCudaBackend)
    cuda._modules = {"text_encoder_2": _load(tiny_sdxl_refiner, "text_encoder_2", False)}
    cuda._base, cuda._graphed = {}, None
    name = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    parameter = dict(cuda._modules["text_encoder_2"].named_parameters())[name]
    base = parameter.detach().clone()
    cuda.apply_weights({"text_encoder_2": {name: base.numpy() * 2}})
    assert torch.equal(parameter.detach(), base * 2) and set(cuda._modules) == {"text_encoder_2"}
    cuda.apply_weights(None)
    assert torch.equal(parameter.detach(), base)

    calls = []

    def refit(backend, component, engines, values):
        calls.append((component, engines, sorted(values)))
        backend._base_weights.setdefault(component, {})

    monkeypatch.setattr(tensorrt_refit, "refit_component", refit)
    trt = TensorRTBackend.__new__(TensorRTBackend)
    trt._base_weights = {}
    trt.session = lambda component: types.SimpleNamespace(engines=[f"{component} engine"])
    trt.apply_weights({"text_encoder_2": {name: np.zeros(1)}})
    trt.apply_weights(None)
    assert calls == [
        ("text_encoder_2", ["text_encoder_2 engine"], [name]),
        ("text_encoder_2", ["text_encoder_2 engine"], []),
    ]


# kohya's names for SDXL base 1.0's UNet (sgm's UNetModel: 3 levels of 2 resnets, attention in levels 1 and 2, 2 and
# 10 transformer blocks) -> the diffusers module, worked out from sgm's block numbering
SDXL_BASE_NAMES = {
    "input_blocks_4_1_transformer_blocks_1_attn1_to_k": "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k",
    "input_blocks_7_1_transformer_blocks_0_attn2_to_out_0": (
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_out.0"
    ),
    "middle_block_1_transformer_blocks_9_ff_net_2": "mid_block.attentions.0.transformer_blocks.9.ff.net.2",
    "output_blocks_5_1_proj_out": "up_blocks.1.attentions.2.proj_out",
    "input_blocks_6_0_op": "down_blocks.1.downsamplers.0.conv",
    "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
    "output_blocks_8_0_out_layers_3": "up_blocks.2.resnets.2.conv2",
    "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
    "label_emb_0_2": "add_embedding.linear_2",
}


def test_kohya_names_on_sdxl_base_layout():
    """kohya's SGM names resolve to the right modules of SDXL base's published UNet (built on the meta device)."""
    import torch
    from diffusers import UNet2DConditionModel

    from export.configs import SDXL_UNET
    from runtime.lora.keys import _resolve, _underscore_index

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in SDXL_UNET.items() if not k.startswith("_")})
    shapes = {"unet": {n: tuple(p.shape) for n, p in unet.named_parameters()}}
    index = {"unet": _underscore_index("unet", shapes["unet"])}
    for kohya, module in SDXL_BASE_NAMES.items():
        assert _resolve("lora_unet_" + kohya, ".lora_down.weight", shapes, index) == ("unet", module + ".weight")
