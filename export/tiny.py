"""Tiny random Stable Diffusion checkpoints in the diffusers folder layout, for demos and tests.

The folder is a real diffusers checkpoint (diffusers' own StableDiffusionPipeline loads it): a CLIP text
encoder, a UNet, a VAE, a scheduler config and a CLIP BPE tokenizer (vocab.json + merges.txt) whose
vocabulary is learnt here from a small word list, since no published vocabulary can be downloaded.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .quiet import quiet_hub_libraries

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# Words the tiny vocabulary learns merges from; prompts in tests and the README use them.
_CORPUS = (
    "a photo of an astronaut riding a horse on the moon, highly detailed, sharp focus, "
    "a painting of a cat and a dog in the garden, oil on canvas, trending on artstation, "
    "portrait of a woman with red hair, studio lighting, 4k, 8k, masterpiece, best quality, "
    "landscape with mountains and a lake at sunset, cinematic, dramatic light, blurry, "
    "low quality, worst quality, ugly, deformed, watermark, text, signature, city street at night"
)

# "sd15-shaped": SD 1.5's published shapes, random weights (benchmarks); "sdxl-shaped": SDXL base 1.0's published
# shapes, random weights, saved in fp16 (benchmarks on a GPU machine: 3.5 billion parameters, 7 GB);
# "sd1-inpaint": sd1 with a 9-channel UNet
# (4 latents + 1 mask + 4 masked-image latents), saved as a StableDiffusionInpaintPipeline; "sd2-depth": SD2 with a
# 5-channel UNet (latents + depth) and a DPT-hybrid depth estimator (StableDiffusionDepth2ImgPipeline);
# "x4-upscaler": 7-channel UNet (latents + noised low-res image) with noise-level class embeddings, a x4 VAE and a
# low-res scheduler (StableDiffusionUpscalePipeline); "sdxl": two text encoders (CLIP and a projected OpenCLIP-style
# one), a UNet with SDXL's added conditioning (pooled text and size/crop ids), VAE scaling 0.13025
# (StableDiffusionXLPipeline); "sdxl-inpaint": sdxl with a 9-channel UNet (StableDiffusionXLInpaintPipeline);
# "sdxl-refiner": as SDXL's refiner folder, text encoder 2 only (no text_encoder/ or tokenizer/), a UNet conditioned on
# its states alone and on 5 ids (size, crop, aesthetic score) (StableDiffusionXLImg2ImgPipeline with
# requires_aesthetics_score)
VARIANTS = ("sd1", "sd2-v", "sd15-shaped", "sd1-inpaint", "sd2-depth", "x4-upscaler", "sdxl", "sdxl-inpaint",
            "sdxl-refiner", "sdxl-shaped")  # fmt: skip
SD2_TEXT = ("sd2-v", "sd2-depth", "x4-upscaler")  # OpenCLIP-style text encoder: gelu, pad token "!"
SDXL_VARIANTS = ("sdxl", "sdxl-inpaint", "sdxl-refiner", "sdxl-shaped")
UNET_IN_CHANNELS = {"sd1-inpaint": 9, "sd2-depth": 5, "x4-upscaler": 7, "sdxl-inpaint": 9}


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2 and CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """Greedy byte-pair merges over `words` (CLIP style: the last symbol of a word carries `</w>`)."""
    byte_chars = bytes_to_unicode()
    freq = Counter(words)
    vocab = {}
    for word, n in freq.items():
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        vocab[tuple(symbols)] = n
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter = Counter()
        for symbols, n in vocab.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        vocab = {_merge(symbols, best): n for symbols, n in vocab.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def write_tiny_tokenizer(folder: Path, pad_token: str = EOS_TOKEN, merges: int = 300) -> int:
    """Write vocab.json, merges.txt and the token configs of a tiny CLIP tokenizer; return its vocab size."""
    import re

    folder.mkdir(parents=True, exist_ok=True)
    words = re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", _CORPUS.lower())
    learnt = _learn_merges(words, merges)
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in learnt] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {}
    for token in tokens:  # a merge can recreate an existing symbol; keep the first id
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in learnt]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = dict(special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


_UNET_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}
# The x4 upscaler's UNet, tiny: its block pattern (cross-attention only where the published one has it) and
# class embeddings for the noise level (num_class_embeds 1000, as published)
_X4_UNET = {
    "block_out_channels": (32, 32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "only_cross_attention": (True, True, False),
    "attention_head_dim": 8,
    "num_class_embeds": 1000,
}
DPT_PATCH = 16  # the tiny depth estimator's patch: it sees 2 x 2 patches of 16 pixels


@dataclass(frozen=True)
class TinyConfig:
    variant: str = "sd1"  # "sd1": epsilon, SD1 text encoder; "sd2-v": v-prediction, SD2-style pad token "!"
    seed: int = 0
    hidden_size: int = 32  # CLIP width = UNet cross-attention dim
    block_out_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (32, 64)
    sample_size: int = 32  # latent size; default image size = sample_size * vae scale factor


def make_tiny_checkpoint(folder: str | Path, config: TinyConfig | None = None) -> Path:
    """Create a random Stable Diffusion checkpoint (tiny, or SD-1.5-shaped) at `folder`; return its path."""
    import torch
    from transformers import CLIPTokenizer

    config = config or TinyConfig()
    if config.variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {config.variant!r}; choose one of {', '.join(VARIANTS)}")
    folder = Path(folder)
    pad_token = "!" if config.variant in SD2_TEXT else EOS_TOKEN
    torch.manual_seed(config.seed)
    write_tiny_tokenizer(folder / "tokenizer", pad_token=pad_token)
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    shaped = {"sd15-shaped": _sd15_shaped_modules, "sdxl-shaped": _sdxl_shaped_modules}  # published shapes
    build = shaped.get(config.variant, _tiny_modules)
    text_encoder, unet, vae = build(config, vocab)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet}
    tokenizer_pads = {"tokenizer": pad_token}
    if config.variant in SDXL_VARIANTS:  # the second encoder's tokenizer pads with "!", as SDXL's OpenCLIP one does
        tokenizer_pads["tokenizer_2"] = "!"
        write_tiny_tokenizer(folder / "tokenizer_2", pad_token="!")
        parts.update(
            text_encoder_2=_sdxl_text_encoder_2(config, vocab),
            tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        )
    if config.variant == "sdxl-refiner":  # SDXL's refiner has the second text encoder only
        parts.update(text_encoder=None, tokenizer=None)
        del tokenizer_pads["tokenizer"]
        shutil.rmtree(folder / "tokenizer")
    with quiet_hub_libraries():  # no torchvision warnings, no bar per shard written
        pipe = _pipeline(config, **parts)
        if config.variant == "sdxl-shaped":  # half the disk and load time; latency depends on shapes only
            pipe.to(torch.float16)
        pipe.save_pretrained(folder, safe_serialization=True)
    # save_pretrained rewrites the tokenizer and schedulers in its own format; keep them as the Hub publishes them
    for part, pad in tokenizer_pads.items():
        (folder / part / "tokenizer.json").unlink(missing_ok=True)
        write_tiny_tokenizer(folder / part, pad_token=pad)
    for part, published in _scheduler_configs(config.variant).items():
        (folder / part / "scheduler_config.json").write_text(json.dumps(published, indent=2))
    logger.debug("wrote a random %s checkpoint to %s", config.variant, folder)
    return folder


def _pipeline(config: TinyConfig, **parts):
    """The diffusers pipeline object of the variant, around the text encoder, tokenizer, UNet and VAE in `parts`."""
    import diffusers

    schedulers = {
        part: getattr(diffusers, published["_class_name"]).from_config(published)
        for part, published in _scheduler_configs(config.variant).items()
    }
    if config.variant == "sd2-depth":
        depth_estimator, feature_extractor = _tiny_depth_estimator(config)
        return diffusers.StableDiffusionDepth2ImgPipeline(
            **parts, **schedulers, depth_estimator=depth_estimator, feature_extractor=feature_extractor
        )
    if config.variant == "x4-upscaler":
        from .configs import X4_MAX_NOISE_LEVEL

        return diffusers.StableDiffusionUpscalePipeline(**parts, **schedulers, max_noise_level=X4_MAX_NOISE_LEVEL)
    if config.variant in ("sdxl", "sdxl-shaped"):
        return diffusers.StableDiffusionXLPipeline(**parts, **schedulers, force_zeros_for_empty_prompt=True)
    if config.variant == "sdxl-inpaint":
        return diffusers.StableDiffusionXLInpaintPipeline(
            **parts, **schedulers, requires_aesthetics_score=False, force_zeros_for_empty_prompt=True
        )
    if config.variant == "sdxl-refiner":  # as SDXL's refiner publishes its model_index.json
        return diffusers.StableDiffusionXLImg2ImgPipeline(
            **parts, **schedulers, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
        )
    inpaint = config.variant == "sd1-inpaint"
    pipeline_class = diffusers.StableDiffusionInpaintPipeline if inpaint else diffusers.StableDiffusionPipeline
    return pipeline_class(
        **parts, **schedulers, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _tiny_modules(config: TinyConfig, vocab: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .configs import SDXL_VAE_SCALING_FACTOR, X4_VAE_SCALING_FACTOR

    sd2 = config.variant in SD2_TEXT
    upscaler = config.variant == "x4-upscaler"
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=config.hidden_size,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=0 if sd2 else vocab[EOS_TOKEN],
        projection_dim=config.hidden_size,
    )
    sdxl = config.variant in SDXL_VARIANTS
    # SDXL's UNet reads both encoders' states concatenated; the refiner's reads the second encoder's alone
    context = config.hidden_size * (2 if sdxl and config.variant != "sdxl-refiner" else 1)
    blocks = {"block_out_channels": config.block_out_channels, "attention_head_dim": (2, 4) if sd2 or sdxl else 8}
    unet = UNet2DConditionModel(
        sample_size=config.sample_size,
        in_channels=UNET_IN_CHANNELS.get(config.variant, 4),
        out_channels=4,
        layers_per_block=1,
        cross_attention_dim=context,
        use_linear_projection=sd2 or sdxl,
        norm_num_groups=32,
        **(_X4_UNET if upscaler else dict(blocks, **_UNET_BLOCKS)),
        **(_sdxl_added_conditioning(config, config.variant == "sdxl-refiner") if sdxl else {}),
    )
    vae_channels = (32, 32, 64) if upscaler else config.vae_channels  # the x4 VAE: 3 levels, 4x per latent pixel
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=config.sample_size * 2 ** (len(vae_channels) - 1),
        **({"scaling_factor": X4_VAE_SCALING_FACTOR} if upscaler else {}),
        **({"scaling_factor": SDXL_VAE_SCALING_FACTOR, "force_upcast": True} if sdxl else {}),
    )
    modules = CLIPTextModel(text_config), unet, vae
    for module in modules:
        _randomise_norms(module)
    return modules


SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim of the tiny SDXL UNet (SDXL base: 256)


def _sdxl_added_conditioning(config: TinyConfig, refiner: bool = False) -> dict:
    """The UNet's "text_time" added conditioning: the pooled projection of text encoder 2 (projection_dim, here the
    hidden size) and the six size/crop ids (a refiner: five, the aesthetic score instead of the target size), each
    embedded in addition_time_embed_dim features."""
    ids = 5 if refiner else 6
    return {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": config.hidden_size + ids * SDXL_TIME_EMBED_DIM,
    }


def _sdxl_text_encoder_2(config: TinyConfig, vocab: dict):
    """SDXL's second text encoder, tiny: OpenCLIP-style (gelu, pad token "!" at id 0) with a text projection."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if config.variant == "sdxl-shaped":
        from .configs import SDXL_TEXT_ENCODER_2

        text = dict(SDXL_TEXT_ENCODER_2, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN], pad_token_id=0)
        return CLIPTextModelWithProjection(CLIPTextConfig(**text))
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=config.hidden_size,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=0,
        projection_dim=config.hidden_size,
    )
    module = CLIPTextModelWithProjection(text_config)
    _randomise_norms(module)
    return module


