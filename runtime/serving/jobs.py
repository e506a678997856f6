"""One request's life in the service: queued -> running -> done (result, error, cancelled or timed out)."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import RequestCancelled, RequestTimeout

logger = logging.getLogger(__name__)
_ids = itertools.count(1)


@dataclass(frozen=True)
class Progress:
    """What a progress callback receives after each sampling step of its request."""

    job_id: int
    step: int  # steps done, 1..steps
    steps: int  # the sampler's step count (second-order samplers: UNet calls in the unbatched path)
    preview: np.ndarray | None = None  # float32 [B, 4, h, w]: the sampler's x for this request (VE space), if asked


ProgressCallback = Callable[[Progress], None]


class Job:
    """A submitted request. `result()` waits for its GenerationResult or raises its typed error; `cancel()` stops it
    whether queued or running (its batch-mates carry on); `interrupt()` ends a running one's sampling early, and
    its result holds the images of the steps done (A1111's interrupt)."""

    def __init__(
        self,
        mode: str,
        args: tuple,
        options: dict,
        key: tuple | None,
        rows: int,
        callback: ProgressCallback | None = None,
        preview: bool = False,
        timeout: float | None = None,
        group: object | None = None,
    ):
        self.id = next(_ids)
        self.mode = mode
        self.args = args  # positional arguments of the StableDiffusion method (prompt, images ...)
        self.options = options  # its keyword options; for batchable txt2img: {"request": validated, "extras"}
        self.key = key  # batch key; None: runs alone
        self.rows = rows  # images this request makes
        self.callback = callback
        self.preview = preview
        self.submitted = time.monotonic()
        self.deadline = None if timeout is None else self.submitted + timeout
        self.timeout = timeout
        self.started: float | None = None
        self.timestamp: str | None = None  # when it started, "%Y%m%d%H%M%S" local time (A1111's job_timestamp)
        self.step = 0
        self.steps = 0
        self.group = group  # requests submitted together (A1111's n_iter): an interrupt skips the queued ones
        self.interrupted = False  # set by interrupt(): sampling stops after the current step
        self.skipped = False  # cancelled unstarted because a request of its group was interrupted
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self.future.done()

    def finish(self, result=None, error: BaseException | None = None) -> bool:
        """Settle the job once (the first caller wins); False when it was already settled."""
        with self._lock:
            if self.future.done():
                return False
            try:
                if error is not None:
                    self.future.set_exception(error)
                else:
                    self.future.set_result(result)
            except concurrent.futures.InvalidStateError:  # cancelled from an asyncio wrapper meanwhile
                return False
            return True

    def cancel(self, reason: str = "cancelled") -> bool:
        """Cancel the request: a queued one never runs, a running one stops at its next step."""
        return self.finish(error=RequestCancelled(f"request {self.id} {reason}"))

    def interrupt(self) -> bool:
        """Ask a running request to stop sampling after its current step and return what it has; False when it is
        not running, already settled or already interrupted."""
        with self._lock:
            if self.started is None or self.future.done() or self.interrupted:
                return False
            self.interrupted = True
            return True

    def skip(self) -> bool:
        """Cancel a request that has not run because one of its group was interrupted (A1111 skips the remaining
        iterations); True when it was settled now."""
        self.skipped = self.cancel("skipped: an earlier request of its group was interrupted")
        return self.skipped

    def check_deadline(self) -> bool:
        """Settle the job with RequestTimeout if its deadline has passed; True when it is (now) timed out."""
        if self.deadline is None or time.monotonic() < self.deadline:
            return False
        self.finish(error=RequestTimeout(f"request {self.id} did not finish within {self.timeout:g} s"))
        return True

    def result(self, timeout: float | None = None):
        """Wait for the GenerationResult (raises the request's error); `timeout` bounds only this wait."""
        wait = timeout
        if self.deadline is not None:
            remaining = max(0.0, self.deadline - time.monotonic())
            wait = remaining if wait is None else min(wait, remaining)
        try:
            return self.future.result(wait)
        except concurrent.futures.TimeoutError:
            if not self.check_deadline():
                raise RequestTimeout(f"request {self.id} still running after waiting {timeout:g} s") from None
            return self.future.result()

    def report(self, step: int, steps: int, preview: np.ndarray | None) -> None:
        """Record progress and call the caller's callback; a failing callback is logged, never fatal."""
        self.step, self.steps = step, steps
        if self.callback is None:
            return
        try:
            self.callback(Progress(self.id, step, steps, preview if self.preview else None))
        except Exception:  # the caller's code: it must not break the batch it shares
            logger.exception("progress callback of request %d failed", self.id)
