"""Return-code checking and device queries over `cuda.bindings.runtime`."""

from __future__ import annotations

import functools
from typing import Any

from ..errors import BackendUnavailableError, SdrtError

# errors that mean "no usable GPU here" rather than a bug: reported as BackendUnavailableError
_UNAVAILABLE = ("cudaErrorNoDevice", "cudaErrorInsufficientDriver", "cudaErrorInitializationError",
                "cudaErrorDevicesUnavailable", "cudaErrorCompatNotSupportedOnDevice")  # fmt: skip


class CudaError(SdrtError):
    """A CUDA runtime call failed; the message names the call and CUDA's error."""

    def __init__(self, message: str, code: Any = None):
        super().__init__(message)
        self.code = code


@functools.cache
def runtime_module():
    """`cuda.bindings.runtime`, or one BackendUnavailableError line when cuda-bindings is not installed."""
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise BackendUnavailableError("the NVIDIA path needs 'cuda-bindings' (pip install -e .[gpu])") from exc
    return runtime


def _error_name(rt, err) -> str:
    try:
        _, name = rt.cudaGetErrorName(err)
        _, text = rt.cudaGetErrorString(err)
        return f"{name.decode()}: {text.decode()}"
    except Exception:  # an unknown code: its number is still worth reporting
        return str(err)


def check(result: Any, call: str) -> Any:
    """The values of a cuda-bindings call's result tuple (None, one value or a tuple) after checking its error.

    A missing device or driver raises BackendUnavailableError, any other error CudaError; both one line."""
    rt = runtime_module()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        described = _error_name(rt, err)
        if described.split(":")[0] == "cudaErrorInsufficientDriver":
            raise BackendUnavailableError(insufficient_driver_message(rt, call))
        if described.split(":")[0] in _UNAVAILABLE:
            raise BackendUnavailableError(f"no usable NVIDIA GPU ({call}: {described})")
        raise CudaError(f"{call} failed: {described}", err)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _cuda_version(number: int) -> str:
    """CUDA's integer version (12080) as text ("12.8")."""
    return f"{number // 1000}.{number % 1000 // 10}"


def insufficient_driver_message(rt, call: str) -> str:
    """One line for cudaErrorInsufficientDriver: the driver's CUDA version, the one cuda-bindings was built for,
    and what to install so that both agree (a driver is never too new, only too old)."""
    err, driver = rt.cudaDriverGetVersion()  # answers even where the driver is too old for this runtime
    err_rt, runtime = rt.cudaRuntimeGetVersion()
    if err != rt.cudaError_t.cudaSuccess or not driver:
        return f"no usable NVIDIA GPU ({call}: cudaErrorInsufficientDriver, and no NVIDIA driver answers)"
    have = _cuda_version(int(driver))
    need = _cuda_version(int(runtime)) if err_rt == rt.cudaError_t.cudaSuccess else "a newer CUDA"
    major = int(driver) // 1000
    return (
        f"the NVIDIA driver supports CUDA {have}, but cuda-bindings needs CUDA {need} ({call}: "
        f"cudaErrorInsufficientDriver): install the packages for CUDA {major} (pip install "
        f"'cuda-bindings=={major}.*', tensorrt-cu{major}, an onnxruntime-gpu built for CUDA {major}), or update the "
        "driver"
    )


def runtime_version() -> str:
    """The CUDA version cuda-bindings' runtime was built for, e.g. "13.0"."""
    return _cuda_version(int(check(runtime_module().cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")))


def device_count() -> int:
    """NVIDIA devices visible to the CUDA runtime (BackendUnavailableError without a driver)."""
    return int(check(runtime_module().cudaGetDeviceCount(), "cudaGetDeviceCount"))


def compute_capability(device: int = 0) -> tuple[int, int]:
    rt = runtime_module()
    attr = rt.cudaDeviceAttr
    major = check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute")
    minor = check(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute")
    return int(major), int(minor)


def device_name(device: int = 0) -> str:
    props = check(runtime_module().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name
    return (name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)).strip()


def driver_version() -> str:
    """The driver's CUDA version, e.g. "13.0" (cudaDriverGetVersion's 13000)."""
    return _cuda_version(int(check(runtime_module().cudaDriverGetVersion(), "cudaDriverGetVersion")))


def mem_get_info() -> tuple[int, int]:
    """(free, total) bytes of the current device."""
    free, total = check(runtime_module().cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)
