"""What /docs and /openapi.json state: Swagger UI served from the swagger-ui-bundle-v2 package (no CDN, so the page
works offline), and a schema that names this server's limits, the sampler, scheduler and upscaler names it accepts,
and every error answer (one ErrorResponse body for all of them)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi

from ..pipelines.hires import LATENT_MODES
from ..samplers import SAMPLER_NAMES, resolve_sampler
from ..upscalers import BUILTIN_UPSCALERS, list_upscalers
from .schemas import ErrorResponse, ValidationErrorResponse

logger = logging.getLogger(__name__)

ASSETS = "/docs-assets"
ERRORS = {
    400: "the body could not be read as JSON text (not UTF-8)",
    408: "the request did not finish within --request-timeout, or its body stalled longer than the read timeout",
    409: "the request was cancelled (its client left, or the server shut down)",
    413: "too large for this server: the body is over --max-body-mb, a prompt is over the prompt limits "
    "(--max-prompt-chars, --max-prompt-chunks, --max-and-terms), or the request's estimated memory is over "
    "--memory-budget; `detail` names the size, batch or prompt length that fits",
    422: "a field is invalid, over a limit or not supported: `detail` lists {loc, msg, type}, msg naming the field",
    429: "the queue is full; retry later",
    503: "the server is shutting down",
    507: "an allocation failed while generating (the machine ran out of memory); `detail` names the size",
}
GENERATION_ERRORS = (400, 408, 409, 413, 422, 429, 503, 507)
BODY_ERRORS = (400, 408, 413, 422)  # routes that read a body (or query) and nothing else
PLAIN_ERRORS = (413,)  # every route: a declared body over the limit is refused before routing


NULL_ANSWER = {200: {"description": "null (A1111 answers nothing)", "content": {"application/json": {
    "schema": {"type": "null"}}}}}  # fmt: skip


def error_responses(codes: tuple[int, ...], null: bool = False) -> dict:
    """FastAPI `responses=` for these codes, each with the ErrorResponse body; `null`: the route answers null."""
    answers = {code: {"model": ValidationErrorResponse if code == 422 else ErrorResponse,
                      "description": ERRORS[code]} for code in codes}  # fmt: skip
    return {**answers, **NULL_ANSWER} if null else answers


def sampler_labels() -> list[str]:
    """Every sampler label resolve_sampler accepts as spelled in A1111: "Euler a", and with a schedule type suffix
    the sampler supports, "DPM++ 2M Karras"."""
    labels = list(SAMPLER_NAMES)
    for name in SAMPLER_NAMES:
        spec, _ = resolve_sampler(name)
        accepted = getattr(spec, "accepted_schedule_types", spec.schedule_types)  # the k-diffusion path's too
        labels += [f"{name} {t}" for t in accepted if t != "default"]
    return labels


def add_docs(app: FastAPI) -> None:
    """GET /docs: Swagger UI from the package's own files under /docs-assets (create the app with docs_url=None)."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        logger.warning('/docs is off: Swagger UI needs swagger-ui-bundle-v2 (pip install -e ".[serve]")')
        return
    from fastapi.staticfiles import StaticFiles

    app.mount(ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=f"{app.title} - API", swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css", swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )  # fmt: skip


def stated_openapi(app: FastAPI, limits, schedulers: list[str]) -> Callable[[], dict]:
    """app.openapi: FastAPI's schema with `limits` (a1111.Limits) and the accepted names written into the bodies."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            folder = getattr(app.state.service.model, "upscaler_dir", None)
            upscalers = [entry.name for entry in list_upscalers(folder)]  # the upscaler folder as the schema is made
            state_limits(schema["components"]["schemas"], limits, schedulers, upscalers)
            for name in ("Txt2ImgBody", "Img2ImgBody", "ExtrasSingleImageBody", "ExtrasBatchImagesBody"):
                allow_null(schema["components"]["schemas"].get(name, {}).get("properties", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def allow_null(props: dict) -> None:
    """State that every property also takes null (schemas.GenerationBody reads null as the field's default, as
    A1111's bodies do): a property without a null branch becomes anyOf [its schema, null], in place."""
    for name, prop in list(props.items()):
        if any(branch.get("type") == "null" for branch in prop.get("anyOf", [])):
            continue
        outer = {key: prop.pop(key) for key in ("title", "description", "default") if key in prop}
        props[name] = {"anyOf": [prop, {"type": "null"}], **outer}


def _constrain(prop: dict, **keywords) -> None:
    """Add JSON-schema keywords to a property, or to the non-null branch of an optional one."""
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    for branch in branches:
        branch.update(keywords)


def state_limits(schemas: dict, limits, schedulers: list[str], upscalers: list[str] | None = None) -> None:
    """Write the server's limits and enums into the request body schemas (in place); `upscalers`: the image upscalers
    served (runtime.upscalers' names; default the built-ins), which hr_upscaler takes besides the latent modes."""
    image_chars = limits.max_image_bytes * 4 // 3 + 4  # base64 of the largest image accepted
    upscalers = list(BUILTIN_UPSCALERS) if upscalers is None else upscalers
    samplers, hires_upscalers = sampler_labels(), [*LATENT_MODES, *upscalers]
    for name in ("Txt2ImgBody", "Img2ImgBody"):
        props = schemas.get(name, {}).get("properties", {})
        for field in ("width", "height"):
            _constrain(props[field], maximum=limits.max_side, multipleOf=8)
        _constrain(props["steps"], maximum=limits.max_steps)
        if getattr(limits, "max_prompt_chars", None):
            for field in ("prompt", "negative_prompt"):
                _constrain(props[field], maxLength=limits.max_prompt_chars)
        for field in ("batch_size", "n_iter"):
            _constrain(props[field], maximum=limits.max_images)
            props[field]["description"] = f"batch_size * n_iter must be at most {limits.max_images}"
        for field in ("sampler_name", "sampler_index", "hr_sampler_name"):
            if field in props:
                _constrain(props[field], enum=samplers)
        for field in ("scheduler", "hr_scheduler"):
            if field in props:
                _constrain(props[field], enum=schedulers)
        if "hr_upscaler" in props:
            _constrain(props["hr_upscaler"], enum=hires_upscalers)
        if "resize_mode" in props:
            _constrain(props["resize_mode"], enum=[0, 1, 2, 3])
        if "mask" in props:
            _constrain(props["mask"], maxLength=image_chars)
        if "init_images" in props:
            for branch in props["init_images"].get("anyOf", []):
                if branch.get("type") == "array":
                    branch["items"]["maxLength"] = image_chars
    for name in ("ExtrasSingleImageBody", "ExtrasBatchImagesBody"):
        props = schemas.get(name, {}).get("properties", {})
        for field in ("upscaler_1", "upscaler_2"):
            if field in props:
                _constrain(props[field], enum=upscalers)
        if "resize_mode" in props:
            _constrain(props["resize_mode"], enum=[0, 1])
        if "image" in props:
            _constrain(props["image"], maxLength=image_chars)
    if "PngInfoBody" in schemas:
        schemas["PngInfoBody"]["properties"]["image"]["maxLength"] = image_chars
