"""The suite runs in parallel the way the README says, and what must stay together does."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from tests.conftest import _starts_ray

REPO = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.findall(r"^    (python3 -m venv .*pytest.*)$", text, re.MULTILINE)
    assert len(found) == 1, found
    return found[0]


def test_ci_runs_exactly_the_readmes_test_command_in_parallel() -> None:
    command = _readme_test_command()
    assert " -n auto" in command
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci[-1] == command


def test_xdist_and_its_lock_are_in_the_dev_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    dev = " ".join(project["project"]["optional-dependencies"]["dev"])
    assert "pytest-xdist" in dev and "filelock" in dev
    assert "--dist=loadgroup" in project["tool"]["pytest"]["ini_options"]["addopts"]


def test_every_test_module_that_starts_a_ray_cluster_is_in_the_ray_group() -> None:
    starts = re.compile(r"Cluster\(|\"ray\", \"start\"|ray\.init\(")
    modules = [p for p in (REPO / "tests").rglob("test_*.py") if starts.search(p.read_text())]
    assert modules, "no Ray tests found: the pattern no longer matches how they start Ray"
    assert [p.name for p in modules if not _starts_ray(p)] == []
