"""An acknowledged cancel is written to the job's row before the member is told, so it outlives
the process: a crash or a full disk before the run's end is written never makes the job run
again, and it ends cancelled and refunded at the next start."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from pathlib import Path

import pytest

from bot.core import Core, JobState, LedgerKind, Owner, Started
from bot.core.models import CancelNotSaved
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request
from tests.core.test_lifecycle import (
    ENDINGS,
    GatedWorker,
    _state_of,
    _until_delayed,
    database_held,
    loop_turns,
    run_sql,
)

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
REPO = Path(__file__).resolve().parents[2]

# Every write that moves a running job fails, the way a full disk makes it fail.
DISK_FULL_WHILE_RUNNING = (
    "CREATE TRIGGER disk_full BEFORE UPDATE OF state ON jobs WHEN OLD.state = 'running' "
    "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
)
# Writing anything about a job fails, cancels included.
DISK_FULL_ON_ANY_JOB_WRITE = (
    "CREATE TRIGGER disk_full BEFORE UPDATE ON jobs "
    "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
)


async def _after_restart_stays_cancelled(root: Path, job_id: int, cost: int) -> None:
    """The next start: the job ends cancelled and refunded exactly, and never runs again."""
    started: list[int] = []
    worker = GatedWorker()
    reopened = await open_core(make_config(root), workers=[worker])
    reopened.scheduler.add_listener(
        lambda e: started.append(e.job_id) if isinstance(e, Started) else None
    )
    try:
        await asyncio.sleep(0.3)
        assert started == [] and worker.runs == []
        job = await reopened.jobs.require(job_id)
        assert job.state is JobState.CANCELLED, job
        assert reopened.scheduler.queued_count == reopened.scheduler.running_count == 0
        ledger = [e for e in await reopened.credits.ledger(ALICE.user_id) if e.job_id == job_id]
        kinds = sorted(e.kind for e in ledger)
        assert kinds == sorted([LedgerKind.HOLD, LedgerKind.REFUND])
        assert sum(e.amount for e in ledger) == 0
        refund = next(e for e in ledger if e.kind is LedgerKind.REFUND)
        assert refund.amount == cost and refund.actor_id == ALICE.user_id
        assert (await reopened.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(reopened)
    finally:
        await reopened.close(0.5)


async def test_a_cancel_acknowledged_before_a_crash_holds_after_the_restart(
    tmp_path: Path,
) -> None:
    driver = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.core.cancel_crash_driver",
        str(tmp_path),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert driver.stdout is not None
        async with asyncio.timeout(60):
            line = await driver.stdout.readline()
        answer = json.loads(line)
        assert answer["accepted"] is True
    finally:
        # Killed while the engine has not reached its next step: nothing ends the run.
        driver.kill()
        await driver.wait()
    database = make_config(tmp_path).database_path
    assert await _state_of(database, answer["job"]) == "running"

    conn = sqlite3.connect(database)
    try:
        (cost,) = conn.execute("SELECT cost FROM jobs WHERE id = ?", (answer["job"],)).fetchone()
    finally:
        conn.close()
    await _after_restart_stays_cancelled(tmp_path, answer["job"], int(cost))


async def test_a_cancel_acknowledged_while_the_disk_is_full_holds_after_the_restart(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    worker = GatedWorker()
    core = await open_core(config, workers=[worker], end_retry_s=0.2)
    try:
        job = await core.scheduler.submit(ALICE, request())
        await worker.next_run(1)
        assert worker.end is not None
        await run_sql(config.database_path, DISK_FULL_WHILE_RUNNING)
        # The run succeeds but its end cannot be written; the member cancels meanwhile.
        ENDINGS["completion"](worker.end)
        await _until_delayed(core, job.id)
        assert await core.scheduler.cancel(job.id, actor_id=ALICE.user_id)
    finally:
        # Shutdown's last try fails too: the row stays running on disk.
        await core.close(0.5)
    assert await _state_of(config.database_path, job.id) == "running"
    await run_sql(config.database_path, "DROP TRIGGER disk_full")
    await _after_restart_stays_cancelled(tmp_path, job.id, job.cost)


@pytest.mark.parametrize("queued", [False, True], ids=["running", "queued"])
async def test_a_cancel_that_cannot_be_written_is_not_acknowledged(
    tmp_path: Path, queued: bool
) -> None:
    config = make_config(tmp_path)
    worker = GatedWorker()
    core = await open_core(config, workers=[worker])
    try:
        first = await core.scheduler.submit(ALICE, request())
        await worker.next_run(1)
        target = await core.scheduler.submit(ALICE, request()) if queued else first
        await run_sql(config.database_path, DISK_FULL_ON_ANY_JOB_WRITE)
        with pytest.raises(CancelNotSaved) as refused:
            await core.scheduler.cancel(target.id, actor_id=ALICE.user_id)
        assert f"job {target.id}" in refused.value.reason.lower()
        assert "try again" in refused.value.reason
        await run_sql(config.database_path, "DROP TRIGGER disk_full")
        # Not cancelled behind the member's back: the job goes on.
        assert (await core.jobs.require(target.id)).state is (
            JobState.QUEUED if queued else JobState.RUNNING
        )
        if queued:
            # Asked again once the disk has room: acknowledged and kept.
            assert await core.scheduler.cancel(target.id, actor_id=ALICE.user_id)
            assert (await finished(core, target.id)).state is JobState.CANCELLED
        assert worker.end is not None
        ENDINGS["completion"](worker.end)
        done = await finished(core, first.id)
        assert done.state is JobState.SUCCEEDED
        assert (await core.credits.balance(ALICE.user_id)).available == 20 - first.cost
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_a_stored_cancel_wins_over_the_end_even_unseen_in_memory(tmp_path: Path) -> None:
    """The row's flag alone decides: a run whose end is written after the cancel was stored
    ends cancelled, even before the in-memory record hears of it."""
    config = make_config(tmp_path)
    worker = GatedWorker()
    core: Core = await open_core(config, workers=[worker])
    try:
        job = await core.scheduler.submit(ALICE, request())
        await worker.next_run(1)
        assert worker.end is not None
        await run_sql(
            config.database_path,
            f"UPDATE jobs SET cancel_requested_at = '2025-01-01T00:00:00+00:00', "
            f"cancel_requested_by = {ALICE.user_id} WHERE id = {job.id}",
        )
        ENDINGS["completion"](worker.end)
        done = await finished(core, job.id)
        assert done.state is JobState.CANCELLED
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(core)
    finally:
        await core.close(0.5)


@pytest.mark.parametrize("ending", ["completion", "crash"])
async def test_a_cancel_is_answered_only_once_written_and_the_answer_holds(
    tmp_path: Path, ending: str
) -> None:
    """A cancel that comes while the run's end waits for the database waits behind it: the
    answer is given once the cancel is written, or once it is known that it came too late."""
    worker = GatedWorker()
    core = await open_core(make_config(tmp_path), workers=[worker])
    try:
        job = await core.scheduler.submit(ALICE, request())
        await worker.next_run(1)
        assert worker.end is not None
        async with database_held(core):
            ENDINGS[ending](worker.end)
            await loop_turns()
            cancelling = asyncio.create_task(core.scheduler.cancel(job.id, actor_id=7))
            await loop_turns()
            assert not cancelling.done()  # not acknowledged before it is written
        accepted = await cancelling
        done = await finished(core, job.id)
        if ending == "completion":
            assert not accepted and done.state is JobState.SUCCEEDED
            assert (await core.credits.balance(ALICE.user_id)).available == 20 - job.cost
        else:
            # Back in the queue first, then cancelled there; never run again.
            assert accepted and done.state is JobState.CANCELLED
            await loop_turns()
            assert len(worker.runs) == 1
            assert (await core.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(core)
    finally:
        await core.close(0.5)