def _randomise_norms(module) -> None:
    """Give norm layers random scales and shifts (fresh ones are 1 and 0): trained models have them, and a
    CLIP output whose final norm has no shift averages to ~0, which makes A1111's emphasis rescale degenerate."""
    import torch

    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and layer.weight is not None:
                layer.weight.normal_(1.0, 0.1)
                layer.bias.normal_(0.0, 0.3)


def _sd15_shaped_modules(config: TinyConfig, vocab: dict):
    """SD 1.5's published shapes with random weights; the tiny tokenizer's ids all lie inside CLIP's vocab."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .configs import SD15_TEXT_ENCODER, SD15_UNET, SD15_VAE

    text = dict(SD15_TEXT_ENCODER, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN])
    text["pad_token_id"] = vocab[EOS_TOKEN]
    return CLIPTextModel(CLIPTextConfig(**text)), UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)


def _sdxl_shaped_modules(config: TinyConfig, vocab: dict):
    """SDXL base 1.0's published shapes with random weights: text encoder 1 (CLIP ViT-L, as SD 1.5's), the UNet, the
    VAE (force_upcast); text encoder 2 comes from _sdxl_text_encoder_2."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .configs import SD15_TEXT_ENCODER, SDXL_UNET, SDXL_VAE

    text = dict(SD15_TEXT_ENCODER, bos_token_id=vocab[BOS_TOKEN], eos_token_id=vocab[EOS_TOKEN])
    text["pad_token_id"] = vocab[EOS_TOKEN]
    return CLIPTextModel(CLIPTextConfig(**text)), UNet2DConditionModel(**SDXL_UNET), AutoencoderKL(**SDXL_VAE)


