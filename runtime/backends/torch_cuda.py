"""torch on CUDA: the checkpoint's diffusers modules in fp16 with SDPA attention and channels-last memory, the
UNet step captured as a torch CUDA graph per input shape (static input/output tensors, warm-up on a side stream).

`compile=True` compiles the UNet with torch.compile ("max-autotune-no-cudagraphs"); the graph capture still wraps
it. The VAE runs in fp16 for SD 1.x/2.x as diffusers' StableDiffusionPipeline does (gpu.vae_runs_fp16); an fp16
decode with NaN/Inf is computed again in fp32. The depth estimator (depth2img, once per request) runs in fp32.
SDXL: text encoder 2 (token ids in, export.modules.TextEncoder2), the UNet's added conditioning (text_embeds and
time_ids as diffusers' added_cond_kwargs, in the graph's static inputs like the others), the VAE fp32 where its
config says force_upcast (SDXL's does).

Inputs go through pinned staging tensors with non-blocking copies; an input that is the same read-only numpy array
object as the last one of its name (the per-generation text conditioning) stays on the device, not uploaded again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendUnavailableError, ModelError
from . import TextTables
from .gpu import NanGuard, vae_runs_fp16
from .torch import _load, text_tables_of

logger = logging.getLogger(__name__)

WARMUP_RUNS = 3  # before a capture: cuDNN/cuBLAS pick their algorithms and allocate workspaces
# float inputs kept float32 on the device: the UNet embeds them with sin/cos (diffusers casts them to float itself)
FP32_INPUTS = ("timestep", "time_ids")


def require_cuda() -> None:
    """BackendUnavailableError unless this torch build sees an NVIDIA GPU."""
    if not torch.cuda.is_available():
        raise BackendUnavailableError("the torch-cuda backend needs a CUDA build of torch and an NVIDIA GPU")


class GraphedUNet:
    """The UNet's forward as a CUDA graph per input shape; inputs are copied into the captured static tensors."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.graphs: dict = {}  # shape key -> (graph, static inputs, static output)

    def forward(self, sample, timestep, encoder_hidden_states, class_labels=None, text_embeds=None, time_ids=None):
        return unet_forward(self.unet, sample, timestep, encoder_hidden_states, class_labels, text_embeds, time_ids)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(inputs)
            except Exception as exc:  # an op that cannot be captured: this shape runs eagerly from now on
                reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                logger.warning("unet: CUDA graph capture failed, running eagerly (%s)", reason)
                self.graphs[key] = None
        if self.graphs[key] is None:
            return self.forward(**inputs)
        graph, static, output, sources = self.graphs[key]
        for name, tensor in inputs.items():
            if sources.get(name) is not tensor:  # a constant input (the same device tensor) is in place already
                static[name].copy_(tensor)
                sources[name] = tensor
        graph.replay()
        return output

    def _capture(self, inputs: dict[str, torch.Tensor]):
        static = {name: t.clone() for name, t in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.forward(**static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.forward(**static)
        return graph, static, output, {}

    def invalidate(self) -> None:
        self.graphs.clear()


def unet_forward(unet, sample, timestep, encoder_hidden_states, class_labels=None, text_embeds=None, time_ids=None):
    """noise_pred of a diffusers UNet2DConditionModel from the UNet session's inputs; SDXL's text_embeds [B, P] and
    time_ids [B, 6] (a refiner's [B, 5]) go in as its added_cond_kwargs."""
    added = None if time_ids is None else {"text_embeds": text_embeds, "time_ids": time_ids}
    out = unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
               added_cond_kwargs=added)  # fmt: skip
    return out.sample


def device_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uploaded input in the dtype its module computes in: floats in `dtype` but FP32_INPUTS; ids as they are."""
    return tensor.to(dtype) if tensor.is_floating_point() and name not in FP32_INPUTS else tensor


class Uploads:
    """Host -> device copies of one session's inputs through pinned staging tensors (non-blocking), skipping an
    input that is the same read-only array object as the last upload of its name (kept referenced, so its id cannot
    be reused by another array)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.last: dict[str, tuple[np.ndarray, torch.Tensor]] = {}  # name -> (read-only array, device tensor)
        self.staging: dict[str, torch.Tensor] = {}  # name -> pinned host tensor of the last shape and dtype

    def tensor(self, name: str, value: np.ndarray) -> torch.Tensor:
        value = np.asarray(value)
        kept = self.last.get(name)
        if kept is not None and kept[0] is value and not value.flags.writeable:
            return kept[1]
        staging = self.staging.get(name)
        if staging is None or tuple(staging.shape) != value.shape or staging.numpy().dtype != value.dtype:
            dtype = torch.from_numpy(np.empty(0, value.dtype)).dtype
            staging = self.staging[name] = torch.empty(value.shape, dtype=dtype, pin_memory=True)
        # the previous copy out of this staging tensor has finished: every run ends in a device -> host copy
        np.copyto(staging.numpy(), value)
        t = device_dtype(name, staging.to("cuda", non_blocking=True), self.dtype)
        t = t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
        if not value.flags.writeable:
            self.last[name] = (value, t)
        else:
            self.last.pop(name, None)
        return t


class TorchCudaSession:
    def __init__(self, component: str, module: torch.nn.Module, dtype: torch.dtype, graphed: GraphedUNet | None):
        self.component, self.module, self.dtype, self.graphed = component, module, dtype, graphed
        self.uploads = Uploads(dtype)
        if component in ("text_encoder", "text_encoder_2"):
            from export.modules import TextEncoder, TextEncoder2

            self.text_encoder = (TextEncoder if component == "text_encoder" else TextEncoder2)(module)

    def _tensor(self, name: str, value: np.ndarray) -> torch.Tensor:
        return self.uploads.tensor(name, value)

    @torch.inference_mode()
    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        t = {name: self._tensor(name, value) for name, value in feeds.items()}
        if self.component == "text_encoder":
            last, hidden = self.text_encoder(t["inputs_embeds"])
            result = {"last_hidden_state": last, "hidden_states": hidden}
        elif self.component == "text_encoder_2":  # SDXL's: ids [n, 77] (-1: an override row) -> states, pooled [n, P]
            hidden, pooled = self.text_encoder(t["input_ids"], t["token_overrides"])
            result = {"hidden_states": hidden, "text_embeds": pooled}
        elif self.component == "unet":
            noise = self.graphed(t) if self.graphed is not None else unet_forward(self.module, **t)
            result = {"noise_pred": noise}
        elif self.component == "vae_decoder":
            result = {"image": self.module.decode(t["latent"]).sample}
        elif self.component == "vae_encoder":
            result = {"latent_parameters": self.module.quant_conv(self.module.encoder(t["image"]))}
        elif self.component == "depth_estimator":
            result = {"predicted_depth": self.module(t["pixel_values"]).predicted_depth}
        else:
            raise ModelError(f"the torch-cuda backend does not run {self.component}")
        return {name: result[name].float().cpu().numpy() for name in (outputs or list(result))}


class TorchCudaBackend:
    name = "torch-cuda"

    def __init__(self, checkpoint: Path | None, allow_pickle: bool = False, cuda_graph: bool = True,
                 compile: bool = False):  # fmt: skip
        if checkpoint is None or not Path(checkpoint).is_dir():
            raise ModelError(f"the torch-cuda backend needs the checkpoint folder, and {checkpoint} is not available")
        from runtime.checkpoint import describe_checkpoint

        self.checkpoint, self.allow_pickle = Path(checkpoint), allow_pickle
        self.vae_fp32 = not vae_runs_fp16(describe_checkpoint(self.checkpoint))
        self.cuda_graph, self.compile = cuda_graph, compile
        self._modules: dict[str, torch.nn.Module] = {}
        self._tables: TextTables | None = None
        self._graphed: GraphedUNet | None = None
        self._sessions: dict = {}
        self._base: dict[tuple[str, str], torch.Tensor] = {}

    def _dtype(self, part: str) -> torch.dtype:
        if part == "depth_estimator" or (part == "vae" and self.vae_fp32):
            return torch.float32
        return torch.float16

    def _module(self, part: str) -> torch.nn.Module:
        if part not in self._modules:
            module = _load(self.checkpoint, part, self.allow_pickle)
            if part == "text_encoder":
                tables = text_tables_of(module)  # views of the fp32 CPU weights: copy before moving
                self._tables = TextTables(np.array(tables.token_embedding), np.array(tables.final_norm_weight),
                                          np.array(tables.final_norm_bias), tables.final_norm_eps)  # fmt: skip
            module = module.to("cuda", self._dtype(part))
            if part in ("unet", "vae"):
                module = module.to(memory_format=torch.channels_last)
            self._modules[part] = module
        return self._modules[part]

    def session(self, component: str):
        if component not in self._sessions:
            part = "vae" if component.startswith("vae") else component
            module = self._module(part)
            graphed = None
            if component == "unet":
                runner = torch.compile(module, mode="max-autotune-no-cudagraphs") if self.compile else module
                graphed = GraphedUNet(runner) if self.cuda_graph else None
                self._graphed = graphed
                module = runner
            session = TorchCudaSession(component, module, self._dtype(part), graphed)
            if component == "vae_decoder" and not self.vae_fp32:
                session = NanGuard(session, lambda: self._fp32_vae_session())
            self._sessions[component] = session
        return self._sessions[component]

    def _fp32_vae_session(self) -> TorchCudaSession:
        vae = _load(self.checkpoint, "vae", self.allow_pickle).to("cuda", torch.float32)
        return TorchCudaSession("vae_decoder", vae, torch.float32, None)

    def text_tables(self) -> TextTables:
        if self._tables is None:
            self._module("text_encoder")
        return self._tables

    @torch.inference_mode()
    def apply_weights(self, patches: dict[str, dict[str, np.ndarray]] | None) -> None:
        """Set parameters to the given full values (diffusers names); everything else back to base."""
        wanted = {(c, n): v for c, values in (patches or {}).items() for n, v in values.items()}
        for component in sorted({c for c, _ in wanted} | {c for c, _ in self._base}):  # SDXL: text_encoder_2 too
            params = dict(self._module(component).named_parameters())

            def param(name: str, params=params, component=component) -> torch.nn.Parameter:
                key = name if name in params else name.removeprefix("text_model.")
                if key not in params:
                    raise ModelError(f"{component} has no parameter {name!r}")
                return params[key]

            for c, name in wanted:
                if c == component and (c, name) not in self._base:
                    self._base[c, name] = param(name).detach().clone()
            for (c, name), base in list(self._base.items()):
                if c != component:
                    continue
                target = param(name)
                source = torch.from_numpy(np.asarray(wanted[c, name], np.float32)) if (c, name) in wanted else base
                target.copy_(source.to(target.device, target.dtype))
                if (c, name) not in wanted:
                    del self._base[c, name]
        if self._graphed is not None:
            self._graphed.invalidate()
