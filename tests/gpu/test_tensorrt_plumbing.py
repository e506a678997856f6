"""A plumbing test, not a TensorRT test: the TensorRT backend's CUDA plumbing (runtime/backends/tensorrt.py's Engine
and TensorRTSession over runtime.cuda) on a real GPU, with a stand-in engine whose `execute_async_v3` launches real
cupy kernels on the buffers the backend bound. It checks tensor addresses, the shared activation block, the
warm-up / capture / replay / recapture cycle, that graphs of other shapes survive while no buffer moves, that a
refit's invalidation is what makes new weights visible to a captured graph, constant read-only inputs uploaded
once, and use from a worker thread (as the serving worker calls it). TensorRT itself is not installed here.

The stand-in computes  y = x * scale + c  through the activation block (x is first copied there), with x [N, 4]
(N dynamic, 1..8), c [4] a constant input and `scale` a "weight" baked into the launch as a kernel argument."""

from __future__ import annotations

import functools
import json
import threading
import types

import numpy as np
import pytest

from tests.gpu.conftest import HAS_CUPY, needs_cuda

pytestmark = [pytest.mark.gpu, needs_cuda,
              pytest.mark.skipif(not HAS_CUPY, reason="the stand-in engine's kernels need cupy")]  # fmt: skip

ACTIVATION_BYTES = 8 * 4 * 4  # the largest x, staged through the activations


@functools.cache
def _kernels():
    """(copy, affine): the stand-in engine's two cupy kernels, compiled once."""
    import cupy

    copy = cupy.ElementwiseKernel("float32 x", "float32 y", "y = x", "sdrt_plumbing_copy")
    affine = cupy.ElementwiseKernel("float32 a, float32 c, float32 scale", "float32 y", "y = a * scale + c",
                                    "sdrt_plumbing_affine")  # fmt: skip
    return copy, affine


class StandInContext:
    """What Engine uses of an IExecutionContext, recording what it was given."""

    def __init__(self, engine):
        self.engine = engine
        self.shapes: dict = {}
        self.addresses: dict = {}
        self.memory = None  # (pointer, size) of the activation block
        self.launches = 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["x"]  # y is shaped like x

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def set_device_memory(self, ptr, size):
        self.memory = (int(ptr), int(size))

    def execute_async_v3(self, stream_ptr):
        import cupy

        n = self.shapes["x"][0]
        x, c, y = (self._array(name, shape) for name, shape in (("x", (n, 4)), ("c", (4,)), ("y", (n, 4))))
        assert self.memory is not None and self.memory[1] >= n * 16, "activation block missing or too small"
        scratch = self._wrap(self.memory[0], n * 16, (n, 4))
        copy, affine = _kernels()
        with cupy.cuda.ExternalStream(stream_ptr):
            copy(x, scratch)
            affine(scratch, c, np.float32(self.engine.scale), y)
        self.launches += 1
        return True

    def _array(self, name, shape):
        return self._wrap(self.addresses[name], int(np.prod(shape)) * 4, shape)

    @staticmethod
    def _wrap(ptr, nbytes, shape):
        import cupy

        # the device given: no pointer query (the launch may be inside a stream capture)
        memory = cupy.cuda.UnownedMemory(ptr, nbytes, owner=None, device_id=cupy.cuda.runtime.getDevice())
        return cupy.ndarray(shape, np.float32, cupy.cuda.MemoryPointer(memory, 0))


class StandInEngine:
    """What Engine uses of an ICudaEngine: two inputs x, c and one output y, all float32."""

    num_io_tensors = 3
    device_memory_size_v2 = ACTIVATION_BYTES
    refittable = True

    def __init__(self):
        self.scale = 2.0
        self.contexts = []

    def get_tensor_name(self, i):
        return ("x", "c", "y")[i]

    def get_tensor_mode(self, name):
        return "in" if name in ("x", "c") else "out"

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self, strategy):
        assert strategy == "user-managed"
        self.contexts.append(StandInContext(self))
        return self.contexts[-1]


def _stand_in_trt(engine):
    return types.SimpleNamespace(
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="user-managed"),
        TensorIOMode=types.SimpleNamespace(INPUT="in"),
        nptype=lambda dtype: np.float32,
    ), types.SimpleNamespace(deserialize_cuda_engine=lambda plan: engine)


@pytest.fixture()
def session(tmp_path):
    from runtime.backends.tensorrt import Engine, SharedActivations, TensorRTSession
    from runtime.cuda import Stream

    plan = tmp_path / "unet.fp16.r1-8.plan"
    plan.write_bytes(b"stand-in")
    shapes = {"x": [[1, 4], [2, 4], [8, 4]], "c": [[4], [4], [4]]}
    plan.with_suffix(".json").write_text(json.dumps({"profile": "r1-8", "shapes": shapes}))
    stand_in = StandInEngine()
    trt, runtime = _stand_in_trt(stand_in)
    engine = Engine(trt, runtime, plan, SharedActivations(), graphed=True)
    yield TensorRTSession("unet", [engine], Stream()), engine, stand_in


