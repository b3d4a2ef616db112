"""Job events: per-job subscriptions, listeners for every job, and queue positions."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from bot.core.clock import Clock
from bot.core.jobs import JobStore
from bot.core.models import Finished, JobEvent, ProgressUpdate, Queued, Started
from bot.core.state import QueueState

log = logging.getLogger(__name__)

Listener = Callable[[JobEvent], None]
JobEventT = TypeVar("JobEventT", bound=JobEvent)

POSITION_PUBLISH_DELAY_S = 0.2


class Subscription:
    """Events for one job, starting with its current state; ends after `Finished`.

    Use as `async with scheduler.subscribe(job_id) as events: async for event in events: ...`.
    Consecutive progress (and queue position) updates are coalesced, so a slow consumer only
    ever sees the latest one.
    """

    def __init__(self, hub: EventHub, job_id: int, first: JobEvent | None) -> None:
        self.job_id = job_id
        self._hub = hub
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
            # A preview not yet read survives a later update that has none.
            self._pending[-1] = with_last_preview(event, self._pending[-1])
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
            job = await self._hub.jobs.get(self.job_id)
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
        self._hub.unsubscribe(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def with_last_preview(event: JobEventT, previous: JobEvent | None) -> JobEventT:
    """`event`, carrying `previous`'s preview image when it is a progress update without one."""
    if (
        isinstance(event, ProgressUpdate)
        and event.preview_png is None
        and isinstance(previous, ProgressUpdate)
        and previous.preview_png is not None
    ):
        return replace(event, preview_png=previous.preview_png)
    return event


class EventHub:
    def __init__(self, state: QueueState, jobs: JobStore, clock: Clock) -> None:
        self._state = state
        self.jobs = jobs
        self._clock = clock
        self._subscriptions: dict[int, set[Subscription]] = collections.defaultdict(set)
        self._listeners: list[Listener] = []
        self._positions: dict[int, int] = {}
        self._positions_dirty = True
        self._positions_scheduled = False
        self._published: dict[int, int] = {}
        state.queue_changed = self.queue_changed

    def subscribe(self, job_id: int) -> Subscription:
        first: JobEvent | None = None
        record = self._state.running.get(job_id)
        if record is not None and record.job is None:
            first = Queued(job_id, 1)  # picked by the dispatcher, about to start
        elif record is not None and record.job is not None:
            first = record.progress or Started(job_id, record.job.attempts)
        elif job_id in self._state.fair:
            position = self.queue_position(job_id) or 1
            self._published[job_id] = position
            first = Queued(job_id, position)
        subscription = Subscription(self, job_id, first)
        self._subscriptions[job_id].add(subscription)
        if self._state.closing and first is not None:
            subscription._end()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscriptions = self._subscriptions.get(subscription.job_id)
        if subscriptions is not None:
            subscriptions.discard(subscription)
            if not subscriptions:
                del self._subscriptions[subscription.job_id]

    def end_all(self) -> None:
        for subscriptions in list(self._subscriptions.values()):
            for subscription in list(subscriptions):
                subscription._end()

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def emit(self, event: JobEvent) -> None:
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

    def queue_changed(self) -> None:
        self._positions_dirty = True
        # Positions shift for every queued job at each dispatch: publish them only to jobs that
        # someone watches, and coalesce bursts (the front end edits at most every ~2 s anyway).
        if not self._positions_scheduled and self._subscriptions:
            self._positions_scheduled = True
            asyncio.get_running_loop().call_later(POSITION_PUBLISH_DELAY_S, self._publish_positions)

    def _publish_positions(self) -> None:
        self._positions_scheduled = False
        fair = self._state.fair
        watched = [job_id for job_id in self._subscriptions if job_id in fair]
        if not watched:
            return
        positions = self._current_positions()
        for job_id in watched:
            position = positions.get(job_id)
            if position is not None and self._published.get(job_id) != position:
                self._published[job_id] = position
                for subscription in list(self._subscriptions.get(job_id, ())):
                    subscription._push(Queued(job_id, position))
        for job_id in [j for j in self._published if j not in fair]:
            del self._published[job_id]

    def _current_positions(self) -> dict[int, int]:
        if self._positions_dirty:
            order = self._state.fair.order(self._clock().timestamp())
            self._positions = {e.job_id: i for i, e in enumerate(order, start=1)}
            self._positions_dirty = False
        return self._positions

    def queue_position(self, job_id: int) -> int | None:
        return self._current_positions().get(job_id)
