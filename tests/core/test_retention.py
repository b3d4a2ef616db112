"""Retention of jobs, their delivery records and the audit log (real database, real files): what
goes when, and that the append-only ledger and its check are untouched by it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from bot.config import StorageConfig
from bot.core import Core, JobState, ManualClock, Owner
from bot.core.storage import prune_audit, prune_jobs
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
BANNED, FORGIVEN = 303, 404
STORAGE = StorageConfig(image_retention_days=30, job_retention_days=60, audit_retention_days=10)


async def _rows(core: Core, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in await core.db.read(sql, params)]


async def test_old_jobs_lose_their_content_and_deliveries_but_keep_what_the_ledger_needs(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = dataclasses.replace(make_config(tmp_path), storage=STORAGE)
    core = await open_core(config, clock)
    try:
        done = await core.scheduler.submit(ALICE, request("alice's private prompt"))
        assert (await finished(core, done.id)).state is JobState.SUCCEEDED
        await core.jobs.complete_delivery(done.id, "result", {"message_id": 5})
        failed = await core.scheduler.submit(ALICE, request("[raise] a secret fox"))
        assert (await finished(core, failed.id)).state is JobState.FAILED
        await core.jobs.complete_delivery(failed.id, "result", {"message_id": 6})
        clock.advance(days=31)
        recent = await core.scheduler.submit(ALICE, request("a recent one"))
        assert (await finished(core, recent.id)).state is JobState.SUCCEEDED
        await core.jobs.complete_delivery(recent.id, "result", {"message_id": 7})
        ledger = await _rows(core, "SELECT * FROM ledger ORDER BY id")
        columns = "id, user_id, guild_id, kind, state, cost, hold_allowance, hold_granted"
        kept_columns = await _rows(core, f"SELECT {columns} FROM jobs ORDER BY id")
        assert core.retention is not None
        first = await core.retention.prune()
        assert sorted(first.images) == [done.id, failed.id] and first.jobs == ()

        clock.advance(days=30)  # the first two ended 61 days ago, `recent` 30
        second = await core.retention.prune()
        assert sorted(second.jobs) == [done.id, failed.id]
        for job_id in (done.id, failed.id):
            job = await core.jobs.require(job_id)
            assert job.pruned_at == clock()
            assert dict(job.request_data) == {"pruned": True}
            assert job.prompt == "" and job.result is None and job.error is None
            assert await core.jobs.deliveries(job_id) == {}
        raw = await _rows(
            core, "SELECT request, result, error FROM jobs WHERE id IN (?, ?)", done.id, failed.id
        )
        assert "secret" not in json.dumps(raw) and "private" not in json.dumps(raw)
        # Nothing to deliver again, and the recent job keeps everything.
        assert [j.id for j in await core.jobs.undelivered()] == []
        kept = await core.jobs.require(recent.id)
        assert kept.pruned_at is None and kept.prompt == "a recent one" and kept.result
        assert "result" in await core.jobs.deliveries(recent.id)
        # The ledger and what its check reads of each job are as they were.
        assert await _rows(core, "SELECT * FROM ledger ORDER BY id") == ledger
        assert await _rows(core, f"SELECT {columns} FROM jobs ORDER BY id") == kept_columns
        await assert_consistent(core)
        assert (await core.retention.prune()).jobs == ()
    finally:
        await core.close(1.0)


async def test_old_audit_rows_go_except_a_still_banned_members_ban(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = dataclasses.replace(
        make_config(tmp_path), storage=StorageConfig(audit_retention_days=10)
    )
    core = await open_core(config, clock)
    try:
        await core.audit.record("prompt_blocked", "a word", user_id=ALICE.user_id, prompt="x")
        await core.admin.ban(BANNED, actor_id=1, reason="spam")
        await core.admin.ban(FORGIVEN, actor_id=1, reason="a mistake")
        await core.admin.unban(FORGIVEN, actor_id=1)
        clock.advance(days=9)
        await core.audit.record("prompt_blocked", "newer", user_id=ALICE.user_id, prompt="y")
        assert await prune_audit(core.db, clock, 10) == 0

        clock.advance(days=2)  # the first four are 11 days old, the last one 2
        assert await prune_audit(core.db, clock, 10) == 3
        left = [(e.kind, e.user_id, e.reason) for e in await core.admin.audit(20)]
        assert left == [("prompt_blocked", ALICE.user_id, "newer"), ("ban", BANNED, "spam")]
        assert await prune_audit(core.db, clock, 0) == 0  # 0 keeps everything
    finally:
        await core.close(1.0)


async def test_a_job_whose_images_are_still_needed_is_not_erased(
    tmp_path: Path, clock: ManualClock
) -> None:
    """Erasing waits for the images to go, and images wait for the jobs that still use them:
    a job is never erased under a queued or running one."""
    config = dataclasses.replace(
        make_config(tmp_path), storage=StorageConfig(image_retention_days=0)
    )
    core = await open_core(config, clock)
    try:
        job = await core.scheduler.submit(ALICE, request())
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        clock.advance(days=365)
        assert await prune_jobs(core.db, clock, 30) == []  # its images were never pruned
        assert core.retention is not None
        pruned = await core.retention.prune()  # images go at the job's age, then the job
        assert pruned.images == (job.id,) and pruned.jobs == (job.id,)
        await assert_consistent(core)
    finally:
        await core.close(1.0)