def _expected(x, c, scale):
    return x * np.float32(scale) + c


def _feeds(n, seed, c=None):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 4), np.float32), "c": rng.standard_normal(4).astype(np.float32) if c is None
            else c}  # fmt: skip


def test_addresses_activations_capture_replay_and_recapture(session):
    session, engine, stand_in = session
    context = stand_in.contexts[0]
    first = _feeds(2, 0)
    np.testing.assert_array_equal(session.run(first)["y"], _expected(first["x"], first["c"], 2.0))  # warm-up
    assert context.addresses == {name: engine.buffers[name].ptr for name in ("x", "c", "y")}
    assert context.memory == (engine.shared.buffer.ptr, ACTIVATION_BYTES)
    assert engine.graphs == {}  # eager so far
    for seed in (1, 2):  # captured, then replayed with new input values
        feeds = _feeds(2, seed)
        np.testing.assert_array_equal(session.run(feeds)["y"], _expected(feeds["x"], feeds["c"], 2.0))
    key_2 = next(iter(engine.graphs))
    assert engine.graphs[key_2] is not None
    launches = context.launches
    session.run(_feeds(2, 3))
    assert context.launches == launches  # a replay: the stand-in's Python was not called again

    small = _feeds(1, 4)  # fits the bound buffers: nothing moves, the graph of 2 rows survives
    for _ in range(3):
        np.testing.assert_array_equal(session.run(small)["y"], _expected(small["x"], small["c"], 2.0))
    assert len(engine.graphs) == 2 and engine.graphs[key_2] is not None
    again = _feeds(2, 5)
    np.testing.assert_array_equal(session.run(again)["y"], _expected(again["x"], again["c"], 2.0))

    big = _feeds(8, 6)  # larger buffers: every graph holds old addresses and is dropped
    np.testing.assert_array_equal(session.run(big)["y"], _expected(big["x"], big["c"], 2.0))
    assert engine.graphs == {}
    assert context.addresses["x"] == engine.buffers["x"].ptr
    for seed in (7, 8):
        big = _feeds(8, seed)
        np.testing.assert_array_equal(session.run(big)["y"], _expected(big["x"], big["c"], 2.0))
    assert len(engine.graphs) == 1


def test_refit_invalidation_makes_new_weights_visible_to_the_graph(session):
    session, engine, stand_in = session
    feeds = _feeds(2, 0)
    for _ in range(3):  # warm-up, capture, replay
        session.run(feeds)
    stand_in.scale = 3.0  # a refit changes weights the captured launch holds
    np.testing.assert_array_equal(session.run(feeds)["y"], _expected(feeds["x"], feeds["c"], 2.0))  # stale graph
    engine.invalidate_graphs()  # what refit_component does after every refit
    for _ in range(3):
        np.testing.assert_array_equal(session.run(feeds)["y"], _expected(feeds["x"], feeds["c"], 3.0))


def test_constant_read_only_inputs_are_uploaded_once(session):
    session, engine, _ = session
    c = np.arange(4, dtype=np.float32)
    c.flags.writeable = False
    session.run(_feeds(2, 0, c))
    uploads = []
    buffer = engine.buffers["c"]
    original = buffer.copy_from_host
    buffer.copy_from_host = lambda array, stream: uploads.append(1) or original(array, stream)
    for seed in (1, 2, 3):
        feeds = _feeds(2, seed, c)
        np.testing.assert_array_equal(session.run(feeds)["y"], _expected(feeds["x"], c, 2.0))
    assert uploads == []  # the same read-only object: its values are on the device already
    other = np.full(4, 7.0, np.float32)  # writable: uploaded on every call
    for seed in (4, 5):
        feeds = _feeds(2, seed, other)
        np.testing.assert_array_equal(session.run(feeds)["y"], _expected(feeds["x"], other, 2.0))
    assert len(uploads) == 2


def test_runs_from_a_worker_thread(session):
    session, engine, _ = session
    results, errors = [], []

    def worker():
        try:
            for seed in range(4):  # warm-up, capture and replays all on this thread
                feeds = _feeds(2, seed)
                results.append((session.run(feeds)["y"], _expected(feeds["x"], feeds["c"], 2.0)))
        except Exception as exc:  # reported below, in the test's own thread
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(timeout=60)
    assert not errors and len(results) == 4
    for got, want in results:
        np.testing.assert_array_equal(got, want)
    assert any(g is not None for g in engine.graphs.values())
