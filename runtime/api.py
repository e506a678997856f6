"""The Python API: load a model once, generate many times.

import runtime
sd = runtime.load("path/to/diffusers-folder")          # exports ONNX on first use
result = sd.txt2img("a photo of a cat", seed=42, steps=20)
result.images  # float32 [B, H, W, 3] in [0, 1]; result.infotexts: A1111 "parameters" per image
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .admission import PromptLimits, admit, allocation_errors, txt2img_passes
from .backends import Backend, check_backend, check_precision, open_backend
from .cache import engines_dir_or_default, ensure_exported
from .checkpoint import describe_checkpoint, fingerprint, model_key, resolve_checkpoint
from .errors import ArtifactError, InvalidRequestError
from .infotext import generation_parameters, image_infotexts, mask_blur, model_parameters, noise_factor
from .lora.requests import with_loras
from .manifest import MANIFEST_NAME, REEXPORT_HINT, read_manifest
from .pipelines.img2img import img2img
from .pipelines.sdxl import check_sdxl_backend, check_sdxl_mode, tokenizer_folder
from .pipelines.txt2img import txt2img
from .prompts import EmbeddingDatabase, load_embeddings
from .request import (
    Img2ImgRequest,
    InpaintRequest,
    Txt2ImgRequest,
    validate_img2img,
    validate_inpaint,
    validate_txt2img,
)
from .single_file import prepare_checkpoint
from .tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

PIPELINE_COMPONENTS = ("text_encoder", "unet", "vae_decoder")


@dataclass(frozen=True)
class GenerationResult:
    images: np.ndarray  # float32 [B, H, W, 3] in [0, 1]
    seeds: list[int]  # the seed of each image (seed + i)
    infotexts: list[str]  # A1111 "parameters" text of each image
    request: Txt2ImgRequest  # the validated request, defaults filled in
    parameters: dict = field(default_factory=dict)
    interrupted: bool = False  # interrupted while running (runtime.serving): sampling may have stopped early


class StableDiffusion:
    """A loaded model: tokenizer, model facts and one backend session per component."""

    def __init__(
        self,
        name: str,
        key: str,
        info: dict,
        tokenizer: ClipTokenizer,
        backend: Backend,
        progress: bool,
        precision: str = "fp32",
    ):
        self.name = name
        self.key = key  # "<folder>-<short hash>", also the Model hash of the infotext
        self.info = info  # runtime.checkpoint.describe_checkpoint(...)
        self.tokenizer = tokenizer
        self.tokenizer_2: ClipTokenizer | None = None  # SDXL's second text encoder's (set by load)
        self.backend = backend
        self.precision = precision  # what the backend computes in (runtime.backends.PRECISIONS)
        self.show_progress = progress
        self.embeddings = EmbeddingDatabase()  # textual inversion, by name (load_embeddings)
        self.embeddings_source: tuple[Path, bool] | None = None  # (folder, allow_pickle) they were loaded from
        self.embedding_lookup = self.embeddings.lookup(tokenizer)
        self.lora_dir: Path | None = None  # where <lora:name> prompt tags are looked up (set_lora_dir)
        self.lora_allow_pickle = False
        self.lora_state = None  # runtime.lora.apply.LoraState, made on first use
        # where upscaler model files are found by name (hires fix, extras; None: runtime.upscalers' default folder)
        self.upscaler_dir: Path | None = None
        self.allow_pickle = False  # upscaler .pth/.pt files (read by the restricted unpickler)
        self.upscalers: dict = {}  # the upscalers loaded so far, by name (runtime.pipelines.extras.model_upscaler)
        # Called after every UNet evaluation with the pass's step total (runtime.serving: progress, cancel by
        # raising); None: no hook. Not thread-safe: one caller at a time, as the serving worker guarantees.
        self.step_hook: Callable[[int], None] | None = None
        # Asked after every sampler step (runtime.serving's interrupt): True skips the remaining steps and decodes
        # the latents of the last one, as A1111's interrupt and diffusers' `pipe._interrupt` do; None: never.
        self.interrupt_hook: Callable[[], bool] | None = None
        # Admission (runtime.admission): every request is checked against these before any work. memory_budget: bytes
        # of working memory a request may use beyond the loaded weights (None: 80% of the memory available when the
        # first request comes); admission: what the running request was measured as.
        self.memory_budget: int | None = None
        self.prompt_limits = PromptLimits()
        self.admission = None
        # VAE tiling (runtime.vae_tiling): None tiles only images over one tile whose untiled decode would need over
        # 4.6 GiB per image (AUTO_TILING_BYTES); True tiles as diffusers' vae.enable_tiling() does; False never tiles
        self.vae_tiling: bool | None = None

    def load_embeddings(self, folder: str | Path, allow_pickle: bool = False) -> list[str]:
        """Load the textual-inversion embeddings of `folder` (usable by name in prompts); return their names."""
        sdxl = self.info.get("sdxl")
        if sdxl:  # vectors for both text encoders (clip_l, clip_g); a refiner has text encoder 2 only
            hidden = self.info["text_hidden_size"] if sdxl.get("two_encoders", True) else None
            self.embeddings = load_embeddings(Path(folder), hidden, allow_pickle, sdxl["text_hidden_size_2"])
        else:
            self.embeddings = load_embeddings(Path(folder), self.info["text_hidden_size"], allow_pickle=allow_pickle)
        self.embedding_lookup = self.embeddings.lookup(self.tokenizer)
        self.embeddings_source = (Path(folder), allow_pickle)
        return sorted(self.embeddings.embeddings)

    def set_lora_dir(self, folder: str | Path | None, allow_pickle: bool = False) -> None:
        """Look up `<lora:name:weight>` prompt tags in `folder` (by file stem; .pt/.ckpt only with allow_pickle).
        Every generation method also takes `loras=[(file, weight), ...]` and `lora_dir=`."""
        self.lora_dir = None if folder is None else Path(folder).expanduser()
        self.lora_allow_pickle = allow_pickle

    @contextlib.contextmanager
    def progress(self, total: int, label: str) -> Iterator[Callable[[], None]]:
        hook = self.step_hook
        if not self.show_progress:
            yield (lambda: None) if hook is None else (lambda: hook(total))
            return
        from tqdm import tqdm

        with tqdm(total=total, desc=label, unit="step", leave=False) as bar:
            yield bar.update if hook is None else (lambda: (bar.update(), hook(total)))

    @allocation_errors
    @with_loras
    def txt2img(
        self,
        prompt: str,
        hires_scale: float | None = None,
        hires_width: int = 0,
        hires_height: int = 0,
        hires_upscaler: str = "Latent",
        hires_steps: int = 0,
        hires_strength: float = 0.7,
        hires_prompt: str | None = None,
        hires_negative_prompt: str | None = None,
        hires_sampler: str | None = None,
        hires_schedule: str | None = None,
        watermark: str | None = None,
        refiner: StableDiffusion | None = None,
        refiner_switch_at: float = 0.8,
        **options,
    ) -> GenerationResult:
        """Generate images from text; options are the fields of runtime.request.Txt2ImgRequest.

        Hires fix (A1111's) runs when hires_scale or hires_width/hires_height is given: txt2img at the request's
        size, an upscale (Latent, Latent (nearest), Latent (nearest-exact) or Lanczos), then img2img at the target
        size with hires_steps (0: the same steps) and hires_strength; hires_prompt, hires_negative_prompt,
        hires_sampler and hires_schedule change the second pass's (None: the first pass's). `watermark`: embed this
        invisible text. `refiner`: a loaded SDXL refiner (or base) model that takes over from `refiner_switch_at`
        of the noise schedule, as diffusers' denoising_end / denoising_start (runtime.pipelines.refiner)."""
        self._require_channels((4, 9), "txt2img")
        hires = bool(hires_scale or hires_width or hires_height)
        if refiner is not None:
            from .pipelines.refiner import check_refiner

            check_refiner(self, refiner, refiner_switch_at)
        request = validate_txt2img(Txt2ImgRequest(prompt, **options), self.info)
        passes = txt2img_passes(request, hires_scale, hires_width, hires_height)
        admit(self, request, "txt2img", passes, hires_prompts=(hires_prompt, hires_negative_prompt))
        refining = refiner is not None and refiner_switch_at < 1  # 1: the refiner never takes over (A1111)
        if refining and not hires:
            from .pipelines.refiner import refined_txt2img, refiner_parameters

            images = refined_txt2img(self, refiner, request, refiner_switch_at)
            return self._result(request, images, refiner_parameters(refiner, refiner_switch_at), watermark)
        if not hires:
            return self._result(request, txt2img(self, request), {}, watermark)
        from .pipelines.hires import hires_fix, hires_overrides, hires_parameters, hires_target

        hires = (hires_upscaler, hires_steps, hires_strength)
        second_pass = (hires_prompt, hires_negative_prompt, hires_sampler, hires_schedule)
        second, second_params = hires_overrides(request, *second_pass)
        width, height = hires_target(request.width, request.height, hires_scale, hires_width, hires_height)
        refined = {"refiner": refiner, "switch_at": refiner_switch_at} if refining else {}
        images = hires_fix(self, request, width, height, *hires, second, **refined)
        extra = hires_parameters(*hires, hires_scale, hires_width, hires_height)
        if refining:  # A1111's "Refiner" entries, written when the second pass hands over (its default)
            from .pipelines.refiner import refiner_parameters

            extra.update(refiner_parameters(refiner, refiner_switch_at))
        return self._result(request, images, {**extra, **second_params}, watermark)

    @allocation_errors
    @with_loras
    def img2img(self, prompt: str, init_image, watermark: str | None = None, **options) -> GenerationResult:
        """Generate from an init image (a path or a PIL image); options are the fields of Img2ImgRequest."""
        from .images import resize_image, to_model_input

        self._require_channels((4,), "img2img")
        image = _open_image(init_image)
        request = validate_img2img(Img2ImgRequest(prompt, init_image=image, **options), self.info, image.size)
        admit(self, request, "img2img")
        resized = resize_image(image, request.width, request.height, request.resize_mode)
        images = img2img(self, request, to_model_input(resized))
        extra = {"Denoising strength": request.strength, "Resize mode": request.resize_mode, **noise_factor(request)}
        return self._result(request, images, extra, watermark)

    @allocation_errors
    @with_loras
    def inpaint(self, prompt: str, init_image, mask, watermark: str | None = None, **options) -> GenerationResult:
        """Repaint the white part of `mask` (a path or a PIL image); options are the fields of InpaintRequest."""
        from .pipelines.masked import run_inpaint

        self._require_channels((4, 9), "inpaint")
        image = _open_image(init_image)
        request = InpaintRequest(prompt, init_image=image, mask=mask, **options)
        request = validate_inpaint(request, self.info, image.size)
        admit(self, request, "inpaint")
        extra = {"Denoising strength": request.strength, **mask_blur(request), **noise_factor(request)}
        if request.inpainting_fill != "original":
            extra["Masked content"] = request.inpainting_fill
        if request.inpaint_full_res:
            extra.update({"Inpaint area": "Only masked", "Masked area padding": request.inpaint_full_res_padding})
        return self._result(request, run_inpaint(self, request, image), extra, watermark)

    @allocation_errors
    @with_loras
    def outpaint(
        self, prompt: str, init_image, extend: tuple[int, int, int, int], watermark: str | None = None, **options
    ) -> GenerationResult:
        """Extend the canvas by (left, right, top, bottom) pixels and fill the new area; the original pixels
        stay exactly as they were. Options are the fields of InpaintRequest (strength defaults to 1)."""
        from .images import extend_canvas
        from .pipelines.masked import run_outpaint

        self._require_channels((4, 9), "outpaint")
        image = _open_image(init_image)
        canvas, mask = extend_canvas(image, *extend)
        options = {"strength": 1.0, **options}
        request = validate_inpaint(
            InpaintRequest(prompt, init_image=image, mask=mask, **options), self.info, canvas.size
        )
        admit(self, request, "outpaint")
        extra = {"Denoising strength": request.strength, "Outpaint": "{},{},{},{}".format(*extend)}
        return self._result(request, run_outpaint(self, request, image, extend), extra, watermark)

    @allocation_errors
    @with_loras
    def depth2img(
        self, prompt: str, init_image, depth_map=None, watermark: str | None = None, **options
    ) -> GenerationResult:
        """img2img for depth checkpoints (5-channel UNet): the depth comes from `depth_map` (a path, PIL image or
        float array, any scale) or, without one, from the checkpoint's depth estimator."""
        from PIL import Image

        from .images import load_image, resize_image, to_model_input
        from .pipelines.depth2img import depth2img

        self._require_channels((5,), "depth2img")
        image = _open_image(init_image)
        request = validate_img2img(Img2ImgRequest(prompt, init_image=image, **options), self.info, image.size)
        admit(self, request, "depth2img")
        resized = resize_image(image, request.width, request.height, request.resize_mode)
        depth = depth_map
        if isinstance(depth_map, Image.Image) or isinstance(depth_map, (str, Path)):
            depth_image = depth_map if isinstance(depth_map, Image.Image) else load_image(depth_map)
            depth = np.asarray(depth_image.convert("F"), dtype=np.float32)
        images = depth2img(self, request, to_model_input(resized), depth)
        extra = {"Denoising strength": request.strength, "Depth map": "given" if depth is not None else "estimated"}
        return self._result(request, images, extra, watermark)

    @allocation_errors
    @with_loras
    def upscale(
        self, prompt: str, image, noise_level: int = 20, watermark: str | None = None, **options
    ) -> GenerationResult:
        """x4 upscaler checkpoints: a 4x larger image guided by the prompt; `noise_level` is added to the low-res
        image first (and is the UNet's class label)."""
        from .images import to_model_input
        from .pipelines.upscale import upscale

        self._require_channels((7,), "upscale")
        low_res = _open_image(image)
        scale = self.info["vae_scale_factor"]
        size = (low_res.width * scale, low_res.height * scale)
        if (options.pop("width", None) or size[0], options.pop("height", None) or size[1]) != size:
            raise InvalidRequestError(f"the upscaler's output is {scale}x the input; leave width and height unset")
        request = validate_txt2img(Txt2ImgRequest(prompt, width=size[0], height=size[1], **options), self.info)
        admit(self, request, "upscale")
        images = upscale(self, request, to_model_input(low_res), noise_level)
        return self._result(request, images, {"Noise level": noise_level}, watermark)

    def extras(self, images: list, **options):
        """A1111's extras upscale (runtime.pipelines.extras.ExtrasOptions: upscaler_1, upscaler_2 with
        upscaler_2_visibility, resize_mode 0 by upscaling_resize or 1 to upscaling_resize_w x _h, upscaling_crop) of
        PIL images or image files; an ExtrasResult of PIL images carrying the input's text and A1111's
        "postprocessing" text. Model upscalers come from `upscaler_dir`, run on this model's backend where they can."""
        from PIL import Image

        from .pipelines.extras import ExtrasOptions, model_upscaler, postprocess

        settings = ExtrasOptions(**options)
        images = [image if isinstance(image, Image.Image) else _open_image(image) for image in images]
        return postprocess(images, settings, lambda name: model_upscaler(self, name))

    def _require_channels(self, channels: tuple[int, ...], mode: str) -> None:
        """One clear line when a mode meets a model it cannot run (by the UNet's input channels, and SDXL's modes)."""
        check_sdxl_mode(self.info, mode)
        kinds = {4: "a regular model", 9: "an inpainting model", 5: "a depth model (use depth2img)",
                 7: "an x4 upscaler (use upscale)"}  # fmt: skip
        have = self.info["unet_in_channels"]
        if have not in channels:
            raise InvalidRequestError(f"{mode} does not run on {kinds.get(have, f'a {have}-channel model')}")

    def _result(
        self, request: Txt2ImgRequest, images: np.ndarray, extra: dict, watermark: str | None = None
    ) -> GenerationResult:
        if watermark:
            from .watermark import embed_watermark

            images = embed_watermark(images, watermark)
        seeds = [request.seed + i for i in range(request.batch_size)]
        model = model_parameters(self.info, self.key, self.name)
        params = dict(generation_parameters(request, model, self.backend.name, self.precision), **extra)
        if getattr(self, "vae_retried", False):  # set by decode_latents: the fp16 VAE overflowed (A1111 retries)
            params["VAE precision"] = "fp32 retry after fp16 NaN"
        return GenerationResult(images, seeds, image_infotexts(request, params, seeds), request, params)


