"""torch backend: the checkpoint's own diffusers/transformers modules, fp32 on the CPU (the reference path).

Each session speaks the same names as the exported ONNX models, so the pipeline cannot tell them apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError


def _load(checkpoint: Path, component: str) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    loaders = {"text_encoder": CLIPTextModel, "unet": UNet2DConditionModel, "vae": AutoencoderKL}
    try:
        module = loaders[component].from_pretrained(checkpoint, subfolder=component, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {component} from {checkpoint}: {str(exc).splitlines()[0][:160]}") from exc
    return module.eval().requires_grad_(False)


class TorchSession:
    def __init__(self, component: str, module: torch.nn.Module):
        self.component = component
        self.module = module

    @torch.inference_mode()
    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        t = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}
        if self.component == "text_encoder":
            out = self.module(t["input_ids"].long(), output_hidden_states=True)
            result = {"last_hidden_state": out.last_hidden_state, "hidden_states": torch.stack(out.hidden_states)}
        elif self.component == "unet":
            sample = self.module(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"])
            result = {"noise_pred": sample.sample}
        elif self.component == "vae_decoder":
            result = {"image": self.module.decode(t["latent"]).sample}
        else:  # vae_encoder: the posterior's parameters (mean, log-variance), never a sample
            moments = self.module.quant_conv(self.module.encoder(t["image"]))
            result = {"latent_parameters": moments}
        names = outputs or list(result)
        return {name: result[name].float().numpy() for name in names}


class TorchBackend:
    name = "torch"

    def __init__(self, checkpoint: Path | None):
        if checkpoint is None or not Path(checkpoint).is_dir():
            raise ModelError(f"the torch backend needs the checkpoint folder, and {checkpoint} is not available")
        self.checkpoint = Path(checkpoint)
        self._modules: dict[str, torch.nn.Module] = {}

    def session(self, component: str) -> TorchSession:
        module_name = "vae" if component.startswith("vae") else component
        if module_name not in self._modules:
            self._modules[module_name] = _load(self.checkpoint, module_name)
        return TorchSession(component, self._modules[module_name])
