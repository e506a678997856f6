"""The HTTP app: A1111-compatible routes over a runtime.serving.Service, plus /health and /metrics.

Every bad request is a 4xx with a one-line `detail` (422 for validation, as A1111 and FastAPI answer; 413 for a
body over the limit); generation runs on the service's worker thread, so the event loop keeps serving
/progress, /interrupt and /health while images are being made.

The routes reach the model through a backend (`app.state.service`): LocalBackend over a Service in this process,
or runtime.ray_serve's over Ray Serve replicas. Both servers build their routes here, from the same table.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException
from starlette.routing import Match

from .. import __version__
from ..errors import (
    AllocationError,
    BackendUnavailableError,
    InvalidRequestError,
    ModelError,
    NumericalError,
    QueueFull,
    RequestCancelled,
    RequestTimeout,
    ResourceError,
    SdrtError,
    ServiceClosed,
)
from ..samplers import SAMPLER_NAMES, resolve_sampler
from ..serving import Job, Service
from . import a1111
from .extras import ROUTES as EXTRAS_ROUTES
from .extras import add_extras_routes
from .metrics import Guard, Metrics
from .openapi import BODY_ERRORS, GENERATION_ERRORS, PLAIN_ERRORS, add_docs, error_responses, stated_openapi
from .options import ServerOptions
from .schemas import (
    EmbeddingsResponse,
    GenerationResponse,
    HealthResponse,
    Img2ImgBody,
    LatentUpscaleModeItem,
    LoraItem,
    OptionsResponse,
    PngInfoBody,
    PngInfoResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    SDVaeItem,
    Txt2ImgBody,
    UpscalerItem,
)
from .startup_routes import add_startup_routes

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # how often a waiting request checks its client and deadline
# first match wins: AllocationError first. A file the request names that is corrupt (ModelError: an upscaler file of
# the folder, say), an output that came out NaN, or a part this server cannot run: 422 with the reason, as for any
# request that cannot be processed as asked (never a bare 500).
STATUS_OF = {InvalidRequestError: 422, QueueFull: 429, RequestTimeout: 408, RequestCancelled: 409, ServiceClosed: 503,
             AllocationError: 507, ResourceError: 413, ModelError: 422, NumericalError: 422,
             BackendUnavailableError: 422}  # fmt: skip
ROUTES = {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/samplers", "/sdapi/v1/schedulers",
          "/sdapi/v1/sd-models", "/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/png-info", "/health",
          "/metrics", "/openapi.json", "/docs", "/sdapi/v1/options", "/sdapi/v1/loras", "/sdapi/v1/embeddings",
          "/sdapi/v1/upscalers", "/sdapi/v1/latent-upscale-modes", "/sdapi/v1/sd-vae", "/sdapi/v1/cmd-flags",
          "/sdapi/v1/prompt-styles", "/sdapi/v1/memory", "/sdapi/v1/scripts", "/sdapi/v1/script-info",
          "/sdapi/v1/refresh-checkpoints", "/sdapi/v1/skip", *EXTRAS_ROUTES}  # fmt: skip
PLAIN, POSTED, GENERATION = (error_responses(c) for c in (PLAIN_ERRORS, BODY_ERRORS, GENERATION_ERRORS))
REPLICA_HEADER = "x-sdrt-replica"  # where a generation ran, when that is not this process


class ClientGone(Exception):
    """The HTTP client disconnected before its images were ready; its jobs were cancelled."""


def create_app(
    service,
    limits: a1111.Limits | None = None,
    close_on_shutdown: bool = True,
    options: ServerOptions | None = None,
    flags: dict | None = None,
) -> FastAPI:
    """The FastAPI app serving `service` (whose model it describes) within `limits`; `flags`: what /cmd-flags adds
    (the host and port serve was started with). `service`: a Service, or a backend with LocalBackend's methods."""
    limits = limits or a1111.Limits()
    options = options or ServerOptions()
    backend = LocalBackend(service) if isinstance(service, Service) else service

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if close_on_shutdown:
            await backend.close()

    app = FastAPI(title="sdrt", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Stable Diffusion inference; A1111-compatible /sdapi/v1 routes")  # fmt: skip
    app.state.service = backend
    app.state.limits = limits
    backend.model.prompt_limits = limits.prompt_limits()  # the model checks them when a request is submitted
    app.state.options = options
    app.state.flags = dict(flags or {})
    app.state.styles = [dict(style) for style in options.styles]
    metrics = Metrics(ROUTES, lambda: backend.queue_depth, lambda: dict(backend.counts))
    app.state.metrics = metrics
    _add_error_handlers(app)
    for add_routes in ROUTE_TABLE:
        add_routes(app)
    app.openapi = stated_openapi(app, limits, _scheduler_names())
    if options.cors_allow_origins or options.cors_allow_origins_regex:  # as A1111's webui.py sets it up
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_allow_origins), allow_methods=["*"],
                           allow_origin_regex=options.cors_allow_origins_regex, allow_credentials=True,
                           allow_headers=["*"])  # fmt: skip
    app.add_middleware(Guard, metrics=metrics, max_body=limits.max_body_bytes, read_timeout=options.read_timeout)
    return app


