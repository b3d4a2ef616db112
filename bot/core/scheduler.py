"""The job scheduler: one front for submitting, watching, cancelling and pausing jobs.

Truth lives in SQLite; the in-memory fair queue and running table (`state.py`) are a cache of
the `queued` and `running` rows, rebuilt from the database on start (restart recovery). Each
concern has its own module:

* `admission.py`  checks limits, holds credits and queues a job (or refuses, charging nothing);
* `dispatch.py`   starts workers and runs queued jobs on free slots in fair order;
* `lifecycle.py`  moves a job's row and credits: running, settled, refunded or re-queued;
* `events.py`     per-job subscriptions, listeners and queue positions;
* `modes.py`      members' modes, servers' relax switches and relax use (`mode_queue.py` is the
                  queue: turbo, then fast, then relax).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from bot.config import ModesConfig, SchedulerConfig
from bot.core.admission import Admission
from bot.core.clock import Clock, to_db
from bot.core.credits import CreditsService
from bot.core.db import Database, Transaction
from bot.core.dispatch import Dispatcher, OutputCheck, WorkerStatus
from bot.core.events import EventHub, Listener, Subscription
from bot.core.jobs import JobStore, row_to_job
from bot.core.lifecycle import Lifecycle
from bot.core.metrics import CoreMetrics
from bot.core.models import (
    ActiveJob,
    Finished,
    Job,
    JobEvent,
    JobKind,
    JobState,
    Mode,
    Owner,
    QueueSnapshot,
)
from bot.core.modes import ModeStore
from bot.core.state import QueueState, RunningJob
from bot.core.workers import Worker
from generation.contract import GenerationRequest

__all__ = ["Listener", "OutputCheck", "Scheduler", "Subscription", "WorkerStatus"]

_PAUSED_KEY = "scheduler.paused"
# Succeeded runs whose durations the expected wait averages.
_RUNS_REMEMBERED = 20


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
        workers_join_later: bool = False,
        end_retry_s: float = 30.0,
        modes: ModesConfig | None = None,
    ) -> None:
        """`workers_join_later`: start with no worker; they come and go through `add_worker`
        and `remove_worker` (the Ray backend), and jobs wait in the queue meanwhile.
        `end_retry_s`: the longest pause between tries to write a run's end that failed."""
        if not workers and not workers_join_later:
            raise ValueError("workers: the scheduler needs at least one worker")
        self._db = db
        self.credits = credits
        self.jobs = jobs
        self.config = config
        self._clock = clock
        self._state = QueueState(config.aging_s, workers)
        self._events = EventHub(self._state, jobs, clock)
        self._lifecycle = Lifecycle(
            db, credits, self._state, self._events, config, clock, end_retry_s
        )
        self.modes = ModeStore(db, modes or ModesConfig(), clock)
        self._admission = Admission(db, credits, self._state, config, clock, data_dir, self.modes)
        self._dispatcher = Dispatcher(
            self._state,
            self._lifecycle,
            self._events,
            workers,
            config,
            clock,
            output_check,
            cancel_grace_s,
            worker_retry_s,
        )
        self.metrics = CoreMetrics()
        self._events.add_listener(self.metrics.on_event)
        self.metrics.watch(self)
        self._run_s: collections.deque[float] = collections.deque(maxlen=_RUNS_REMEMBERED)
        self._events.add_listener(self._remember_run)
        self._started = False

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._state.paused = (await self._db.get_setting(_PAUSED_KEY)) == "1"
        await self._lifecycle.recover()
        self._dispatcher.start()

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop dispatching, let running jobs finish for up to `drain_timeout_s`, hand the rest
        back to the queue (they run again after the restart), then stop the workers."""
        if self._state.closing:
            return
        self._state.closing = True
        await self._dispatcher.close(drain_timeout_s)
        self._events.end_all()

    # ----- submit ----------------------------------------------------------------------------

    def tier_for(self, owner: Owner) -> int:
        return self._admission.tier_for(owner)

    async def submit(
        self,
        owner: Owner,
        request: GenerationRequest,
        kind: JobKind = JobKind.IMAGINE,
        parent: tuple[int, int | None] | None = None,
        mode: Mode = Mode.FAST,
    ) -> Job:
        """Hold the cost and queue the job, or raise `Refused` having charged nothing.

        `parent` is (job id, image index) for U/V buttons and (job id, None) for a reroll.
        `mode` sets the cost and the queue (turbo, fast or relax).
        """
        (job,) = await self.submit_many(owner, [request], kind, parent, mode)
        return job

    async def submit_many(
        self,
        owner: Owner,
        requests: Sequence[GenerationRequest],
        kind: JobKind = JobKind.IMAGINE,
        parent: tuple[int, int | None] | None = None,
        mode: Mode = Mode.FAST,
    ) -> list[Job]:
        """Queue one job per request, all or none (one /imagine with permutations or
        --repeat): the queue limits count them together, their costs are held in one
        transaction, and a refusal (`Refused`) charges and queues nothing. Jobs come back in
        the order of `requests`, and are queued in that order, all in `mode`."""
        jobs = await self._admission.submit_many(owner, requests, kind, parent, mode)
        self.metrics.submitted(jobs)
        return jobs

    async def check_submit(
        self, owner: Owner, requests: Sequence[GenerationRequest], mode: Mode = Mode.FAST
    ) -> None:
        """`Refused` now for what `submit_many` would refuse now (paused, queue full, banned,
        too few credits, relax off or capped), holding and queueing nothing: looked at before a
        command fetches anything."""
        await self._admission.check(owner, requests, mode)

    # ----- cancel, pause, refunds ------------------------------------------------------------

    async def cancel(self, job_id: int, actor_id: int | None = None) -> bool:
        """Cancel a queued or running job and refund it. Returns False when the job is not
        active (finished already, or unknown). A running job stops at its next step; if the
        engine does not react within the grace period, the worker aborts it hard. The
        `Finished` event (state cancelled) follows either way. A True answer is kept: the job
        ends cancelled and refunded even if its run finished, crashed or was handed back at
        shutdown before its end was written, or the bot died: the cancel is written to the
        job's row before the answer. Raises `CancelNotSaved` when it cannot be written (the
        job goes on; the member may try again). Permission checks (owner or admin) are the
        caller's job."""
        for _ in range(4):
            record = self._state.running.get(job_id)
            if record is not None and record.writing_end is not None:
                # Its end is being written: acknowledge only what that leaves to cancel (a job
                # back in the queue, or an end that failed to be written and will be retried).
                await asyncio.shield(record.writing_end)
                continue
            if record is None and job_id not in self._state.fair:
                return False
            writing = asyncio.get_running_loop().create_future()
            self._state.cancels_writing.setdefault(job_id, writing)
            try:
                # Written before it is acknowledged: kept across a crash or a restart.
                outcome = await self._lifecycle.write_cancel(job_id, actor_id)
                if isinstance(outcome, RunningJob):
                    await self._dispatcher.cancel_running(outcome, actor_id)
                    return True
                return outcome
            finally:
                if self._state.cancels_writing.get(job_id) is writing:
                    del self._state.cancels_writing[job_id]
                writing.set_result(None)
        return False

    async def cancel_queued_for_user(self, user_id: int, actor_id: int | None, reason: str) -> int:
        count = 0
        for entry in [e for e in self._state.fair.entries() if e.user_id == user_id]:
            job = await self._lifecycle.finish(
                entry.job_id,
                JobState.CANCELLED,
                error=reason,
                actor_id=actor_id,
                from_state=JobState.QUEUED,
            )
            count += job is not None
        return count

    async def refund_undelivered(self, job_id: int, reason: str) -> int:
        """Give back what a succeeded job was charged when its result can never be delivered
        (e.g. the bot may not attach files there), once; its 'result' delivery is recorded as
        'undelivered' so it is never retried. Returns the credits given back (0 the second
        time, and for a job that was refunded when it ended)."""
        refunded = await self._lifecycle.refund_undelivered(job_id, reason)
        self.metrics.refunded(refunded)
        return refunded

    @property
    def paused(self) -> bool:
        return self._state.paused

    async def set_paused(self, paused: bool, actor_id: int | None = None) -> None:
        """Pause: running jobs finish, nothing new starts, new submits are refused."""

        async def work(txn: Transaction) -> None:
            await txn.set_setting(_PAUSED_KEY, "1" if paused else "0")
            await txn.execute(
                "INSERT INTO audit (kind, actor_id, reason, created_at) VALUES (?, ?, ?, ?)",
                ("pause" if paused else "resume", actor_id, "", to_db(self._clock())),
            )

        await self._db.transaction(work)
        self._state.paused = paused
        self._state.wake.set()

    # ----- events and queue views ------------------------------------------------------------

    def subscribe(self, job_id: int) -> Subscription:
        """Events for one job: first its current state (Queued with position, Started, or
        Finished), then every change until Finished. Raises LookupError on iteration for an
        unknown job."""
        return self._events.subscribe(job_id)

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Call `listener` for every event of every job; returns a function that removes it.
        Listeners run on the event loop and must not block."""
        return self._events.add_listener(listener)

    async def events(self, job_id: int) -> AsyncIterator[JobEvent]:
        """Convenience generator over `subscribe(job_id)`."""
        async with self.subscribe(job_id) as subscription:
            async for event in subscription:
                yield event

    def queue_position(self, job_id: int) -> int | None:
        """1 = runs next (an estimate: fair share may reorder as others submit). None when the
        job is not queued."""
        return self._events.queue_position(job_id)

    def expected_wait_s(self, job_id: int) -> float | None:
        """About how long a queued job waits before it starts, if nothing else arrived: the
        jobs ahead of it (those running and those queued before it) go through the worker
        slots in rounds of the average run of the last succeeded jobs (`wait_estimate_run_s`
        before any). None when the job is not queued. A relax job waits longer when fast jobs
        arrive meanwhile."""
        position = self.queue_position(job_id)
        if position is None:
            return None
        slots = max(1, sum(w.capacity for w in self._dispatcher.workers))
        if self._run_s:
            run_s = sum(self._run_s) / len(self._run_s)
        else:
            run_s = self.modes.config.wait_estimate_run_s
        ahead = self.running_count + position - 1
        return float(ahead // slots) * run_s

    def _remember_run(self, event: JobEvent) -> None:
        if not isinstance(event, Finished) or event.job.state is not JobState.SUCCEEDED:
            return
        started, finished = event.job.started_at, event.job.finished_at
        if started is not None and finished is not None:
            self._run_s.append(max(0.0, (finished - started).total_seconds()))

    def waiting(self, mode: Mode) -> int:
        """Jobs of `mode` waiting in the queue now."""
        return self._state.fair.waiting(mode)

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
            paused=self._state.paused,
            running=running,
            queued=tuple(queued),
            worker_slots=sum(w.capacity for w in self._dispatcher.workers),
        )

    @property
    def queued_count(self) -> int:
        return len(self._state.fair)

    @property
    def running_count(self) -> int:
        return len(self._state.running)

    @property
    def dispatch_count(self) -> int:
        return self._dispatcher.dispatch_count

    def add_worker(self, worker: Worker) -> None:
        """Start a worker that joined while the bot runs; jobs go to it once it is ready."""
        self._dispatcher.add_worker(worker)

    async def remove_worker(self, worker: Worker) -> None:
        """Stop giving jobs to a worker that left, and close it."""
        await self._dispatcher.remove_worker(worker)

    def worker_states(self) -> list[WorkerStatus]:
        """Each worker's name, readiness, running jobs and last reported GPU memory."""
        return self._dispatcher.worker_states()

    @property
    def ready_workers(self) -> int:
        return sum(1 for state in self._dispatcher.worker_states() if state.ready)

    def busy_counts(self) -> list[int]:
        """Slots each worker has taken, in worker order (all zero when nothing runs)."""
        return self._state.running.busy_counts()
