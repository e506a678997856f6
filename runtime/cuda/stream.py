"""Streams, events and CUDA graphs (stream capture -> instantiate -> launch -> destroy)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from .api import CudaError, check, runtime_module

logger = logging.getLogger(__name__)


class CaptureError(CudaError):
    """Stream capture failed (an operation that cannot be captured, or an error inside the captured work)."""


class Stream:
    """A non-blocking stream (graph capture is not allowed on the legacy default stream)."""

    def __init__(self):
        rt = runtime_module()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @property
    def ptr(self) -> int:
        """The stream as an integer handle (what TensorRT's execute_async_v3 takes)."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(runtime_module().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(runtime_module().cudaStreamDestroy(handle), "cudaStreamDestroy")

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Event:
    """A CUDA event: record on a stream, wait for it, time between two of them."""

    def __init__(self):
        self.handle = check(runtime_module().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(runtime_module().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def synchronize(self) -> None:
        check(runtime_module().cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from `start` to this event (both recorded; this one synchronized)."""
        return float(check(runtime_module().cudaEventElapsedTime(start.handle, self.handle), "cudaEventElapsedTime"))

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(runtime_module().cudaEventDestroy(handle), "cudaEventDestroy")

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class CudaGraph:
    """The work `enqueue(stream)` puts on `stream`, captured once and replayed with `launch`.

    The capture is thread-local (other threads' CUDA calls are not swept in). If anything fails inside, the capture
    is ended and discarded and CaptureError says why; the caller then runs eagerly.
    """

    def __init__(self, stream: Stream, enqueue: Callable[[Stream], None]):
        self.stream = stream
        self.graph = None
        self.exec = None
        self._capture(enqueue)

    def _capture(self, enqueue: Callable[[Stream], None]) -> None:
        rt = runtime_module()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(self.stream.handle, mode), "cudaStreamBeginCapture")
        failure: BaseException | None = None
        try:
            enqueue(self.stream)
        except BaseException as exc:  # end the capture below whatever happened, then re-raise
            failure = exc
        result = rt.cudaStreamEndCapture(self.stream.handle)
        if failure is not None:
            if result[0] == rt.cudaError_t.cudaSuccess and result[1] is not None and int(result[1]):  # not NULL
                check(rt.cudaGraphDestroy(result[1]), "cudaGraphDestroy")
            rt.cudaGetLastError()  # clear the invalidated capture's error so the eager run that follows starts clean
            raise CaptureError(f"capturing a CUDA graph failed: {failure}") from failure
        try:
            self.graph = check(result, "cudaStreamEndCapture")
            self.exec = check(rt.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")
        except CudaError as exc:
            rt.cudaGetLastError()
            self.destroy()
            raise CaptureError(str(exc), exc.code) from exc

    def launch(self) -> None:
        if self.exec is None:
            raise CudaError("this CUDA graph was destroyed")
        check(runtime_module().cudaGraphLaunch(self.exec, self.stream.handle), "cudaGraphLaunch")

    def destroy(self) -> None:
        rt = runtime_module()
        if self.exec is not None:
            exec_, self.exec = self.exec, None
            check(rt.cudaGraphExecDestroy(exec_), "cudaGraphExecDestroy")
        if self.graph is not None:
            graph, self.graph = self.graph, None
            check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def __del__(self):
        try:
            self.destroy()
        except Exception:
            pass
