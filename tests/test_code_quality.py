"""The project's own code stays ruff- and mypy-clean, checked with the configuration in pyproject.toml, and every
setting it reads is documented."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_ruff_lint_and_format_are_clean() -> None:
    lint = _run(str(BIN / "ruff"), "check", ".")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    form = _run(str(BIN / "ruff"), "format", "--check", ".")
    assert form.returncode == 0, form.stdout + form.stderr


@pytest.mark.slow
def test_mypy_is_clean() -> None:
    result = _run(str(BIN / "mypy"), "tutorial", "lessons", "sandbox", "bench", "tests", "conftest.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_setting_is_in_the_readme_and_the_example_environment() -> None:
    read = set()
    for path in (ROOT / "tutorial" / "settings").glob("*.py"):
        read |= set(re.findall(r'env_\w+\("(LAYERCAKE_\w+)"', path.read_text()))
    read -= {"LAYERCAKE_TEST_REDIS_URL"}  # the test run's own, which ./layercake test sets
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `LAYERCAKE_")]
    readme = set(re.findall(r"LAYERCAKE_\w+", "\n".join(rows)))
    example = set(re.findall(r"LAYERCAKE_\w+", (ROOT / ".env.example").read_text()))
    assert read - readme == set(), "settings the README's table does not list"
    assert read - example == set(), "settings .env.example does not list"
