"""The live dashboard: who waits and for how long, what each worker runs, its models and memory,
and the recent failures, as far as an admin may see them (`/admin queue show` and `/admin
workers` in one view, scoped alike: bot/app/admin.py), and a stream of it that follows the
queue as it moves (the web sends it as server-sent events)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bot.app.access import AdminScope
from bot.app.admin import AdminDesk, AdminOp, AdminSeat
from bot.core.clock import Clock
from bot.core.models import JobEvent

# Adds a job-event listener and returns its remover (Scheduler.add_listener).
Listen = Callable[[Callable[[JobEvent], None]], Callable[[], None]]


@dataclass(frozen=True)
class WaitingJob:
    job_id: int
    user_id: int
    guild_id: int | None
    kind: str
    cost: int
    # 1 = runs next (an estimate: fair share may reorder).
    position: int | None
    waited_s: float


@dataclass(frozen=True)
class RunningJob:
    job_id: int
    user_id: int
    guild_id: int | None
    kind: str
    cost: int
    running_s: float
    # The worker running it; shown to owners only (the workers are theirs).
    worker: str | None


@dataclass(frozen=True)
class WorkerLine:
    name: str
    node: str
    device: str
    ready: bool
    jobs: tuple[int, ...]
    models: tuple[str, ...]
    gpu_memory_bytes: int | None


@dataclass(frozen=True)
class FailedJob:
    job_id: int
    user_id: int
    guild_id: int | None
    kind: str
    error: str
    finished_at: datetime | None


@dataclass(frozen=True)
class LiveView:
    """The queue and the workers at one moment, as far as the seat may see them. `workers` and
    `backend` are None for a server admin (`/admin workers` is the owners')."""

    paused: bool
    worker_slots: int
    waiting: tuple[WaitingJob, ...]
    running: tuple[RunningJob, ...]
    failures: tuple[FailedJob, ...]
    workers: tuple[WorkerLine, ...] | None
    backend: str | None
    taken_at: datetime

    def key(self) -> tuple[Any, ...]:
        """What changes when something happens (not the clock's waits and run times)."""
        return (
            self.paused,
            self.worker_slots,
            tuple((w.job_id, w.position) for w in self.waiting),
            tuple((r.job_id, r.worker) for r in self.running),
            tuple(f.job_id for f in self.failures),
            self.workers,
            self.backend,
        )

    def to_json(self) -> dict[str, Any]:
        def when(moment: datetime | None) -> str | None:
            return None if moment is None else moment.isoformat()

        return {
            "paused": self.paused,
            "worker_slots": self.worker_slots,
            "taken_at": when(self.taken_at),
            "waiting": [
                {
                    "job_id": w.job_id,
                    "user_id": str(w.user_id),
                    "guild_id": None if w.guild_id is None else str(w.guild_id),
                    "kind": w.kind,
                    "cost": w.cost,
                    "position": w.position,
                    "waited_s": round(w.waited_s, 1),
                }
                for w in self.waiting
            ],
            "running": [
                {
                    "job_id": r.job_id,
                    "user_id": str(r.user_id),
                    "guild_id": None if r.guild_id is None else str(r.guild_id),
                    "kind": r.kind,
                    "cost": r.cost,
                    "running_s": round(r.running_s, 1),
                    "worker": r.worker,
                }
                for r in self.running
            ],
            "failures": [
                {
                    "job_id": f.job_id,
                    "user_id": str(f.user_id),
                    "kind": f.kind,
                    "error": f.error,
                    "finished_at": when(f.finished_at),
                }
                for f in self.failures
            ],
            "backend": self.backend,
            "workers": None
            if self.workers is None
            else [
                {
                    "name": w.name,
                    "node": w.node,
                    "device": w.device,
                    "ready": w.ready,
                    "jobs": list(w.jobs),
                    "models": list(w.models),
                    "gpu_memory_bytes": w.gpu_memory_bytes,
                }
                for w in self.workers
            ],
        }


class LiveBoard:
    def __init__(self, desk: AdminDesk, listen: Listen, clock: Clock) -> None:
        """`listen`: the stream wakes on each job event it hears."""
        self._desk = desk
        self._listen = listen
        self._clock = clock

    async def view(self, seat: AdminSeat, failures: int = 10) -> LiveView:
        """Who waits and for how long, what runs where, each worker's models and memory, and
        the recent failures: `/admin queue show` and `/admin workers` in one, scoped alike."""
        snapshot = await self._desk.queue(seat)
        owner = seat.scope is AdminScope.OWNER
        view = self._desk.workers(seat) if owner else None
        running_on = {
            job_id: worker.name
            for worker in (view.workers if view else ())
            for job_id in worker.jobs
        }
        now = self._clock()
        failed = await self._desk.recent_failures(seat, failures)
        return LiveView(
            paused=snapshot.paused,
            worker_slots=snapshot.worker_slots,
            waiting=tuple(
                WaitingJob(
                    job_id=a.job.id,
                    user_id=a.job.owner.user_id,
                    guild_id=a.job.owner.guild_id,
                    kind=a.job.kind.value,
                    cost=a.job.cost,
                    position=a.position,
                    waited_s=max(0.0, (now - a.job.created_at).total_seconds()),
                )
                for a in snapshot.queued
            ),
            running=tuple(
                RunningJob(
                    job_id=a.job.id,
                    user_id=a.job.owner.user_id,
                    guild_id=a.job.owner.guild_id,
                    kind=a.job.kind.value,
                    cost=a.job.cost,
                    running_s=max(
                        0.0, (now - (a.job.started_at or a.job.created_at)).total_seconds()
                    ),
                    worker=running_on.get(a.job.id) if owner else None,
                )
                for a in snapshot.running
            ),
            failures=tuple(
                FailedJob(
                    job_id=job.id,
                    user_id=job.owner.user_id,
                    guild_id=job.owner.guild_id,
                    kind=job.kind.value,
                    error=job.error or "",
                    finished_at=job.finished_at,
                )
                for job in failed
            ),
            workers=None
            if view is None
            else tuple(
                WorkerLine(
                    name=w.name,
                    node=w.node,
                    device=w.device,
                    ready=w.ready,
                    jobs=tuple(w.jobs),
                    models=tuple(w.models),
                    gpu_memory_bytes=w.gpu_memory_bytes,
                )
                for w in view.workers
            ),
            backend=None if view is None else view.backend,
            taken_at=now,
        )

    async def views(
        self,
        seat: AdminSeat,
        *,
        poll_s: float = 1.0,
        refresh_s: float = 5.0,
        closing: asyncio.Event | None = None,
    ) -> AsyncIterator[LiveView | None]:
        """The live view now, then again whenever it changes: woken by every job event, and
        looked at every `poll_s` (a submit raises no event); every `refresh_s` it comes
        anyway (the waits have grown). Between those it yields None every `poll_s`, a tick
        the caller may use as a heartbeat. Ends when `closing` is set."""
        self._desk.authorize(seat, AdminOp.QUEUE_SHOW)
        wake = asyncio.Event()
        remove = self._listen(lambda _event: wake.set())
        loop = asyncio.get_running_loop()
        try:
            last = await self.view(seat)
            last_sent = loop.time()
            yield last
            while closing is None or not closing.is_set():
                waits = [asyncio.ensure_future(wake.wait())]
                if closing is not None:
                    waits.append(asyncio.ensure_future(closing.wait()))
                try:
                    await asyncio.wait(waits, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiting in waits:
                        waiting.cancel()
                if closing is not None and closing.is_set():
                    return
                wake.clear()
                view = await self.view(seat)
                if view.key() != last.key() or loop.time() - last_sent >= refresh_s:
                    last, last_sent = view, loop.time()
                    yield view
                else:
                    yield None
        finally:
            remove()
