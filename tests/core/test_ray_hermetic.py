"""The Ray tests pass on a new machine: one of them runs again in a process whose temp folder is
private and empty, as on a machine where no earlier Ray run left `/tmp/ray` (Ray records a
cluster's address under its default temp folder whatever `temp_dir` its nodes are given), and
leaves nothing behind there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
# Starts and stops the module's cluster, connects a bridge process to it and runs a job in an
# actor there.
ONE_RAY_TEST = (
    "tests/core/test_ray_workers.py::test_a_job_is_one_streaming_call_with_its_steps_as_items"
)


def test_a_ray_test_passes_with_an_empty_private_temp_folder_and_leaves_it_empty() -> None:
    # Short, not tmp_path: Ray's unix sockets live under it and their paths are limited.
    private = Path(tempfile.mkdtemp(prefix="rt-"))
    try:
        environment = {**os.environ, "TMPDIR": str(private)}
        environment.pop("RAY_TMPDIR", None)
        # The outer run's options (a --randomly-seed, say) are not this run's: it names its own.
        environment.pop("PYTEST_ADDOPTS", None)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:randomly",
                "-p",
                "no:cacheprovider",
                "--basetemp",
                str(private / "pytest"),
                ONE_RAY_TEST,
            ],
            cwd=REPO,
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
        assert "1 passed" in result.stdout
        left = sorted(p.name for p in private.iterdir() if p.name != "pytest")
        # Torch's compile cache may settle there too; Ray's folders must not.
        assert not [name for name in left if name.startswith("ray")], left
    finally:
        shutil.rmtree(private, ignore_errors=True)
