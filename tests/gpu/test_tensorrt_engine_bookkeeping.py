"""The TensorRT backend's Engine bookkeeping on the CPU: which call binds, uploads, runs eagerly, captures or
replays, and when graphs are dropped. runtime.cuda is replaced by a numpy model of device memory in which a
"graph" records the stand-in engine's work during capture and replays it; neither CUDA nor TensorRT is involved
(tests/gpu/test_tensorrt_plumbing.py runs the same cycle on a real GPU). The stand-in engine computes
y = x * scale + c through the activation block, with `scale` a weight fixed into a captured launch."""

from __future__ import annotations

import itertools
import json
import types

import numpy as np
import pytest

MEMORY: dict[int, np.ndarray] = {}  # device address -> bytes


class FakeDeviceBuffer:
    _addresses = itertools.count(4096, 4096)

    def __init__(self, nbytes):
        self.nbytes = max(int(nbytes), 1)
        self.ptr = next(self._addresses)
        MEMORY[self.ptr] = np.zeros(self.nbytes, np.uint8)

    def copy_from_host(self, array, stream):
        array = np.ascontiguousarray(array)
        MEMORY[self.ptr][: array.nbytes] = array.view(np.uint8).ravel()

    def copy_to_host(self, array, stream):
        array.view(np.uint8).ravel()[:] = MEMORY[self.ptr][: array.nbytes]

    def close(self):
        MEMORY.pop(self.ptr, None)


class FakePinnedBuffer:
    def __init__(self, shape, dtype=np.float32):
        self.array = np.zeros(shape, dtype)

    def close(self):
        pass


class FakeStream:
    ptr = 1
    recording: list | None = None  # the capture in progress

    def synchronize(self):
        pass


class FakeGraph:
    def __init__(self, stream, enqueue):
        self.work = stream.recording = []
        enqueue(stream)
        stream.recording = None

    def launch(self):
        for work in self.work:
            work()

    def destroy(self):
        self.work = None


class StandInContext:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.memory, self.launches = engine, {}, {}, None, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["x"]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return True

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)

    def execute_async_v3(self, stream_ptr):
        n, scale, addresses, activations = self.shapes["x"][0], self.engine.scale, dict(self.addresses), self.memory[0]

        def work():  # reads the buffers when it runs, as a kernel does
            x = MEMORY[addresses["x"]][: n * 16].view(np.float32).reshape(n, 4)
            c = MEMORY[addresses["c"]][:16].view(np.float32)
            MEMORY[activations][: n * 16] = x.view(np.uint8).ravel()
            staged = MEMORY[activations][: n * 16].view(np.float32).reshape(n, 4)
            MEMORY[addresses["y"]][: n * 16] = (staged * np.float32(scale) + c).view(np.uint8).ravel()

        self.launches += 1
        if STREAM.recording is not None:
            STREAM.recording.append(work)
        else:
            work()
        return True


class StandInEngine:
    num_io_tensors, device_memory_size_v2, scale = 3, 128, 2.0

    def __init__(self):
        self.contexts = []

    def get_tensor_name(self, i):
        return ("x", "c", "y")[i]

    def get_tensor_mode(self, name):
        return "in" if name in ("x", "c") else "out"

    def get_tensor_dtype(self, name):
        return "float32"

    def create_execution_context(self, strategy):
        self.contexts.append(StandInContext(self))
        return self.contexts[-1]


STREAM = FakeStream()


@pytest.fixture()
def session(tmp_path, monkeypatch):
    import runtime.cuda as cuda
    from runtime.backends.tensorrt import Engine, SharedActivations, TensorRTSession

    for name, fake in (("DeviceBuffer", FakeDeviceBuffer), ("PinnedBuffer", FakePinnedBuffer),
                       ("CudaGraph", FakeGraph)):  # fmt: skip
        monkeypatch.setattr(cuda, name, fake)
    plan = tmp_path / "unet.plan"
    plan.write_bytes(b"stand-in")
    shapes = {"x": [[1, 4], [2, 4], [8, 4]], "c": [[4], [4], [4]]}
    plan.with_suffix(".json").write_text(json.dumps({"profile": "r1-8", "shapes": shapes}))
    stand_in = StandInEngine()
    trt = types.SimpleNamespace(
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED=1),
        TensorIOMode=types.SimpleNamespace(INPUT="in"),
        nptype=lambda dtype: np.float32,
    )
    runtime = types.SimpleNamespace(deserialize_cuda_engine=lambda plan: stand_in)  # fmt: skip
    engine = Engine(trt, runtime, plan, SharedActivations(), graphed=True)
    return TensorRTSession("unet", [engine], STREAM), engine, stand_in


def _feeds(n, seed, c=None):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 4), np.float32), "c": rng.standard_normal(4).astype(np.float32) if c is None
            else c}  # fmt: skip


def _check(session, feeds, scale=2.0):
    np.testing.assert_array_equal(session.run(feeds)["y"], feeds["x"] * np.float32(scale) + feeds["c"])


def test_warm_up_capture_replay_and_graphs_that_survive_until_a_buffer_moves(session):
    session, engine, stand_in = session
    context = stand_in.contexts[0]
    _check(session, _feeds(2, 0))
    assert engine.graphs == {} and context.memory == (engine.shared.buffer.ptr, 128)  # warm-up: eager
    _check(session, _feeds(2, 1))  # captured, then launched
    launches = context.launches
    _check(session, _feeds(2, 2))  # replayed: the engine is not asked again
    assert context.launches == launches and len(engine.graphs) == 1
    for seed in (3, 4, 5):  # a smaller shape fits the buffers: its own graph, the first one kept
        _check(session, _feeds(1, seed))
    _check(session, _feeds(2, 6))
    assert len(engine.graphs) == 2 and context.launches == launches + 2
    _check(session, _feeds(8, 7))  # larger buffers: both graphs held old addresses
    assert engine.graphs == {} and context.addresses["x"] == engine.buffers["x"].ptr


def test_an_invalidated_graph_sees_new_weights_and_a_stale_one_does_not(session):
    session, engine, stand_in = session
    feeds = _feeds(2, 0)
    for _ in range(3):
        _check(session, feeds)
    stand_in.scale = 3.0  # a refit
    _check(session, feeds, scale=2.0)  # the captured launch still holds the old weight
    engine.invalidate_graphs()  # what refit_component does after every refit
    for _ in range(3):
        _check(session, feeds, scale=3.0)


def test_the_same_read_only_input_is_uploaded_once_and_writable_ones_every_call(session):
    session, engine, _ = session
    constant = np.arange(4, dtype=np.float32)
    constant.flags.writeable = False
    _check(session, _feeds(2, 0, constant))
    uploads = []
    buffer = engine.buffers["c"]
    original = buffer.copy_from_host
    buffer.copy_from_host = lambda array, stream: uploads.append(1) or original(array, stream)
    for seed in (1, 2, 3):
        _check(session, _feeds(2, seed, constant))
    assert uploads == []
    writable = np.full(4, 7.0, np.float32)
    for seed in (4, 5):
        _check(session, _feeds(2, seed, writable))
    assert len(uploads) == 2
    other = np.full(4, -1.0, np.float32)
    other.flags.writeable = False  # another read-only object: uploaded
    _check(session, _feeds(2, 6, other))
    assert len(uploads) == 3