def load(
    model: str | Path,
    backend: str = "onnxruntime",
    engines_dir: str | Path | None = None,
    progress: bool = False,
    allow_pickle: bool = False,
    vae: str | Path | None = None,
    tokenizer: str | Path | None = None,
    prediction_type: str | None = None,
    precision: str = "fp32",
) -> StableDiffusion:
    """Load `model` (a diffusers folder, a Hub id in the local cache, an exported artifact folder, or a single-file
    checkpoint: .safetensors in the original LDM layout, or .ckpt/.pt with `allow_pickle`).

    `allow_pickle` also reads .bin (pickle) weights of a checkpoint that has no .safetensors, and .ckpt single files
    (with a restricted unpickler that runs no code): only for checkpoints you trust. `vae`: a VAE file (LDM or
    diffusers layout) replacing the model's VAE. Single files only: `tokenizer`, a tokenizer folder (default: CLIP's
    or SD 2's from the Hugging Face cache); `prediction_type` "epsilon"/"v_prediction" overrides the detection.

    Artifacts go to `engines_dir`, by default the per-user cache ($SDRT_HOME/engines, see runtime.cache). Progress
    bars and export log lines show only with `progress=True`. A broken artifact of a checkpoint (ArtifactError) is
    exported again with one warning; any other load failure (backend, device, engine) is raised as it is.

    `precision`: what the backend computes in: "fp32" (default, every backend), "int8" (onnxruntime: the UNet's
    MatMuls quantised), "bf16" (openvino, on a CPU with bf16 instructions); checked before any work."""
    check_backend(backend)
    check_precision(backend, precision)
    path = Path(model).expanduser()
    if (path / MANIFEST_NAME).is_file():
        if vae or tokenizer or prediction_type:
            raise InvalidRequestError("vae, tokenizer and prediction_type apply to checkpoints, not artifact folders")
        manifest = read_manifest(path)
        check_sdxl_backend(manifest.model, backend)
        source = Path(manifest.source.get("path", ""))
        source = source if source.is_dir() else None
        return _open(manifest.model_key, manifest.model, path, source, backend, progress, allow_pickle, precision)
    engines = engines_dir_or_default(engines_dir)
    checkpoint = prepare_checkpoint(model, engines, vae, tokenizer, prediction_type, allow_pickle)
    info = describe_checkpoint(checkpoint)
    check_sdxl_backend(info, backend)
    key = model_key(checkpoint, fingerprint(checkpoint))
    if backend in ("torch", "torch-cuda"):  # the checkpoint's own modules: no export
        tokenizer_dir = checkpoint / tokenizer_folder(info)
        return _open(key, info, tokenizer_dir, checkpoint, backend, progress, allow_pickle, tokenizer_only=True)
    artifacts = ensure_exported(checkpoint, engines, key, progress, allow_pickle)
    try:
        return _open(key, info, artifacts, checkpoint, backend, progress, allow_pickle, precision)
    except ArtifactError as exc:  # only a broken artifact: a backend, device or engine failure is not fixed by this
        logger.warning("%s; exporting %s again", str(exc).removesuffix(REEXPORT_HINT), checkpoint)
        artifacts = ensure_exported(checkpoint, engines, key, progress, allow_pickle, force=True)
        return _open(key, info, artifacts, checkpoint, backend, progress, allow_pickle, precision)