def _scheduler_configs(variant: str) -> dict[str, dict]:
    """The scheduler configs each variant's published model has (SD 1.5, SD 2.1 768 v-prediction, SD 2 depth, the
    x4 upscaler and its low-res scheduler), keys as they have them, by checkpoint folder."""
    from .configs import SD2_DEPTH_SCHEDULER, SD15_SCHEDULER, SDXL_SCHEDULER, X4_LOW_RES_SCHEDULER, X4_SCHEDULER

    if variant == "sd2-v":
        config = {k: v for k, v in SD15_SCHEDULER.items() if k != "skip_prk_steps"}
        return {"scheduler": dict(config, _class_name="DDIMScheduler", prediction_type="v_prediction")}
    if variant == "sd2-depth":
        return {"scheduler": dict(SD2_DEPTH_SCHEDULER)}
    if variant == "x4-upscaler":
        return {"scheduler": dict(X4_SCHEDULER), "low_res_scheduler": dict(X4_LOW_RES_SCHEDULER)}
    if variant in SDXL_VARIANTS:
        return {"scheduler": dict(SDXL_SCHEDULER)}
    return {"scheduler": dict(SD15_SCHEDULER)}


def _tiny_depth_estimator(config: TinyConfig):
    """A tiny DPT-hybrid (ViT on a BiT backbone, as SD 2 depth's Intel/dpt-hybrid-midas) and its image processor.

    Weights are fan-in scaled and the head's last bias is positive, so the random depth varies over the image
    (DPT's own small init puts nearly every depth through the final ReLU at 0)."""
    import math

    import torch
    import transformers
    from transformers import DPTConfig, DPTForDepthEstimation

    size = 2 * DPT_PATCH  # pixels the estimator sees (Intel/dpt-hybrid-midas: 384)
    backbone = {
        "layer_type": "bottleneck",
        "depths": [1, 1, 1],
        "hidden_sizes": [16, 32, 64, 128],
        "embedding_size": 16,
        "num_groups": 2,
        "global_padding": "same",
        "embedding_dynamic_padding": True,
        "out_features": ["stage1", "stage2", "stage3"],
    }
    dpt_config = DPTConfig(
        image_size=size,
        patch_size=DPT_PATCH,
        hidden_size=config.hidden_size,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        is_hybrid=True,
        backbone_config=backbone,
        backbone_featmap_shape=[1, 64, size // DPT_PATCH, size // DPT_PATCH],
        backbone_out_indices=(0, 1, 2, 3),
        neck_hidden_sizes=[16, 32, 64, 128],
        reassemble_factors=[1, 1, 1, 0.5],
        fusion_hidden_size=32,
    )
    model = DPTForDepthEstimation(dpt_config).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.weight[0].numel()))
                if layer.bias is not None:
                    layer.bias.normal_(0.0, 0.1)
        model.head.head[-2].bias.fill_(1.0)
    # the PIL image processor (transformers 5 names it apart from the torchvision one), which sdrt reproduces
    processor_class = getattr(transformers, "DPTImageProcessorPil", None) or transformers.DPTImageProcessor
    processor = processor_class(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, keep_aspect_ratio=False
    )
    return model, processor
