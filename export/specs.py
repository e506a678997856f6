"""One spec per exported component: tensor names, dtypes, dynamic axes and shapes (numpy only, no torch).

Export traces with `spec.sample_inputs()`, writes `spec.dynamic_axes()` into the ONNX model and the spec's
tensors into the manifest; engine builds and runtime buffers take their shapes from `spec.shapes(...)`.
Axis names: "height"/"width" are latent sizes, "image_height"/"image_width" pixel sizes, "sequence" the
token count (77 per chunk of a long prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOKENS_PER_CHUNK = 77  # CLIP context: BOS + 75 tokens + EOS


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # ints are fixed, strings name a dynamic axis

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        """This tensor's concrete shape, dynamic axes looked up in `dims`."""
        return tuple(dims[axis] if isinstance(axis, str) else axis for axis in self.shape)


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # "unet", ...; also the ONNX file's stem
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vae_scale_factor: int  # pixels per latent pixel
    trace_batch: int = 2  # shapes the tracer sees; every named axis stays dynamic
    trace_latent_size: int = 64

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes: {tensor: {axis index: axis name}}."""
        tensors = self.inputs + self.outputs
        return {t.name: {i: a for i, a in enumerate(t.shape) if isinstance(a, str)} for t in tensors}

    def dims(self, batch: int, height: int, width: int, chunks: int = 1) -> dict[str, int]:
        """Dynamic axis sizes for images of height x width pixels and prompts of `chunks` token chunks."""
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not a multiple of the VAE scale factor {f}")
        return {
            "batch": batch,
            "image_height": height,
            "image_width": width,
            "height": height // f,
            "width": width // f,
            "sequence": TOKENS_PER_CHUNK * chunks,
        }

    def shapes(self, batch: int, height: int, width: int, chunks: int = 1) -> dict[str, tuple[int, ...]]:
        """Every input and output shape of this component, by tensor name (height, width in pixels).

        `batch` is this component's own batch: for the UNet with classifier-free guidance that is 2x images.
        """
        dims = self.dims(batch, height, width, chunks)
        return {t.name: t.resolve(dims) for t in self.inputs + self.outputs}

    def sample_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs to trace the torch module with, in input order."""
        size = self.trace_latent_size * self.vae_scale_factor
        shapes = self.shapes(self.trace_batch, size, size)
        rng = np.random.default_rng(seed)
        feeds = {}
        for t in self.inputs:
            shape = shapes[t.name]
            if t.name == "timestep":
                feeds[t.name] = np.full(shape, 981.0, dtype=t.dtype)
            elif t.name == "input_ids":  # token ids, valid in any vocabulary (tracing only needs some)
                feeds[t.name] = np.arange(shape[-1], dtype=t.dtype)[None].repeat(shape[0], axis=0) % 40
            elif np.issubdtype(t.dtype, np.integer):  # class labels: any valid one
                feeds[t.name] = np.full(shape, 20, dtype=t.dtype)
            else:
                feeds[t.name] = rng.standard_normal(shape).astype(t.dtype)
        return feeds


def component_specs(model: dict) -> dict[str, ComponentSpec]:
    """The specs of the four Stable Diffusion components, plus the depth estimator of a depth checkpoint that
    ships one and SDXL's second text encoder (an SDXL refiner: instead of the first), from a manifest `model` block
    (describe_checkpoint)."""
    hidden = model["text_hidden_size"]
    tokens = model["text_max_length"]
    context = model["cross_attention_dim"]
    latent = model["latent_channels"]
    common = {
        "vae_scale_factor": model["vae_scale_factor"],
        "trace_latent_size": model["unet_sample_size"],
    }
    f32 = "float32"
    # the x4 upscaler's UNet also takes the noise level as a class label per row
    labels = (TensorSpec("class_labels", "int64", ("batch",)),) if model.get("unet_num_class_embeds") else ()
    sdxl = model.get("sdxl")
    # SDXL's UNet also takes the pooled text embedding of text encoder 2 and the size/crop ids, per row
    added = (
        (
            TensorSpec("text_embeds", f32, ("batch", sdxl["text_projection_dim"])),
            # original (h, w), crop (top, left), target (h, w); a refiner's: the aesthetic score for the target
            TensorSpec("time_ids", f32, ("batch", sdxl.get("time_ids", 6))),
        )
        if sdxl
        else ()
    )
    specs = {
        "text_encoder": ComponentSpec(
            name="text_encoder",
            inputs=(TensorSpec("inputs_embeds", f32, ("batch", tokens, hidden)),),  # token embeddings (host lookup)
            outputs=(
                TensorSpec("last_hidden_state", f32, ("batch", tokens, hidden)),
                TensorSpec("hidden_states", f32, (model["text_num_layers"] + 1, "batch", tokens, hidden)),
            ),
            **common,
        ),
        "unet": ComponentSpec(
            name="unet",
            inputs=(
                TensorSpec("sample", f32, ("batch", model["unet_in_channels"], "height", "width")),
                TensorSpec("timestep", f32, ("batch",)),
                TensorSpec("encoder_hidden_states", f32, ("batch", "sequence", context)),
                *labels,
                *added,
            ),
            outputs=(TensorSpec("noise_pred", f32, ("batch", latent, "height", "width")),),
            **common,
        ),
        "vae_decoder": ComponentSpec(
            name="vae_decoder",
            inputs=(TensorSpec("latent", f32, ("batch", latent, "height", "width")),),
            outputs=(TensorSpec("image", f32, ("batch", 3, "image_height", "image_width")),),
            **common,
        ),
        "vae_encoder": ComponentSpec(
            name="vae_encoder",
            inputs=(TensorSpec("image", f32, ("batch", 3, "image_height", "image_width")),),
            outputs=(TensorSpec("latent_parameters", f32, ("batch", 2 * latent, "height", "width")),),
            **common,
        ),
    }
    if sdxl and not sdxl.get("two_encoders", True):  # an SDXL refiner: the second text encoder only
        del specs["text_encoder"]
    if sdxl:  # the second text encoder: ids in (its token lookup and the pooled row need them), no host tables;
        # the rows of token_overrides replace the lookup where an id is -1 (textual-inversion vectors)
        hidden_2 = sdxl["text_hidden_size_2"]
        specs["text_encoder_2"] = ComponentSpec(
            name="text_encoder_2",
            inputs=(
                TensorSpec("input_ids", "int32", ("batch", tokens)),
                TensorSpec("token_overrides", f32, ("batch", tokens, hidden_2)),
            ),
            outputs=(
                TensorSpec("hidden_states", f32, (sdxl["text_num_layers_2"] + 1, "batch", tokens, hidden_2)),
                TensorSpec("text_embeds", f32, ("batch", sdxl["text_projection_dim"])),  # pooled, projected
            ),
            **common,
        )
    depth = model.get("depth_estimator")
    if depth:  # DPT: a fixed square input (the hybrid one takes its configured size only), depth at that size
        size = depth["image_size"]
        specs["depth_estimator"] = ComponentSpec(
            name="depth_estimator",
            inputs=(TensorSpec("pixel_values", f32, ("batch", 3, size, size)),),
            outputs=(TensorSpec("predicted_depth", f32, ("batch", size, size)),),
            **common,
        )
    return specs
