"""The README's commands and examples run as written: CI runs its test command, and its Python blocks run on the
model its first command builds."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import cli
from tests.conftest import needs_torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    command = ci_lines[-1].strip()
    assert "pytest" in command
    assert f"\n{command}\n" in README


def first_command() -> list[str]:
    """The README's first shell command, split at `&&`."""
    block = re.search(r"```sh\n(.*?)\n```", README, re.S).group(1)
    return [part.strip() for part in block.split("&&")]


@needs_torch
def test_readme_python_examples_run_as_written(tiny_sd1, tmp_path, monkeypatch):
    """In a fresh folder after the README's first command (its `tiny-model models/tiny` is the session's tiny_sd1:
    the same variant and seed), that command's txt2img and then every ```python block run unchanged."""
    from PIL import Image

    steps = first_command()
    assert steps[0].startswith("python -m venv .venv") and "python cli.py tiny-model models/tiny" in steps
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_sd1)
    (generate,) = [step for step in steps if step.startswith("python cli.py txt2img")]
    assert cli.main(shlex.split(generate)[2:]) == 0
    assert Image.open("astronaut.png").size == (64, 64)  # the tiny model's native size

    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2  # the Python API and serving examples
    for index, block in enumerate(blocks):
        namespace: dict = {}
        exec(compile(block, f"README.md python block {index + 1}", "exec"), namespace)
        if index == 0:  # what the example's comments say
            result = namespace["result"]
            assert result.images.shape == (2, 64, 64, 3) and result.seeds == [42, 43]
            assert result.request.width == 64 and "Sampler: DPM++ 2M, Schedule type: Karras" in result.infotexts[0]
