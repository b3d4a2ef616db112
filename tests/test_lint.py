"""The code base stays ruff-clean (lint and format) and type-checks under mypy, with every test
run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _tool(name: str, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    executable = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if executable is None:
        pytest.fail(f"{name} is not installed; it is part of the dev extra")
    return subprocess.run(
        [executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )


def _ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return _tool("ruff", *args)


def test_ruff_lint_is_clean() -> None:
    result = _ruff("check", ".")
    assert result.returncode == 0, result.stdout[-4000:]


def test_ruff_format_is_clean() -> None:
    result = _ruff("format", "--check", ".")
    assert result.returncode == 0, result.stdout[-4000:]


def test_mypy_is_clean_over_bot_and_generation() -> None:
    # Files and settings come from [tool.mypy] in pyproject.toml.
    result = _tool("mypy", timeout_s=600)
    assert result.returncode == 0, result.stdout[-4000:]
