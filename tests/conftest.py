"""Suite-wide settings for running the tests in parallel (pytest-xdist, `--dist loadgroup`).

- The tiny models are built once per run into one folder all workers share (`tiny_models`).
- Each worker gets its share of the cores for torch, so two workers on two cores don't each run
  two threads and trade the CPU back and forth.
- Tests that use a module-scoped fixture (a loaded engine, a started cluster) stay on one worker
  with the rest of their module, so the fixture is built once, not once per worker.
- The tests that start a Ray cluster (modules named test_ray_*, or using private_ray_temp) run one
  after another on one worker: two clusters at once on a small machine starve each other's
  heartbeats. A test of such a module that starts none (marked `starts_no_ray_cluster`: say, one
  whose cluster address never answers) runs anywhere, instead of making the group longer.
- `-n auto` starts a worker per core and one more: the Ray group's tests mostly wait (for `ray
  start`, a head to come back, an actor to be replaced), and on a worker of its own that wait
  does not keep a core from the tests that compute.
- The lint tests (ruff, and mypy: a minute or two on a fresh clone, before its cache exists) are
  one group too: xdist hands out the larger groups first, so they start at once instead of
  ending the run.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
from filelock import FileLock

RAY_GROUP = "ray-cluster"
LINT_GROUP = "lint"
NO_CLUSTER = "starts_no_ray_cluster"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{NO_CLUSTER}: in a module of Ray tests, a test that starts no Ray cluster (it need not "
        "wait for the others' clusters)",
    )
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        torch.set_num_threads(threads)
        # The processes the tests start (workers, `python -m bot`, scripts) too: each would
        # otherwise run torch on every core, spinning on cores the other test workers use.
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    # pytest-xdist's own variable still decides when it is set.
    wanted = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if wanted:
        return int(wanted)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) + 1


@functools.cache
def _starts_ray(path: Path) -> bool:
    # Every test that starts a Ray cluster keeps what it writes in a private temp folder.
    return path.name.startswith("test_ray_") or "private_ray_temp" in path.read_text("utf-8")


def _group(item: pytest.Item) -> str | None:
    if _starts_ray(item.path) and item.get_closest_marker(NO_CLUSTER) is None:
        return RAY_GROUP
    if item.path.name == "test_lint.py":
        return LINT_GROUP
    fixture_info = getattr(item, "_fixtureinfo", None)
    if fixture_info is None:
        return None
    for definitions in fixture_info.name2fixturedefs.values():
        if any(d.scope in ("module", "package", "class") for d in definitions):
            return item.nodeid.split("::")[0]
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Before xdist's own hook, which turns the marks into the groups it schedules by.
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            group = _group(item)
            if group is not None:
                item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD and CLIP models, built once for the whole run in its temp folder: under xdist
    the first worker builds them and the others wait on the lock, then find them there. Each
    model sits in a folder named after it with its build version (generation.tiny), so other
    tiny models built into the same folder later never clash with these."""
    from generation.tiny import ensure_tiny_clip, ensure_tiny_sd

    run = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run = run.parent  # each worker's temp folder sits in the run's
    folder = run / "tiny-models"
    with FileLock(str(run / "tiny-models.lock")):
        ensure_tiny_sd(folder)
        ensure_tiny_clip(folder)
    return folder
