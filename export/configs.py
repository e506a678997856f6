"""Published model configs, as data: random-weight models of the real shapes for benchmarks (no download)."""

from __future__ import annotations

# The published scheduler configs (scheduler/scheduler_config.json) are the runtime's family data, which the
# single-file converter writes too: SD 1.5's PNDM; SD 2 depth's PNDM with epsilon (its v2-midas config has no "v");
# the x4 upscaler's DDIM with v-prediction on x4-upscaling.yaml's betas (linear_start 0.0001, linear_end 0.02), its
# low_res_scheduler that noises the low-resolution image (DDPM, the ImageConcatWithNoiseAugmentation schedule) and
# model_index.json's cap of 350 on the noise level.
from runtime.single_file.families import SD1_SCHEDULER as SD15_SCHEDULER  # noqa: F401 (re-exported)
from runtime.single_file.families import SD2_EPS_SCHEDULER as SD2_DEPTH_SCHEDULER  # noqa: F401
from runtime.single_file.families import X4_LOW_RES_SCHEDULER, X4_MAX_NOISE_LEVEL, X4_SCHEDULER  # noqa: F401

# Stable Diffusion 1.5 (unet/, vae/, text_encoder/ config.json as published), keys as diffusers reads them.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
}

SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

SD15_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}

X4_VAE_SCALING_FACTOR = 0.08333

# Stable Diffusion XL base 1.0: its VAE's scaling factor and its scheduler/scheduler_config.json as published
SDXL_VAE_SCALING_FACTOR = 0.13025
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

# Stable Diffusion XL base 1.0 (unet/, vae/, text_encoder_2/ config.json as published; its text_encoder/ is SD 1.5's
# CLIP ViT-L, SD15_TEXT_ENCODER): 2,567,463,684 UNet, 694,659,840 text encoder 2 and 83,653,863 VAE parameters
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,  # 768 + 1280: both encoders' states side by side
    "attention_head_dim": [5, 10, 20],  # heads per level (64 channels each)
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled text 1280 + 6 ids x 256
    "norm_num_groups": 32,
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
}

SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=SDXL_VAE_SCALING_FACTOR, force_upcast=True)

SDXL_TEXT_ENCODER_2 = {  # OpenCLIP ViT-bigG's text tower with its projection (CLIPTextModelWithProjection)
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "projection_dim": 1280,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
