"""Model families of single-file checkpoints: what the published configs say, as data, and how to tell them apart.

Shapes fix most of the architecture (channels, levels, layers, cross-attention and text widths, vocabulary); the
rest comes from the family's published diffusers configs, written here: attention heads (SD 1.x: 8 per UNet block;
SD 2.x and SDXL: one head per 64 channels; CLIP-L, OpenCLIP-H and -bigG text: one head per 64 channels), the text
activation, the scheduler, the VAE scaling factor (and SDXL's fp32 VAE) and the default image size.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import ModelError
from .keys import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    SDXL_REFINER_PREFIX,
    UNET_PREFIX,
)

TEXT_HEAD_WIDTH = 64  # CLIP ViT-L/14 (768 / 12) and OpenCLIP ViT-H/14 (1024 / 16)
SD2_HEAD_WIDTH = 64  # SD 2.x UNet: num_head_channels 64 (diffusers' attention_head_dim [5, 10, 20, 20])

# Scheduler configs as the families publish them (scheduler/scheduler_config.json)
_SCALED_LINEAR = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD1_SCHEDULER = dict(_SCALED_LINEAR, _class_name="PNDMScheduler")  # runwayml/stable-diffusion-v1-5
SD2_EPS_SCHEDULER = dict(SD1_SCHEDULER, prediction_type="epsilon")  # stabilityai/stable-diffusion-2-base
SD2_V_SCHEDULER = dict(_SCALED_LINEAR, _class_name="DDIMScheduler", prediction_type="v_prediction")  # 2-1 (768)
X4_SCHEDULER = dict(  # stabilityai/stable-diffusion-x4-upscaler
    _SCALED_LINEAR, _class_name="DDIMScheduler", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction"
)
X4_LOW_RES_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}
X4_MAX_NOISE_LEVEL = 350
SDXL_SCHEDULER = dict(  # stabilityai/stable-diffusion-xl-base-1.0 (and its refiner, and the SDXL inpainting 0.1)
    _SCALED_LINEAR,
    _class_name="EulerDiscreteScheduler",
    interpolation_type="linear",
    prediction_type="epsilon",
    sample_max_value=1.0,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)
SDXL_VAE_SCALING_FACTOR = 0.13025


@dataclass(frozen=True)
class Family:
    """One published model family: its name for messages, pipeline class and the configs shapes do not fix."""

    name: str
    pipeline_class: str
    text: str  # "clip" (SD 1.x), "open_clip" (SD 2.x), "sdxl" (CLIP-L + OpenCLIP-bigG), "sdxl_refiner" (bigG only)
    unet_heads: str  # "8": 8 heads in every block (SD 1.x, x4); "64": one head per 64 channels (SD 2.x)
    scheduler: dict
    sample_size: int  # UNet latent size of the default image (512 px: 64, 768 px: 96)
    vae_scaling_factor: float = 0.18215
    upcast_attention: bool = False
    only_cross_attention: bool = False  # x4: attention blocks without self-attention, except at the lowest level
    low_res_scheduler: dict | None = None
    force_upcast: bool = False  # SDXL: the VAE runs in float32 (its published config says so)

    @property
    def sdxl(self) -> bool:
        return self.text in ("sdxl", "sdxl_refiner")


SD1 = Family("SD 1.x", "StableDiffusionPipeline", "clip", "8", SD1_SCHEDULER, 64)
SD1_INPAINT = Family("SD 1.x inpainting", "StableDiffusionInpaintPipeline", "clip", "8", SD1_SCHEDULER, 64)
SD2_EPS = Family("SD 2.x (epsilon)", "StableDiffusionPipeline", "open_clip", "64", SD2_EPS_SCHEDULER, 64)
SD2_V = Family(
    "SD 2.x (v-prediction)", "StableDiffusionPipeline", "open_clip", "64", SD2_V_SCHEDULER, 96, upcast_attention=True
)
SD2_INPAINT = Family("SD 2.x inpainting", "StableDiffusionInpaintPipeline", "open_clip", "64", SD2_EPS_SCHEDULER, 64)
SD2_DEPTH = Family("SD 2.x depth", "StableDiffusionDepth2ImgPipeline", "open_clip", "64", SD2_EPS_SCHEDULER, 64)
X4_UPSCALER = Family(
    "SD x4 upscaler",
    "StableDiffusionUpscalePipeline",
    "open_clip",
    "8",
    X4_SCHEDULER,
    128,
    vae_scaling_factor=0.08333,
    only_cross_attention=True,
    low_res_scheduler=X4_LOW_RES_SCHEDULER,
)
_SDXL = dict(vae_scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=True)
SDXL = Family("SDXL", "StableDiffusionXLPipeline", "sdxl", "64", SDXL_SCHEDULER, 128, **_SDXL)
SDXL_INPAINT = Family(
    "SDXL inpainting", "StableDiffusionXLInpaintPipeline", "sdxl", "64", SDXL_SCHEDULER, 128, **_SDXL
)
SDXL_REFINER = Family(
    "SDXL refiner", "StableDiffusionXLImg2ImgPipeline", "sdxl_refiner", "64", SDXL_SCHEDULER, 128, **_SDXL
)
PREDICTION_TYPES = ("epsilon", "v_prediction")


def detect_family(names: set[str], unet_in_channels: int | None) -> Family:
    """The family of a checkpoint from its tensor names and UNet input channels; ModelError for anything else.

    SD 2.x with 4 channels is returned as SD2_EPS here; v-prediction cannot be read from shapes (see
    runtime.single_file.probe)."""
    if any(n.startswith(("conditioner.embedders.", UNET_PREFIX + "label_emb.0.0.")) for n in names):
        return _detect_sdxl(names, unet_in_channels)
    if unet_in_channels is None:
        if any(n.startswith(("model.diffusion_model.", "double_blocks.", "joint_blocks.")) for n in names):
            raise ModelError("unknown model family: not an SD 1.x/2.x UNet (SD3, Flux, ... are not supported)")
        raise ModelError("not a Stable Diffusion checkpoint: it has no UNet (model.diffusion_model.*) tensors")
    clip = any(n.startswith(CLIP_PREFIX) for n in names)
    open_clip = any(n.startswith(OPEN_CLIP_PREFIX) for n in names)
    if clip == open_clip:
        raise ModelError("unknown model family: no SD 1.x (CLIP) or SD 2.x (OpenCLIP) text encoder tensors")
    if clip:
        families = {4: SD1, 9: SD1_INPAINT}
    else:
        families = {4: SD2_EPS, 9: SD2_INPAINT, 5: SD2_DEPTH}
        if UNET_PREFIX + "label_emb.weight" in names:
            families = {7: X4_UPSCALER}
    if unet_in_channels not in families:
        kind = "SD 1.x" if clip else "SD 2.x"
        raise ModelError(f"unknown model family: an {kind} text encoder with a {unet_in_channels}-channel UNet")
    return families[unet_in_channels]


def _detect_sdxl(names: set[str], unet_in_channels: int | None) -> Family:
    """SDXL base or inpainting (CLIP-L as embedder 0, OpenCLIP-bigG as embedder 1) or the refiner (bigG alone)."""
    has = {prefix: any(n.startswith(prefix) for n in names) for prefix in (SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX)}
    refiner = any(n.startswith(SDXL_REFINER_PREFIX) for n in names)
    if unet_in_channels is None or UNET_PREFIX + "label_emb.0.0.weight" not in names:
        raise ModelError("an SDXL checkpoint without its UNet or the UNet's added conditioning (label_emb.0.*)")
    if all(has.values()) and not refiner:
        families = {4: SDXL, 9: SDXL_INPAINT}
    elif refiner and not any(has.values()):
        families = {4: SDXL_REFINER}
    else:
        raise ModelError(
            "unknown SDXL layout: expected conditioner.embedders.0.transformer + 1.model (base) or 0.model (refiner)"
        )
    if unet_in_channels not in families:
        raise ModelError(f"unknown model family: an SDXL text encoder layout with a {unet_in_channels}-channel UNet")
    return families[unet_in_channels]


def unet_heads(family: Family, block_out_channels: list[int]) -> int | list[int]:
    """diffusers' `attention_head_dim` (which it reads as the number of heads) by the family's rule."""
    if family.unet_heads == "64":
        bad = [c for c in block_out_channels if c % SD2_HEAD_WIDTH]
        if bad:
            raise ModelError(f"{family.name}: UNet widths {bad} are not multiples of {SD2_HEAD_WIDTH} (head width)")
        return [c // SD2_HEAD_WIDTH for c in block_out_channels]
    return int(family.unet_heads)


def with_prediction_type(family: Family, prediction_type: str) -> Family:
    """The family with the scheduler of the given prediction type (only SD 2.x base models differ by it)."""
    if family is SD2_EPS and prediction_type == "v_prediction":
        return SD2_V
    if family is SD2_V and prediction_type == "epsilon":
        return SD2_EPS
    if family.scheduler.get("prediction_type", "epsilon") == prediction_type:
        return family
    return replace(family, scheduler=dict(family.scheduler, prediction_type=prediction_type))
