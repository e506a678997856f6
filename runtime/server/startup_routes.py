"""The A1111 routes clients call at start-up, answered with what is true of this server: its flags, prompt styles,
memory, scripts (none), checkpoint refresh (one checkpoint is served: nothing to refresh) and skip."""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI, Request

from .openapi import PLAIN_ERRORS, error_responses
from .schemas import MemoryResponse, PromptStyleItem, ScriptInfo, ScriptsList

GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "torch-cuda")


def cmd_flags(app: FastAPI) -> dict[str, Any]:
    """A1111's cmd-flags, by its names where sdrt has the same setting (`sdrt_*` for its own ones); `app.state.flags`
    (what `serve` was started with: host, port) overrides."""
    service, limits, options = app.state.service, app.state.limits, app.state.options
    model = service.model
    source = model.info.get("source") or {}
    embeddings = getattr(model.embeddings, "folder", None)
    flags = {
        "api": True, "nowebui": True, "ckpt": str(model.info.get("path", model.name)), "vae_path": source.get("vae"),
        "lora_dir": None if model.lora_dir is None else str(model.lora_dir),
        "embeddings_dir": None if embeddings is None else str(embeddings),
        "cors_allow_origins": ",".join(options.cors_allow_origins) or None,
        "cors_allow_origins_regex": options.cors_allow_origins_regex, "listen": False, "port": None,
        "server_name": None, "sdrt_backend": model.backend.name, "sdrt_batching": service.config.batching,
        "sdrt_max_batch_images": service.config.max_batch_images, "sdrt_read_timeout": options.read_timeout,
        "sdrt_request_timeout": limits.request_timeout, "sdrt_max_side": limits.max_side,
        "sdrt_max_steps": limits.max_steps, "sdrt_max_images": limits.max_images,
        "sdrt_max_body_bytes": limits.max_body_bytes,
    }  # fmt: skip
    flags.update(app.state.flags)
    return flags


def memory(model) -> dict:
    """A1111's /memory: system RAM (`used` is this process's resident set) and, on a GPU backend, device memory."""
    import psutil

    rss = psutil.Process(os.getpid()).memory_info().rss
    system = psutil.virtual_memory()
    ram = {"free": system.available, "used": rss, "total": system.total}
    cuda: dict = {"error": "unavailable"}
    if model.backend.name in GPU_BACKENDS:
        try:
            from ..cuda import mem_get_info

            free, total = mem_get_info()
            cuda = {"system": {"free": free, "used": total - free, "total": total}}
        except Exception as exc:  # a device that cannot be queried is reported, not fatal
            cuda = {"error": f"{type(exc).__name__}: {exc}"}
    return {"ram": ram, "cuda": cuda}


def add_startup_routes(app: FastAPI) -> None:
    plain = error_responses(PLAIN_ERRORS)

    @app.get("/sdapi/v1/cmd-flags", response_model=dict[str, Any], responses=plain)
    async def flags(request: Request):
        return cmd_flags(request.app)

    @app.get("/sdapi/v1/prompt-styles", response_model=list[PromptStyleItem], responses=plain)
    async def prompt_styles(request: Request):
        return [dict(style) for style in request.app.state.styles]

    @app.get("/sdapi/v1/memory", response_model=MemoryResponse, responses=plain)
    async def memory_route(request: Request):
        return memory(request.app.state.service.model)

    @app.get("/sdapi/v1/scripts", response_model=ScriptsList, responses=plain)
    async def scripts():
        return {"txt2img": [], "img2img": []}  # sdrt runs no A1111 scripts

    @app.get("/sdapi/v1/script-info", response_model=list[ScriptInfo], responses=plain)
    async def script_info():
        return []

    @app.post("/sdapi/v1/refresh-checkpoints", response_model=None, responses=error_responses(PLAIN_ERRORS, True))
    async def refresh_checkpoints() -> None:
        return None  # one checkpoint, loaded at start: the list /sd-models shows cannot change

    @app.post("/sdapi/v1/skip", response_model=None, responses=error_responses(PLAIN_ERRORS, True))
    async def skip(request: Request) -> None:
        """The running generation stops after its current step and answers with those images; unlike interrupt,
        the request's remaining n_iter iterations still run."""
        await request.app.state.service.interrupt(rest_of_group=False)
        return None
