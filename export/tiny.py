"""Tiny random Stable Diffusion checkpoints in the diffusers folder layout, for demos and tests.

The folder is a real diffusers checkpoint (diffusers' own StableDiffusionPipeline loads it): a CLIP text
encoder, a UNet, a VAE, a scheduler config and a CLIP BPE tokenizer (vocab.json + merges.txt) whose
vocabulary is learnt here from a small word list, since no published vocabulary can be downloaded.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

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

# "sd15-shaped": SD 1.5's published shapes, random weights (benchmarks); "sd1-inpaint": sd1 with a 9-channel UNet
# (4 latents + 1 mask + 4 masked-image latents), saved as a StableDiffusionInpaintPipeline
VARIANTS = ("sd1", "sd2-v", "sd15-shaped", "sd1-inpaint")


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
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    config = config or TinyConfig()
    if config.variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {config.variant!r}; choose one of {', '.join(VARIANTS)}")
    folder = Path(folder)
    sd2 = config.variant == "sd2-v"
    pad_token = "!" if sd2 else EOS_TOKEN
    torch.manual_seed(config.seed)
    write_tiny_tokenizer(folder / "tokenizer", pad_token=pad_token)
    vocab = json.loads((folder / "tokenizer" / "vocab.json").read_text())
    build = _sd15_shaped_modules if config.variant == "sd15-shaped" else _tiny_modules
    text_encoder, unet, vae = build(config, vocab)
    pipeline_class = StableDiffusionInpaintPipeline if config.variant == "sd1-inpaint" else StableDiffusionPipeline
    pipe = pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=unet,
        scheduler=(DDIMScheduler if sd2 else PNDMScheduler).from_config(_scheduler_config(sd2)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # save_pretrained rewrites the tokenizer and scheduler in its own format; keep them as the Hub publishes them
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    write_tiny_tokenizer(folder / "tokenizer", pad_token=pad_token)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_scheduler_config(sd2), indent=2))
    logger.debug("wrote a random %s checkpoint to %s", config.variant, folder)
    return folder


def _tiny_modules(config: TinyConfig, vocab: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sd2 = config.variant == "sd2-v"
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
    unet = UNet2DConditionModel(
        sample_size=config.sample_size,
        in_channels=9 if config.variant == "sd1-inpaint" else 4,
        out_channels=4,
        block_out_channels=config.block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=config.hidden_size,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=config.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(config.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=config.sample_size * 2 ** (len(config.vae_channels) - 1),
    )
    modules = CLIPTextModel(text_config), unet, vae
    for module in modules:
        _randomise_norms(module)
    return modules


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


def _scheduler_config(sd2: bool) -> dict:
    """The scheduler configs SD 1.5 and SD 2.1 (768, v-prediction) publish, keys as they have them."""
    from .configs import SD15_SCHEDULER

    if not sd2:
        return dict(SD15_SCHEDULER)
    config = {k: v for k, v in SD15_SCHEDULER.items() if k != "skip_prk_steps"}
    return dict(config, _class_name="DDIMScheduler", prediction_type="v_prediction")
