from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bot.config import Config, CreditsConfig, SchedulerConfig
from bot.core import Core, Finished, InProcessWorker, Job, ManualClock, Worker
from generation.contract import GenerationRequest, JobKind
from generation.settings import EngineSettings
from tests.core.fakes import create_fake_engine


def make_config(
    tmp_path: Path,
    *,
    scheduler: dict[str, Any] | None = None,
    credits: dict[str, Any] | None = None,
    step_s: float = 0.002,
) -> Config:
    engine = EngineSettings(
        cache_dir=tmp_path / "models",
        extra={"fake_step_s": str(step_s), "fake_marker_dir": str(tmp_path / "markers")},
    )
    return Config(
        data_dir=tmp_path / "data",
        engine=engine,
        scheduler=SchedulerConfig(**(scheduler or {})),
        credits=CreditsConfig(**(credits or {})),
    )


def request(prompt: str = "a red fox", **changes: Any) -> GenerationRequest:
    values: dict[str, Any] = dict(
        kind=JobKind.IMAGINE,
        prompt=prompt,
        width=64,
        height=64,
        steps=4,
        num_candidates=4,
        num_kept=4,
        seed=1,
    )
    values.update(changes)
    return GenerationRequest(**values)


async def open_core(
    config: Config,
    clock: ManualClock | None = None,
    workers: list[Worker] | None = None,
    **options: Any,
) -> Core:
    if workers is None:
        workers = [InProcessWorker(config.engine, config.data_dir, create_fake_engine)]
    kwargs: dict[str, Any] = {"workers": workers, **options}
    if clock is not None:
        kwargs["clock"] = clock
    return await Core.open(config, **kwargs)


async def finished(core: Core, job_id: int, timeout_s: float = 20.0) -> Job:
    async with asyncio.timeout(timeout_s):
        async with core.scheduler.subscribe(job_id) as events:
            async for event in events:
                if isinstance(event, Finished):
                    return event.job
    raise AssertionError(f"job {job_id}: events ended without Finished")


async def ready_workers(core: Core, count: int, timeout_s: float = 60.0) -> None:
    """Until exactly `count` workers exist and all are ready (a Ray pool changes them as it
    watches its cluster, with no event to wait on)."""
    async with asyncio.timeout(timeout_s):
        while True:
            states = core.scheduler.worker_states()
            if len(states) == count and all(s.ready for s in states):
                return
            await asyncio.sleep(0.05)


async def queue_behind_its_back(config: Config, user_id: int, count: int) -> None:
    """Insert queued job rows with a second connection, as another process would: the core's
    in-memory state does not see them, only a check inside a transaction does."""

    def insert() -> None:
        conn = sqlite3.connect(config.database_path)
        try:
            for _ in range(count):
                conn.execute(
                    "INSERT INTO jobs (user_id, kind, request, state, cost, hold_allowance, "
                    "hold_granted, hold_day, created_at) VALUES (?, 'imagine', '{}', "
                    "'queued', 0, 0, 0, '2025-03-01', '2025-03-01T12:00:00+00:00')",
                    (user_id,),
                )
            conn.commit()
        finally:
            conn.close()

    await asyncio.to_thread(insert)


async def assert_consistent(core: Core) -> None:
    report = await core.credits.check_consistency()
    assert report.ok, str(report)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2025, 3, 1, 12, 0, tzinfo=UTC))


@pytest.fixture
async def core(tmp_path: Path, clock: ManualClock) -> AsyncIterator[Core]:
    opened = await open_core(make_config(tmp_path), clock)
    yield opened
    await opened.close(drain_timeout_s=2.0)