def _open_image(image):
    """An RGB PIL image from a PIL image or a path (one-line InvalidRequestError if unreadable)."""
    from PIL import Image

    from .images import load_image

    return image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)


def load_tokenizer(model: str | Path) -> ClipTokenizer:
    """Just the tokenizer of a model (diffusers folder, cached Hub id or artifact folder); no sessions."""
    path = Path(model).expanduser()
    if (path / MANIFEST_NAME).is_file():
        return ClipTokenizer.from_folder(path / tokenizer_folder(read_manifest(path).model))
    folder = resolve_checkpoint(model)
    return ClipTokenizer.from_folder(folder / ("tokenizer" if (folder / "tokenizer").is_dir() else "tokenizer_2"))


def _open(
    key: str,
    info: dict,
    folder: Path,
    checkpoint: Path | None,
    backend_name: str,
    progress: bool,
    allow_pickle: bool,
    precision: str = "fp32",
    tokenizer_only: bool = False,
) -> StableDiffusion:
    tokenizer = ClipTokenizer.from_folder(folder if tokenizer_only else folder / tokenizer_folder(info))
    artifacts = None if tokenizer_only else folder
    backend = open_backend(
        backend_name, artifacts=artifacts, checkpoint=checkpoint, allow_pickle=allow_pickle, precision=precision
    )
    components = PIPELINE_COMPONENTS + (("depth_estimator",) if info.get("depth_estimator") else ())
    if info.get("sdxl"):  # an SDXL refiner has text encoder 2 only
        two = info["sdxl"].get("two_encoders", True)
        components = tuple(c for c in components if two or c != "text_encoder") + ("text_encoder_2",)
    for component in components:  # load now, so a broken model fails here and not mid-request
        backend.session(component)
    name = (info.get("source") or {}).get("model") or key.rsplit("-", 1)[0]  # a single file: its stem
    model = StableDiffusion(name, key, info, tokenizer, backend, progress, precision)
    if info.get("sdxl"):
        model.tokenizer_2 = ClipTokenizer.from_folder((folder.parent if tokenizer_only else folder) / "tokenizer_2")
    return model
