"""The suite runs in parallel the way the README says, and what must stay together does."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import (
    NO_CLUSTER,
    RAY_GROUP,
    _group,
    _starts_ray,
    pytest_xdist_auto_num_workers,
)

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


def _item(path: Path, *marks: str) -> Any:
    # What _group reads of a collected test: its file, its marks, and no module-scoped fixture.
    return SimpleNamespace(
        path=path,
        nodeid=f"{path.relative_to(REPO)}::test_x",
        get_closest_marker=lambda name: pytest.mark.skip if name in marks else None,
        _fixtureinfo=SimpleNamespace(name2fixturedefs={}),
    )


def test_a_test_of_a_ray_module_that_starts_no_cluster_runs_outside_the_ray_group() -> None:
    outage = REPO / "tests" / "core" / "test_ray_outage.py"
    assert _group(_item(outage)) == RAY_GROUP
    assert _group(_item(outage, NO_CLUSTER)) is None
    marked = re.findall(rf"@pytest\.mark\.{NO_CLUSTER}\n(?:async )?def (\w+)", outage.read_text())
    assert marked == [
        "test_an_address_where_nothing_listens_is_reported_unreachable_at_once",
        "test_connecting_again_backs_off_while_the_cluster_does_not_answer",
    ]


def test_auto_starts_a_worker_per_core_and_one_for_the_ray_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    config: Any = None
    assert pytest_xdist_auto_num_workers(config) == 3
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "2")
    assert pytest_xdist_auto_num_workers(config) == 2
