"""What Lightning checkpoints pickle besides tensors (numpy scalars, bytes), read without numpy's own unpickling."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_torch

pytestmark = needs_torch


def test_numpy_scalars_read_as_torch_load_reads_them(tmp_path):
    import torch

    from runtime.torch_pickle import load_torch_file

    data = {"global_step": np.int64(470000), "lr": np.float32(1.5e-4), "big_endian": np.array(7, ">i4")[()]}
    path = tmp_path / "scalars.ckpt"
    torch.save(data, path)
    ours, theirs = load_torch_file(path), torch.load(path, weights_only=False)
    assert ours == theirs and {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    assert np.dtype(np.int64).byteorder == "="  # numpy's shared dtypes untouched


def test_non_numeric_numpy_dtype_is_refused(tmp_path):
    import torch

    from runtime.errors import ModelError
    from runtime.torch_pickle import load_torch_file

    path = tmp_path / "object.ckpt"
    torch.save({"dtype": np.dtype("O")}, path)
    with pytest.raises(ModelError, match="not numeric"):
        load_torch_file(path)
