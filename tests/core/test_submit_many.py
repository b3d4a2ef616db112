"""Several jobs from one request (permutations, --repeat): all queued and held, or none."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.core import Core, JobState, LedgerKind, Owner, RefusalCode, Refused
from bot.core.db import Transaction
from generation.contract import GenerationRequest
from generation.requests import variation_request
from tests.core.conftest import (
    assert_consistent,
    finished,
    make_config,
    open_core,
    queue_behind_its_back,
    request,
)
from tests.core.test_scheduler import StalledWorker

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
BOB = Owner(user_id=202, guild_id=1, channel_id=2)


def priced(prompt: str = "a red fox", **changes: Any) -> GenerationRequest:
    """A request that costs 4 credits (512², 30 steps, 8 candidates at cost_imagine 4)."""
    return request(prompt, width=512, height=512, steps=30, num_candidates=8, **changes)


def batch(count: int, **changes: Any) -> list[GenerationRequest]:
    return [priced(f"a bird, colour {index}", seed=index + 1, **changes) for index in range(count)]


async def stalled_core(
    tmp_path: Path,
    scheduler: dict[str, Any] | None = None,
    credits: dict[str, Any] | None = None,
) -> Core:
    """A core whose worker never starts: everything submitted stays queued."""
    config = make_config(tmp_path, scheduler=scheduler, credits=credits)
    return await open_core(config, workers=[StalledWorker()])


async def ledger_kinds(core: Core, user_id: int) -> list[LedgerKind]:
    return [entry.kind for entry in reversed(await core.credits.ledger(user_id))]


async def test_a_batch_is_queued_in_order_with_one_hold_per_job(tmp_path: Path) -> None:
    core = await stalled_core(tmp_path, scheduler={"max_queued_per_user": 5})
    try:
        jobs = await core.scheduler.submit_many(ALICE, batch(4))
        assert [job.request_data["prompt"] for job in jobs] == [
            f"a bird, colour {index}" for index in range(4)
        ]
        assert [job.id for job in jobs] == sorted(job.id for job in jobs)
        assert all(job.state is JobState.QUEUED and job.cost == 4 for job in jobs)
        assert [core.scheduler.queue_position(job.id) for job in jobs] == [1, 2, 3, 4]
        balance = await core.credits.balance(ALICE.user_id)
        assert (balance.available, balance.held) == (20 - 16, 16)
        ledger = await core.credits.ledger(ALICE.user_id)
        holds = [entry for entry in ledger if entry.kind is LedgerKind.HOLD]
        assert sorted((entry.job_id, entry.amount) for entry in holds) == [
            (job.id, -4) for job in jobs
        ]
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_a_short_balance_refuses_the_whole_batch_and_charges_nothing(
    tmp_path: Path,
) -> None:
    core = await stalled_core(
        tmp_path, scheduler={"max_queued_per_user": 5}, credits={"daily_allowance": 10}
    )
    try:
        # Two of the three would fit: none is queued.
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit_many(ALICE, batch(3))
        assert refused.value.code is RefusalCode.INSUFFICIENT_CREDITS
        assert refused.value.reason.startswith(
            "Not enough credits: these 3 jobs cost 12, you have 10 "
        )
        assert await core.jobs.for_user(ALICE.user_id) == []
        assert core.scheduler.queued_count == 0
        assert (await core.credits.balance(ALICE.user_id)).available == 10
        assert await ledger_kinds(core, ALICE.user_id) == [LedgerKind.ALLOWANCE_TOPUP]

        jobs = await core.scheduler.submit_many(ALICE, batch(2))
        assert len(jobs) == 2
        assert (await core.credits.balance(ALICE.user_id)).available == 2
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_the_member_queue_limit_applies_to_the_whole_batch(tmp_path: Path) -> None:
    core = await stalled_core(tmp_path, scheduler={"max_queued_per_user": 3})
    try:
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit_many(BOB, batch(4))
        assert refused.value.reason == "This prompt makes 4 jobs but you can queue 3 (limit 3)."

        await core.scheduler.submit(ALICE, priced())
        before = await core.credits.balance(ALICE.user_id)
        ledger_before = await core.credits.ledger(ALICE.user_id)
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit_many(ALICE, batch(4))
        assert refused.value.code is RefusalCode.USER_QUEUE_FULL
        assert refused.value.reason == (
            "This prompt makes 4 jobs but you can queue 2 more (limit 3)."
        )
        assert await core.credits.balance(ALICE.user_id) == before
        assert await core.credits.ledger(ALICE.user_id) == ledger_before
        assert core.scheduler.queued_count == 1

        assert len(await core.scheduler.submit_many(ALICE, batch(2))) == 2
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit_many(ALICE, batch(2))
        assert refused.value.reason == (
            "This prompt makes 2 jobs, and you already have 3 jobs queued (limit 3); "
            "wait for one to start."
        )
        assert core.scheduler.queued_count == 3
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_the_global_queue_limit_applies_to_the_whole_batch(tmp_path: Path) -> None:
    core = await stalled_core(tmp_path, scheduler={"max_queued_per_user": 10, "max_queue": 5})
    try:
        await core.scheduler.submit_many(BOB, batch(3))
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit_many(ALICE, batch(3))
        assert refused.value.code is RefusalCode.QUEUE_FULL
        assert refused.value.reason == (
            "This prompt makes 3 jobs but the queue has room for 2 more (5 jobs at most) — "
            "try again in a minute."
        )
        assert await core.jobs.for_user(ALICE.user_id) == []
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        assert len(await core.scheduler.submit_many(ALICE, batch(2))) == 2
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_the_limit_inside_the_transaction_counts_the_whole_batch(tmp_path: Path) -> None:
    config = make_config(tmp_path, scheduler={"max_queued_per_user": 3})
    core = await open_core(config, workers=[StalledWorker()])
    try:
        # Queued rows this process has not loaded: only the check in the transaction sees them.
        await queue_behind_its_back(config, ALICE.user_id, 2)
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit_many(ALICE, batch(2))
        assert refused.value.reason == (
            "This prompt makes 2 jobs but you can queue 1 more (limit 3)."
        )
        assert (await core.credits.balance(ALICE.user_id)).available == 20
    finally:
        await core.close(0.5)


async def test_two_batches_at_once_never_share_the_last_places(tmp_path: Path) -> None:
    core = await stalled_core(tmp_path, scheduler={"max_queued_per_user": 3})
    try:
        outcomes = await asyncio.gather(
            core.scheduler.submit_many(ALICE, batch(2)),
            core.scheduler.submit_many(ALICE, batch(2)),
            return_exceptions=True,
        )
        accepted = [o for o in outcomes if isinstance(o, list)]
        refused = [o for o in outcomes if isinstance(o, Refused)]
        assert len(accepted) == 1 and len(refused) == 1, outcomes
        assert core.scheduler.queued_count == 2
        assert (await core.credits.balance(ALICE.user_id)).available == 20 - 8
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_a_failure_while_queueing_a_later_job_leaves_nothing_held(tmp_path: Path) -> None:
    core = await stalled_core(tmp_path, scheduler={"max_queued_per_user": 5})
    try:

        async def fail_the_third_insert(txn: Transaction) -> None:
            await txn.execute(
                "CREATE TRIGGER third_job_fails BEFORE INSERT ON jobs "
                "WHEN (SELECT COUNT(*) FROM jobs) >= 2 "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )

        await core.db.transaction(fail_the_third_insert)
        with pytest.raises(sqlite3.DatabaseError, match="disk is full"):
            await core.scheduler.submit_many(ALICE, batch(3))
        # The first two jobs and their holds were in the same transaction: all rolled back.
        assert await core.jobs.for_user(ALICE.user_id) == []
        assert core.scheduler.queued_count == 0
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        assert LedgerKind.HOLD not in await ledger_kinds(core, ALICE.user_id)
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_cancelling_one_job_of_a_batch_refunds_only_that_job(tmp_path: Path) -> None:
    core = await stalled_core(tmp_path, scheduler={"max_queued_per_user": 5})
    try:
        first, middle, last = await core.scheduler.submit_many(ALICE, batch(3))
        assert (await core.credits.balance(ALICE.user_id)).available == 20 - 12
        assert await core.scheduler.cancel(middle.id, actor_id=ALICE.user_id)
        assert (await core.jobs.require(middle.id)).state is JobState.CANCELLED
        for job in (first, last):
            assert (await core.jobs.require(job.id)).state is JobState.QUEUED
        balance = await core.credits.balance(ALICE.user_id)
        assert (balance.available, balance.held) == (20 - 8, 8)
        refunds = [
            entry
            for entry in await core.credits.ledger(ALICE.user_id)
            if entry.kind is LedgerKind.REFUND
        ]
        assert [(entry.job_id, entry.amount) for entry in refunds] == [(middle.id, 4)]
        assert [core.scheduler.queue_position(job.id) for job in (first, last)] == [1, 2]
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_a_batch_runs_to_the_end_and_each_job_is_settled(core: Core) -> None:
    requests = [request(f"a bird, colour {index}", seed=index + 1) for index in range(3)]
    jobs = await core.scheduler.submit_many(ALICE, requests)
    done = [await finished(core, job.id) for job in jobs]
    assert [job.state for job in done] == [JobState.SUCCEEDED] * 3
    assert [job.result.seeds[0] for job in done if job.result] == [1, 2, 3]
    kinds = await ledger_kinds(core, ALICE.user_id)
    assert kinds.count(LedgerKind.HOLD) == 3 and kinds.count(LedgerKind.SETTLE) == 3
    await assert_consistent(core)


async def test_a_batch_must_hold_requests_of_its_kind(core: Core) -> None:
    with pytest.raises(ValueError, match="requests: at least one"):
        await core.scheduler.submit_many(ALICE, [])
    variation = variation_request(request(), Image.new("RGB", (64, 64)), strength=0.7, seed=5)
    with pytest.raises(ValueError, match="kind: a imagine job needs a imagine request"):
        await core.scheduler.submit_many(ALICE, [request(), variation])
    assert await core.jobs.for_user(ALICE.user_id) == []
