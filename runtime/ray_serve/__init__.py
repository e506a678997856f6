"""sdrt on Ray Serve (`pip install -e ".[ray]"`): the A1111 API of `cli.py serve` over model replicas that Ray places,
routes to, scales and restarts.

    python cli.py serve --ray --model models/tiny --replicas 2           # a local Ray instance
    serve run deploy/ray-serve.yaml                                       # or serve deploy, or a RayService

Two deployments (runtime.ray_serve.deployments): SdrtIngress, the HTTP routes of runtime.server.app (one route
table for both servers), and SdrtModel, one loaded model per replica (num_gpus 1 on GPU backends, CPUs on
onnxruntime and openvino) with `serve.batch` gathering compatible txt2img calls into one UNet batch.

The model is exported once, by `build_app` (the driver, or the task that builds the application on the cluster),
before any replica starts: replicas load the artifact folder and never export. On a cluster that folder must be on
storage every node reads (or export with `cli.py export` beforehand and point `model` at the artifact folder).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidRequestError

TORCH_BACKENDS = ("torch", "torch-cuda")  # run the checkpoint's own modules: no artifacts
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "torch-cuda")
CHECKPOINT_KEYS = ("vae", "tokenizer", "prediction_type")


def checkpoint_load_options(spec: dict) -> dict:
    """runtime.load's checkpoint options for a replica: only where it loads a checkpoint (torch backends)."""
    if spec["backend"] not in TORCH_BACKENDS:
        return {}
    return {key: spec[key] for key in CHECKPOINT_KEYS if spec.get(key)}


def artifact_path(model: str, backend: str, engines: str | None = None, allow_pickle: bool = False,
                  vae: str | None = None, tokenizer: str | None = None, prediction_type: str | None = None,
                  progress: bool = False) -> str:  # fmt: skip
    """Where the replicas load `model` from: its artifact folder, exported now when it is missing (once, here, never
    in a replica); on torch backends the checkpoint itself (nothing to export)."""
    from ..backends import BACKENDS
    from ..cache import engines_dir_or_default
    from ..manifest import MANIFEST_NAME

    if backend not in BACKENDS:  # the name only: the replicas' nodes have the device and packages, not this one
        raise InvalidRequestError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    path = Path(model).expanduser()
    if (path / MANIFEST_NAME).is_file() or backend in TORCH_BACKENDS:
        return str(path)
    from ..cache import ensure_exported
    from ..checkpoint import fingerprint, model_key
    from ..single_file import prepare_checkpoint

    engines_dir = engines_dir_or_default(engines)
    checkpoint = prepare_checkpoint(model, engines_dir, vae, tokenizer, prediction_type, allow_pickle)
    key = model_key(checkpoint, fingerprint(checkpoint))
    return str(ensure_exported(checkpoint, engines_dir, key, progress, allow_pickle))


def parse_autoscale(text: str) -> tuple[int, int]:
    """--autoscale MIN:MAX -> (min, max) replicas."""
    try:
        low, high = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise InvalidRequestError(f"--autoscale takes MIN:MAX replicas (e.g. 1:4), not {text!r}") from None
    if low < 0 or high < 1 or low > high:
        raise InvalidRequestError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, not {text!r}")
    return low, high


