"""Which queued job runs next: fair share between users, with aging and priority tiers.

This is start-time fair queueing over users (pure, synchronous, no I/O):

* Every user with queued work has a virtual "pass". Dispatching one of their jobs advances it by
  1 / weight, where weight = 1 + tier, so a tier-1 user gets twice the share of a tier-0 user
  when both keep the queue busy, and equal users alternate (round-robin).
* A user who becomes active (first queued job) starts at the current virtual time, the pass of
  the last dispatch: they neither jump ahead with credit saved while idle nor queue up behind
  someone who has ten jobs waiting. So user A's 10 queued jobs cannot hold back user B's one job.
* Aging: a user's waiting time is worth one round of pass per `aging_s` seconds, so a user who
  waits long enough overtakes any amount of newer higher-tier work; nothing starves. The wait
  is counted from the user's last dispatch, or from when they became active (first job queued)
  if later; never from when their head job was queued, which would reward a deep backlog
  (every job of a long queue has waited long) and turn fair share into first come, first served.
* Ties go to the higher tier, then to the older job.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from bot.core.models import Mode


@dataclass(frozen=True)
class QueueEntry:
    job_id: int
    user_id: int
    # Seconds since the epoch (from the core's clock) when the job was queued.
    enqueued_at: float
    tier: int = 0
    # Which of the mode queues holds it (bot/core/mode_queue.py); a FairQueue ignores it.
    mode: Mode = Mode.FAST


@dataclass
class _UserQueue:
    pass_: float = 0.0
    jobs: deque[QueueEntry] = field(default_factory=deque)
    # Since when this user has been waiting for their next dispatch (clock seconds).
    waiting_since: float = 0.0


class FairQueue:
    def __init__(self, aging_s: float) -> None:
        # math.inf switches aging off (used by tests to show it matters).
        self._aging_s = aging_s
        self._users: dict[int, _UserQueue] = {}
        self._where: dict[int, int] = {}  # job id -> user id
        self._vtime = 0.0

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, job_id: int) -> bool:
        return job_id in self._where

    def count(self, user_id: int) -> int:
        queue = self._users.get(user_id)
        return len(queue.jobs) if queue else 0

    def entries(self) -> Iterator[QueueEntry]:
        for queue in self._users.values():
            yield from queue.jobs

    def push(self, entry: QueueEntry, front: bool = False) -> None:
        """Queue a job; `front=True` hands an interrupted job back ahead of its owner's others."""
        if entry.job_id in self._where:
            raise ValueError(f"job {entry.job_id} is already queued")
        queue = self._users.setdefault(entry.user_id, _UserQueue(pass_=self._vtime))
        if not queue.jobs:
            queue.pass_ = max(queue.pass_, self._vtime)
            # Becoming active starts the wait (never before the last dispatch of this user).
            queue.waiting_since = max(queue.waiting_since, entry.enqueued_at)
        if front:
            queue.jobs.appendleft(entry)
        else:
            queue.jobs.append(entry)
        self._where[entry.job_id] = entry.user_id

    def remove(self, job_id: int) -> QueueEntry | None:
        user_id = self._where.pop(job_id, None)
        if user_id is None:
            return None
        queue = self._users[user_id]
        for entry in queue.jobs:
            if entry.job_id == job_id:
                queue.jobs.remove(entry)
                self._forget_if_idle(user_id)
                return entry
        raise AssertionError(f"job {job_id} indexed but not queued")

    def _key(self, queue: _UserQueue, now: float) -> tuple[float, int, float, int]:
        return self._head_key(queue.pass_, queue.waiting_since, queue.jobs[0], now)

    def _head_key(
        self, pass_: float, waiting_since: float, head: QueueEntry, now: float
    ) -> tuple[float, int, float, int]:
        waited_rounds = 0.0
        if math.isfinite(self._aging_s):
            waited_rounds = max(0.0, now - waiting_since) / self._aging_s
        return (pass_ - waited_rounds, -head.tier, head.enqueued_at, head.job_id)

    def peek(
        self, now: float, eligible: Callable[[int], bool] = lambda _user: True
    ) -> QueueEntry | None:
        best: tuple[tuple[float, int, float, int], _UserQueue] | None = None
        for user_id, queue in self._users.items():
            if not queue.jobs or not eligible(user_id):
                continue
            key = self._key(queue, now)
            if best is None or key < best[0]:
                best = (key, queue)
        return best[1].jobs[0] if best else None

    def pop(
        self, now: float, eligible: Callable[[int], bool] = lambda _user: True
    ) -> QueueEntry | None:
        entry = self.peek(now, eligible)
        if entry is None:
            return None
        queue = self._users[entry.user_id]
        queue.jobs.popleft()
        del self._where[entry.job_id]
        self._vtime = max(self._vtime, queue.pass_)
        queue.pass_ += 1.0 / (1 + max(0, entry.tier))
        queue.waiting_since = max(queue.waiting_since, now)
        self._forget_if_idle(entry.user_id)
        return entry

    def _forget_if_idle(self, user_id: int) -> None:
        # An idle user would restart at the virtual time anyway, unless they are ahead of it;
        # keeping only those bounds memory by the number of recently served users.
        queue = self._users[user_id]
        if not queue.jobs and queue.pass_ <= self._vtime:
            del self._users[user_id]

    def order(self, now: float) -> list[QueueEntry]:
        """The expected dispatch order of everything queued, if nothing else arrived.

        The same choices `pop` would make, in O(n log users): with `now` fixed, a user's key
        only changes when one of their own jobs is taken.
        """
        heap: list[tuple[tuple[float, int, float, int], int, float, int]] = []
        for user_id, queue in self._users.items():
            if queue.jobs:
                heap.append((self._key(queue, now), user_id, queue.pass_, 0))
        heapq.heapify(heap)
        result = []
        while heap:
            _key, user_id, pass_, index = heapq.heappop(heap)
            jobs = self._users[user_id].jobs
            entry = jobs[index]
            result.append(entry)
            if index + 1 < len(jobs):
                # As if dispatched now: the user's wait starts again.
                pass_ += 1.0 / (1 + max(0, entry.tier))
                head = jobs[index + 1]
                waiting_since = max(self._users[user_id].waiting_since, now)
                key = self._head_key(pass_, waiting_since, head, now)
                heapq.heappush(heap, (key, user_id, pass_, index + 1))
        return result
