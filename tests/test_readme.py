"""The README's test command is what CI runs."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    command = ci_lines[-1].strip()
    assert "pytest" in command
    assert f"\n{command}\n" in readme
