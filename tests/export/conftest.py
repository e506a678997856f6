"""Exports of the tiny checkpoints, built once per session and shared by the export tests (read them only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import HAS_TORCH, single_torch_thread


@dataclass
class ExportCase:
    variant: str
    source: Path  # the tiny diffusers checkpoint
    artifact: Path  # what export_model returned for it


one_torch_thread = pytest.fixture(scope="session", autouse=True)(single_torch_thread)


@pytest.fixture(scope="session")
def engines_dir(shared_engines: Path) -> Path:
    return shared_engines  # the session's exports (tests/conftest.py): each tiny checkpoint is exported once


def _export(source: Path, engines_dir: Path, variant: str) -> ExportCase:
    if not HAS_TORCH:
        pytest.skip("exporting needs torch and diffusers (export extras)")
    from export import export_model

    return ExportCase(variant, source, export_model(source, engines_dir, progress=False))


@pytest.fixture(scope="session")
def sd1_export(tiny_sd1: Path, engines_dir: Path) -> ExportCase:
    return _export(tiny_sd1, engines_dir, "sd1")


@pytest.fixture(scope="session")
def sd2v_export(tiny_sd2v: Path, engines_dir: Path) -> ExportCase:
    return _export(tiny_sd2v, engines_dir, "sd2-v")


@pytest.fixture(scope="session", params=["sd1", "sd2-v"])
def export_case(request: pytest.FixtureRequest) -> ExportCase:
    """Each tiny variant's export in turn."""
    return request.getfixturevalue("sd1_export" if request.param == "sd1" else "sd2v_export")
