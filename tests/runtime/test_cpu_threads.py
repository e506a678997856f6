"""$SDRT_CPU_THREADS: the threads each CPU model run takes, for processes that share the cores."""

from __future__ import annotations

import importlib.util

import pytest

from runtime.backends import THREADS_VARIABLE, cpu_threads
from runtime.errors import InvalidRequestError
from tests.conftest import needs_torch


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_value_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv(THREADS_VARIABLE, value)
    with pytest.raises(InvalidRequestError, match=r"^\$SDRT_CPU_THREADS must be a positive number of threads, not "):
        cpu_threads()


@needs_torch
def test_onnxruntime_and_openvino_sessions_take_the_thread_count(tiny_sd1, shared_engines, monkeypatch):
    from export import export_model
    from runtime.backends.onnxruntime import OnnxRuntimeBackend

    artifacts = export_model(tiny_sd1, shared_engines, progress=False)  # the session's export
    monkeypatch.setenv(THREADS_VARIABLE, "3")
    options = OnnxRuntimeBackend(artifacts).session("text_encoder")._session.get_session_options()
    assert options.intra_op_num_threads == 3 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    monkeypatch.delenv(THREADS_VARIABLE)
    assert (
        OnnxRuntimeBackend(artifacts).session("text_encoder")._session.get_session_options().intra_op_num_threads == 0
    )
    if importlib.util.find_spec("openvino") is not None:
        from runtime.backends.openvino import OpenVinoBackend

        monkeypatch.setenv(THREADS_VARIABLE, "1")  # openvino caps the count at the machine's cores
        compiled = OpenVinoBackend(artifacts).session("text_encoder")._request.get_compiled_model()
        assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == 1