def build_app(args: dict):
    """The Serve application of `args` (the `args:` of deploy/ray-serve.yaml, or what `cli.py serve --ray` passes):

    model (required), backend, precision, engines, allow_pickle, vae, tokenizer, prediction_type, lora_dir,
    embeddings, upscaler_dir, memory_budget (bytes), vae_tiling (null/true/false), batching, max_batch_images,
    replicas (int) or autoscale ("MIN:MAX"), replica_cpus (CPU backends; default 1), batch_wait_s,
    limits ({max_side, max_steps, max_images, max_body_bytes, request_timeout, max_prompt_chars, ...}),
    options ({cors_allow_origins, cors_allow_origins_regex, read_timeout, styles}), flags (/cmd-flags extras).

    Exports the model here when it has no artifacts yet (see artifact_path)."""
    from .deployments import SdrtIngress, SdrtModel

    if not args.get("model"):
        raise InvalidRequestError("the Ray application needs args.model (a checkpoint or an artifact folder)")
    backend = args.get("backend", "onnxruntime")
    allow_pickle = bool(args.get("allow_pickle", False))
    checkpoint = {key: args.get(key) for key in CHECKPOINT_KEYS}
    path = artifact_path(args["model"], backend, args.get("engines"), allow_pickle, **checkpoint)
    limits = dict(args.get("limits") or {})
    spec = {"path": path, "backend": backend, "precision": args.get("precision", "fp32"), "allow_pickle": allow_pickle,
            "lora_dir": args.get("lora_dir"), "embeddings": args.get("embeddings"),
            "upscaler_dir": args.get("upscaler_dir"), "memory_budget": args.get("memory_budget"),
            "vae_tiling": args.get("vae_tiling"),
            "batching": bool(args.get("batching", True)), "max_batch_images": int(args.get("max_batch_images", 8)),
            "batch_wait_s": float(args.get("batch_wait_s", 0.02)),
            "limits": limits, **(checkpoint if backend in ("torch", "torch-cuda") else {})}  # fmt: skip
    options: dict = {"ray_actor_options": _actor_options(backend, args.get("replica_cpus", 1))}
    if backend not in GPU_BACKENDS:
        spec["cpu_threads"] = max(1, int(float(args.get("replica_cpus", 1))))
    if args.get("autoscale"):
        low, high = parse_autoscale(args["autoscale"])
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": max(low, 1),
                                         "target_ongoing_requests": spec["max_batch_images"]}  # fmt: skip
    else:
        replicas = int(args.get("replicas", 1))
        if replicas < 1:
            raise InvalidRequestError(f"replicas must be at least 1, not {replicas}")
        options["num_replicas"] = replicas
    options["max_ongoing_requests"] = 2 * spec["max_batch_images"]  # a batch gathering while another runs
    model = SdrtModel.options(**options).bind(spec)
    settings = {"limits": limits, "options": dict(args.get("options") or {}), "flags": dict(args.get("flags") or {})}
    return SdrtIngress.bind(model, settings)


def _actor_options(backend: str, cpus) -> dict:
    """One GPU per replica on GPU backends; CPUs (default 1) on onnxruntime and openvino."""
    if backend in GPU_BACKENDS:
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": float(cpus)}


def require_ray() -> None:
    """BackendUnavailableError in one line when Ray Serve (or the server's packages) is not installed."""
    from ..errors import BackendUnavailableError
    from ..server import _require_packages

    _require_packages()
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(f'serving on Ray needs Ray Serve: pip install -e ".[ray]" ({exc})') from None


APP_NAME = "sdrt"


def run(args: dict, host: str = "127.0.0.1", port: int = 7860, address: str | None = None, quiet: bool = False):
    """`cli.py serve --ray`: deploy build_app(args) on the Ray cluster at `address` (None: a local instance started
    here) with Serve's HTTP proxy on host:port, and serve until interrupted; then the application drains (Serve
    lets the replicas finish what they hold) and, on a local instance, Ray stops."""
    import signal
    import threading

    import ray
    from ray import serve

    require_ray()
    application = build_app(args)  # exports first, when needed: before Ray starts anything
    ray.init(address=address, include_dashboard=False, log_to_driver=not quiet,
             logging_level="WARNING" if quiet else "INFO")  # fmt: skip
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}  # Ray's too
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=APP_NAME, route_prefix="/")
        print(f"serving {Path(args['model']).name} on http://{host}:{port} through Ray Serve "
              f"({ray.get_runtime_context().gcs_address}; docs at /docs)", flush=True)  # fmt: skip
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if address is None:
            serve.shutdown()
            ray.shutdown()
        else:  # someone else's cluster: only this application goes
            serve.delete(APP_NAME)
