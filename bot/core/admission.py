"""Admission: check a submit against the limits, hold its cost and queue it, or refuse it
having charged nothing."""

from __future__ import annotations

import asyncio
import collections
import json
from pathlib import Path

from bot.config import SchedulerConfig
from bot.core.clock import Clock, to_db
from bot.core.credits import CreditsService, check_user_id
from bot.core.db import Database, Transaction
from bot.core.fairness import QueueEntry
from bot.core.jobs import save_input_image
from bot.core.models import (
    EXPIRED_MESSAGE,
    Job,
    JobKind,
    JobState,
    Owner,
    RefusalCode,
    Refused,
)
from bot.core.state import QueueState
from generation.contract import GenerationRequest
from generation.contract import JobKind as GenerationKind

_KIND_FOR = {
    JobKind.IMAGINE: GenerationKind.IMAGINE,
    JobKind.VARIATION: GenerationKind.VARIATION,
    JobKind.UPSCALE: GenerationKind.UPSCALE,
}


class Admission:
    def __init__(
        self,
        db: Database,
        credits: CreditsService,
        state: QueueState,
        config: SchedulerConfig,
        clock: Clock,
        data_dir: Path,
    ) -> None:
        self._db = db
        self._credits = credits
        self._state = state
        self._config = config
        self._clock = clock
        self._data_dir = data_dir
        # Submits between the in-memory limit check and their transaction's commit.
        self._in_flight: collections.Counter[int] = collections.Counter()

    def tier_for(self, owner: Owner) -> int:
        tiers = [self._config.user_tiers.get(owner.user_id, 0)]
        tiers += [self._config.role_tiers.get(r, 0) for r in owner.role_ids]
        return max(tiers)

    async def submit(
        self,
        owner: Owner,
        request: GenerationRequest,
        kind: JobKind = JobKind.IMAGINE,
        parent: tuple[int, int | None] | None = None,
    ) -> Job:
        check_user_id(owner.user_id, "owner.user_id")
        kind = JobKind(kind)
        if kind is JobKind.REROLL:
            if parent is None:
                raise ValueError("parent: a reroll needs the job it rerolls")
        elif request.kind is not _KIND_FOR[kind]:
            raise ValueError(f"kind: a {kind.value} job needs a {_KIND_FOR[kind].value} request")
        if self._state.closing:
            raise Refused("The bot is restarting — try again in a minute.", RefusalCode.CLOSING)
        if self._state.paused:
            raise Refused("The queue is paused by an admin.", RefusalCode.PAUSED)
        # The same limits are checked again inside the transaction, which is authoritative; this
        # in-memory look first (counting submits still waiting for the database as queued)
        # makes a refusal under load immediate instead of waiting behind everyone else's work.
        user = owner.user_id
        fair = self._state.fair
        self._refuse_if_full(
            user,
            user_queued=fair.count(user) + self._in_flight[user],
            total_queued=len(fair) + self._in_flight.total(),
        )
        self._in_flight[user] += 1
        cost = self._credits.cost(request)
        tier = self.tier_for(owner)
        try:
            # A U/V press or a reroll refers to its parent's image; only a source image that
            # comes from nowhere else is stored as a new input file.
            init_path = None
            if request.init_image is not None and parent is None:
                init_path = await asyncio.to_thread(
                    save_input_image, request.init_image, self._data_dir
                )
            transaction = asyncio.ensure_future(
                self._db.transaction(
                    lambda txn: self._submit_in(
                        txn, owner, request, kind, parent, cost, tier, init_path
                    )
                )
            )
            try:
                return await asyncio.shield(transaction)
            except BaseException:
                if init_path is not None:
                    self._discard_unless_committed(transaction, init_path)
                raise
        finally:
            self._in_flight[user] -= 1
            if not self._in_flight[user]:
                del self._in_flight[user]

    def _discard_unless_committed(self, transaction: asyncio.Future[Job], init_path: str) -> None:
        """The input file belongs to the job once its transaction commits, even when our caller
        was cancelled meanwhile; it goes only when the transaction failed."""

        def discard(done: asyncio.Future[Job]) -> None:
            if done.cancelled() or done.exception() is not None:
                (self._data_dir / init_path).unlink(missing_ok=True)

        if transaction.done():
            discard(transaction)
        else:
            transaction.add_done_callback(discard)

    def _refuse_if_full(self, user_id: int, user_queued: int, total_queued: int) -> None:
        limit = self._config.max_queued_per_user
        if user_queued >= limit:
            jobs = "job" if user_queued == 1 else "jobs"
            raise Refused(
                f"You already have {user_queued} {jobs} queued (limit {limit}); "
                "wait for one to start.",
                RefusalCode.USER_QUEUE_FULL,
            )
        if total_queued >= self._config.max_queue:
            raise Refused(
                f"The queue is full ({self._config.max_queue} jobs) — try again in a minute.",
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
        state = await self._credits.touch(txn, user, owner.role_ids)
        if state["banned"]:
            raise Refused("You are banned from using this bot.", RefusalCode.BANNED)
        if parent is not None:
            init_path = await self._parent_image(txn, parent)
        counts = await txn.fetchone(
            "SELECT COUNT(*), COALESCE(SUM(user_id = ?), 0) FROM jobs WHERE state = 'queued'",
            (user,),
        )
        assert counts is not None
        self._refuse_if_full(user, user_queued=int(counts[1]), total_queued=int(counts[0]))
        split = await self._credits.hold(txn, user, cost)
        if split is None:
            raise self._credits.insufficient(cost, state)
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
        await self._credits.record_hold(txn, user, job_id, split, f"{kind.value} job {job_id}")
        entry = QueueEntry(job_id=job_id, user_id=user, enqueued_at=now.timestamp(), tier=tier)
        txn.after_commit(lambda: self._state.enqueue(entry))
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

    async def _parent_image(self, txn: Transaction, parent: tuple[int, int | None]) -> str | None:
        """Check the parent job and return the source image a child job refers to: image
        `index` of its result for U/V, the parent's own source image for a reroll."""
        job_id, index = parent
        row = await txn.fetchone(
            "SELECT state, result, init_image_path, images_expired_at FROM jobs WHERE id = ?",
            (job_id,),
        )
        if row is None:
            raise Refused(f"Job {job_id} does not exist.", RefusalCode.INVALID)
        if row["images_expired_at"] is not None:
            raise Refused(EXPIRED_MESSAGE, RefusalCode.INVALID)
        if index is None:
            return None if row["init_image_path"] is None else str(row["init_image_path"])
        if row["state"] != JobState.SUCCEEDED.value or not row["result"]:
            raise Refused(f"Job {job_id} has no images to use.", RefusalCode.INVALID)
        paths = json.loads(row["result"])["image_paths"]
        if not 0 <= index < len(paths):
            raise Refused(
                f"Job {job_id} has {len(paths)} images; there is no image {index + 1}.",
                RefusalCode.INVALID,
            )
        return str(paths[index])
