"""Dispatch: start workers, hand queued jobs to free worker slots in fair order, run each job
and end it through the lifecycle, and drain at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bot.config import SchedulerConfig
from bot.core.clock import Clock
from bot.core.events import EventHub, with_last_preview
from bot.core.execute import JobError, WorkItem, WorkOutcome
from bot.core.jobs import output_dir_for
from bot.core.lifecycle import Ending, Lifecycle
from bot.core.models import Job, JobResult, JobState, ProgressUpdate, Started
from bot.core.state import QueueState, RunningJob
from bot.core.workers import JobTimeout, Worker, WorkerCrashed, WorkerUnavailable
from generation.contract import GenerationCancelled

log = logging.getLogger(__name__)

# The first pause before starting a worker again; it doubles up to `worker_retry_s`.
FIRST_RETRY_S = 1.0

# Called with a finished job's outcome before it is settled; returns None to accept it or a
# reason to refuse it (the job becomes `refused` and is refunded). Moderation plugs in here.
OutputCheck = Callable[[Job, WorkOutcome], Awaitable[str | None]]


@dataclass(frozen=True)
class WorkerStatus:
    """One worker as the dispatcher sees it (for metrics and readiness)."""

    name: str
    ready: bool
    busy: int
    # CUDA memory its process held after its last job; None on CPU or before any job.
    gpu_memory_bytes: int | None
    # The models it reported holding after its last job.
    models: tuple[str, ...] = ()
    # Where it runs: the machine (host name or cluster node) and the device it is pinned to
    # ("" when it sees whatever the machine shows), as the worker reports them.
    node: str = ""
    device: str = ""
    # The jobs it runs now.
    jobs: tuple[int, ...] = ()


class Dispatcher:
    def __init__(
        self,
        state: QueueState,
        lifecycle: Lifecycle,
        events: EventHub,
        workers: Sequence[Worker],
        config: SchedulerConfig,
        clock: Clock,
        output_check: OutputCheck | None,
        cancel_grace_s: float,
        worker_retry_s: float,
    ) -> None:
        self._state = state
        self._lifecycle = lifecycle
        self._events = events
        self.workers = list(workers)
        self._config = config
        self._clock = clock
        self._output_check = output_check
        self._cancel_grace_s = cancel_grace_s
        self._worker_retry_s = worker_retry_s
        self._ready: set[int] = set()
        self._starting: set[int] = set()
        self._loop_task: asyncio.Task[None] | None = None
        # Only the starters still running: a worker restarted after every crash adds one each.
        self._worker_starters: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gpu_memory: dict[int, int] = {}
        self._models: dict[int, frozenset[str]] = {}
        self.dispatch_count = 0

    def start(self) -> None:
        for worker in self.workers:
            self._start_in_background(worker)
        self._loop_task = asyncio.create_task(self._dispatch_loop(), name="dispatcher")

    def add_worker(self, worker: Worker) -> None:
        """A worker that joined while the bot runs (a GPU of a Ray node that came up)."""
        if self._has(worker):
            return
        self.workers.append(worker)
        self._state.running.add_worker(worker)
        if self._loop_task is not None and not self._state.closing:
            self._start_in_background(worker)

    async def remove_worker(self, worker: Worker) -> None:
        """A worker that left (its node is gone): no job is given to it any more, and it is
        closed. A job it was running ends the way its worker reports (a crash re-queues it)."""
        if not self._has(worker):
            return
        self.workers = [w for w in self.workers if w is not worker]
        self._ready.discard(id(worker))
        self._models.pop(id(worker), None)
        self._gpu_memory.pop(id(worker), None)
        self._state.running.remove_worker(worker)
        try:
            await worker.close()
        except Exception:
            log.exception("worker %s did not close cleanly", worker.name)

    def _has(self, worker: Worker) -> bool:
        return any(w is worker for w in self.workers)

    def _start_in_background(self, worker: Worker) -> None:
        self._ready.discard(id(worker))
        if id(worker) in self._starting or not self._has(worker):
            return
        self._starting.add(id(worker))
        task = asyncio.create_task(self._start_worker(worker), name=f"start-{worker.name}")
        self._worker_starters.add(task)

        def started(done: asyncio.Task[None]) -> None:
            self._starting.discard(id(worker))
            self._worker_starters.discard(done)

        task.add_done_callback(started)

    async def _start_worker(self, worker: Worker) -> None:
        # Jobs wait in the queue while a worker loads its models (which may take minutes);
        # a worker that cannot start is retried with a growing pause (a crashed child's GPU
        # memory may take a moment to come free), with the error in the log for the admin.
        delay_s = min(FIRST_RETRY_S, self._worker_retry_s)
        while not self._state.closing and self._has(worker):
            try:
                await worker.start()
            except Exception as exc:
                if not self._has(worker):
                    return
                log.error(
                    "worker %s failed to start (%s); retrying in %g s", worker.name, exc, delay_s
                )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, self._worker_retry_s)
                continue
            if self._has(worker):
                self._ready.add(id(worker))
                self._state.wake.set()
            return

    async def close(self, drain_timeout_s: float) -> None:
        """Stop dispatching, let running jobs finish for up to `drain_timeout_s`, hand the rest
        back to the queue (they run again after the restart), then stop the workers."""
        self._state.wake.set()
        for starter in list(self._worker_starters):
            starter.cancel()
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        records = list(self._state.running.records())
        tasks = [r.task for r in records if r.task is not None]
        pending: set[asyncio.Task[None]] = set()
        if tasks:
            log.info("draining %d running jobs (up to %g s)", len(tasks), drain_timeout_s)
            _done, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
            for record in records:
                if record.task in pending:
                    record.hand_back = True
                    record.task.cancel()
        # An ending that cannot be written gets one last try now: the next start recovers it.
        self._lifecycle.stop_retrying()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._lifecycle.wait_endings()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._worker_starters, return_exceptions=True)
        for worker in self.workers:
            try:
                await worker.close()
            except Exception:
                log.exception("worker %s did not close cleanly", worker.name)

    def worker_states(self) -> list[WorkerStatus]:
        return [
            WorkerStatus(
                name=worker.name,
                ready=id(worker) in self._ready,
                busy=self._state.running.busy(worker),
                gpu_memory_bytes=self._gpu_memory.get(id(worker)),
                models=tuple(sorted(self._models.get(id(worker), ()))),
                node=str(getattr(worker, "node", "")),
                device=str(getattr(worker, "device", "")),
                jobs=tuple(self._state.running.jobs_on(worker)),
            )
            for worker in self.workers
        ]

    # ----- picking -----------------------------------------------------------------------------

    def _free_worker(self) -> Worker | None:
        for worker in self.workers:
            if id(worker) in self._ready and self._state.running.busy(worker) < worker.capacity:
                return worker
        return None

    def _with_model(self, job: Job, picked: Worker) -> Worker:
        """A free worker that already holds the job's model, so no worker loads a model another
        one has ready; else the one picked. The job was chosen in fair order before this."""
        model = job.request_data.get("model")
        if model is None or model in self._models.get(id(picked), ()):
            return picked
        for worker in self.workers:
            if (
                worker is not picked
                and id(worker) in self._ready
                and self._state.running.busy(worker) < worker.capacity
                and model in self._models.get(id(worker), ())
            ):
                return worker
        return picked

    def _eligible(self, user_id: int) -> bool:
        return self._state.running.running_for(user_id) < self._config.max_running_per_user

    async def _dispatch_loop(self) -> None:
        wake = self._state.wake
        while not self._state.closing:
            await wake.wait()
            wake.clear()
            try:
                await self._dispatch_ready()
            except Exception:
                # A dead dispatcher would silently stall every queue; log and keep going.
                log.exception("dispatch failed; retrying")
                await asyncio.sleep(1.0)
                wake.set()

    async def _dispatch_ready(self) -> None:
        """Start queued jobs while a worker slot is free and someone is eligible."""
        state = self._state
        while not (state.paused or state.closing):
            worker = self._free_worker()
            if worker is None:
                break
            entry = state.fair.pop(self._clock().timestamp(), self._eligible)
            if entry is None:
                break
            state.queue_changed()
            record = RunningJob(entry.job_id, entry.user_id, worker)
            state.running.claim(record)
            try:
                job = await self._lifecycle.mark_running(entry.job_id)
            except Exception:
                log.exception("job %d: could not be started; leaving it queued", entry.job_id)
                state.release(record)
                state.fair.push(entry, front=True)
                await asyncio.sleep(1.0)
                continue
            if job is None:  # cancelled while we were picking it
                state.release(record)
                continue
            record.job = job
            preferred = self._with_model(job, worker)
            if preferred is not worker:
                state.running.move(record, preferred)
            self.dispatch_count += 1
            record.task = asyncio.create_task(self._run(record), name=f"job-{job.id}")

    # ----- running -----------------------------------------------------------------------------

    async def _run(self, record: RunningJob) -> None:
        job = record.job
        assert job is not None
        self._events.emit(Started(job.id, job.attempts))
        ending = Ending(JobState.FAILED, error="something went wrong")
        try:
            ending = await self._attempt(record, job)
        except asyncio.CancelledError:
            ending = self._cancelled(record)
            raise
        finally:
            # Shielded: a second cancel must not cut the ending short.
            await asyncio.shield(self._lifecycle.end(record, ending))

    async def _attempt(self, record: RunningJob, job: Job) -> Ending:
        """Run the job and check its output; every way this can go maps to one `Ending`."""
        try:
            writing = self._state.cancels_writing.get(job.id)
            if writing is not None:
                # A cancel of this job is being written: it decides whether the run starts.
                await asyncio.shield(writing)
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
                lambda step, total, preview=None: self._progress(record, step, total, preview),
                self._config.job_timeout_s,
            )
            if outcome.gpu_memory_bytes is not None:
                self._gpu_memory[id(record.worker)] = outcome.gpu_memory_bytes
            self._models[id(record.worker)] = frozenset(outcome.loaded_models)
            if record.cancel_requested:
                raise GenerationCancelled()
            verdict = await self._check_output(job, outcome)
            if record.cancel_requested:
                raise GenerationCancelled()
        except GenerationCancelled:
            return Ending(JobState.CANCELLED, error="cancelled", actor_id=record.cancel_actor)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if record.cancel_requested:
                # The member asked to stop and the run stopped, whatever the way: a crash
                # must not put a cancelled job back in the queue.
                log.info("job %d: cancelled; the run ended with %r", job.id, exc)
                return Ending(JobState.CANCELLED, error="cancelled", actor_id=record.cancel_actor)
            return self._failed(record, job, exc)
        result = JobResult(
            image_paths=outcome.image_paths,
            grid_path=outcome.grid_path,
            seeds=outcome.seeds,
            clip_scores=outcome.clip_scores,
            timings_s=outcome.timings_s,
            candidate_indices=outcome.candidate_indices,
            width=outcome.width,
            height=outcome.height,
            texts=outcome.texts,
            control_map_path=outcome.control_map_path,
            personalized=outcome.personalized,
            embeddings=outcome.embeddings,
        )
        if verdict:
            return Ending(JobState.REFUSED, error=verdict, result=result)
        return Ending(JobState.SUCCEEDED, result=result)

    def _failed(self, record: RunningJob, job: Job, exc: Exception) -> Ending:
        if isinstance(exc, WorkerUnavailable | JobTimeout | WorkerCrashed):
            # Its process was replaced (or will be): whatever it held is gone.
            self._models.pop(id(record.worker), None)
            self._gpu_memory.pop(id(record.worker), None)
        if isinstance(exc, WorkerUnavailable):
            # Out of the ready set before the job is back in the queue, so the job waits for
            # this worker's restart (or runs on another) instead of burning its attempts here.
            log.error("job %d: worker %s cannot run jobs: %s", job.id, record.worker.name, exc)
            self._start_in_background(record.worker)
            return Ending(None, hand_back=True)
        if isinstance(exc, JobTimeout):
            return Ending(JobState.FAILED, error=str(exc))
        if isinstance(exc, JobError):
            return Ending(JobState.FAILED, error=exc.message)
        if isinstance(exc, WorkerCrashed):
            log.warning("job %d: %s", job.id, exc)
            # Out of the ready set before the job is re-queued: it goes to another worker, or
            # waits for this one's replacement, instead of bouncing off it while it restarts.
            self._start_in_background(record.worker)
            return self._lifecycle.after_crash(job)
        log.error("job %d: unexpected failure", job.id, exc_info=exc)
        return Ending(JobState.FAILED, error="something went wrong")

    def _cancelled(self, record: RunningJob) -> Ending:
        """The run's task was cancelled: a cancel past its grace period, or shutdown. A cancel
        the member was told about wins over the shutdown's hand-back; a task cancelled for no
        recorded reason is handed back too: its job is not at fault."""
        if record.cancel_requested:
            return Ending(JobState.CANCELLED, error="cancelled", actor_id=record.cancel_actor)
        return Ending(None, hand_back=True)

    async def _check_output(self, job: Job, outcome: WorkOutcome) -> str | None:
        if self._output_check is None:
            return None
        try:
            return await self._output_check(job, outcome)
        except Exception:
            log.exception("job %d: output check failed; refusing the result", job.id)
            return "the result could not be checked"

    def _progress(
        self, record: RunningJob, step: int, total: int, preview_png: bytes | None = None
    ) -> None:
        update = ProgressUpdate(record.job_id, step, total, preview_png)
        self._events.emit(update)
        # Whoever subscribes mid-run gets the latest preview with the latest step.
        record.progress = with_last_preview(update, record.progress)

    # ----- cancelling ---------------------------------------------------------------------------

    async def cancel_running(self, record: RunningJob, actor_id: int | None) -> None:
        """Ask a running job to stop at its next step; abort it hard after the grace period."""
        if record.cancel_requested:
            return
        record.cancel_requested = True
        record.cancel_actor = actor_id
        if record.task is not None:
            await record.worker.cancel(record.job_id)
            self._later(self._cancel_grace_s, lambda: self._abort(record))

    def _abort(self, record: RunningJob) -> None:
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
