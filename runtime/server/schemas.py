"""Request and response bodies of the A1111 web UI's HTTP API (modules/api/models.py), by its field names.

Every field A1111 publishes for txt2img/img2img is accepted with A1111's default, so existing clients work
unchanged. Each field either changes the images as A1111 defines it, or, set to anything but its default, is refused
with a 422 naming it (runtime.server.fields: restore_faces, tiling, scripts, a refiner the server does not serve ...);
fields with no effect on the images (saving, comments, send_images, force_task_id) and unknown extra fields are
accepted, as A1111 does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class GenerationBody(_Body):
    """The fields txt2img and img2img share (StableDiffusionProcessing's constructor in A1111). `null` in any field
    means its default, as in A1111's schema."""

    _prompts: tuple[str, str] | None = PrivateAttr(default=None)  # the prompts as run (styles applied)
    _comments: list[str] = PrivateAttr(default_factory=list)  # warnings for info.comments

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(default=-1, description="-1: random; image i of the request uses seed + i")
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(default=None, description="A1111 label, e.g. 'Euler a'; None: sampler_index")
    scheduler: str | None = Field(default=None, description="automatic, karras, exponential, sgm_uniform, beta")
    batch_size: int = Field(default=1, ge=1)
    n_iter: int = Field(default=1, ge=1, description="batches run one after another; seeds continue")
    steps: int = Field(default=50, ge=1)
    cfg_scale: float = 7.0
    width: int = Field(default=512, ge=8)
    height: int = Field(default=512, ge=8)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    sampler_index: str = "Euler"
    script_name: str | None = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgBody(GenerationBody):
    """POST /sdapi/v1/txt2img (StableDiffusionProcessingTxt2Img), hires fix included."""

    denoising_strength: float | None = Field(default=None, description="hires fix strength (default 0.7)")
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgBody(GenerationBody):
    """POST /sdapi/v1/img2img (StableDiffusionProcessingImg2Img): init_images, and with a mask, inpainting."""

    init_images: list[str] | None = Field(default=None, description="base64 images; the first one is used")
    resize_mode: int = Field(default=0, description="0 just resize, 1 crop and resize, 2 resize and fill")
    denoising_strength: float = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = Field(default=None, description="base64 mask: white = repaint")
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = Field(default=0, description="masked content: 0 fill, 1 original, 2 latent noise, "
                                 "3 latent nothing")  # fmt: skip
    inpaint_full_res: bool = Field(default=True, description="True: generate a crop around the mask (only masked)")
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = Field(default=0, description="1: repaint the black part instead")
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class GenerationResponse(_Body):
    images: list[str] | None = Field(default=None, description="the generated images, base64 PNG with parameters")
    parameters: dict
    info: str = Field(description="a JSON string: all_prompts, all_seeds, infotexts, seed, ...")


class PngInfoBody(_Body):
    image: str = Field(description="a base64 image (PNG, JPEG or WebP)")


class PngInfoResponse(_Body):
    info: str
    items: dict
    parameters: dict


class ProgressResponse(_Body):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(_Body):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(_Body):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(_Body):
    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class ErrorResponse(_Body):
    """Every 4xx/5xx answer but 422: one line in `detail`."""

    detail: str = Field(description="what is wrong, in one line")


class ValidationProblem(_Body):
    loc: list[str | int] = Field(description='where: ["body", field name, ...]')
    msg: str = Field(description="what is wrong, naming the field, in one line")
    type: str


class ValidationErrorResponse(_Body):
    """A 422, as FastAPI and A1111 answer it: each problem with its location."""

    detail: list[ValidationProblem]


class HealthResponse(_Body):
    status: str
    model: str
    backend: str
    queue_depth: int
    batching: bool


class OptionsResponse(BaseModel):
    """GET /sdapi/v1/options: the settings A1111 clients read, as this server applies them."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str
    sd_checkpoint_hash: str
    sd_vae: str
    CLIP_stop_at_last_layers: int
    eta_ddim: float
    samples_format: str
    sd_lora: str
    live_previews_enable: bool


class LoraItem(_Body):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class EmbeddingItem(_Body):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int
    vectors: int


class EmbeddingsResponse(_Body):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class UpscalerItem(_Body):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscaleModeItem(_Body):
    name: str


class SDVaeItem(_Body):
    model_name: str
    filename: str


class PromptStyleItem(_Body):
    name: str
    prompt: str | None = None
    negative_prompt: str | None = None


class MemoryResponse(_Body):
    ram: dict[str, Any] = Field(description="system memory in bytes: free, used (this process), total")
    cuda: dict[str, Any] = Field(description="device memory in bytes, or {error} where the backend has no device")


class ScriptsList(_Body):
    txt2img: list[str]
    img2img: list[str]


class ScriptInfo(_Body):
    name: str | None = None
    is_alwayson: bool | None = None
    is_img2img: bool | None = None
    args: list[dict[str, Any]]
