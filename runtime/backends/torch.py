"""torch backend: the checkpoint's own diffusers/transformers modules, fp32 on the CPU (the reference path).

Each session speaks the same names as the exported ONNX models, so the pipeline cannot tell them apart; the text
encoder runs in export/modules.py's wrapper, the very module the ONNX text encoder was traced from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.modules import TextEncoder, TextEncoder2
from export.quiet import quiet_hub_libraries

from ..errors import ModelError
from . import TextTables


def _load(checkpoint: Path, component: str, allow_pickle: bool) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, DPTForDepthEstimation

    loaders = {
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,  # SDXL's second, with the pooled projection
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "depth_estimator": DPTForDepthEstimation,
    }
    if not (checkpoint / component).is_dir():
        raise ModelError(f"{checkpoint} has no {component}/ folder")
    if not allow_pickle and not any((checkpoint / component).glob("*.safetensors")):
        raise ModelError(
            f"{checkpoint / component} has only .bin (pickle) weights: convert them to .safetensors, "
            "or allow pickles (--allow-pickle) if you trust this checkpoint"
        )
    try:
        safetensors = None if allow_pickle else True  # None: safetensors when present, else the .bin pickle
        with quiet_hub_libraries():  # no weight-loading bar: the API and --quiet show none
            module = loaders[component].from_pretrained(checkpoint, subfolder=component, use_safetensors=safetensors)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load {component} from {checkpoint}: {str(exc).splitlines()[0][:160]}") from exc
    return module.eval().requires_grad_(False)


def _numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """A read-only float32 numpy view of a parameter (shares its memory)."""
    array = tensor.detach().float().numpy()
    array.flags.writeable = False
    return array


def text_tables_of(text_encoder: torch.nn.Module) -> TextTables:
    """The token embedding table and final LayerNorm of a transformers CLIPTextModel, as numpy views."""
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm  # transformers 4 nests text_model
    return TextTables(
        token_embedding=_numpy_view(text_encoder.get_input_embeddings().weight),  # [V, D]
        final_norm_weight=_numpy_view(norm.weight),
        final_norm_bias=_numpy_view(norm.bias),
        final_norm_eps=float(norm.eps),
    )


class TorchSession:
    def __init__(self, component: str, module: torch.nn.Module):
        self.component = component
        self.module = module
        if component == "text_encoder":
            self.text_encoder = TextEncoder(module)
            self.tables = text_tables_of(module)
        if component == "text_encoder_2":
            self.text_encoder = TextEncoder2(module)

    @torch.inference_mode()
    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        if self.component == "text_encoder" and "input_ids" in feeds:
            feeds = {"inputs_embeds": self.tables.embed(feeds["input_ids"])}  # [B, 77, D]
        # writable C-contiguous views (a copy only of a read-only or strided feed): torch warns on read-only arrays
        t = {name: torch.from_numpy(np.require(value, requirements=("C", "W"))) for name, value in feeds.items()}
        if self.component == "text_encoder":
            last_hidden_state, hidden_states = self.text_encoder(t["inputs_embeds"])
            result = {"last_hidden_state": last_hidden_state, "hidden_states": hidden_states}
        elif self.component == "text_encoder_2":
            hidden_states, text_embeds = self.text_encoder(t["input_ids"], t["token_overrides"])
            result = {"hidden_states": hidden_states, "text_embeds": text_embeds}
        elif self.component == "unet":
            added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]} if "time_ids" in t else None
            sample = self.module(
                t["sample"],
                t["timestep"],
                encoder_hidden_states=t["encoder_hidden_states"],
                class_labels=t.get("class_labels"),  # the x4 upscaler's noise level, per row
                added_cond_kwargs=added,  # SDXL's pooled text and size/crop ids
            )
            result = {"noise_pred": sample.sample}
        elif self.component == "depth_estimator":
            result = {"predicted_depth": self.module(t["pixel_values"]).predicted_depth}
        elif self.component == "vae_decoder":
            result = {"image": self.module.decode(t["latent"]).sample}
        else:  # vae_encoder: the posterior's parameters (mean, log-variance), never a sample
            moments = self.module.quant_conv(self.module.encoder(t["image"]))
            result = {"latent_parameters": moments}
        names = outputs or list(result)
        return {name: result[name].float().numpy() for name in names}


class TorchBackend:
    name = "torch"

    def __init__(self, checkpoint: Path | None, allow_pickle: bool = False):
        if checkpoint is None or not Path(checkpoint).is_dir():
            raise ModelError(f"the torch backend needs the checkpoint folder, and {checkpoint} is not available")
        self.checkpoint = Path(checkpoint)
        self.allow_pickle = allow_pickle
        self._modules: dict[str, torch.nn.Module] = {}
        self._saved: dict[tuple[str, str], torch.Tensor] = {}  # (component, parameter) -> base value (LoRA)

    def _module(self, component: str) -> torch.nn.Module:
        module_name = "vae" if component.startswith("vae") else component
        if module_name not in self._modules:
            self._modules[module_name] = _load(self.checkpoint, module_name, self.allow_pickle)
        return self._modules[module_name]

    def session(self, component: str) -> TorchSession:
        return TorchSession(component, self._module(component))

    def text_tables(self) -> TextTables:
        """The text encoder's token embedding table and final norm, read from the loaded module (no copies)."""
        return text_tables_of(self._module("text_encoder"))

    # LoRA: the backend weight interface (diffusers parameter names, full float32 values)

    def _parameters(self, component: str) -> dict[str, torch.nn.Parameter]:
        from runtime.lora.weight_map import canonical_parameter_name

        module = self._module(component)
        return {canonical_parameter_name(component, name): p for name, p in module.named_parameters()}

    def parameter_shapes(self, component: str) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in self._parameters(component).items()}

    def base_parameters(self, component: str, names) -> dict[str, np.ndarray]:
        """The base values of parameters, whether or not a LoRA is merged into them now."""
        parameters = self._parameters(component)
        values = {}
        for name in names:
            base = self._saved.get((component, name), parameters[name].data)
            values[name] = base.detach().float().numpy().copy()
        return values

    @torch.inference_mode()
    def apply_weights(self, patches: dict[str, dict[str, np.ndarray]] | None) -> None:
        """Write full new values into the modules' parameters, keeping each touched base value to restore it;
        None or {} restores every touched parameter (each call starts from base)."""
        patches = patches or {}
        parameters = {component: self._parameters(component) for component in {*patches, *(c for c, _ in self._saved)}}
        for component, values in patches.items():  # check everything before changing anything
            unknown = sorted(set(values) - set(parameters[component]))
            if unknown:
                raise ModelError(f"the {component} has no parameter {unknown[0]}")
        for (component, name), base in list(self._saved.items()):
            if name not in patches.get(component, {}):
                parameters[component][name].data.copy_(base)
                del self._saved[(component, name)]
        for component, values in patches.items():
            for name, value in values.items():
                parameter = parameters[component][name]
                self._saved.setdefault((component, name), parameter.data.clone())
                parameter.data.copy_(torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32)))
