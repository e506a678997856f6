"""Tracing wrappers: each takes a component's inputs by position and returns exactly its spec's outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class TextEncoder(nn.Module):
    """CLIP text model on token embeddings -> (last_hidden_state, all hidden states stacked, before the final norm).

    `inputs_embeds` [B, 77, D] is the token-embedding lookup, done by the caller (textual-inversion vectors replace
    rows of it); CLIP adds the position embeddings and runs its causal transformer exactly as for input ids.
    """

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    def forward(self, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # CLIPTextModel takes only ids: give it zeros and put the caller's embeddings where their lookup would be.
        # The ids then feed only the pooled output, which is dropped, so the exported graph keeps neither.
        placeholder_ids = torch.zeros_like(inputs_embeds[..., 0], dtype=torch.long)  # [B, 77]
        with replaced_output(self.token_embedding, inputs_embeds):
            output = self.text_encoder(placeholder_ids, output_hidden_states=True, return_dict=True)
        hidden_states = torch.stack(output.hidden_states)  # [num_layers + 1, B, 77, D]
        return output.last_hidden_state, hidden_states  # pooled output dropped


@contextlib.contextmanager
def replaced_output(module: nn.Module, value: torch.Tensor) -> Iterator[None]:
    """Within the block, `module` returns `value` (a forward hook, removed on exit)."""
    handle = module.register_forward_hook(lambda _module, _args, _output: value)
    try:
        yield
    finally:
        handle.remove()


class UNet(nn.Module):
    """UNet2DConditionModel -> noise_pred (eps or v, as the checkpoint predicts); `class_labels` [B] int64 for a
    UNet with class embeddings (the x4 upscaler's noise level)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        output = self.unet(sample, timestep, encoder_hidden_states, class_labels=class_labels, return_dict=False)
        return output[0]  # [B, C_out, h, w]


class SdxlUNet(nn.Module):
    """SDXL's UNet2DConditionModel: the "text_time" added conditioning as two more inputs, text_embeds [B, P] (text
    encoder 2's pooled projection) and time_ids [B, 6] (original size, crop top-left, target size; a refiner's
    [B, 5], the aesthetic score for the target size)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        output = self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)
        return output[0]  # [B, 4, h, w]


class TextEncoder2(nn.Module):
    """SDXL's second text encoder (CLIPTextModelWithProjection) on token ids -> (all hidden states stacked, before
    the final norm; the pooled, projected text_embeds of the end token's row).

    Textual inversion: where `input_ids` holds -1 the token embedding is that row of `token_overrides` [B, 77, D]
    (an embedding's vectors) instead of a looked-up id; the pooled row is found among the other ids as usual.
    """

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    @property
    def token_embedding(self) -> nn.Embedding:  # an SDXL refiner's text tables come from here (no text encoder 1)
        return self.text_encoder.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, token_overrides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = input_ids.long()
        looked_up = self.token_embedding(ids.clamp(min=0))  # [B, 77, D]
        embeds = torch.where((ids < 0).unsqueeze(-1), token_overrides.to(looked_up.dtype), looked_up)
        with replaced_output(self.token_embedding, embeds):
            output = self.text_encoder(ids.clamp(min=0), output_hidden_states=True, return_dict=True)
        return torch.stack(output.hidden_states), output.text_embeds  # [L + 1, B, 77, D], [B, P]


class DepthEstimator(nn.Module):
    """DPTForDepthEstimation: preprocessed pixel_values [B, 3, S, S] -> predicted_depth [B, S, S] (relative)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, return_dict=True).predicted_depth


class VaeDecoder(nn.Module):
    """AutoencoderKL post_quant_conv + decoder: scaled-back latent -> image in about [-1, 1], unclamped."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]  # [B, 3, 8h, 8w]


class VaeEncoder(nn.Module):
    """AutoencoderKL encoder + quant_conv: image -> the diagonal Gaussian's parameters (mean, log-variance)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(image, return_dict=False)[0]
        return posterior.parameters  # [B, 2 * latent_channels, H/8, W/8]; never a sample
