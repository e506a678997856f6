"""Tracing wrappers: each takes a component's inputs by position and returns exactly its spec's outputs."""

from __future__ import annotations

import torch
from torch import nn


class TextEncoder(nn.Module):
    """CLIP text model -> (last_hidden_state, every encoder hidden state stacked before the final layer norm)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        hidden_states = torch.stack(output.hidden_states)  # [num_layers + 1, B, 77, D]
        return output.last_hidden_state, hidden_states  # pooled output dropped


class UNet(nn.Module):
    """UNet2DConditionModel -> noise_pred (eps or v, as the checkpoint predicts)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]  # [B, C_out, h, w]


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
