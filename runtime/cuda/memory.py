"""Device buffers and pinned host buffers; copies are asynchronous on a given stream."""

from __future__ import annotations

import ctypes

import numpy as np

from .api import check, runtime_module


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc: 256-byte aligned); freed by close() or when collected."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = int(check(runtime_module().cudaMalloc(self.nbytes), "cudaMalloc"))

    def copy_from_host(self, array: np.ndarray, stream) -> None:
        """Enqueue host -> device of `array` (contiguous; pinned memory makes it truly asynchronous)."""
        array = np.ascontiguousarray(array)
        self._fits(array.nbytes)
        rt = runtime_module()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes, kind, stream.handle), "cudaMemcpyAsync")

    def copy_to_host(self, array: np.ndarray, stream) -> None:
        """Enqueue device -> host into `array` (C-contiguous, writable); synchronize the stream before reading."""
        if not array.flags.c_contiguous or not array.flags.writeable:
            raise ValueError("the host array must be C-contiguous and writable")
        self._fits(array.nbytes)
        rt = runtime_module()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(array.ctypes.data, self.ptr, array.nbytes, kind, stream.handle), "cudaMemcpyAsync")

    def copy_from_device(self, other: DeviceBuffer, nbytes: int, stream) -> None:
        self._fits(nbytes)
        rt = runtime_module()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(rt.cudaMemcpyAsync(self.ptr, other.ptr, nbytes, kind, stream.handle), "cudaMemcpyAsync")

    def _fits(self, nbytes: int) -> None:
        if nbytes > self.nbytes:
            raise ValueError(f"{nbytes} bytes do not fit a device buffer of {self.nbytes}")

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(runtime_module().cudaFree(ptr), "cudaFree")

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the driver frees everything anyway
            pass


class PinnedBuffer:
    """Page-locked host memory seen as a numpy array of `shape` and `dtype` (fast, asynchronous copies)."""

    def __init__(self, shape: tuple[int, ...], dtype=np.float32):
        dtype = np.dtype(dtype)
        self.nbytes = max(int(np.prod(shape)) * dtype.itemsize, 1)
        self.ptr = int(check(runtime_module().cudaMallocHost(self.nbytes), "cudaMallocHost"))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def close(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.array = None
            check(runtime_module().cudaFreeHost(ptr), "cudaFreeHost")

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
