"""The queue the dispatcher picks from: one fair queue per mode, served in strict order.

Every waiting turbo job is offered a free slot before any fast job, and every fast job before
any relax job; within a mode, members share by the fair queueing of `fairness.py` (their own
virtual time, aging and tiers), so relax members are fair among themselves as fast ones are.

"Waiting" means able to start: a job held back by its owner's running limit
(`max_running_per_user`) cannot take the slot, so the slot goes to the next mode rather than
stand idle. A relax job therefore starts only on a slot that no turbo or fast job can use now,
and under a fast load that keeps every slot busy it waits, whatever its age: aging works only
within a mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from bot.core.fairness import FairQueue, QueueEntry
from bot.core.models import Mode

_ORDER = sorted(Mode, key=lambda mode: mode.rank)


class ModeQueue:
    """FairQueue's interface over one FairQueue per mode."""

    def __init__(self, aging_s: float) -> None:
        self._queues = {mode: FairQueue(aging_s) for mode in _ORDER}
        self._modes: dict[int, Mode] = {}  # job id -> its mode

    def __len__(self) -> int:
        return len(self._modes)

    def __contains__(self, job_id: int) -> bool:
        return job_id in self._modes

    def count(self, user_id: int, mode: Mode | None = None) -> int:
        """The user's queued jobs, of one mode or of all."""
        if mode is not None:
            return self._queues[mode].count(user_id)
        return sum(queue.count(user_id) for queue in self._queues.values())

    def waiting(self, mode: Mode) -> int:
        return len(self._queues[mode])

    def mode_of(self, job_id: int) -> Mode | None:
        return self._modes.get(job_id)

    def entries(self) -> Iterator[QueueEntry]:
        for queue in self._queues.values():
            yield from queue.entries()

    def push(self, entry: QueueEntry, front: bool = False) -> None:
        if entry.job_id in self._modes:
            raise ValueError(f"job {entry.job_id} is already queued")
        self._queues[entry.mode].push(entry, front=front)
        self._modes[entry.job_id] = entry.mode

    def remove(self, job_id: int) -> QueueEntry | None:
        mode = self._modes.pop(job_id, None)
        if mode is None:
            return None
        return self._queues[mode].remove(job_id)

    def peek(
        self, now: float, eligible: Callable[[int], bool] = lambda _user: True
    ) -> QueueEntry | None:
        for mode in _ORDER:
            entry = self._queues[mode].peek(now, eligible)
            if entry is not None:
                return entry
        return None

    def pop(
        self, now: float, eligible: Callable[[int], bool] = lambda _user: True
    ) -> QueueEntry | None:
        for mode in _ORDER:
            entry = self._queues[mode].pop(now, eligible)
            if entry is not None:
                del self._modes[entry.job_id]
                return entry
        return None

    def order(self, now: float) -> list[QueueEntry]:
        """The expected dispatch order if nothing else arrived: each mode's fair order, turbo
        first, relax last (a fast job arriving later still goes ahead of every relax one)."""
        return [entry for mode in _ORDER for entry in self._queues[mode].order(now)]