def _scheduler_names() -> list[str]:
    """The scheduler values a body may name: A1111's names and labels (a1111._schedule reads either)."""
    return list(dict.fromkeys([*a1111.SCHEDULER_NAMES.values(), *a1111.SCHEDULER_LABELS.values()]))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


def _invalid(exc: SdrtError) -> JSONResponse:
    """A 422 as FastAPI and A1111 answer it: `detail`, a list of {loc, msg, type}; loc names the refused field."""
    field = getattr(exc, "field", None)
    loc = ["body", *field.split(".")] if field else ["body"]
    return JSONResponse({"detail": [{"loc": loc, "msg": str(exc), "type": "value_error"}]}, status_code=422)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SdrtError)
    async def sdrt_error(request: Request, exc: SdrtError):
        status = next((code for kind, code in STATUS_OF.items() if isinstance(exc, kind)), 500)
        return _invalid(exc) if status == 422 else _error(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = _plain(exc.errors()) or [{"loc": ["body"], "msg": "invalid request", "type": "value_error"}]
        return JSONResponse({"detail": problems}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only those of the first route that matched it
            response.headers["Allow"] = ", ".join(_allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}")


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)  # a path that matches with another method is a partial match
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= route.methods
    return sorted(methods)


def _plain(errors: list) -> list:
    """Validation errors as JSON-safe dicts (pydantic puts exception objects in `ctx`), the failing field named in
    the message too."""
    return [{"loc": [str(p) for p in e.get("loc", ())], "msg": _named(e), "type": str(e.get("type", ""))}
            for e in errors]  # fmt: skip


def _named(error: dict) -> str:
    where = ".".join(str(p) for p in error.get("loc", ())[1:])  # without "body"
    return f"{where}: {error.get('msg', '')}" if where else str(error.get("msg", ""))


class LocalBackend:
    """What the routes ask of the model, answered by a Service in this process: its model and config, generation,
    interrupt, status and the counts /metrics reports (runtime.ray_serve.RayBackend answers the same over Ray)."""

    def __init__(self, service: Service):
        self.service = service
        self.model = service.model
        self.config = service.config

    @property
    def queue_depth(self) -> int:
        return self.service.queue_depth

    @property
    def counts(self) -> dict:
        return dict(self.service.counts)

    async def refresh(self) -> None:
        """Bring queue_depth and counts up to date (they are live here)."""

    async def status(self) -> dict:
        return self.service.status()

    async def interrupt(self, rest_of_group: bool = True) -> int:
        return self.service.interrupt(rest_of_group)

    async def close(self) -> None:
        await asyncio.to_thread(self.service.close, False, 30.0)

    async def generate(self, request: Request, calls: list[a1111.Call]) -> tuple[list, str | None, list[str]]:
        """Submit every call and wait for all results; cancel them all if the client goes away or one fails. The
        calls still queued when one is interrupted are skipped (Job.skipped) and left out (A1111 skips the remaining
        n_iter). Returns the results, when the first call started (A1111's job_timestamp) and where they ran (none:
        in this process)."""
        timeout = request.app.state.limits.request_timeout
        jobs: list[Job] = []
        group = object()  # the service skips the queued calls of an interrupted request
        try:
            await asyncio.to_thread(_submit, self.service, calls, jobs, timeout, group)  # validating: off the loop
            waiting = [asyncio.wrap_future(job.future) for job in jobs]
            while True:
                done, pending = await asyncio.wait(waiting, timeout=POLL_SECONDS, return_when=asyncio.FIRST_EXCEPTION)
                failed = [f for f, job in zip(waiting, jobs) if f in done and not job.skipped and f.exception()]
                if failed or not pending:
                    break
                for job in jobs:
                    job.check_deadline()
                if await request.is_disconnected():
                    raise ClientGone
            return [f.result() for f, job in zip(waiting, jobs) if not job.skipped], jobs[0].timestamp, []
        finally:
            for job in jobs:
                job.cancel("cancelled: its HTTP request ended")


def _submit(service: Service, calls: list[a1111.Call], jobs: list[Job], timeout: float | None, group: object) -> None:
    """Submit the calls in order, appending each job to `jobs` (the caller cancels them if a later one is refused)."""
    for call in calls:
        jobs.append(service.submit(call.mode, *call.args, timeout=timeout, group=group, **call.options))


def _add_generation_routes(app: FastAPI) -> None:
    @app.post("/sdapi/v1/txt2img", response_model=GenerationResponse, responses=GENERATION)
    async def txt2img(body: Txt2ImgBody, request: Request, response: Response):
        calls = await asyncio.to_thread(a1111.txt2img_calls, body, request.app.state.limits, request.app.state)
        return await _generate(request, response, body, calls)

    @app.post("/sdapi/v1/img2img", response_model=GenerationResponse, responses=GENERATION)
    async def img2img(body: Img2ImgBody, request: Request, response: Response):
        calls = await asyncio.to_thread(a1111.img2img_calls, body, request.app.state.limits, request.app.state)
        return await _generate(request, response, body, calls)

    @app.post("/sdapi/v1/interrupt", response_model=dict, responses=PLAIN)
    async def interrupt(request: Request):
        await request.app.state.service.interrupt()
        return {}

    @app.post("/sdapi/v1/png-info", response_model=PngInfoResponse, responses=POSTED)
    async def png_info(body: PngInfoBody, request: Request):
        return await asyncio.to_thread(a1111.png_info, body.image, request.app.state.limits)


async def _generate(request: Request, response: Response, body, calls: list[a1111.Call]):
    backend = request.app.state.service
    try:
        results, timestamp, where = await backend.generate(request, calls)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
    if where:  # the replicas that made the images, in order (Ray Serve)
        response.headers[REPLICA_HEADER] = ",".join(where)
    return await asyncio.to_thread(a1111.response, body, results, backend.model, job_timestamp=timestamp)


def _add_info_routes(app: FastAPI) -> None:
    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem], responses=PLAIN)
    async def samplers():
        specs = [resolve_sampler(name)[0] for name in SAMPLER_NAMES]
        return [{"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)} for s in specs]

    @app.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem], responses=PLAIN)
    async def schedulers():
        names, labels = a1111.SCHEDULER_NAMES, a1111.SCHEDULER_LABELS
        facts = a1111.SCHEDULER_FACTS
        return [{"name": names[t], "label": labels[t], "aliases": None, "default_rho": None, "need_inner_model": False,
                 **facts.get(t, {})} for t in names]  # fmt: skip

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem], responses=PLAIN)
    async def sd_models(request: Request):
        return a1111.sd_models(request.app.state.service.model)

    _add_listing_routes(app)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse, responses=POSTED)
    async def progress(request: Request, skip_current_image: bool = False):
        status = await request.app.state.service.status()
        fraction = status["step"] / status["steps"] if status["steps"] else 0.0
        elapsed = time.monotonic() - status["started"] if status["started"] else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        state = {"skipped": status["skipped"], "interrupted": status["interrupted"], "stopping_generation": False,
                 "job": "generating" if status["running"] else "", "job_count": status["running"] + status["queued"],
                 "job_timestamp": status["job_timestamp"], "job_no": 0, "sampling_step": status["step"],
                 "sampling_steps": status["steps"]}  # fmt: skip
        return {"progress": fraction, "eta_relative": eta, "state": state, "current_image": None, "textinfo": None}

    @app.get("/health", response_model=HealthResponse, responses=PLAIN)
    async def health(request: Request):
        backend = request.app.state.service
        await backend.refresh()
        return {"status": "ok", "model": backend.model.name, "backend": backend.model.backend.name,
                "queue_depth": backend.queue_depth, "batching": backend.config.batching}  # fmt: skip

    @app.get("/metrics", response_class=PlainTextResponse, responses=PLAIN)
    async def prometheus_metrics(request: Request):
        await request.app.state.service.refresh()
        return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


