"""The two Ray Serve deployments: SdrtModel (one loaded model and its Service per replica) and SdrtIngress (the A1111
routes of runtime.server.app over a RayBackend that reaches the model replicas through a deployment handle).

A call naming a replica (`sdrt_replica=<id>`) is routed to that replica by ReplicaRouter; every other call goes where
Ray's power-of-two-choices router sends it. That is how /progress, /interrupt and /skip reach every model replica.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, RunningReplica
from starlette.requests import Request

from ..errors import RequestCancelled, ServiceClosed
from ..server import a1111
from ..server.app import POLL_SECONDS, ClientGone, create_app
from ..server.options import ServerOptions

try:  # where Ray keeps its default router (a public class, an internal module path)
    from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
except ImportError:  # pragma: no cover - a Ray that moved it
    from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter

logger = logging.getLogger(__name__)

REPLICA_KEYWORD = "sdrt_replica"  # a call with this keyword goes to the model replica of that id
CONTROL_SECONDS = 10.0  # how long /progress, /interrupt and /metrics wait for one replica's answer
_routers: weakref.WeakSet = weakref.WeakSet()  # the ReplicaRouters of this process (one per handle)


class ReplicaRouter(PowerOfTwoChoicesRequestRouter):
    """Ray's default router, except that a call with `sdrt_replica=<id>` goes to that replica only (none while it is
    not running: the caller's wait bounds it). It also lists the running replicas for RayBackend."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from . import deployments  # the imported module's registry: Ray may unpickle this class by value

        deployments._routers.add(self)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        wanted = None if pending_request is None else pending_request.kwargs.get(REPLICA_KEYWORD)
        if wanted is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        return [[replica for replica in candidate_replicas if replica.replica_id.unique_id == wanted]]

    def replica_ids(self) -> list[str]:
        return sorted(replica_id.unique_id for replica_id in self.curr_replicas)


@dataclass
class ModelView:
    """What the routes read of the model, sent by a model replica to the ingress: names, facts, LoRA folder and
    embeddings, without sessions (the ingress never runs the model)."""

    name: str
    key: str
    info: dict
    backend: SimpleNamespace
    precision: str
    embeddings: object
    lora_dir: object
    lora_allow_pickle: bool
    prompt_limits: object = None
    upscaler_dir: object = None  # /upscalers lists its models
    allow_pickle: bool = False

    @classmethod
    def of(cls, sd) -> ModelView:
        return cls(sd.name, sd.key, sd.info, SimpleNamespace(name=sd.backend.name), sd.precision, sd.embeddings,
                   sd.lora_dir, sd.lora_allow_pickle, sd.prompt_limits, getattr(sd, "upscaler_dir", None),
                   getattr(sd, "allow_pickle", False))  # fmt: skip


@dataclass
class Outcome:
    """A model replica's answer to one call: the GenerationResult or the typed error, where and when it ran."""

    replica: str
    result: object = None
    error: BaseException | None = None
    timestamp: str | None = None
    skipped: bool = False  # skipped because a call of its request was interrupted (A1111 skips the rest of n_iter)


@dataclass(eq=False)  # compared and hashed by identity (a set holds the pending ones)
class _Item:
    """One call waiting in the replica: submitted to the Service by the batch that takes it."""

    call: a1111.Call
    timeout: float | None
    group: str
    job: object = None
    cancelled: bool = False
    extra: dict = field(default_factory=dict)

    def cancel(self) -> None:
        self.cancelled = True
        if self.job is not None:
            self.job.cancel("cancelled: its HTTP request ended")


class _Group:
    """The group object the Service compares by identity: one per request id on this replica."""


def _replica_id() -> str:
    return serve.get_replica_context().replica_id.unique_id


