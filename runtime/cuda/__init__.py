"""The device layer of the NVIDIA path, over cuda-bindings' runtime API (no torch, no cupy).

Every cuda-bindings call returns a tuple whose first element is a cudaError_t; `check` turns any error into a
CudaError with the call's name and CUDA's own error name and text, so no return code is ever dropped. Without the
package or without a driver, the first call raises BackendUnavailableError with one line.
"""

from __future__ import annotations

from .api import (
    CudaError,
    check,
    compute_capability,
    device_count,
    device_name,
    driver_version,
    mem_get_info,
    runtime_module,
    runtime_version,
)
from .memory import DeviceBuffer, PinnedBuffer
from .stream import CaptureError, CudaGraph, Event, Stream

__all__ = [
    "CaptureError",
    "CudaError",
    "CudaGraph",
    "DeviceBuffer",
    "Event",
    "PinnedBuffer",
    "Stream",
    "check",
    "compute_capability",
    "device_count",
    "device_name",
    "driver_version",
    "mem_get_info",
    "runtime_module",
    "runtime_version",
]
