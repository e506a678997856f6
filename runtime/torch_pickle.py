"""Read `torch.save` files (the zip format) into numpy arrays, without torch and without running their code.

A pickle names the callables that rebuild its objects, and `pickle.load` imports and calls whatever it names: that is
how a malicious .pt file runs code. This reader resolves only the names torch writes for tensors (its rebuild
functions, storage classes, OrderedDict, and the inert parts of a pickled ParameterDict, which old textual-inversion
files hold) to local stand-ins that build numpy arrays. Any other name is refused before anything is called.

Zip layout (torch >= 1.6): `<archive>/data.pkl` is the pickle; tensor storages are the files `<archive>/data/<key>`,
raw little-endian elements, referenced from the pickle by persistent ids ("storage", type, key, location, numel).
"""

from __future__ import annotations

import collections
import functools
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from .errors import ModelError

MAX_PICKLE_BYTES = 1 << 26  # data.pkl of a tensor file is tiny; anything near this is not one

BFLOAT16 = "bfloat16"  # numpy has no bfloat16: its bits are the upper half of a float32
STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": BFLOAT16,
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """Stands in for torch.FloatStorage & co. in persistent ids: only its element type is used."""

    def __init__(self, name: str):
        self.name = name


class _ModuleState:
    """Stands in for a pickled torch.nn.ParameterDict: keeps its `_parameters`, calls nothing."""

    def __setstate__(self, state: object) -> None:
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        self._parameters = dict(parameters) if isinstance(parameters, dict) else {}


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2: a strided view of `storage` -> a read-only numpy view, bounds-checked."""
    if not (isinstance(storage, np.ndarray) and storage.ndim == 1):
        raise ModelError("a tensor in the pickle does not refer to a storage")
    shape, strides = _int_tuple(size), _int_tuple(stride)
    if len(shape) != len(strides) or not isinstance(storage_offset, int) or storage_offset < 0:
        raise ModelError("a tensor in the pickle has an invalid shape, stride or offset")
    if 0 not in shape:
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, strides))  # index of the last element
        if last >= storage.size:
            raise ModelError("a tensor in the pickle reaches past the end of its storage")
    return np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=shape, strides=[s * storage.itemsize for s in strides], writeable=False
    )


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """torch._utils._rebuild_parameter: a Parameter is its tensor."""
    if not isinstance(data, np.ndarray):
        raise ModelError("a parameter in the pickle does not hold a tensor")
    return data


def _int_tuple(values: object) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ModelError("a tensor in the pickle has an invalid shape or stride")
    return tuple(values)


class _Inert:
    """Stands in for a training-time object a Lightning checkpoint pickles (a ModelCheckpoint callback): it keeps
    nothing and calls nothing."""

    def __setstate__(self, state: object) -> None:
        pass


class _DtypeName:
    """Stands in for numpy.dtype(name): numpy's built-in dtypes are shared singletons, so the pickle's BUILD
    (dtype.__setstate__) must never reach a real one; only the byte order of its state is kept."""

    def __init__(self, name, align=False, copy=False):
        if not isinstance(name, str) or np.dtype(name).kind not in "biufc":
            raise ModelError(f"a numpy dtype {name!r} in the pickle is not numeric; refused")
        self.name, self.byteorder = name, "="

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]

    def dtype(self) -> np.dtype:
        dtype = np.dtype(self.name)
        return dtype.newbyteorder(self.byteorder) if self.byteorder in "<>" else dtype


def _numpy_scalar(dtype, data=None):
    """numpy.core.multiarray.scalar: one numeric value from its raw bytes (e.g. a `global_step` of np.int64)."""
    if not isinstance(dtype, _DtypeName):
        raise ModelError("a numpy scalar in the pickle is not numeric; refused")
    dtype = dtype.dtype()
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ModelError("a numpy scalar in the pickle has malformed data")
    return np.frombuffer(data, dtype=dtype)[0]


def _latin1_encode(text, encoding="latin1"):
    """_codecs.encode as protocol-2 pickles use it for bytes: latin-1 text to bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ModelError("the pickle encodes bytes in an unexpected way; refused")
    return text.encode("latin-1")