@serve.deployment(
    name="SdrtModel",
    max_ongoing_requests=16,
    graceful_shutdown_timeout_s=120,
    health_check_period_s=2,  # a dead replica is noticed (and replaced) within seconds
    request_router_config=RequestRouterConfig(request_router_class=ReplicaRouter),
)
class SdrtModel:
    """One replica: the model loaded from its exported artifacts (never exported here) and a Service over it.

    Calls arrive through `generate`; `serve.batch` gathers those that arrive together and submits them to the
    Service at once, which runs the compatible txt2img ones (its batch key) in one UNet batch, each with the images it
    gets alone, and everything else alone."""

    def __init__(self, spec: dict):
        from .. import load
        from ..serving import Service, ServiceConfig
        from . import checkpoint_load_options

        if spec.get("cpu_threads"):  # a CPU replica computes on the CPUs Ray reserved for it, unless told otherwise
            os.environ.setdefault("SDRT_CPU_THREADS", str(spec["cpu_threads"]))
        sd = load(spec["path"], backend=spec["backend"], precision=spec.get("precision", "fp32"),
                  allow_pickle=spec.get("allow_pickle", False), **checkpoint_load_options(spec))  # fmt: skip
        if spec.get("embeddings"):
            sd.load_embeddings(spec["embeddings"], allow_pickle=spec.get("allow_pickle", False))
        sd.set_lora_dir(spec.get("lora_dir"), allow_pickle=spec.get("allow_pickle", False))
        sd.upscaler_dir, sd.allow_pickle = spec.get("upscaler_dir"), spec.get("allow_pickle", False)  # as cli serve
        sd.memory_budget = spec.get("memory_budget")
        sd.vae_tiling = spec.get("vae_tiling")
        sd.prompt_limits = a1111.Limits(**spec.get("limits", {})).prompt_limits()
        config = ServiceConfig(batching=spec.get("batching", True), max_batch_images=spec.get("max_batch_images", 8))
        self.service = Service(sd, config)
        self.replica = _replica_id()
        self._items: set[_Item] = set()  # the calls submitted and not settled yet
        self._groups: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._batched.set_max_batch_size(config.max_batch_images)
        self._batched.set_batch_wait_timeout_s(spec.get("batch_wait_s", 0.02))  # how long a batch gathers calls
        logger.info("replica %s serves %s (pid %d)", self.replica, sd.name, os.getpid())

    # ------------------------------------------------------------------------------------------ generation

    async def generate(self, call: a1111.Call, timeout: float | None, group: str, **_) -> Outcome:
        item = _Item(call, timeout, group)
        try:
            return await self._batched(item)
        except asyncio.CancelledError:  # the caller cancelled it (its client went away): the device stops on it
            item.cancel()
            raise

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, max_concurrent_batches=4)  # queued behind a running one
    async def _batched(self, items: list[_Item]) -> list[Outcome]:
        await asyncio.to_thread(self._submit, items)
        waiting = [asyncio.wrap_future(item.job.future) for item in items if item.job is not None]
        await asyncio.gather(*waiting, return_exceptions=True)
        return [self._outcome(item) for item in items]

    def _submit(self, items: list[_Item]) -> None:
        """Submit the batch's calls together (Service.submitting_together), so the replica's worker groups the
        compatible ones; a refused call (bad request) gets its error."""
        with self.service.submitting_together():
            for item in items:
                if item.cancelled:
                    continue
                group = self._groups.setdefault(item.group, _Group())
                try:
                    call = item.call
                    item.job = self.service.submit(call.mode, *call.args, timeout=item.timeout, group=group,
                                                   **call.options)  # fmt: skip
                except Exception as exc:  # validation: this call's answer, not the batch's
                    item.extra["error"] = exc
                    continue
                item.job.sdrt_group = item.group
                self._items.add(item)

    def _outcome(self, item: _Item) -> Outcome:
        self._items.discard(item)
        job = item.job
        if job is None:
            error = item.extra.get("error") or RequestCancelled("cancelled before it ran")
            return Outcome(self.replica, error=error)
        error = None if job.future.cancelled() else job.future.exception()
        result = None if error is not None or job.future.cancelled() else job.future.result()
        return Outcome(self.replica, result, error, job.timestamp, job.skipped)

    # ------------------------------------------------------------------------------------------ control

    async def describe(self, **_) -> dict:
        return {"replica": self.replica, "pid": os.getpid(), "model": ModelView.of(self.service.model),
                "config": self.service.config}  # fmt: skip

    async def status(self, **_) -> dict:
        """The Service's status with `elapsed` (seconds since its running requests started) for `started`, whose
        clock is this process's; and the counts /metrics reports."""
        status = self.service.status()
        started = status.pop("started")
        status["elapsed"] = None if started is None else time.monotonic() - started
        return {**status, "counts": dict(self.service.counts), "replica": self.replica, "pid": os.getpid()}

    async def interrupt(self, rest_of_group: bool = True, **_) -> dict:
        """A1111's interrupt (rest_of_group False: its skip) of what runs here now; returns how many calls stopped
        and their requests (whose calls still queued on other replicas RayBackend then skips)."""
        count = self.service.interrupt(rest_of_group)
        groups = sorted({item.group for item in list(self._items) if item.job is not None and item.job.interrupted})
        return {"interrupted": count, "groups": groups if rest_of_group else []}

    async def skip(self, groups: list[str], **_) -> int:
        """Skip the calls of these requests still queued here (a call of theirs was interrupted elsewhere)."""
        wanted = set(groups)
        return sum(1 for item in list(self._items) if item.group in wanted and item.job.started is None
                   and item.job.skip())  # fmt: skip

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:  # Serve has drained the ongoing calls: whatever is left finishes first
            service.close(drain=True, timeout=60)


