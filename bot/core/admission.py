"""Admission: check a submit against the limits, hold its cost and queue it, or refuse it
having charged nothing. A job's mode sets its cost (`credits.mode_cost`) and its queue; relax
jobs also pass the relax switch of their server and the relax caps (bot/core/modes.py)."""

from __future__ import annotations

import asyncio
import collections
import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bot.config import SchedulerConfig
from bot.core.clock import Clock, next_utc_midnight, to_db
from bot.core.credits import CreditsService, check_user_id, describe_wait, mode_cost
from bot.core.db import Database, Transaction
from bot.core.fairness import QueueEntry
from bot.core.jobs import StoredInputs, save_input_image
from bot.core.models import (
    EXPIRED_MESSAGE,
    Job,
    JobKind,
    JobState,
    Mode,
    Owner,
    RefusalCode,
    Refused,
)
from bot.core.modes import ModeStore, relax_off_text
from bot.core.state import QueueState
from generation.contract import GenerationRequest
from generation.contract import JobKind as GenerationKind

_KIND_FOR = {
    JobKind.IMAGINE: GenerationKind.IMAGINE,
    JobKind.VARIATION: GenerationKind.VARIATION,
    JobKind.UPSCALE: GenerationKind.UPSCALE,
    JobKind.ZOOM: GenerationKind.ZOOM,
    JobKind.PAN: GenerationKind.PAN,
    JobKind.SQUARE: GenerationKind.SQUARE,
    JobKind.REGION: GenerationKind.REGION,
    JobKind.DESCRIBE: GenerationKind.DESCRIBE,
    JobKind.SHORTEN: GenerationKind.SHORTEN,
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
        modes: ModeStore,
    ) -> None:
        self._db = db
        self._credits = credits
        self._state = state
        self._config = config
        self._clock = clock
        self._data_dir = data_dir
        self._modes = modes
        # Submits between the in-memory limit check and their transaction's commit (all, and
        # the relax ones).
        self._in_flight: collections.Counter[int] = collections.Counter()
        self._relax_in_flight: collections.Counter[int] = collections.Counter()

    def tier_for(self, owner: Owner) -> int:
        tiers = [self._config.user_tiers.get(owner.user_id, 0)]
        tiers += [self._config.role_tiers.get(r, 0) for r in owner.role_ids]
        return max(tiers)

    async def submit_many(
        self,
        owner: Owner,
        requests: Sequence[GenerationRequest],
        kind: JobKind = JobKind.IMAGINE,
        parent: tuple[int, int | None] | None = None,
        mode: Mode = Mode.FAST,
    ) -> list[Job]:
        """Queue every request as its own job, or none: the limits apply to all of them
        together, and their costs are held in the same transaction that queues them."""
        check_user_id(owner.user_id, "owner.user_id")
        kind = JobKind(kind)
        mode = Mode(mode)
        requests = list(requests)
        if not requests:
            raise ValueError("requests: at least one request is needed")
        if kind in (JobKind.REROLL, JobKind.ENHANCE):
            # Made from another job's request, whatever its kind.
            if parent is None:
                raise ValueError(f"parent: a {kind.value} needs the job it comes from")
        elif any(request.kind is not _KIND_FOR[kind] for request in requests):
            raise ValueError(f"kind: a {kind.value} job needs a {_KIND_FOR[kind].value} request")
        self._refuse_if_closed()
        # The same limits are checked again inside the transaction, which is authoritative; this
        # in-memory look first (counting submits still waiting for the database as queued)
        # makes a refusal under load immediate instead of waiting behind everyone else's work.
        user = owner.user_id
        fair = self._state.fair
        self._refuse_if_full(
            len(requests),
            user_queued=fair.count(user) + self._in_flight[user],
            total_queued=len(fair) + self._in_flight.total(),
        )
        relax = len(requests) if mode is Mode.RELAX else 0
        if relax:
            self._refuse_relax_queued(
                relax, fair.count(user, Mode.RELAX) + self._relax_in_flight[user]
            )
        self._in_flight[user] += len(requests)
        self._relax_in_flight[user] += relax
        costs = self._costs(requests, mode)
        if mode is Mode.TURBO and not any(costs):
            # Turbo sells a place ahead of every fast job; a job that is free in fast mode
            # would get it for nothing (a member with no credits jumping every paying one).
            mode = Mode.FAST
        tier = self.tier_for(owner)
        try:
            stored = await self._save_inputs(requests, parent)
            transaction = asyncio.ensure_future(
                self._db.transaction(
                    lambda txn: self._submit_in(
                        txn, owner, requests, kind, parent, costs, tier, stored, mode
                    )
                )
            )
            try:
                return await asyncio.shield(transaction)
            except BaseException:
                self._discard_unless_committed(transaction, stored)
                raise
        finally:
            self._in_flight[user] -= len(requests)
            if not self._in_flight[user]:
                del self._in_flight[user]
            self._relax_in_flight[user] -= relax
            if not self._relax_in_flight[user]:
                del self._relax_in_flight[user]

    def _costs(self, requests: Sequence[GenerationRequest], mode: Mode) -> list[int]:
        return [
            mode_cost(self._credits.cost(request), mode, self._modes.config) for request in requests
        ]

    async def check(
        self, owner: Owner, requests: Sequence[GenerationRequest], mode: Mode = Mode.FAST
    ) -> None:
        """Refuse, as `submit_many` would, requests that can't be queued now (the queue is
        paused or closing, the member's or the bot's queue is full, the member is banned or
        has too few credits), without holding or queueing anything. A command looks before it
        fetches a member's pictures, so a refusal costs no download or decoding; `submit_many`
        checks again, authoritatively, afterwards."""
        check_user_id(owner.user_id, "owner.user_id")
        if not requests:
            raise ValueError("requests: at least one request is needed")
        self._refuse_if_closed()
        user = owner.user_id
        fair = self._state.fair
        self._refuse_if_full(
            len(requests),
            user_queued=fair.count(user) + self._in_flight[user],
            total_queued=len(fair) + self._in_flight.total(),
        )
        mode = Mode(mode)
        if mode is Mode.RELAX:
            self._refuse_relax_queued(
                len(requests), fair.count(user, Mode.RELAX) + self._relax_in_flight[user]
            )
        total = sum(self._costs(requests, mode))

        async def look(txn: Transaction) -> None:
            state = await self._credits.touch(txn, user, owner.role_ids)
            if state["banned"]:
                raise Refused("You are banned from using this bot.", RefusalCode.BANNED)
            if mode is Mode.RELAX:
                await self._check_relax_in(txn, owner, len(requests), state["allowance_day"])
            if int(state["allowance_left"]) + int(state["granted"]) < total:
                raise self._insufficient(total, state, requests, mode)

        await self._db.transaction(look)

    def _refuse_if_closed(self) -> None:
        if self._state.closing:
            raise Refused("The bot is restarting — try again in a minute.", RefusalCode.CLOSING)
        if self._state.paused:
            raise Refused("The queue is paused by an admin.", RefusalCode.PAUSED)

    async def _save_inputs(
        self, requests: Sequence[GenerationRequest], parent: tuple[int, int | None] | None
    ) -> list[StoredInputs]:
        """Store each request's pictures as input files. A U/V press or a reroll refers to its
        parent's source image instead; only an image that comes from nowhere else is stored.
        The member's own pictures (`request.inputs`) always belong to the job that has them."""
        stored: list[StoredInputs] = []
        try:
            for request in requests:
                init_path = None
                if request.init_image is not None and parent is None:
                    init_path = await asyncio.to_thread(
                        save_input_image, request.init_image, self._data_dir
                    )
                data = request.to_json()
                stored.append(StoredInputs(init_path, data))
                for described, given in zip(data["inputs"], request.inputs, strict=True):
                    described["path"] = await asyncio.to_thread(
                        save_input_image, given.image, self._data_dir
                    )
        except BaseException:
            for path in (p for entry in stored for p in entry.paths()):
                (self._data_dir / path).unlink(missing_ok=True)
            raise
        return stored

    def _discard_unless_committed(
        self, transaction: asyncio.Future[list[Job]], stored: Sequence[StoredInputs]
    ) -> None:
        """The input files belong to the jobs once their transaction commits, even when our
        caller was cancelled meanwhile; they go only when the transaction failed."""
        paths = [path for entry in stored for path in entry.paths()]
        if not paths:
            return

        def discard(done: asyncio.Future[list[Job]]) -> None:
            if done.cancelled() or done.exception() is not None:
                for path in paths:
                    (self._data_dir / path).unlink(missing_ok=True)

        if transaction.done():
            discard(transaction)
        else:
            transaction.add_done_callback(discard)

    def _insufficient(
        self,
        total: int,
        state: dict[str, Any],
        requests: Sequence[GenerationRequest],
        mode: Mode,
    ) -> Refused:
        """Too few credits; in turbo, saying so and what fast mode would cost, since the price
        the member sees is a multiple of the one /help lists."""
        refused = self._credits.insufficient(total, state, len(requests))
        if mode is not Mode.TURBO:
            return refused
        fast = sum(self._credits.cost(request) for request in requests)
        percent = self._modes.config.turbo_cost_percent
        return Refused(
            f"{refused.reason} Turbo costs {percent} % of the fast price; in fast mode "
            f"(/fast or --fast) {'it costs' if len(requests) == 1 else 'they cost'} {fast}.",
            refused.code,
        )

    def _refuse_relax_queued(self, wanted: int, relax_queued: int) -> None:
        limit = self._modes.config.relax_max_queued_per_user
        if relax_queued + wanted > limit:
            jobs = "job" if relax_queued == 1 else "jobs"
            making = f"This prompt makes {wanted} relax jobs, and you" if wanted > 1 else "You"
            raise Refused(
                f"{making} already have {relax_queued} relax {jobs} waiting (limit {limit}); "
                "wait for one to start, or use --fast.",
                RefusalCode.RELAX_LIMIT,
            )

    async def _check_relax_in(self, txn: Transaction, owner: Owner, wanted: int, day: str) -> None:
        """The relax switch of the member's server and the relax caps, inside the submit's
        transaction (the authoritative look: another process's rows count too). `day`: the
        UTC day the submit charges its jobs to (`hold_day`), counted against."""
        if not await self._modes.relax_enabled_in(txn, owner.guild_id):
            raise Refused(relax_off_text(owner.guild_id), RefusalCode.RELAX_OFF)
        today, queued = await self._modes.relax_counts_in(txn, owner.user_id, day)
        self._refuse_relax_queued(wanted, queued)
        per_day = self._modes.config.relax_max_per_day
        if today + wanted > per_day:
            now = self._clock()
            wait = describe_wait(next_utc_midnight(now), now)
            left = max(0, per_day - today)
            what = f"this prompt makes {wanted} and you have {left} left" if left else "none left"
            raise Refused(
                f"Relax limit reached: {per_day} relax jobs a day, {what} (it resets in {wait}, "
                "at 00:00 UTC); use --fast to run it with credits.",
                RefusalCode.RELAX_LIMIT,
            )

    def _refuse_if_full(self, wanted: int, user_queued: int, total_queued: int) -> None:
        """Refuse `wanted` more jobs of one user, all together, when they don't all fit."""
        limit = self._config.max_queued_per_user
        if user_queued + wanted > limit:
            room = max(0, limit - user_queued)
            jobs = "job" if user_queued == 1 else "jobs"
            if wanted == 1 or room == 0:
                making = f"This prompt makes {wanted} jobs, and you" if wanted > 1 else "You"
                raise Refused(
                    f"{making} already have {user_queued} {jobs} queued (limit {limit}); "
                    "wait for one to start.",
                    RefusalCode.USER_QUEUE_FULL,
                )
            more = " more" if user_queued else ""
            raise Refused(
                f"This prompt makes {wanted} jobs but you can queue {room}{more} (limit {limit}).",
                RefusalCode.USER_QUEUE_FULL,
            )
        max_queue = self._config.max_queue
        if total_queued + wanted > max_queue:
            room = max(0, max_queue - total_queued)
            if wanted == 1 or room == 0:
                raise Refused(
                    f"The queue is full ({max_queue} jobs) — try again in a minute.",
                    RefusalCode.QUEUE_FULL,
                )
            raise Refused(
                f"This prompt makes {wanted} jobs but the queue has room for {room} more "
                f"({max_queue} jobs at most) — try again in a minute.",
                RefusalCode.QUEUE_FULL,
            )

    async def _submit_in(
        self,
        txn: Transaction,
        owner: Owner,
        requests: Sequence[GenerationRequest],
        kind: JobKind,
        parent: tuple[int, int | None] | None,
        costs: Sequence[int],
        tier: int,
        stored: Sequence[StoredInputs],
        mode: Mode,
    ) -> list[Job]:
        user = owner.user_id
        state = await self._credits.touch(txn, user, owner.role_ids)
        if state["banned"]:
            raise Refused("You are banned from using this bot.", RefusalCode.BANNED)
        if mode is Mode.RELAX:
            await self._check_relax_in(txn, owner, len(requests), state["allowance_day"])
        parent_image = await self._parent_image(txn, parent) if parent is not None else None
        counts = await txn.fetchone(
            "SELECT COUNT(*), COALESCE(SUM(user_id = ?), 0) FROM jobs WHERE state = 'queued'",
            (user,),
        )
        assert counts is not None
        self._refuse_if_full(len(requests), user_queued=int(counts[1]), total_queued=int(counts[0]))
        total = sum(costs)
        if int(state["allowance_left"]) + int(state["granted"]) < total:
            raise self._insufficient(total, state, requests, mode)
        now = self._clock()
        jobs = []
        for cost, inputs in zip(costs, stored, strict=True):
            init_path = inputs.init_path
            if parent is not None:
                init_path = parent_image
            split = await self._credits.hold(txn, user, cost)
            if split is None:
                # Unreachable after the check above; raising rolls back every earlier hold.
                raise self._insufficient(total, state, requests, mode)
            job_id = await txn.insert(
                "INSERT INTO jobs (user_id, guild_id, channel_id, kind, parent_job_id, "
                "parent_index, request, init_image_path, state, attempts, cost, hold_allowance, "
                "hold_granted, hold_day, tier, created_at, mode) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?, ?)",
                (
                    user,
                    owner.guild_id,
                    owner.channel_id,
                    kind.value,
                    parent[0] if parent else None,
                    parent[1] if parent else None,
                    json.dumps(inputs.request_data),
                    init_path,
                    cost,
                    split[0],
                    split[1],
                    state["allowance_day"],
                    tier,
                    to_db(now),
                    mode.value,
                ),
            )
            await self._credits.record_hold(
                txn, user, job_id, split, f"{kind.value} job {job_id} ({mode.value})"
            )
            entry = QueueEntry(
                job_id=job_id, user_id=user, enqueued_at=now.timestamp(), tier=tier, mode=mode
            )
            txn.after_commit(functools.partial(self._state.enqueue, entry))
            jobs.append(
                Job(
                    id=job_id,
                    owner=Owner(owner.user_id, owner.guild_id, owner.channel_id),
                    kind=kind,
                    request_data=inputs.request_data,
                    state=JobState.QUEUED,
                    cost=cost,
                    attempts=0,
                    created_at=now,
                    parent_job_id=parent[0] if parent else None,
                    parent_index=parent[1] if parent else None,
                    init_image_path=init_path,
                    tier=tier,
                    mode=mode,
                )
            )
        return jobs

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
