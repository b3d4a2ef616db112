"""How a job ends: one place settles or refunds it, whatever races with what."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bot.core import (
    Core,
    EndingDelayed,
    Finished,
    Job,
    JobEvent,
    JobResult,
    JobState,
    LedgerKind,
    Owner,
    ProcessWorker,
    Started,
    Worker,
    WorkItem,
    WorkOutcome,
)
from bot.core.execute import JobError
from bot.core.lifecycle import Ending
from bot.core.workers import JobTimeout, WorkerCrashed
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request
from tests.core.fakes import FACTORY

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)


async def test_an_undeliverable_result_is_refunded_once_and_not_retried(core: Core) -> None:
    job = await core.scheduler.submit(ALICE, request())
    done = await finished(core, job.id)
    assert done.state is JobState.SUCCEEDED
    assert (await core.credits.balance(ALICE.user_id)).available == 20 - job.cost
    assert [j.id for j in await core.jobs.undelivered()] == [job.id]
    # The front end claimed the delivery, then found it can never post there.
    assert await core.jobs.claim_delivery(job.id)

    refunded = await core.scheduler.refund_undelivered(job.id, "missing Attach Files")
    assert refunded == job.cost
    assert await core.scheduler.refund_undelivered(job.id, "missing Attach Files") == 0

    assert (await core.credits.balance(ALICE.user_id)).available == 20
    kinds = [e.kind for e in await core.credits.ledger(ALICE.user_id)]
    assert kinds[:3] == [LedgerKind.REFUND, LedgerKind.SETTLE, LedgerKind.HOLD]
    assert await core.jobs.undelivered() == []
    result = (await core.jobs.deliveries(job.id))["result"]
    assert result.state == "undelivered" and result.info["reason"] == "missing Attach Files"
    assert (await core.jobs.require(job.id)).state is JobState.SUCCEEDED
    await assert_consistent(core)


async def test_an_undeliverable_failure_is_not_refunded_twice(core: Core) -> None:
    job = await core.scheduler.submit(ALICE, request("[raise] a fox"))
    assert (await finished(core, job.id)).state is JobState.FAILED
    assert await core.scheduler.refund_undelivered(job.id, "missing Send Messages") == 0
    assert (await core.credits.balance(ALICE.user_id)).available == 20
    assert await core.jobs.undelivered() == []
    await assert_consistent(core)


async def test_refund_undelivered_refuses_an_active_or_unknown_job(core: Core) -> None:
    with pytest.raises(LookupError):
        await core.scheduler.refund_undelivered(999, "gone")
    job = await core.scheduler.submit(ALICE, request("[slow] a fox", steps=50))
    with pytest.raises(ValueError, match="job_id"):
        await core.scheduler.refund_undelivered(job.id, "too early")
    await core.scheduler.cancel(job.id)
    await finished(core, job.id)
    await assert_consistent(core)


@pytest.mark.parametrize("worker_count", [1, 2])
async def test_a_job_rerun_after_a_crash_keeps_its_slot_limits_and_cancel(
    tmp_path: Path, worker_count: int
) -> None:
    config = make_config(
        tmp_path, scheduler={"max_queued_per_user": 5, "max_attempts": 2}, step_s=0.02
    )
    workers: list[Worker] = [
        ProcessWorker(config.engine, config.data_dir, FACTORY, name=f"w{i}", startup_timeout_s=60)
        for i in range(worker_count)
    ]
    core = await open_core(config, workers=workers, cancel_grace_s=5.0)
    try:
        attempts: list[int] = []
        rerun = asyncio.Event()

        def on_event(event: JobEvent) -> None:
            if isinstance(event, Started) and event.job_id == crashing.id:
                attempts.append(event.attempt)
                if event.attempt == 2:
                    rerun.set()

        core.scheduler.add_listener(on_event)
        crashing = await core.scheduler.submit(ALICE, request("[crash-once] a fox", steps=150))
        second = await core.scheduler.submit(ALICE, request("a cat"))
        async with asyncio.timeout(60):
            await rerun.wait()
        # Whatever the crashed run leaves behind happens now; give it the chance to go wrong.
        await asyncio.sleep(0.3)
        assert attempts == [1, 2]
        assert core.scheduler.running_count == 1
        assert sum(core.scheduler.busy_counts()) == 1
        # max_running_per_user = 1: the second job waits for the re-run one.
        assert core.scheduler.queue_position(second.id) == 1

        assert await core.scheduler.cancel(crashing.id)
        assert (await finished(core, crashing.id, timeout_s=30)).state is JobState.CANCELLED
        assert (await finished(core, second.id, timeout_s=60)).state is JobState.SUCCEEDED
        assert core.scheduler.busy_counts() == [0] * worker_count
        assert core.scheduler.running_count == 0
        assert (await core.credits.balance(ALICE.user_id)).available == 20 - second.cost
        await assert_consistent(core)
    finally:
        await core.close(2.0)


class HeldCheck:
    """An output check (moderation's place) that waits until the test lets it answer."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, job: Job, outcome: WorkOutcome) -> str | None:
        self.entered.set()
        await self.release.wait()
        return None


async def test_a_cancel_during_the_output_check_refunds_and_stays_cancelled(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    check = HeldCheck()
    core = await open_core(config, output_check=check, cancel_grace_s=0.1)
    try:
        job = await core.scheduler.submit(ALICE, request())
        async with asyncio.timeout(10):
            await check.entered.wait()
        assert await core.scheduler.cancel(job.id)
        # The check never answers: the grace period runs out and the run is aborted.
        done = await finished(core, job.id, timeout_s=5)
        assert done.state is JobState.CANCELLED
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(core)
    finally:
        await core.close(0.5)
    assert await _state_of(config.database_path, job.id) == "cancelled"

    started: list[int] = []
    reopened = await open_core(config)
    reopened.scheduler.add_listener(
        lambda e: started.append(e.job_id) if isinstance(e, Started) else None
    )
    try:
        await asyncio.sleep(0.3)
        assert started == []
        assert (await reopened.jobs.require(job.id)).state is JobState.CANCELLED
        assert (await reopened.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(reopened)
    finally:
        await reopened.close(0.5)


async def test_a_cancel_answered_after_the_output_check_still_cancels(tmp_path: Path) -> None:
    check = HeldCheck()
    core = await open_core(make_config(tmp_path), output_check=check, cancel_grace_s=30.0)
    try:
        job = await core.scheduler.submit(ALICE, request())
        async with asyncio.timeout(10):
            await check.entered.wait()
        assert await core.scheduler.cancel(job.id)
        check.release.set()
        assert (await finished(core, job.id, timeout_s=5)).state is JobState.CANCELLED
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_a_drain_during_the_output_check_hands_the_job_back(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    check = HeldCheck()
    core = await open_core(config, output_check=check)
    job = await core.scheduler.submit(ALICE, request())
    async with asyncio.timeout(10):
        await check.entered.wait()
    await core.close(drain_timeout_s=0.1)
    # Back in the queue without losing an attempt, its credits still held, not left running.
    assert await _state_of(config.database_path, job.id) == "queued"
    reopened = await open_core(config)
    try:
        done = await finished(reopened, job.id)
        assert done.state is JobState.SUCCEEDED and done.attempts == 1
        await assert_consistent(reopened)
    finally:
        await reopened.close(0.5)


async def _state_of(database: Path, job_id: int) -> str:
    def read() -> str:
        conn = sqlite3.connect(database)
        try:
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        finally:
            conn.close()
        return str(row[0])

    return await asyncio.to_thread(read)


class GatedWorker:
    """A worker at the edge whose run ends when, and how, the test says; it gets ready when
    `ready` is set (at once unless told otherwise). `runs` counts the runs it was given."""

    name = "gated"
    capacity = 1

    def __init__(self, ready: bool = True) -> None:
        self.running = asyncio.Event()
        self.end: asyncio.Future[WorkOutcome] | None = None
        self.ready = asyncio.Event()
        if ready:
            self.ready.set()
        self.runs: list[WorkItem] = []

    async def start(self) -> None:
        await self.ready.wait()

    async def run(self, item: WorkItem, on_progress: object, timeout_s: float) -> WorkOutcome:
        self.runs.append(item)
        self.end = asyncio.get_running_loop().create_future()
        self.running.set()
        return await self.end

    async def next_run(self, count: int) -> None:
        """Until the worker has been given `count` runs."""
        async with asyncio.timeout(5):
            while True:
                if len(self.runs) >= count:
                    return
                await asyncio.sleep(0.01)

    async def cancel(self, job_id: int) -> None:
        pass  # the engine has not reached its next step yet: the test ends the run

    async def close(self) -> None:
        pass


OUTCOME = WorkOutcome(
    image_paths=("images/1/0.png",), grid_path=None, seeds=(1,), clip_scores=(1.0,)
)
OUTCOME_RESULT = JobResult(
    image_paths=OUTCOME.image_paths, grid_path=None, seeds=(1,), clip_scores=(1.0,)
)
ENDINGS: dict[str, Callable[[asyncio.Future[WorkOutcome]], None]] = {
    "completion": lambda end: end.set_result(OUTCOME),
    "timeout": lambda end: end.set_exception(JobTimeout(300)),
    "crash": lambda end: end.set_exception(WorkerCrashed("the worker process died")),
    "engine error": lambda end: end.set_exception(JobError("the generator failed")),
}


@pytest.mark.parametrize("cancel_first", [True, False], ids=["cancel-first", "end-first"])
@pytest.mark.parametrize("ending", sorted(ENDINGS))
async def test_cancel_racing_a_run_ending_cancels_once(
    tmp_path: Path, ending: str, cancel_first: bool
) -> None:
    worker = GatedWorker()
    core = await open_core(make_config(tmp_path), workers=[worker])
    try:
        job = await core.scheduler.submit(ALICE, request())
        async with asyncio.timeout(5):
            await worker.running.wait()
        assert worker.end is not None
        if cancel_first:
            accepted = await core.scheduler.cancel(job.id, actor_id=7)
            ENDINGS[ending](worker.end)
        else:
            ENDINGS[ending](worker.end)
            accepted = await core.scheduler.cancel(job.id, actor_id=7)
        assert accepted
        done = await finished(core, job.id, timeout_s=5)
        # A cancel the scheduler accepted ends the job cancelled and refunded, exactly once,
        # whatever the run did meanwhile; a crashed run is not re-queued behind it.
        assert done.state is JobState.CANCELLED and done.attempts == 1
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        assert core.scheduler.queued_count == core.scheduler.running_count == 0
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_a_cancel_after_the_end_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    worker = GatedWorker()
    core = await open_core(make_config(tmp_path), workers=[worker])
    try:
        job = await core.scheduler.submit(ALICE, request())
        async with asyncio.timeout(5):
            await worker.running.wait()
        assert worker.end is not None
        worker.end.set_result(OUTCOME)
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        assert not await core.scheduler.cancel(job.id)
        assert (await core.credits.balance(ALICE.user_id)).available == 20 - job.cost
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_an_ending_that_lost_its_race_changes_nothing(tmp_path: Path) -> None:
    """What the guarded finishing update is for: a cancel of a queued job that the dispatcher
    started meanwhile, and a late ending of a job that already ended."""
    worker = GatedWorker()
    core = await open_core(make_config(tmp_path), workers=[worker])
    lifecycle = core.scheduler._lifecycle
    try:
        job = await core.scheduler.submit(ALICE, request())
        async with asyncio.timeout(5):
            await worker.running.wait()
        assert worker.end is not None
        lost = await lifecycle.finish(
            job.id, JobState.CANCELLED, error="cancelled", from_state=JobState.QUEUED
        )
        assert lost is None
        assert (await core.jobs.require(job.id)).state is JobState.RUNNING
        worker.end.set_result(OUTCOME)
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        late = await lifecycle.finish(job.id, JobState.FAILED, error="timed out")
        assert late is None
        assert (await core.jobs.require(job.id)).state is JobState.SUCCEEDED
        assert (await core.credits.balance(ALICE.user_id)).available == 20 - job.cost
        await assert_consistent(core)
    finally:
        await core.close(0.5)


@contextlib.asynccontextmanager
async def database_held(core: Core) -> AsyncIterator[None]:
    """Another write in flight: every transaction of the core waits until the block ends."""
    entered, release = asyncio.Event(), asyncio.Event()

    async def hold(_txn: object) -> None:
        entered.set()
        await release.wait()

    holder = asyncio.create_task(core.db.transaction(hold))
    await entered.wait()
    try:
        yield
    finally:
        release.set()
        await holder


async def loop_turns(count: int = 50) -> None:
    """Let the event loop go round `count` times: far more than a coroutine that waits for no
    I/O needs to reach its next wait (here: the database lock)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def run_sql(database: Path, statement: str) -> None:
    """A statement through a second connection, as an operator (or the disk) would."""

    def run() -> None:
        conn = sqlite3.connect(database)
        try:
            conn.execute(statement)
            conn.commit()
        finally:
            conn.close()

    await asyncio.to_thread(run)


# Writing a success fails the way a full disk does; everything else still works.
DISK_FULL_ON_SUCCESS = (
    "CREATE TRIGGER disk_full BEFORE UPDATE OF state ON jobs WHEN NEW.state = 'succeeded' "
    "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
)


async def _until_delayed(core: Core, job_id: int) -> None:
    async with asyncio.timeout(20):
        async with core.scheduler.subscribe(job_id) as events:
            async for event in events:
                if isinstance(event, EndingDelayed):
                    return
                assert not isinstance(event, Finished), event


async def test_an_end_that_cannot_be_written_is_retried_until_it_is(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    core = await open_core(config, end_retry_s=0.2)
    try:
        await run_sql(config.database_path, DISK_FULL_ON_SUCCESS)
        job = await core.scheduler.submit(ALICE, request())
        # The run is over but its end can't be written: the owner is told, and the job keeps
        # its record, its slot and its held credits instead of being stranded.
        await _until_delayed(core, job.id)
        assert await _state_of(config.database_path, job.id) == "running"
        assert core.scheduler.running_count == 1 and core.scheduler.busy_counts() == [1]
        assert (await core.credits.balance(ALICE.user_id)).available == 20 - job.cost

        await run_sql(config.database_path, "DROP TRIGGER disk_full")
        done = await finished(core, job.id)
        assert done.state is JobState.SUCCEEDED and done.attempts == 1
        kinds = [e.kind for e in await core.credits.ledger(ALICE.user_id)]
        assert kinds.count(LedgerKind.HOLD) == 1 and kinds.count(LedgerKind.SETTLE) == 1
        assert LedgerKind.REFUND not in kinds
        assert (await core.credits.balance(ALICE.user_id)).available == 20 - job.cost
        assert core.scheduler.running_count == 0 and core.scheduler.busy_counts() == [0]
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_a_cancel_while_the_end_cannot_be_written_is_kept(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    core = await open_core(config, end_retry_s=0.2)
    try:
        await run_sql(config.database_path, DISK_FULL_ON_SUCCESS)
        job = await core.scheduler.submit(ALICE, request())
        await _until_delayed(core, job.id)
        assert await core.scheduler.cancel(job.id, actor_id=ALICE.user_id)
        done = await finished(core, job.id)
        assert done.state is JobState.CANCELLED and done.attempts == 1
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        assert core.scheduler.running_count == 0 and core.scheduler.busy_counts() == [0]
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_an_end_still_unwritten_at_shutdown_is_recovered_at_the_next_start(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    core = await open_core(config, end_retry_s=0.2)
    try:
        await run_sql(config.database_path, DISK_FULL_ON_SUCCESS)
        job = await core.scheduler.submit(ALICE, request())
        await _until_delayed(core, job.id)
    finally:
        # Shutdown is not held up by it: one last try, then the job is left running on disk.
        await core.close(0.5)
    assert await _state_of(config.database_path, job.id) == "running"
    await run_sql(config.database_path, "DROP TRIGGER disk_full")
    reopened = await open_core(config)
    try:
        done = await finished(reopened, job.id)
        assert done.state is JobState.SUCCEEDED and done.attempts == 2
        assert (await reopened.credits.balance(ALICE.user_id)).available == 20 - job.cost
        await assert_consistent(reopened)
    finally:
        await reopened.close(0.5)


@pytest.mark.parametrize("ending", ["completion", "crash"])
async def test_a_cancel_acknowledged_before_the_end_is_written_wins(
    tmp_path: Path, ending: str
) -> None:
    worker = GatedWorker()
    core = await open_core(make_config(tmp_path), workers=[worker])
    try:
        job = await core.scheduler.submit(ALICE, request())
        await worker.next_run(1)
        assert worker.end is not None
        # The engine has not reached its next step: the cancel is acknowledged (and written)
        # while the run goes on.
        assert await core.scheduler.cancel(job.id, actor_id=7)
        async with database_held(core):
            # Then the run ends (a crash would re-queue the job, a completion settle it), and
            # that end waits for the database.
            ENDINGS[ending](worker.end)
            await loop_turns()
        done = await finished(core, job.id)
        assert done.state is JobState.CANCELLED and done.attempts == 1
        await loop_turns()
        assert len(worker.runs) == 1  # not run again
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        assert core.scheduler.queued_count == core.scheduler.running_count == 0
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_a_cancel_acknowledged_during_the_shutdown_drain_wins(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    worker = GatedWorker()
    # The engine never reaches its next step: only the drain's end stops the run.
    core = await open_core(config, workers=[worker], cancel_grace_s=30.0)
    closing: asyncio.Task[None] | None = None
    try:
        job = await core.scheduler.submit(ALICE, request())
        await worker.next_run(1)
        closing = asyncio.create_task(core.close(drain_timeout_s=2.0))
        await loop_turns()
        assert not closing.done()
        assert await core.scheduler.cancel(job.id, actor_id=ALICE.user_id)
    finally:
        await (closing or core.close(0.5))
    # Not handed back to the queue for the next start: cancelled and refunded now.
    assert await _state_of(config.database_path, job.id) == "cancelled"
    started: list[int] = []
    reopened = await open_core(config)
    reopened.scheduler.add_listener(
        lambda e: started.append(e.job_id) if isinstance(e, Started) else None
    )
    try:
        await asyncio.sleep(0.3)
        assert started == []
        assert (await reopened.jobs.require(job.id)).state is JobState.CANCELLED
        assert (await reopened.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(reopened)
    finally:
        await reopened.close(0.5)


@pytest.mark.parametrize("ending", ["completion", "crash"])
async def test_a_cancel_while_the_end_is_being_written_gets_a_true_answer(
    tmp_path: Path, ending: str
) -> None:
    worker = GatedWorker()
    core = await open_core(make_config(tmp_path), workers=[worker])
    try:
        job = await core.scheduler.submit(ALICE, request())
        await worker.next_run(1)
        record = core.scheduler._state.running.get(job.id)
        assert record is not None and worker.end is not None
        ENDINGS[ending](worker.end)
        async with asyncio.timeout(5):
            while True:
                if record.writing_end is not None:
                    break
                await asyncio.sleep(0)
        # The end's transaction is open: the answer must be what actually happens.
        async with asyncio.timeout(5):
            accepted = await core.scheduler.cancel(job.id, actor_id=7)
        done = await finished(core, job.id)
        if ending == "completion":
            assert not accepted and done.state is JobState.SUCCEEDED
            assert (await core.credits.balance(ALICE.user_id)).available == 20 - job.cost
        else:
            # Back in the queue first, then cancelled there; never run again.
            assert accepted and done.state is JobState.CANCELLED
            assert len(worker.runs) == 1
            assert (await core.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_a_job_cancelled_while_the_dispatcher_picks_it_never_starts(tmp_path: Path) -> None:
    """What `mark_running`'s `state = 'queued'` guard is for: the cancel is written first, and
    the start that was already on its way must find the job no longer queued."""
    worker = GatedWorker(ready=False)
    core = await open_core(make_config(tmp_path), workers=[worker])
    try:
        job = await core.scheduler.submit(ALICE, request())
        async with database_held(core):
            cancelling = asyncio.create_task(core.scheduler.cancel(job.id, actor_id=7))
            await loop_turns()  # the cancel waits for the database first
            worker.ready.set()
            await loop_turns()  # then the dispatcher, which picked the job meanwhile
            assert core.scheduler.running_count == 1
        assert await cancelling
        done = await finished(core, job.id)
        assert done.state is JobState.CANCELLED
        # Read after the start's own write: the job was not marked running after all.
        assert (await core.jobs.require(job.id)).state is JobState.CANCELLED
        assert done.attempts == 0
        await loop_turns()
        assert worker.runs == []
        assert core.scheduler.running_count == 0 and core.scheduler.busy_counts() == [0]
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_a_late_end_of_an_earlier_run_changes_nothing(tmp_path: Path) -> None:
    """The ends of a run are tied to its attempt: once the job was re-queued and started
    again, an end of the earlier run (here delivered late on purpose) neither settles nor
    re-queues the running one."""
    worker = GatedWorker()
    core = await open_core(make_config(tmp_path), workers=[worker])
    lifecycle = core.scheduler._lifecycle
    try:
        job = await core.scheduler.submit(ALICE, request())
        await worker.next_run(1)
        first = core.scheduler._state.running.get(job.id)
        assert first is not None and worker.end is not None
        worker.end.set_exception(WorkerCrashed("the worker process died"))
        await worker.next_run(2)
        assert (await core.jobs.require(job.id)).attempts == 2
        await lifecycle.end(first, Ending(JobState.SUCCEEDED, result=OUTCOME_RESULT))
        await lifecycle.end(first, Ending(None))
        again = await core.jobs.require(job.id)
        assert again.state is JobState.RUNNING and again.attempts == 2
        assert core.scheduler.queued_count == 0 and core.scheduler.running_count == 1
        assert (await core.credits.balance(ALICE.user_id)).available == 20 - job.cost

        assert worker.end is not None
        worker.end.set_result(OUTCOME)
        done = await finished(core, job.id)
        assert done.state is JobState.SUCCEEDED and done.attempts == 2
        kinds = [e.kind for e in await core.credits.ledger(ALICE.user_id)]
        assert kinds.count(LedgerKind.SETTLE) == 1 and LedgerKind.REFUND not in kinds
        await assert_consistent(core)
    finally:
        await core.close(0.5)