class RayBackend:
    """LocalBackend's methods (runtime.server.app) answered by the SdrtModel replicas: generation through the
    handle (Ray routes and batches), progress, interrupt, skip and counts from every running replica."""

    def __init__(self, handle, description: dict, app_name: str):
        self.handle = handle
        self.model = description["model"]
        self.config = description["config"]
        self.app_name = app_name
        self.queue_depth = 0
        self.counts: dict = {}

    def replica_ids(self) -> list[str]:
        for router in list(_routers):
            deployment = router._deployment_id
            if deployment.name == "SdrtModel" and deployment.app_name == self.app_name:
                return router.replica_ids()
        return []

    async def _each(self, method: str, *args) -> list:
        """Call `method` on every running model replica; the answers of those that gave one in time."""

        async def one(replica: str):
            response = getattr(self.handle, method).remote(*args, **{REPLICA_KEYWORD: replica})
            try:
                return await asyncio.wait_for(_awaited(response), CONTROL_SECONDS)
            except Exception as exc:  # a replica stopping or restarting: left out of this answer
                response.cancel()
                logger.warning("replica %s did not answer %s: %s", replica, method, type(exc).__name__)
                return None

        answers = await asyncio.gather(*(one(replica) for replica in self.replica_ids()))
        return [answer for answer in answers if answer is not None]

    async def refresh(self) -> None:
        answers = await self._each("status")
        self.queue_depth = sum(answer["queued"] for answer in answers)
        counts: dict = {}
        for answer in answers:
            for outcome, n in answer["counts"].items():
                counts[outcome] = counts.get(outcome, 0) + n
        self.counts = counts

    async def status(self) -> dict:
        """Service.status's fields over every replica: the running calls' lowest step of the highest step count,
        `started` in this process's clock, the latest job_timestamp and the interrupt flags of that latest job."""
        answers = await self._each("status")
        running = [answer for answer in answers if answer["running"]]
        now = time.monotonic()
        elapsed = max((answer["elapsed"] for answer in running if answer["elapsed"] is not None), default=None)
        latest = max((answer["job_timestamp"] for answer in answers), default="0")
        latest_ones = [answer for answer in answers if answer["job_timestamp"] == latest]  # A1111's flags: last job's
        return {"running": sum(a["running"] for a in answers), "queued": sum(a["queued"] for a in answers),
                "step": min((a["step"] for a in running), default=0), "steps": max((a["steps"] for a in running),
                default=0), "started": None if elapsed is None else now - elapsed, "job_timestamp": latest,
                "interrupted": any(a["interrupted"] for a in latest_ones), "skipped": any(a["skipped"] for a in
                latest_ones),
                "replicas": sorted(a["replica"] for a in answers)}  # fmt: skip

    async def interrupt(self, rest_of_group: bool = True) -> int:
        answers = await self._each("interrupt", rest_of_group)
        groups = sorted({group for answer in answers for group in answer["groups"]})
        if groups:  # their calls queued on other replicas are skipped too, as one Service skips its own
            await self._each("skip", groups)
        return sum(answer["interrupted"] for answer in answers)

    async def close(self) -> None:
        """Nothing to close here: Serve drains and stops the model replicas."""

    async def generate(self, request: Request, calls: list[a1111.Call]) -> tuple[list, str | None, list[str]]:
        """Send every call to the model deployment and wait for all; a client that goes away or a failed call
        cancels the rest (the replicas stop working on them). A replica that dies mid-call is a 503 to retry."""
        timeout = request.app.state.limits.request_timeout
        group = uuid.uuid4().hex  # one request's calls, on whichever replicas run them
        responses = [self.handle.generate.remote(call, timeout, group) for call in calls]
        tasks = [asyncio.ensure_future(_awaited(response)) for response in responses]
        try:
            while True:
                done, pending = await asyncio.wait(tasks, timeout=POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                failed = [t for t in done if t.exception() or (t.result().error and not t.result().skipped)]
                if failed or not pending:
                    break
                if await request.is_disconnected():
                    raise ClientGone
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise _unavailable(task.exception())
            outcomes = [task.result() for task in tasks if task.done()]
            for outcome in outcomes:
                if outcome.error is not None and not outcome.skipped:
                    raise outcome.error
            kept = [outcome for outcome in outcomes if not outcome.skipped]
            return [o.result for o in kept], kept[0].timestamp if kept else None, [o.replica for o in kept]
        finally:
            for response, task in zip(responses, tasks):
                if not task.done():
                    response.cancel()
                    task.cancel()


async def _awaited(response):
    return await response


def _unavailable(exc: BaseException) -> BaseException:
    """A Ray failure of a call (its replica died or is unreachable) as the 503 a retry answers; others as they are."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayActorError) or type(exc).__name__ in (
        "BackPressureError",
        "DeploymentUnavailableError",
    ):
        return ServiceClosed(f"the model replica running this request stopped ({type(exc).__name__}); retry it")
    return exc


@serve.deployment(name="SdrtIngress", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class SdrtIngress:
    """The A1111 HTTP API: runtime.server.app's routes (the same table `cli.py serve` serves) over a RayBackend."""

    async def __init__(self, model, settings: dict):
        description = await model.describe.remote()
        context = serve.get_replica_context()
        backend = RayBackend(model, description, context.app_name)
        options = ServerOptions(**settings.get("options", {}))
        limits = a1111.Limits(**settings.get("limits", {}))
        self._app = create_app(backend, limits, options=options, flags=settings.get("flags"))

    def __serve_build_asgi_app__(self):
        return self._app