def _add_listing_routes(app: FastAPI) -> None:
    """What A1111 clients read before generating: settings, LoRAs, embeddings, upscalers, VAEs. One model is served;
    POST /sdapi/v1/options accepts settings that change nothing here and refuses a different checkpoint."""

    @app.get("/sdapi/v1/options", response_model=OptionsResponse, responses=PLAIN)
    async def options(request: Request):
        return a1111.options(request.app.state.service.model, request.app.state)

    @app.post("/sdapi/v1/options", response_model=None, responses=error_responses(BODY_ERRORS, True))
    async def set_options(body: dict, request: Request):
        a1111.set_options(body, request.app.state)
        return None

    @app.get("/sdapi/v1/loras", response_model=list[LoraItem], responses=PLAIN)
    async def loras(request: Request):
        return await asyncio.to_thread(a1111.loras, request.app.state.service.model)

    @app.get("/sdapi/v1/embeddings", response_model=EmbeddingsResponse, responses=PLAIN)
    async def embeddings(request: Request):
        return a1111.embeddings(request.app.state.service.model)

    @app.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem], responses=PLAIN)
    async def upscalers(request: Request):
        from ..upscalers import list_upscalers

        folder = getattr(request.app.state.service.model, "upscaler_dir", None)
        return [entry.as_a1111() for entry in await asyncio.to_thread(list_upscalers, folder)]

    @app.get("/sdapi/v1/latent-upscale-modes", response_model=list[LatentUpscaleModeItem], responses=PLAIN)
    async def latent_upscale_modes():
        return [{"name": name} for name in a1111.LATENT_UPSCALERS]

    @app.get("/sdapi/v1/sd-vae", response_model=list[SDVaeItem], responses=PLAIN)
    async def sd_vae(request: Request):
        source = request.app.state.service.model.info.get("source") or {}
        return [{"model_name": source["vae"], "filename": source["vae"]}] if source.get("vae") else []


# Every route of the A1111 API, registered in this order by create_app (runtime.ray_serve's ingress too): a new
# group of routes is one more `add(app)` function here.
ROUTE_TABLE = (_add_generation_routes, _add_info_routes, add_extras_routes, add_startup_routes, add_docs)
