"""A1111's extras routes: /sdapi/v1/extra-single-image and /extra-batch-images (the upscale part of its Extras tab).

The upscaling runs where generation runs (the backend's queue: one request at a time on the model's worker, as A1111's
queue lock does, and on a replica under Ray Serve), as StableDiffusion.extras (runtime.pipelines.extras). Face
restoration (GFPGAN, CodeFormer) is not offered: a visibility above 0 is refused by name. The result's size is
checked against the server's pixel limit before any work; a model upscaler's memory, by the upscaler before it runs.
"""

from __future__ import annotations

import asyncio
import base64
import html
import io

from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image, PngImagePlugin
from pydantic import Field, model_validator

from ..errors import InvalidRequestError
from ..pipelines.extras import ExtrasOptions
from . import a1111
from .fields import FieldError
from .schemas import _Body

ROUTES = ("/sdapi/v1/extra-single-image", "/sdapi/v1/extra-batch-images")


class ExtrasBody(_Body):
    """A1111's ExtrasBaseRequest; `null` in any field means its default."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    resize_mode: int = Field(default=0, description="0: upscale by upscaling_resize; 1: to upscaling_resize_w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(default=0, ge=0, le=1)
    codeformer_visibility: float = Field(default=0, ge=0, le=1)
    codeformer_weight: float = Field(default=0, ge=0, le=1)
    upscaling_resize: float = Field(default=2, gt=0, le=8, description="by how much (resize_mode 0)")
    upscaling_resize_w: int = Field(default=512, ge=1, description="target width (resize_mode 1)")
    upscaling_resize_h: int = Field(default=512, ge=1, description="target height (resize_mode 1)")
    upscaling_crop: bool = Field(default=True, description="crop to exactly the target size (resize_mode 1)")
    upscaler_1: str = Field(default="None", description="a name from /sdapi/v1/upscalers")
    upscaler_2: str = Field(default="None", description="a name from /sdapi/v1/upscalers")
    extras_upscaler_2_visibility: float = Field(default=0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageBody(ExtrasBody):
    image: str = Field(default="", description="base64 image")


class FileData(_Body):
    data: str = Field(description="base64 image")
    name: str = ""


class ExtrasBatchImagesBody(ExtrasBody):
    imageList: list[FileData] = Field(description="base64 images")  # noqa: N815 (A1111's name)


class ExtrasSingleImageResponse(_Body):
    html_info: str
    image: str | None = None


class ExtrasBatchImagesResponse(_Body):
    html_info: str
    images: list[str]


def options_of(body: ExtrasBody) -> ExtrasOptions:
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, name) > 0:
            raise FieldError(name, "face restoration is not available on this server")
    return ExtrasOptions(
        upscaler_1=body.upscaler_1, upscaler_2=body.upscaler_2,
        upscaler_2_visibility=body.extras_upscaler_2_visibility, resize_mode=body.resize_mode,
        upscaling_resize=body.upscaling_resize, upscaling_resize_w=body.upscaling_resize_w,
        upscaling_resize_h=body.upscaling_resize_h, upscaling_crop=body.upscaling_crop,
    )  # fmt: skip


def extras_call(images: list[Image.Image], body: ExtrasBody, limits: a1111.Limits) -> a1111.Call:
    """The backend call for these images; every result size checked against the server's limits first."""
    options = options_of(body)
    for image in images:
        width, height = options.output_size(image.width, image.height)
        if width * height > limits.max_image_pixels:
            raise InvalidRequestError(
                f"the upscaled image ({width}x{height}) would have more than {limits.max_image_pixels} pixels"
            )
    return a1111.Call("extras", (images,), vars(options))


def decode(data: str, limits: a1111.Limits, what: str) -> Image.Image:
    """A base64 image as sent, its text chunks kept (A1111 carries them to the output)."""
    return a1111.open_image(a1111.decode_bytes(data, limits, what), limits, what)


def encode(image: Image.Image) -> str:
    """A1111's encode_pil_to_base64 for PNG: every text item of the image as a text chunk."""
    pnginfo = PngImagePlugin.PngInfo()
    for key, value in image.info.items():
        pnginfo.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=pnginfo if image.info else None)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def html_info(text: str) -> str:
    """A1111's ui_common.plaintext_to_html."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def _single(body: ExtrasSingleImageBody, limits: a1111.Limits) -> a1111.Call:
    if not body.image:
        raise FieldError("image", "image not selected")
    return extras_call([decode(body.image, limits, "image")], body, limits)


def _batch(body: ExtrasBatchImagesBody, limits: a1111.Limits) -> a1111.Call:
    if len(body.imageList) > limits.max_images:
        raise FieldError("imageList", f"at most {limits.max_images} images, not {len(body.imageList)}")
    images = [decode(item.data, limits, f"imageList[{i}]") for i, item in enumerate(body.imageList)]
    return extras_call(images, body, limits)


async def _run(request: Request, call: a1111.Call):
    """The call's ExtrasResult; None when the client went away (its job was cancelled)."""
    from .app import ClientGone

    try:
        results, _, _ = await request.app.state.service.generate(request, [call])
    except ClientGone:
        return None
    return results[0]


def add_extras_routes(app: FastAPI) -> None:
    from .openapi import GENERATION_ERRORS, error_responses

    responses = error_responses(GENERATION_ERRORS)

    @app.post("/sdapi/v1/extra-single-image", response_model=ExtrasSingleImageResponse, responses=responses)
    async def extra_single_image(body: ExtrasSingleImageBody, request: Request):
        call = await asyncio.to_thread(_single, body, request.app.state.limits)
        result = await _run(request, call)
        if result is None:
            return Response(status_code=499)  # nobody reads it (as the generation routes answer)
        image = await asyncio.to_thread(encode, result.images[0])
        return {"html_info": html_info(result.infotexts[0]), "image": image}

    @app.post("/sdapi/v1/extra-batch-images", response_model=ExtrasBatchImagesResponse, responses=responses)
    async def extra_batch_images(body: ExtrasBatchImagesBody, request: Request):
        call = await asyncio.to_thread(_batch, body, request.app.state.limits)
        if not call.args[0]:
            return {"html_info": html_info(""), "images": []}
        result = await _run(request, call)
        if result is None:
            return Response(status_code=499)
        images = await asyncio.to_thread(lambda: [encode(image) for image in result.images])
        return {"html_info": html_info(result.infotexts[-1]), "images": images}
