"""How a job's row and its credits move: queued → running → settled or refunded, or back to
the queue. The only code that settles or refunds a job.

Every state change is a guarded UPDATE (`WHERE state = <expected>`, and for a run's end also
`AND attempts = <that run's attempt>`) in the same transaction as its ledger row, so a job is
settled or refunded exactly once whatever races between cancel, timeout, crash and shutdown; the
in-memory queue state follows in the after-commit callbacks.

A run's ending that cannot be written (the disk is full, the database is locked) keeps its
record, and with it its slot, and is tried again with a growing pause until it is written: the
guards make a retry safe. A cancel the scheduler acknowledged before the ending was written wins
over whatever the run did: it is in the job's row before it is acknowledged, so it also wins
over a crash and over an ending never written before shutdown (the next start honours it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime

from bot.config import SchedulerConfig
from bot.core.clock import Clock, from_db, to_db
from bot.core.credits import CreditsService
from bot.core.db import Database, Transaction
from bot.core.events import EventHub
from bot.core.fairness import QueueEntry
from bot.core.jobs import row_to_job
from bot.core.models import (
    CancelNotSaved,
    EndingDelayed,
    Finished,
    Job,
    JobResult,
    JobState,
    Mode,
)
from bot.core.state import QueueState, RunningJob
from bot.core.taste import store_embeddings

log = logging.getLogger(__name__)

# The first pause before writing a run's ending again; it doubles up to `end_retry_s`.
FIRST_END_RETRY_S = 0.5
# After this many failed writes the member is told that the job's end is delayed.
TELL_AFTER_FAILURES = 3


@dataclass(frozen=True)
class Ending:
    """How one run of a job ended. `state=None` puts the job back in the queue; `hand_back`
    (shutdown) does so without counting the attempt, which was not the job's fault."""

    state: JobState | None
    error: str | None = None
    result: JobResult | None = None
    actor_id: int | None = None
    hand_back: bool = False


