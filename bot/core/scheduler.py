"""The job scheduler: submit (hold credits, queue), fair dispatch to workers, settle or refund.

Truth lives in SQLite; the in-memory fair queue and running table are a cache of the `queued`
and `running` rows, changed only by after-commit callbacks of the transactions that change those
rows, so the two never disagree while the process lives, and the cache is rebuilt from the
database on start (restart recovery).

Every state change of a job is a guarded UPDATE (`WHERE state = <expected>`) in the same
transaction as its ledger row, so a job is settled or refunded exactly once whatever races
between cancel, timeout, crash and shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import SchedulerConfig
from bot.core.clock import Clock, from_db, to_db
from bot.core.credits import CreditsService, check_user_id
from bot.core.db import Database, Transaction
from bot.core.execute import JobError, WorkItem, WorkOutcome
from bot.core.fairness import FairQueue, QueueEntry
from bot.core.jobs import JobStore, output_dir_for, row_to_job, save_input_image
from bot.core.models import (
    ActiveJob,
    Finished,
    Job,
    JobEvent,
    JobKind,
    JobResult,
    JobState,
    Owner,
    ProgressUpdate,
    Queued,
    QueueSnapshot,
    RefusalCode,
    Refused,
    Started,
)
from bot.core.workers import JobTimeout, Worker, WorkerCrashed
from generation.contract import GenerationCancelled, GenerationRequest
from generation.contract import JobKind as GenerationKind

log = logging.getLogger(__name__)

# Called with a finished job's outcome before it is settled; returns None to accept it or a
# reason to refuse it (the job becomes `refused` and is refunded). Moderation plugs in here.
OutputCheck = Callable[[Job, WorkOutcome], Awaitable[str | None]]
Listener = Callable[[JobEvent], None]

_PAUSED_KEY = "scheduler.paused"
POSITION_PUBLISH_DELAY_S = 0.2

_KIND_FOR = {
    JobKind.IMAGINE: GenerationKind.IMAGINE,
    JobKind.VARIATION: GenerationKind.VARIATION,
    JobKind.UPSCALE: GenerationKind.UPSCALE,
}


@dataclass
class _Running:
    job_id: int
    user_id: int
    worker: Worker
    job: Job | None = None
    task: asyncio.Task[None] | None = None
    cancel_actor: int | None = None
    cancel_requested: bool = False
    hand_back: bool = False
    progress: ProgressUpdate | None = None


class Subscription:
    """Events for one job, starting with its current state; ends after `Finished`.

    Use as `async with scheduler.subscribe(job_id) as events: async for event in events: ...`.
    Consecutive progress (and queue position) updates are coalesced, so a slow consumer only
    ever sees the latest one.
    """

    def __init__(self, scheduler: Scheduler, job_id: int, first: JobEvent | None) -> None:
        self.job_id = job_id
        self._scheduler = scheduler
        self._pending: collections.deque[JobEvent] = collections.deque()
        self._wake = asyncio.Event()
        self._needs_lookup = first is None
        self._done = False
        if first is not None:
            self._pending.append(first)

    def _push(self, event: JobEvent) -> None:
        if (
            self._pending
            and type(self._pending[-1]) is type(event)
            and isinstance(event, ProgressUpdate | Queued)
        ):
            self._pending[-1] = event
        else:
            self._pending.append(event)
        self._wake.set()

    def _end(self) -> None:
        self._done = True
        self._wake.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> JobEvent:
        if self._needs_lookup:
            self._needs_lookup = False
            job = await self._scheduler.jobs.get(self.job_id)
            if job is None:
                self.close()
                raise LookupError(f"job {self.job_id} does not exist")
            if job.state.terminal:
                self._pending.appendleft(Finished(job))
        while not self._pending:
            if self._done:
                self.close()
                raise StopAsyncIteration
            self._wake.clear()
            await self._wake.wait()
        event = self._pending.popleft()
        if isinstance(event, Finished):
            self._pending.clear()
            self._done = True
            self.close()
        return event

    def close(self) -> None:
        self._scheduler._unsubscribe(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Scheduler:
    def __init__(
        self,
        db: Database,
        credits: CreditsService,
        jobs: JobStore,
        config: SchedulerConfig,
        workers: Sequence[Worker],
        clock: Clock,
        data_dir: Path,
        output_check: OutputCheck | None = None,
        cancel_grace_s: float = 15.0,
        worker_retry_s: float = 30.0,
    ) -> None:
        if not workers:
            raise ValueError("workers: the scheduler needs at least one worker")
        self._db = db
        self.credits = credits
        self.jobs = jobs
        self.config = config
        self._workers = list(workers)
        self._clock = clock
        self._data_dir = data_dir
        self._output_check = output_check
        self._cancel_grace_s = cancel_grace_s
        self._worker_retry_s = worker_retry_s
        self._fair = FairQueue(config.aging_s)
        self._running: dict[int, _Running] = {}
        self._running_per_user: collections.Counter[int] = collections.Counter()
        # Submits between the in-memory limit check and their transaction's commit.
        self._in_flight: collections.Counter[int] = collections.Counter()
        self._busy: dict[int, int] = {id(w): 0 for w in self._workers}
        self._ready: set[int] = set()
        self._subscriptions: dict[int, set[Subscription]] = collections.defaultdict(set)
        self._listeners: list[Listener] = []
        self._positions: dict[int, int] = {}
        self._positions_dirty = True
        self._positions_scheduled = False
        self._published: dict[int, int] = {}
        self._wake = asyncio.Event()
        self._paused = False
        self._closing = False
        self._started = False
        self._dispatcher: asyncio.Task[None] | None = None
        self._worker_starters: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dispatch_count = 0

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._paused = (await self._db.get_setting(_PAUSED_KEY)) == "1"
        await self._recover()
        for worker in self._workers:
            self._worker_starters.append(
                asyncio.create_task(self._start_worker(worker), name=f"start-{worker.name}")
            )
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="dispatcher")

    async def _start_worker(self, worker: Worker) -> None:
        # Jobs wait in the queue while a worker loads its models (which may take minutes);
        # a worker that cannot start is retried, with the error in the log for the admin.
        while not self._closing:
            try:
                await worker.start()
            except Exception as exc:
                log.error(
                    "worker %s failed to start (%s); retrying in %g s",
                    worker.name,
                    exc,
                    self._worker_retry_s,
                )
                await asyncio.sleep(self._worker_retry_s)
                continue
            self._ready.add(id(worker))
            self._wake.set()
            return

    async def _recover(self) -> None:
        """Running jobs of a previous process were interrupted: re-queue them (at most
        `max_attempts` times) or fail and refund them. Queued jobs keep their order."""
        max_attempts = self.config.max_attempts
        now = self._clock()

        async def work(txn: Transaction) -> list[Job]:
            failed = []
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
                    job = await self._finish_in(
                        txn, int(row["id"]), JobState.RUNNING, JobState.FAILED, now, error=error
                    )
                    if job is not None:
                        failed.append(job)
            rows = await txn.fetchall(
                "SELECT id, user_id, tier, created_at FROM jobs WHERE state = 'queued' ORDER BY id"
            )

            def load() -> None:
                for r in rows:
                    self._fair.push(
                        QueueEntry(
                            job_id=int(r["id"]),
                            user_id=int(r["user_id"]),
                            enqueued_at=from_db(r["created_at"]).timestamp(),  # type: ignore
                            tier=int(r["tier"]),
                        )
                    )
                self._positions_dirty = True

            txn.after_commit(load)
            return failed

        failed = await self._db.transaction(work)
        if failed or len(self._fair):
            log.info(
                "recovered %d queued jobs; %d failed after too many attempts",
                len(self._fair),
                len(failed),
            )

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop dispatching, let running jobs finish for up to `drain_timeout_s`, hand the rest
        back to the queue (they run again after the restart), then stop the workers."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        for starter in self._worker_starters:
            starter.cancel()
        if self._dispatcher is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            log.info("draining %d running jobs (up to %g s)", len(tasks), drain_timeout_s)
            _done, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
            for record in list(self._running.values()):
                if record.task in pending:
                    record.hand_back = True
                    record.task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._worker_starters, return_exceptions=True)
        for worker in self._workers:
            try:
                await worker.close()
            except Exception:
                log.exception("worker %s did not close cleanly", worker.name)
        for subscriptions in list(self._subscriptions.values()):
            for subscription in list(subscriptions):
                subscription._end()

    # ----- submit ----------------------------------------------------------------------------

    def tier_for(self, owner: Owner) -> int:
        tiers = [self.config.user_tiers.get(owner.user_id, 0)]
        tiers += [self.config.role_tiers.get(r, 0) for r in owner.role_ids]
        return max(tiers)

    async def submit(
        self,
        owner: Owner,
        request: GenerationRequest,
        kind: JobKind = JobKind.IMAGINE,
        parent: tuple[int, int | None] | None = None,
    ) -> Job:
        """Hold the cost and queue the job, or raise `Refused` having charged nothing.

        `parent` is (job id, image index) for U/V buttons and (job id, None) for a reroll.
        """
        check_user_id(owner.user_id, "owner.user_id")
        kind = JobKind(kind)
        if kind is JobKind.REROLL:
            if parent is None:
                raise ValueError("parent: a reroll needs the job it rerolls")
        elif request.kind is not _KIND_FOR[kind]:
            raise ValueError(f"kind: a {kind.value} job needs a {_KIND_FOR[kind].value} request")
        if self._closing:
            raise Refused("The bot is restarting — try again in a minute.", RefusalCode.CLOSING)
        if self._paused:
            raise Refused("The queue is paused by an admin.", RefusalCode.PAUSED)
        # The same limits are checked again inside the transaction, which is authoritative; this
        # in-memory look first (counting submits still waiting for the database as queued)
        # makes a refusal under load immediate instead of waiting behind everyone else's work.
        user = owner.user_id
        self._refuse_if_full(
            user,
            user_queued=self._fair.count(user) + self._in_flight[user],
            total_queued=len(self._fair) + self._in_flight.total(),
        )
        self._in_flight[user] += 1
        cost = self.credits.cost(request)
        tier = self.tier_for(owner)
        init_path = None
        try:
            if request.init_image is not None:
                init_path = await asyncio.to_thread(
                    save_input_image, request.init_image, self._data_dir
                )
            return await self._db.transaction(
                lambda txn: self._submit_in(
                    txn, owner, request, kind, parent, cost, tier, init_path
                )
            )
        except BaseException:
            if init_path is not None:
                (self._data_dir / init_path).unlink(missing_ok=True)
            raise
        finally:
            self._in_flight[user] -= 1
            if not self._in_flight[user]:
                del self._in_flight[user]

    def _refuse_if_full(self, user_id: int, user_queued: int, total_queued: int) -> None:
        limit = self.config.max_queued_per_user
        if user_queued >= limit:
            jobs = "job" if limit == 1 else "jobs"
            raise Refused(
                f"You already have {limit} {jobs} queued — wait for one to finish.",
                RefusalCode.USER_QUEUE_FULL,
            )
        if total_queued >= self.config.max_queue:
            raise Refused(
                f"The queue is full ({self.config.max_queue} jobs) — try again in a minute.",
                RefusalCode.QUEUE_FULL,
            )

    async def _submit_in(
        self,
        txn: Transaction,
        owner: Owner,
        request: GenerationRequest,
        kind: JobKind,
        parent: tuple[int, int | None] | None,
        cost: int,
        tier: int,
        init_path: str | None,
    ) -> Job:
        user = owner.user_id
        state = await self.credits.touch(txn, user, owner.role_ids)
        if state["banned"]:
            raise Refused("You are banned from using this bot.", RefusalCode.BANNED)
        if parent is not None:
            await self._check_parent(txn, parent)
        counts = await txn.fetchone(
            "SELECT COUNT(*), COALESCE(SUM(user_id = ?), 0) FROM jobs WHERE state = 'queued'",
            (user,),
        )
        assert counts is not None
        self._refuse_if_full(user, user_queued=int(counts[1]), total_queued=int(counts[0]))
        split = await self.credits.hold(txn, user, cost)
        if split is None:
            raise self.credits.insufficient(cost, state)
        now = self._clock()
        job_id = await txn.insert(
            "INSERT INTO jobs (user_id, guild_id, channel_id, kind, parent_job_id, parent_index, "
            "request, init_image_path, state, attempts, cost, hold_allowance, hold_granted, "
            "hold_day, tier, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?)",
            (
                user,
                owner.guild_id,
                owner.channel_id,
                kind.value,
                parent[0] if parent else None,
                parent[1] if parent else None,
                json.dumps(request.to_json()),
                init_path,
                cost,
                split[0],
                split[1],
                state["allowance_day"],
                tier,
                to_db(now),
            ),
        )
        await self.credits.record_hold(txn, user, job_id, split, f"{kind.value} job {job_id}")
        entry = QueueEntry(job_id=job_id, user_id=user, enqueued_at=now.timestamp(), tier=tier)
        txn.after_commit(lambda: self._enqueue(entry))
        return Job(
            id=job_id,
            owner=Owner(owner.user_id, owner.guild_id, owner.channel_id),
            kind=kind,
            request_data=request.to_json(),
            state=JobState.QUEUED,
            cost=cost,
            attempts=0,
            created_at=now,
            parent_job_id=parent[0] if parent else None,
            parent_index=parent[1] if parent else None,
            init_image_path=init_path,
            tier=tier,
        )

    async def _check_parent(self, txn: Transaction, parent: tuple[int, int | None]) -> None:
        job_id, index = parent
        row = await txn.fetchone("SELECT state, result FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise Refused(f"Job {job_id} does not exist.", RefusalCode.INVALID)
        if index is not None:
            if row["state"] != JobState.SUCCEEDED.value or not row["result"]:
                raise Refused(f"Job {job_id} has no images to use.", RefusalCode.INVALID)
            count = len(json.loads(row["result"])["image_paths"])
            if not 0 <= index < count:
                raise Refused(
                    f"Job {job_id} has {count} images; there is no image {index + 1}.",
                    RefusalCode.INVALID,
                )

    def _enqueue(self, entry: QueueEntry, front: bool = False) -> None:
        self._fair.push(entry, front=front)
        self._queue_changed()
        self._wake.set()

    # ----- dispatch --------------------------------------------------------------------------

    def _free_worker(self) -> Worker | None:
        for worker in self._workers:
            if id(worker) in self._ready and self._busy[id(worker)] < worker.capacity:
                return worker
        return None

    def _eligible(self, user_id: int) -> bool:
        return self._running_per_user[user_id] < self.config.max_running_per_user

    async def _dispatch_loop(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._dispatch_ready()
            except Exception:
                # A dead dispatcher would silently stall every queue; log and keep going.
                log.exception("dispatch failed; retrying")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def _dispatch_ready(self) -> None:
        """Start queued jobs while a worker slot is free and someone is eligible."""
        while not (self._paused or self._closing):
            worker = self._free_worker()
            if worker is None:
                break
            entry = self._fair.pop(self._clock().timestamp(), self._eligible)
            if entry is None:
                break
            self._queue_changed()
            record = _Running(entry.job_id, entry.user_id, worker)
            self._claim(record)
            try:
                job = await self._mark_running(entry.job_id)
            except Exception:
                log.exception("job %d: could not be started; leaving it queued", entry.job_id)
                self._release(record)
                self._fair.push(entry, front=True)
                await asyncio.sleep(1.0)
                continue
            if job is None:  # cancelled while we were picking it
                self._release(record)
                continue
            record.job = job
            self.dispatch_count += 1
            record.task = asyncio.create_task(self._run(record), name=f"job-{job.id}")

    def _claim(self, record: _Running) -> None:
        self._running[record.job_id] = record
        self._running_per_user[record.user_id] += 1
        self._busy[id(record.worker)] += 1

    def _release(self, record: _Running) -> None:
        if self._running.pop(record.job_id, None) is not None:
            self._running_per_user[record.user_id] -= 1
            if self._running_per_user[record.user_id] <= 0:
                del self._running_per_user[record.user_id]
            self._busy[id(record.worker)] -= 1
        self._wake.set()

    async def _mark_running(self, job_id: int) -> Job | None:
        now = to_db(self._clock())

        async def work(txn: Transaction) -> Job | None:
            row = await txn.fetchone(
                "UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1 "
                "WHERE id = ? AND state = 'queued' RETURNING *",
                (now, job_id),
            )
            return row_to_job(row) if row else None

        return await self._db.transaction(work)

    async def _run(self, record: _Running) -> None:
        job = record.job
        assert job is not None
        self._emit(Started(job.id, job.attempts))
        try:
            if record.cancel_requested:
                raise GenerationCancelled()
            item = WorkItem(
                job_id=job.id,
                attempt=job.attempts,
                request_data=dict(job.request_data),
                init_image_path=job.init_image_path,
                output_dir=output_dir_for(job.id),
            )
            outcome = await record.worker.run(
                item,
                lambda step, total: self._progress(record, step, total),
                self.config.job_timeout_s,
            )
            if record.cancel_requested:
                raise GenerationCancelled()
        except GenerationCancelled:
            await self._finish(
                job.id, JobState.CANCELLED, error="cancelled", actor_id=record.cancel_actor
            )
        except JobTimeout as exc:
            await self._finish(job.id, JobState.FAILED, error=str(exc))
        except JobError as exc:
            await self._finish(job.id, JobState.FAILED, error=exc.message)
        except WorkerCrashed as exc:
            log.warning("job %d: %s", job.id, exc)
            await self._requeue_or_fail(job, str(exc))
        except asyncio.CancelledError:
            if record.hand_back:
                await self._requeue(job.id, hand_back=True)
            elif record.cancel_requested:
                await self._finish(
                    job.id, JobState.CANCELLED, error="cancelled", actor_id=record.cancel_actor
                )
            else:
                raise
        except Exception:
            log.exception("job %d: unexpected failure", job.id)
            await self._finish(job.id, JobState.FAILED, error="something went wrong")
        else:
            await self._succeed(job, outcome)
        finally:
            self._release(record)

    def _progress(self, record: _Running, step: int, total: int) -> None:
        record.progress = ProgressUpdate(record.job_id, step, total)
        self._emit(record.progress)

    async def _succeed(self, job: Job, outcome: WorkOutcome) -> None:
        result = JobResult(
            image_paths=outcome.image_paths,
            grid_path=outcome.grid_path,
            seeds=outcome.seeds,
            clip_scores=outcome.clip_scores,
            timings_s=outcome.timings_s,
            candidate_indices=outcome.candidate_indices,
            width=outcome.width,
            height=outcome.height,
        )
        verdict = None
        if self._output_check is not None:
            try:
                verdict = await self._output_check(job, outcome)
            except Exception:
                log.exception("job %d: output check failed; refusing the result", job.id)
                verdict = "the result could not be checked"
        if verdict:
            await self._finish(job.id, JobState.REFUSED, error=verdict, result=result)
        else:
            await self._finish(job.id, JobState.SUCCEEDED, result=result)

    async def _requeue_or_fail(self, job: Job, error: str) -> None:
        if job.attempts <= self.config.max_attempts:
            await self._requeue(job.id)
        else:
            await self._finish(
                job.id, JobState.FAILED, error=f"the generator crashed {job.attempts} times"
            )

    async def _requeue(self, job_id: int, hand_back: bool = False) -> None:
        """Put an interrupted running job back at the head of its owner's queue; a job handed
        back at shutdown does not lose an attempt, it was not its fault."""

        async def work(txn: Transaction) -> None:
            row = await txn.fetchone(
                "UPDATE jobs SET state = 'queued', started_at = NULL, "
                "attempts = attempts - ? WHERE id = ? AND state = 'running' "
                "RETURNING user_id, tier, created_at",
                (1 if hand_back else 0, job_id),
            )
            if row is None:
                return
            entry = QueueEntry(
                job_id=job_id,
                user_id=int(row["user_id"]),
                enqueued_at=from_db(row["created_at"]).timestamp(),  # type: ignore[union-attr]
                tier=int(row["tier"]),
            )

            def requeued() -> None:
                if (record := self._running.get(job_id)) is not None:
                    self._release(record)
                self._enqueue(entry, front=True)

            txn.after_commit(requeued)

        await self._db.transaction(work)

    async def _finish(
        self,
        job_id: int,
        state: JobState,
        *,
        error: str | None = None,
        result: JobResult | None = None,
        actor_id: int | None = None,
        from_state: JobState = JobState.RUNNING,
    ) -> Job | None:
        now = self._clock()
        return await self._db.transaction(
            lambda txn: self._finish_in(
                txn,
                job_id,
                from_state,
                state,
                now,
                error=error,
                result=result,
                actor_id=actor_id,
            )
        )

    async def _finish_in(
        self,
        txn: Transaction,
        job_id: int,
        from_state: JobState,
        state: JobState,
        now: Any,
        *,
        error: str | None = None,
        result: JobResult | None = None,
        actor_id: int | None = None,
    ) -> Job | None:
        row = await txn.fetchone(
            "UPDATE jobs SET state = ?, error = ?, finished_at = ?, result = ? "
            "WHERE id = ? AND state = ? RETURNING *",
            (
                state.value,
                error,
                to_db(now),
                json.dumps(result.to_json()) if result else None,
                job_id,
                from_state.value,
            ),
        )
        if row is None:
            return None
        if state is JobState.SUCCEEDED:
            await self.credits.settle(txn, int(row["user_id"]), job_id, int(row["cost"]))
        else:
            await self.credits.refund(
                txn, dict(row), f"job {job_id} {state.value}: {error}", actor_id
            )
        job = row_to_job(row)

        def done() -> None:
            # In step with the commit, so nobody can see the job finished in the database
            # but still running (or queued) here.
            if self._fair.remove(job_id) is not None:
                self._queue_changed()
            # Also a job the dispatcher has picked but not yet marked running.
            if (record := self._running.get(job_id)) is not None:
                self._release(record)
            self._emit(Finished(job))

        txn.after_commit(done)
        return job

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
            return await self.credits.refund(txn, dict(row), f"job {job_id} undelivered: {reason}")

        return await self._db.transaction(work)

    # ----- cancel, pause ---------------------------------------------------------------------

    async def cancel(self, job_id: int, actor_id: int | None = None) -> bool:
        """Cancel a queued or running job and refund it. Returns False when the job is not
        active (finished already, or unknown). A running job stops at its next step; if the
        engine does not react within the grace period, the worker aborts it hard. The
        `Finished` event (state cancelled) follows either way. Permission checks (owner or
        admin) are the caller's job."""
        for _ in range(3):
            record = self._running.get(job_id)
            if record is not None:
                if not record.cancel_requested:
                    record.cancel_requested = True
                    record.cancel_actor = actor_id
                    if record.task is not None:
                        await record.worker.cancel(job_id)
                        self._later(self._cancel_grace_s, lambda r=record: self._abort(r))
                return True
            if job_id not in self._fair:
                return False
            job = await self._finish(
                job_id,
                JobState.CANCELLED,
                error="cancelled",
                actor_id=actor_id,
                from_state=JobState.QUEUED,
            )
            if job is not None:
                return True
            # It started between our look and the update: cancel it as a running job.
        return False

    def _abort(self, record: _Running) -> None:
        if record.task is not None and not record.task.done():
            log.warning(
                "job %d ignored its cancel for %g s; aborting the worker",
                record.job_id,
                self._cancel_grace_s,
            )
            record.task.cancel()

    def _later(self, delay_s: float, callback: Callable[[], None]) -> None:
        async def call() -> None:
            await asyncio.sleep(delay_s)
            callback()

        task = asyncio.create_task(call())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def paused(self) -> bool:
        return self._paused

    async def set_paused(self, paused: bool, actor_id: int | None = None) -> None:
        """Pause: running jobs finish, nothing new starts, new submits are refused."""

        async def work(txn: Transaction) -> None:
            await txn.set_setting(_PAUSED_KEY, "1" if paused else "0")
            await txn.execute(
                "INSERT INTO audit (kind, actor_id, reason, created_at) VALUES (?, ?, ?, ?)",
                ("pause" if paused else "resume", actor_id, "", to_db(self._clock())),
            )

        await self._db.transaction(work)
        self._paused = paused
        self._wake.set()

    async def cancel_queued_for_user(self, user_id: int, actor_id: int | None, reason: str) -> int:
        count = 0
        for entry in [e for e in self._fair.entries() if e.user_id == user_id]:
            job = await self._finish(
                entry.job_id,
                JobState.CANCELLED,
                error=reason,
                actor_id=actor_id,
                from_state=JobState.QUEUED,
            )
            count += job is not None
        return count

    # ----- events and queue views ------------------------------------------------------------

    def subscribe(self, job_id: int) -> Subscription:
        """Events for one job: first its current state (Queued with position, Started, or
        Finished), then every change until Finished. Raises LookupError on iteration for an
        unknown job."""
        first: JobEvent | None = None
        record = self._running.get(job_id)
        if record is not None and record.job is None:
            first = Queued(job_id, 1)  # picked by the dispatcher, about to start
        elif record is not None:
            first = record.progress or Started(job_id, record.job.attempts)
        elif job_id in self._fair:
            position = self.queue_position(job_id) or 1
            self._published[job_id] = position
            first = Queued(job_id, position)
        subscription = Subscription(self, job_id, first)
        self._subscriptions[job_id].add(subscription)
        if self._closing and first is not None:
            subscription._end()
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        subscriptions = self._subscriptions.get(subscription.job_id)
        if subscriptions is not None:
            subscriptions.discard(subscription)
            if not subscriptions:
                del self._subscriptions[subscription.job_id]

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` for every event of every job; returns a function that removes it.
        Listeners run on the event loop and must not block."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    async def events(self, job_id: int) -> AsyncIterator[JobEvent]:
        """Convenience generator over `subscribe(job_id)`."""
        async with self.subscribe(job_id) as subscription:
            async for event in subscription:
                yield event

    def _emit(self, event: JobEvent) -> None:
        for subscription in list(self._subscriptions.get(event.job_id, ())):
            subscription._push(event)
        if isinstance(event, Finished):
            # Nothing follows Finished: forget subscribers that never read to the end.
            self._subscriptions.pop(event.job_id, None)
            self._published.pop(event.job_id, None)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    def _queue_changed(self) -> None:
        self._positions_dirty = True
        # Positions shift for every queued job at each dispatch: publish them only to jobs that
        # someone watches, and coalesce bursts (the front end edits at most every ~2 s anyway).
        if not self._positions_scheduled and self._subscriptions:
            self._positions_scheduled = True
            asyncio.get_running_loop().call_later(POSITION_PUBLISH_DELAY_S, self._publish_positions)

    def _publish_positions(self) -> None:
        self._positions_scheduled = False
        watched = [job_id for job_id in self._subscriptions if job_id in self._fair]
        if not watched:
            return
        positions = self._current_positions()
        for job_id in watched:
            position = positions.get(job_id)
            if position is not None and self._published.get(job_id) != position:
                self._published[job_id] = position
                for subscription in list(self._subscriptions.get(job_id, ())):
                    subscription._push(Queued(job_id, position))
        for job_id in [j for j in self._published if j not in self._fair]:
            del self._published[job_id]

    def _current_positions(self) -> dict[int, int]:
        if self._positions_dirty:
            order = self._fair.order(self._clock().timestamp())
            self._positions = {e.job_id: i for i, e in enumerate(order, start=1)}
            self._positions_dirty = False
        return self._positions

    def queue_position(self, job_id: int) -> int | None:
        """1 = runs next (an estimate: fair share may reorder as others submit). None when the
        job is not queued."""
        return self._current_positions().get(job_id)

    async def user_jobs(self, user_id: int) -> list[ActiveJob]:
        """The user's running and queued jobs, running first, then in expected run order."""
        jobs = await self.jobs.for_user(user_id, (JobState.QUEUED, JobState.RUNNING), limit=100)
        active = [ActiveJob(j, self.queue_position(j.id)) for j in jobs]
        return sorted(active, key=lambda a: (a.position is not None, a.position or 0, a.job.id))

    async def snapshot(self) -> QueueSnapshot:
        rows = await self._db.read(
            "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY id"
        )
        jobs = [row_to_job(r) for r in rows]
        running = tuple(ActiveJob(j, None) for j in jobs if j.state is JobState.RUNNING)
        queued = sorted(
            (ActiveJob(j, self.queue_position(j.id)) for j in jobs if j.state is JobState.QUEUED),
            key=lambda a: (a.position is None, a.position or 0),
        )
        return QueueSnapshot(
            paused=self._paused,
            running=running,
            queued=tuple(queued),
            worker_slots=sum(w.capacity for w in self._workers),
        )

    @property
    def queued_count(self) -> int:
        return len(self._fair)

    @property
    def running_count(self) -> int:
        return len(self._running)
