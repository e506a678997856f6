"""A long-lived generator shared by many threads: one queue, one worker, one batch on the device at a time.

    service = Service(runtime.load("models/tiny"))
    result = service.txt2img("a cat", seed=1, steps=20)          # blocking, from any thread
    job = service.submit("txt2img", "a dog", callback=print, timeout=30)
    job.cancel()                                                  # queued or running: an error, no images
    service.interrupt()                                           # running: stop after this step, keep its images
    service.close(drain=True)

Plain txt2img requests that agree on every setting except prompt, negative prompt, seed and batch size run in
one UNet batch (runtime.serving.batching; `batching=False` turns it off); everything else (img2img, inpaint,
hires fix, a refiner, inpainting models, prompts with extra networks) runs alone through the StableDiffusion method.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..admission import admit, batch_out_of_memory, fits_together, txt2img_passes
from ..errors import (
    AllocationError,
    InvalidRequestError,
    QueueFull,
    RequestCancelled,
    RequestTimeout,
    SdrtError,
    ServiceClosed,
    ServiceError,
)
from ..memory import release_memory
from ..request import Txt2ImgRequest, validate_txt2img
from .batching import batch_key, plan_groups, txt2img_group
from .jobs import Job, ProgressCallback

logger = logging.getLogger(__name__)

MODES = ("txt2img", "img2img", "inpaint", "outpaint", "depth2img", "upscale", "extras")  # extras: A1111's upscale
# fmt: off
TXT2IMG_EXTRAS = ("hires_scale", "hires_width", "hires_height", "hires_upscaler", "hires_steps", "hires_strength",
                  "hires_prompt", "hires_negative_prompt", "hires_sampler", "hires_schedule", "loras", "lora_dir",
                  "refiner", "refiner_switch_at")  # options of StableDiffusion.txt2img beyond the request's fields
# fmt: on


@dataclass(frozen=True)
class ServiceConfig:
    batching: bool = True  # run compatible txt2img requests in one UNet batch
    max_batch_images: int = 8  # images (rows before CFG doubling) per batch
    max_queue: int = 256  # queued requests beyond this raise QueueFull
    timeout: float | None = None  # default per-request timeout in seconds (None: none)

    def __post_init__(self):
        for name in ("max_batch_images", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, not {value!r}")


class _Abandoned(Exception):
    """Raised from a step hook when no request of the running batch still wants its result."""


class Service:
    """Thread-safe front of one loaded StableDiffusion; see the module docstring."""

    def __init__(self, model, config: ServiceConfig | None = None):
        self.model = model
        self.config = config or ServiceConfig()
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._closed = False
        self.counts = collections.Counter()  # completed, failed, cancelled, batches, batched_requests
        self.job_timestamp = "0"  # when the latest group started, "%Y%m%d%H%M%S" local time (A1111's; "0": none yet)
        self.stopped = {"interrupted": False, "skipped": False}  # of the latest group (A1111's state flags)
        self._thread = threading.Thread(target=self._work, name="sdrt-service", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------------ callers

    def submit(
        self,
        mode: str,
        *args,
        callback: ProgressCallback | None = None,
        preview: bool = False,
        timeout: float | None = None,
        group: object | None = None,
        **options,
    ) -> Job:
        """Queue a request for StableDiffusion.<mode>(*args, **options); return its Job at once. txt2img requests
        are validated here, so a bad one raises InvalidRequestError in the caller's thread. `group`: any object
        shared by requests submitted together (A1111's n_iter); interrupting one skips those still queued."""
        if mode not in MODES:
            raise InvalidRequestError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        timeout = self.config.timeout if timeout is None else timeout
        if timeout is not None and not timeout > 0:
            raise InvalidRequestError(f"timeout must be a positive number of seconds, not {timeout!r}")
        key, rows = None, int(options.get("batch_size", 1) or 1)
        if mode == "txt2img":
            options, key = self._prepare_txt2img(args, options)
            rows = options["request"].batch_size
        job = Job(mode, args, options, key, rows, callback, preview, timeout, group)
        with self._cond:
            if self._closed:
                raise ServiceClosed("the service is shut down")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull(f"{len(self._queue)} requests are queued (the limit); retry later")
            self._queue.append(job)
            self._cond.notify_all()
        return job

    @contextlib.contextmanager
    def submitting_together(self) -> Iterator[None]:
        """`with service.submitting_together(): service.submit(...) ...`: the worker takes none of these submissions
        before the block ends, so it sees them queued together and runs the compatible txt2img ones in one batch
        (runtime.ray_serve hands a serve.batch of calls over this way)."""
        with self._cond:  # reentrant: submit() takes it again inside
            yield

    def generate(self, mode: str, *args, **options):
        """submit(...) and wait: the GenerationResult, or the request's typed error."""
        return self.submit(mode, *args, **options).result()

    def txt2img(self, prompt: str, **options):
        return self.generate("txt2img", prompt, **options)

    def img2img(self, prompt: str, init_image, **options):
        return self.generate("img2img", prompt, init_image, **options)

    def inpaint(self, prompt: str, init_image, mask, **options):
        return self.generate("inpaint", prompt, init_image, mask, **options)

    def interrupt(self, rest_of_group: bool = True) -> int:
        """A1111's interrupt: the requests running now stop sampling after the current step and return the images
        of the steps done (their infotexts keep the requested Steps); queued ones stay. The running batch stops as a
        whole (every request in it is interrupted), so no request's images depend on another's interrupt. Queued
        requests of an interrupted one's group are skipped (Job.skip); `rest_of_group=False` is A1111's skip, which
        lets them run. Returns how many requests were interrupted."""
        with self._cond:
            interrupted = [job for job in self._running if job.interrupt()]
            if interrupted:
                self.stopped["interrupted" if rest_of_group else "skipped"] = True
            groups = {id(job.group) for job in interrupted if job.group is not None and rest_of_group}
            for job in list(self._queue):
                if job.group is not None and id(job.group) in groups:
                    job.skip()
            return len(interrupted)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; drain=True finishes the queued ones first, False cancels everything."""
        with self._cond:
            self._closed = True
            pending = [] if drain else list(self._queue) + list(self._running)
            self._cond.notify_all()
        for job in pending:
            job.cancel("cancelled by shutdown")
        self._thread.join(timeout)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc) -> None:
        self.close(drain=exc[0] is None)

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._queue)

    def status(self) -> dict:
        """A snapshot for progress reports: the running requests' step, the queue depth."""
        with self._cond:
            running = list(self._running)
            queued = len(self._queue)
        steps = max((job.steps for job in running), default=0)
        step = min((job.step for job in running), default=0)
        started = min((job.started for job in running if job.started), default=None)
        return {"running": len(running), "queued": queued, "step": step, "steps": steps, "started": started,
                "job_timestamp": self.job_timestamp, **self.stopped}  # fmt: skip

    def _prepare_txt2img(self, args: tuple, options: dict) -> tuple[dict, tuple | None]:
        """Validate a txt2img request; return the worker's options and the batch key (None: runs alone)."""
        if len(args) != 1:
            raise InvalidRequestError("txt2img takes one positional argument, the prompt")
        extras = {k: options.pop(k) for k in TXT2IMG_EXTRAS if k in options}
        watermark = options.pop("watermark", None)
        try:
            request = Txt2ImgRequest(args[0], **options)
        except TypeError as exc:
            raise InvalidRequestError(f"bad txt2img option: {exc}") from None
        if not isinstance(request.prompt, str) or not isinstance(request.negative_prompt, str):
            raise InvalidRequestError("prompt and negative prompt must be strings")
        request = validate_txt2img(request, self.model.info)
        passes = txt2img_passes(request, extras.get("hires_scale"), extras.get("hires_width") or 0,
                                extras.get("hires_height") or 0)  # fmt: skip
        hires_prompts = (extras.get("hires_prompt"), extras.get("hires_negative_prompt"))
        admission = admit(self.model, request, "txt2img", passes, False, hires_prompts)  # ResourceError: refused here
        hires = extras.get("hires_scale") or extras.get("hires_width") or extras.get("hires_height")
        loras = extras.get("loras") or extras.get("lora_dir") is not None
        key = batch_key(request)
        refined = extras.get("refiner") is not None  # two models in turn: runs alone
        if hires or loras or refined or self.model.info["unet_in_channels"] != 4 or key is None:
            key = None
        else:
            key = (key, watermark)
        return {"request": request, "extras": extras, "watermark": watermark, "admission": admission}, key

    # ------------------------------------------------------------------------------------------ worker

    def _work(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            try:
                self._run(group)
            finally:
                with self._cond:
                    self._running = []
                release_memory()  # the group's buffers go back to the system, not to a heap that keeps them

    def _next_group(self) -> list[Job] | None:
        """Block for the next job; with batching, also take every queued job of the same key that fits."""
        with self._cond:
            while True:
                self._drop_settled()
                if self._queue:
                    break
                if self._closed:
                    return None
                self._cond.wait(0.5)
            first = self._queue.popleft()
            group, rows = [first], first.rows
            if self.config.batching and first.key is not None:
                for job in list(self._queue):
                    if (
                        job.key == first.key
                        and rows + job.rows <= self.config.max_batch_images
                        and self._fits(group + [job], rows + job.rows)
                    ):
                        self._queue.remove(job)
                        group.append(job)
                        rows += job.rows
            now, self.job_timestamp = time.monotonic(), time.strftime("%Y%m%d%H%M%S")
            self.stopped = {"interrupted": False, "skipped": False}
            for job in group:
                job.started, job.timestamp = now, self.job_timestamp
            self._running = group
            return group

    def _fits(self, jobs: list[Job], images: int) -> bool:
        """Whether these txt2img jobs still fit the memory budget as one batch of `images` images."""
        return fits_together(self.model.info, [job.options["admission"] for job in jobs], images)

    def _drop_settled(self) -> None:
        """Forget queued jobs already cancelled or past their deadline."""
        for job in list(self._queue):
            if job.done() or job.check_deadline():
                self._queue.remove(job)
                self._count(job)

    def _run(self, group: list[Job]) -> None:
        """Run a group; whatever happens, every job of it ends settled and counted."""
        try:
            if group[0].key is None:
                self._run_alone(group[0])
            else:
                self._run_batched(group)
        except _Abandoned:
            pass
        except SdrtError as exc:
            self._fail(group, exc)
        except MemoryError:  # outside a model method or a batch's sampling (each translates its own)
            self._fail(group, AllocationError(f"out of memory running {len(group)} requests"))
        except Exception as exc:  # a bug or a backend failure: the callers get it, the worker lives on
            logger.exception("generation failed")
            self._fail(group, exc)
        finally:
            for job in group:
                job.finish(error=ServiceError(f"request {job.id} was not run"))  # a no-op for settled jobs
                self._count(job)

    def _count(self, job: Job) -> None:
        """Tally a settled job's outcome: completed, interrupted (images of fewer steps), failed, cancelled or
        timed_out."""
        error = None if job.future.cancelled() else job.future.exception()
        if job.future.cancelled() or isinstance(error, RequestCancelled):
            self.counts["cancelled"] += 1
        elif isinstance(error, RequestTimeout):
            self.counts["timed_out"] += 1
        elif error is None and getattr(job.future.result(), "interrupted", False):
            self.counts["interrupted"] += 1
        else:
            self.counts["completed" if error is None else "failed"] += 1

    @staticmethod
    def _fail(jobs: list[Job], error: BaseException) -> None:
        for job in jobs:
            job.finish(error=error)

    def _run_alone(self, job: Job) -> None:
        """One request through its StableDiffusion method, with a step hook for progress and cancellation."""
        calls = 0

        def hook(total: int) -> None:
            nonlocal calls
            calls += 1
            if job.done() or job.check_deadline():
                raise _Abandoned
            job.report(min(calls, total), total, None)

        options = job.options
        if job.mode == "txt2img":
            request = options["request"]
            fields = {k: v for k, v in vars(request).items() if k != "prompt"}
            options = dict(fields, **options["extras"], watermark=options["watermark"])
        interrupted = _InterruptCheck([job])
        models = [self.model, *([options["refiner"]] if options.get("refiner") is not None else [])]
        for model in models:  # a refiner's steps report progress and stop as the base's do
            model.step_hook, model.interrupt_hook = hook, interrupted
        try:
            result = getattr(self.model, job.mode)(*job.args, **options)
        finally:
            for model in models:
                model.step_hook = model.interrupt_hook = None
        job.finish(dataclasses.replace(result, interrupted=True) if interrupted.fired else result)

    def _run_batched(self, group: list[Job]) -> None:
        """Compatible txt2img requests in as few sampler runs as their conditionings allow."""
        requests = [job.options["request"] for job in group]
        lora_state = getattr(self.model, "lora_state", None)
        if lora_state is not None:  # a LoRA request that ran alone may have left its weights: back to the base
            lora_state.activate([])
        self.counts["batches"] += 1
        self.counts["batched_requests"] += len(group)
        for members, conditionings in plan_groups(self.model, requests):
            jobs = [group[i] for i in members]
            if all(job.done() for job in jobs):
                continue
            interrupted = _InterruptCheck(jobs)
            try:
                images = txt2img_group(
                    self.model, [requests[i] for i in members], conditionings, self._stepper(jobs), interrupted
                )
            except _Abandoned:
                continue
            except (AllocationError, MemoryError) as exc:  # named with the batch's size, as a request alone is
                self._fail(jobs, AllocationError(batch_out_of_memory([j.options["admission"] for j in jobs], exc)))
                continue
            except SdrtError as exc:
                self._fail(jobs, exc)
                continue
            for job, rows in zip(jobs, images):
                result = self.model._result(job.options["request"], rows, {}, job.options["watermark"])
                job.finish(dataclasses.replace(result, interrupted=True) if interrupted.fired else result)

    @staticmethod
    def _stepper(jobs: list[Job]):
        """The per-step hook of a batched run: progress per request, stop when nobody is waiting any more."""
        offsets = [0]
        for job in jobs:
            offsets.append(offsets[-1] + job.rows)

        def on_step(i: int, steps: int, x) -> None:
            alive = False
            for job, start, end in zip(jobs, offsets, offsets[1:]):
                if job.done() or job.check_deadline():
                    continue
                alive = True
                job.report(i + 1, steps, x[start:end] if job.preview else None)
            if not alive:
                raise _Abandoned

        return on_step


class _InterruptCheck:
    """The interrupt check of a run (model.interrupt_hook, txt2img_group's `interrupted`): True once every request
    still waiting in it is interrupted, so an interrupt of only some requests of a batch leaves every image of it as
    it is. `fired`: it answered True, i.e. sampling stopped early."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs
        self.fired = False

    def __call__(self) -> bool:
        waiting = [job for job in self.jobs if not job.done()]
        if waiting and all(job.interrupted for job in waiting):
            self.fired = True
        return self.fired