class Lifecycle:
    def __init__(
        self,
        db: Database,
        credits: CreditsService,
        state: QueueState,
        events: EventHub,
        config: SchedulerConfig,
        clock: Clock,
        end_retry_s: float = 30.0,
    ) -> None:
        self._db = db
        self._credits = credits
        self._state = state
        self._events = events
        self._config = config
        self._clock = clock
        self._end_retry_s = end_retry_s
        # Endings still being written, and the signal (at shutdown) to stop retrying them.
        self._endings: set[asyncio.Task[object]] = set()
        self._stop_retrying = asyncio.Event()

    def after_crash(self, job: Job) -> Ending:
        if job.attempts <= self._config.max_attempts:
            return Ending(None)
        return Ending(JobState.FAILED, error=f"the generator crashed {job.attempts} times")

    async def mark_running(self, job_id: int) -> Job | None:
        """queued → running; None when the job is no longer queued (cancelled meanwhile)."""
        now = to_db(self._clock())

        async def work(txn: Transaction) -> Job | None:
            row = await txn.fetchone(
                "UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1 "
                "WHERE id = ? AND state = 'queued' RETURNING *",
                (now, job_id),
            )
            return row_to_job(row) if row else None

        return await self._db.transaction(work)

    async def end(self, record: RunningJob, ending: Ending) -> None:
        """The one way a run ends: settle, refund or re-queue its job, and give back its slot
        in step with the commit. Safe against a job that already ended another way.

        A failed write is tried again (after 0.5 s, doubling up to `end_retry_s`) until it is
        written: until then the job keeps its running record, so it can still be cancelled and
        is never lost between the table and the queue, and its owner is told after a few
        failures. At shutdown each ending gets one last try; one that still fails stays
        `running` in the database, and the next start re-queues it."""
        task = asyncio.current_task()
        if task is not None:
            self._endings.add(task)
        try:
            await self._end_with_retries(record, ending)
        finally:
            self._state.release(record)
            if task is not None:
                self._endings.discard(task)

    async def _end_with_retries(self, record: RunningJob, ending: Ending) -> None:
        delay_s = min(FIRST_END_RETRY_S, self._end_retry_s)
        failures = 0
        while True:
            last_try = self._stop_retrying.is_set()
            try:
                await self._db.transaction(lambda txn: self._end_in(txn, record, ending))
                return
            except Exception as exc:
                failures += 1
                if last_try:
                    log.error(
                        "job %d: how its run ended could not be written (%s); it stays running "
                        "in the database and the next start re-queues it",
                        record.job_id,
                        exc,
                    )
                    return
                log.error(
                    "job %d: how its run ended could not be written (%s, %d times); "
                    "trying again in %g s",
                    record.job_id,
                    exc,
                    failures,
                    delay_s,
                )
                if failures == TELL_AFTER_FAILURES:
                    self._events.emit(EndingDelayed(record.job_id, failures))
            finally:
                written, record.writing_end = record.writing_end, None
                if written is not None and not written.done():
                    written.set_result(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_retrying.wait(), delay_s)
            delay_s = min(delay_s * 2, self._end_retry_s)

    async def _end_in(self, txn: Transaction, record: RunningJob, ending: Ending) -> None:
        # From here until this transaction is over, a cancel waits for its outcome instead of
        # being acknowledged and then overridden by it; a cancel acknowledged before wins.
        record.writing_end = asyncio.get_running_loop().create_future()
        # The row's flag counts too: it is written before the cancel is acknowledged, and the
        # record may not have heard of it yet.
        stored = await txn.fetchone(
            "SELECT cancel_requested_by FROM jobs WHERE id = ? AND cancel_requested_at IS NOT NULL",
            (record.job_id,),
        )
        cancelled_by = record.cancel_actor if record.cancel_requested else None
        if stored is not None and not record.cancel_requested:
            cancelled_by = stored["cancel_requested_by"]
        if (
            record.cancel_requested or stored is not None
        ) and ending.state is not JobState.CANCELLED:
            log.info("job %d: cancelled before its end was written", record.job_id)
            ending = Ending(JobState.CANCELLED, error="cancelled", actor_id=cancelled_by)
        attempt = record.job.attempts if record.job is not None else None
        if ending.state is None:
            await self._requeue_in(txn, record, ending.hand_back, attempt)
        else:
            await self.finish_in(
                txn,
                record.job_id,
                JobState.RUNNING,
                ending.state,
                self._clock(),
                error=ending.error,
                result=ending.result,
                actor_id=ending.actor_id,
                record=record,
                attempt=attempt,
            )

    async def write_cancel(self, job_id: int, actor_id: int | None) -> RunningJob | bool:
        """Write a cancel in one transaction, so that it outlives the process: a queued job is
        cancelled and refunded at once (True); a running one (or one the dispatcher picked)
        gets the cancel in its row, honoured by its run's end and by the next start, and its
        record comes back for the caller to stop the run. False when the job is not active.
        Raises `CancelNotSaved` when the write fails; the cancel must then not be
        acknowledged."""
        now = self._clock()

        async def work(txn: Transaction) -> RunningJob | bool:
            # Under the database lock the queue state matches the rows: every change to it
            # happens as a transaction commits. So a job handed back to the queue meanwhile is
            # cancelled there, before the dispatcher can start it again.
            record = self._state.running.get(job_id)
            if record is None and job_id not in self._state.fair:
                return False
            if record is None or record.job is None:
                # Queued, or picked but not marked running yet: cancelled where it stands
                # (a start on its way then finds it no longer queued).
                job = await self.finish_in(
                    txn,
                    job_id,
                    JobState.QUEUED,
                    JobState.CANCELLED,
                    now,
                    error="cancelled",
                    actor_id=actor_id,
                )
                if job is not None or record is None:
                    return job is not None
            # The first cancel's time and actor are kept.
            changed = await txn.execute(
                "UPDATE jobs SET cancel_requested_by = CASE WHEN cancel_requested_at IS NULL "
                "THEN ? ELSE cancel_requested_by END, "
                "cancel_requested_at = coalesce(cancel_requested_at, ?) "
                "WHERE id = ? AND state IN ('queued', 'running')",
                (actor_id, to_db(now), job_id),
            )
            return record if changed == 1 else False

        try:
            return await self._db.transaction(work)
        except Exception as exc:
            log.error("job %d: its cancel could not be written (%s)", job_id, exc)
            raise CancelNotSaved(job_id) from exc

    def stop_retrying(self) -> None:
        """At shutdown: every ending still being retried, or starting from now on, gets one
        last try (nothing may hold up the shutdown)."""
        self._stop_retrying.set()

    async def wait_endings(self) -> None:
        """Until every ending being written is over."""
        if self._endings:
            await asyncio.gather(*self._endings, return_exceptions=True)

    async def _requeue_in(
        self, txn: Transaction, record: RunningJob, hand_back: bool, attempt: int | None
    ) -> None:
        """Put an interrupted running job back at the head of its owner's queue."""
        job_id = record.job_id
        row = await txn.fetchone(
            "UPDATE jobs SET state = 'queued', started_at = NULL, "
            "attempts = attempts - ? WHERE id = ? AND state = 'running' "
            "AND (? IS NULL OR attempts = ?) RETURNING user_id, tier, created_at, mode",
            (1 if hand_back else 0, job_id, attempt, attempt),
        )
        if row is None:
            return
        entry = QueueEntry(
            job_id=job_id,
            user_id=int(row["user_id"]),
            enqueued_at=from_db(row["created_at"]).timestamp(),  # type: ignore[union-attr]
            tier=int(row["tier"]),
            # Back in its own mode's queue: a relax job handed back stays behind fast ones.
            mode=Mode(row["mode"]),
        )

        def requeued() -> None:
            self._state.release(record)
            self._state.enqueue(entry, front=True)

        txn.after_commit(requeued)

    async def finish(
        self,
        job_id: int,
        state: JobState,
        *,
        error: str | None = None,
        result: JobResult | None = None,
        actor_id: int | None = None,
        from_state: JobState = JobState.RUNNING,
        record: RunningJob | None = None,
    ) -> Job | None:
        """Move a job from `from_state` to a final state, settling or refunding it; None when
        it was not in `from_state` (it ended some other way first)."""
        now = self._clock()
        return await self._db.transaction(
            lambda txn: self.finish_in(
                txn,
                job_id,
                from_state,
                state,
                now,
                error=error,
                result=result,
                actor_id=actor_id,
                record=record,
            )
        )

    async def finish_in(
        self,
        txn: Transaction,
        job_id: int,
        from_state: JobState,
        state: JobState,
        now: datetime,
        *,
        error: str | None = None,
        result: JobResult | None = None,
        actor_id: int | None = None,
        record: RunningJob | None = None,
        attempt: int | None = None,
    ) -> Job | None:
        """`attempt`, for the end of a run: only that run's attempt may end the job, never an
        earlier run's late ending after the job was re-queued and started again."""
        row = await txn.fetchone(
            "UPDATE jobs SET state = ?, error = ?, finished_at = ?, result = ? "
            "WHERE id = ? AND state = ? AND (? IS NULL OR attempts = ?) RETURNING *",
            (
                state.value,
                error,
                to_db(now),
                json.dumps(result.to_json()) if result else None,
                job_id,
                from_state.value,
                attempt,
                attempt,
            ),
        )
        if row is None:
            return None
        if state is JobState.SUCCEEDED:
            await self._credits.settle(txn, int(row["user_id"]), job_id, int(row["cost"]))
            if result is not None and result.embeddings is not None:
                await store_embeddings(txn, job_id, result.embeddings)
        else:
            await self._credits.refund(
                txn, dict(row), f"job {job_id} {state.value}: {error}", actor_id
            )
        job = row_to_job(row)

        def done() -> None:
            # In step with the commit, so nobody can see the job finished in the database
            # but still running (or queued) here.
            self._state.dequeue(job_id)
            if record is not None:
                self._state.release(record)
            elif from_state is JobState.QUEUED:
                # Picked by the dispatcher but not yet started: that claim ends with the job.
                picked = self._state.running.get(job_id)
                if picked is not None and picked.job is None:
                    self._state.release(picked)
            self._events.emit(Finished(job))

        txn.after_commit(done)
        return job

    async def recover(self) -> None:
        """Running jobs of a previous process were interrupted: re-queue them (at most
        `max_attempts` times) or fail and refund them. Queued jobs keep their order. A queued
        or running job whose cancel was acknowledged ends cancelled and refunded."""
        max_attempts = self._config.max_attempts
        now = self._clock()

        async def work(txn: Transaction) -> list[Job]:
            failed = []
            # An acknowledged cancel wins: a job whose cancel was written ends cancelled and
            # refunded, never re-queued.
            for row in await txn.fetchall(
                "SELECT id, state, cancel_requested_by FROM jobs WHERE state IN "
                "('queued', 'running') AND cancel_requested_at IS NOT NULL ORDER BY id"
            ):
                log.info("job %d was cancelled before the restart; refunded", row["id"])
                await self.finish_in(
                    txn,
                    int(row["id"]),
                    JobState(row["state"]),
                    JobState.CANCELLED,
                    now,
                    error="cancelled",
                    actor_id=row["cancel_requested_by"],
                )
            for row in await txn.fetchall("SELECT * FROM jobs WHERE state = 'running' ORDER BY id"):
                if row["attempts"] <= max_attempts:
                    log.info(
                        "job %d was interrupted; re-queued (attempt %d)", row["id"], row["attempts"]
                    )
                    await txn.execute(
                        "UPDATE jobs SET state = 'queued', started_at = NULL WHERE id = ?",
                        (row["id"],),
                    )
                else:
                    error = f"interrupted {row['attempts']} times; your credits were refunded"
                    job = await self.finish_in(
                        txn, int(row["id"]), JobState.RUNNING, JobState.FAILED, now, error=error
                    )
                    if job is not None:
                        failed.append(job)
            rows = await txn.fetchall(
                "SELECT id, user_id, tier, created_at, mode FROM jobs WHERE state = 'queued' "
                "ORDER BY id"
            )

            def load() -> None:
                for r in rows:
                    self._state.fair.push(
                        QueueEntry(
                            job_id=int(r["id"]),
                            user_id=int(r["user_id"]),
                            enqueued_at=from_db(r["created_at"]).timestamp(),  # type: ignore
                            tier=int(r["tier"]),
                            mode=Mode(r["mode"]),
                        )
                    )
                self._state.queue_changed()

            txn.after_commit(load)
            return failed

        failed = await self._db.transaction(work)
        queued = len(self._state.fair)
        if failed or queued:
            log.info(
                "recovered %d queued jobs; %d failed after too many attempts", queued, len(failed)
            )

    async def refund_undelivered(self, job_id: int, reason: str) -> int:
        """Give back what a succeeded job was charged when its result can never be delivered
        (the bot may not post where it was asked), and record its 'result' delivery as
        'undelivered' so it is not retried at every start. Returns the credits given back; 0
        when there is nothing (left) to refund, so calling it twice refunds once."""
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise ValueError(f"job_id: must be an integer, got {job_id!r}")
        now = to_db(self._clock())

        async def work(txn: Transaction) -> int:
            row = await txn.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))
            if row is None:
                raise LookupError(f"job {job_id} does not exist")
            if not JobState(row["state"]).terminal:
                raise ValueError(f"job_id: job {job_id} is still {row['state']}")
            await txn.execute(
                "INSERT INTO deliveries (job_id, key, state, info, updated_at) "
                "VALUES (?, 'result', 'undelivered', json_object('reason', ?), ?) "
                "ON CONFLICT(job_id, key) DO UPDATE SET state = 'undelivered', "
                "info = json_patch(deliveries.info, excluded.info), "
                "updated_at = excluded.updated_at",
                (job_id, reason, now),
            )
            if row["state"] != JobState.SUCCEEDED.value:
                return 0  # failed, cancelled and refused jobs were refunded when they ended
            refunded = await txn.fetchone(
                "SELECT 1 FROM ledger WHERE job_id = ? AND kind = 'refund'", (job_id,)
            )
            if refunded is not None:
                return 0
            return await self._credits.refund(txn, dict(row), f"job {job_id} undelivered: {reason}")

        return await self._db.transaction(work)