LIGHTNING_CALLBACK = ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")

# What each allowed name resolves to. Factories, so every lookup gets a fresh object: a pickle can set attributes
# on what it looks up (BUILD), and that must not reach this module's functions and classes or the next file.
ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): lambda: functools.partial(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): lambda: functools.partial(_rebuild_parameter),
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,  # a built-in type: attributes cannot be set
    ("torch.nn.modules.container", "ParameterDict"): lambda: type("ParameterDict", (_ModuleState,), {}),
    ("builtins", "set"): lambda: set,  # a pickled module's _non_persistent_buffers_set
    ("__builtin__", "set"): lambda: set,  # the same under protocol 2's Python 2 module name
    **{("torch", name): functools.partial(_StorageType, name) for name in STORAGE_DTYPES},
    # Lightning checkpoints (.ckpt): numpy scalars (global_step), bytes under protocol 2, the checkpoint callback
    ("numpy.core.multiarray", "scalar"): lambda: functools.partial(_numpy_scalar),
    ("numpy._core.multiarray", "scalar"): lambda: functools.partial(_numpy_scalar),
    ("numpy", "dtype"): lambda: type("dtype", (_DtypeName,), {}),
    ("_codecs", "encode"): lambda: functools.partial(_latin1_encode),
    LIGHTNING_CALLBACK: lambda: type("ModelCheckpoint", (_Inert,), {}),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        try:
            factory = ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ModelError(f"{self.path} wants to call {module}.{name}, which no tensor needs; refused") from None
        return factory()

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ModelError(f"{self.path} has a persistent id that is not a tensor storage; refused")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise ModelError(f"{self.path} has a malformed tensor storage reference")
        if key not in self.storages:
            self.storages[key] = self._read_storage(STORAGE_DTYPES.get(storage_type.name), key, numel)
        return self.storages[key]

    def _read_storage(self, dtype: np.dtype | str, key: str, numel: int) -> np.ndarray:
        """Storage `key` as a read-only 1-D array of `numel` elements (bfloat16 widened to float32, exactly)."""
        if dtype is None:
            raise ModelError(f"{self.path} has a storage of an unknown type")
        itemsize = 2 if dtype == BFLOAT16 else dtype.itemsize
        info = _stored_entry(self.archive, f"{self.prefix}/data/{key}", self.path)
        if info.file_size != numel * itemsize:
            raise ModelError(f"{self.path}: storage {key!r} holds {info.file_size} bytes, not {numel} x {itemsize}")
        raw = self.archive.read(info)
        if dtype == BFLOAT16:
            return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(raw, dtype=dtype.newbyteorder("<"))


def _stored_entry(archive: zipfile.ZipFile, name: str, path: Path) -> zipfile.ZipInfo:
    """A zip entry that torch.save wrote: uncompressed, so its bytes are really in the file (no zip bombs)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise ModelError(f"{path} lacks {name}, which its pickle refers to") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise ModelError(f"{path} has a compressed entry {name}; torch.save writes none")
    return info


def load_torch_file(path: Path) -> object:
    """The object `torch.save` wrote to `path`, tensors as numpy arrays; ModelError for anything else it holds."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise ModelError(f"{path} is a zip file but not one torch.save wrote")
            prefix = pickles[0].rsplit("/", 1)[0]
            byteorder = f"{prefix}/byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
                raise ModelError(f"{path} was saved big-endian, which is not supported")
            info = _stored_entry(archive, pickles[0], path)
            if info.file_size > MAX_PICKLE_BYTES:
                raise ModelError(f"{path} has a {info.file_size}-byte pickle, too large for a tensor file")
            return _RestrictedUnpickler(archive.read(info), archive, prefix, path).load()
    except zipfile.BadZipFile:
        raise ModelError(f"{path} is not a torch zip file (the pre-1.6 format is not supported)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise ModelError(f"{path} is not a readable torch file ({type(exc).__name__}: {exc})") from None
