"""The scheduler's in-memory picture of the `queued` and `running` rows.

It is a cache of SQLite, changed only by after-commit callbacks of the transactions that change
those rows (and by the dispatcher while it picks a job), so the two never disagree while the
process lives; it is rebuilt from the database on start.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from bot.core.fairness import QueueEntry
from bot.core.mode_queue import ModeQueue
from bot.core.models import Job, ProgressUpdate
from bot.core.workers import Worker


@dataclass(eq=False)
class RunningJob:
    """One run of one job, from the dispatcher's pick to its end. The run that created it owns
    it: only that run's code ends it, and ending it twice, or after the same job started again,
    changes nothing (records are compared by identity, never looked up by job id alone)."""

    job_id: int
    user_id: int
    worker: Worker
    job: Job | None = None
    task: asyncio.Task[None] | None = None
    cancel_actor: int | None = None
    cancel_requested: bool = False
    hand_back: bool = False
    progress: ProgressUpdate | None = None
    released: bool = False
    # Set while the transaction that ends this run is open: a cancel waits for its outcome
    # (the job may be ending cancelled, finished, or back in the queue) instead of being
    # acknowledged and then overridden by it.
    writing_end: asyncio.Future[None] | None = None


class RunningTable:
    """Which job runs where: the slots each worker has taken and each user's running count."""

    def __init__(self, workers: Sequence[Worker]) -> None:
        self._records: dict[int, RunningJob] = {}
        self._per_user: collections.Counter[int] = collections.Counter()
        self._busy: dict[int, int] = {id(w): 0 for w in workers}
        # Workers that left while running a job: their count goes when that job is released.
        self._leaving: set[int] = set()

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, job_id: int) -> bool:
        return job_id in self._records

    def get(self, job_id: int) -> RunningJob | None:
        return self._records.get(job_id)

    def records(self) -> Iterator[RunningJob]:
        return iter(list(self._records.values()))

    def busy(self, worker: Worker) -> int:
        return self._busy[id(worker)]

    def busy_counts(self) -> list[int]:
        return list(self._busy.values())

    def jobs_on(self, worker: Worker) -> list[int]:
        return [r.job_id for r in self._records.values() if r.worker is worker]

    def add_worker(self, worker: Worker) -> None:
        self._busy.setdefault(id(worker), 0)
        self._leaving.discard(id(worker))

    def remove_worker(self, worker: Worker) -> None:
        if self._busy.get(id(worker)):
            self._leaving.add(id(worker))
        else:
            self._busy.pop(id(worker), None)

    def running_for(self, user_id: int) -> int:
        return self._per_user[user_id]

    def claim(self, record: RunningJob) -> None:
        if record.job_id in self._records:
            raise RuntimeError(f"job {record.job_id} is already running")
        self._records[record.job_id] = record
        self._per_user[record.user_id] += 1
        self._busy[id(record.worker)] += 1

    def move(self, record: RunningJob, worker: Worker) -> None:
        """Run a picked job on `worker` instead (which must have a free slot)."""
        self._busy[id(record.worker)] -= 1
        self._busy[id(worker)] += 1
        record.worker = worker

    def release(self, record: RunningJob) -> bool:
        """Give back the slots `record` took; False when it already gave them back."""
        if record.released:
            return False
        record.released = True
        if self._records.get(record.job_id) is record:
            del self._records[record.job_id]
        self._per_user[record.user_id] -= 1
        if self._per_user[record.user_id] <= 0:
            del self._per_user[record.user_id]
        key = id(record.worker)
        self._busy[key] -= 1
        if key in self._leaving and not self._busy[key]:
            self._leaving.discard(key)
            del self._busy[key]
        return True


class QueueState:
    """What admission, dispatch and the job lifecycle share: the fair queue, the running
    table, the pause and closing flags, and the dispatcher's wake-up."""

    def __init__(self, aging_s: float, workers: Sequence[Worker]) -> None:
        # One fair queue per mode, served turbo, fast, then relax (bot/core/mode_queue.py).
        self.fair = ModeQueue(aging_s)
        self.running = RunningTable(workers)
        self.wake = asyncio.Event()
        self.paused = False
        self.closing = False
        # Cancels being written, by job: a run of that job waits for the outcome before it
        # starts, so a cancel written while the job is picked or handed back never lets it run.
        self.cancels_writing: dict[int, asyncio.Future[None]] = {}
        # Set by the event hub: queue positions shift whenever the queue changes.
        self.queue_changed: Callable[[], None] = lambda: None

    def enqueue(self, entry: QueueEntry, front: bool = False) -> None:
        self.fair.push(entry, front=front)
        self.queue_changed()
        self.wake.set()

    def dequeue(self, job_id: int) -> None:
        if self.fair.remove(job_id) is not None:
            self.queue_changed()

    def release(self, record: RunningJob) -> None:
        self.running.release(record)
        self.wake.set()
