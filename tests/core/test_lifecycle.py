"""How a job ends: one place settles or refunds it, whatever races with what."""

from __future__ import annotations

import pytest

from bot.core import Core, JobState, LedgerKind, Owner
from tests.core.conftest import assert_consistent, finished, request

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)


async def test_an_undeliverable_result_is_refunded_once_and_not_retried(core: Core) -> None:
    job = await core.scheduler.submit(ALICE, request())
    done = await finished(core, job.id)
    assert done.state is JobState.SUCCEEDED
    assert (await core.credits.balance(ALICE.user_id)).available == 20 - job.cost
    assert [j.id for j in await core.jobs.undelivered()] == [job.id]
    # The front end claimed the delivery, then found it can never post there.
    assert await core.jobs.claim_delivery(job.id)

    refunded = await core.scheduler.refund_undelivered(job.id, "missing Attach Files")
    assert refunded == job.cost
    assert await core.scheduler.refund_undelivered(job.id, "missing Attach Files") == 0

    assert (await core.credits.balance(ALICE.user_id)).available == 20
    kinds = [e.kind for e in await core.credits.ledger(ALICE.user_id)]
    assert kinds[:3] == [LedgerKind.REFUND, LedgerKind.SETTLE, LedgerKind.HOLD]
    assert await core.jobs.undelivered() == []
    result = (await core.jobs.deliveries(job.id))["result"]
    assert result.state == "undelivered" and result.info["reason"] == "missing Attach Files"
    assert (await core.jobs.require(job.id)).state is JobState.SUCCEEDED
    await assert_consistent(core)


async def test_an_undeliverable_failure_is_not_refunded_twice(core: Core) -> None:
    job = await core.scheduler.submit(ALICE, request("[raise] a fox"))
    assert (await finished(core, job.id)).state is JobState.FAILED
    assert await core.scheduler.refund_undelivered(job.id, "missing Send Messages") == 0
    assert (await core.credits.balance(ALICE.user_id)).available == 20
    assert await core.jobs.undelivered() == []
    await assert_consistent(core)


async def test_refund_undelivered_refuses_an_active_or_unknown_job(core: Core) -> None:
    with pytest.raises(LookupError):
        await core.scheduler.refund_undelivered(999, "gone")
    job = await core.scheduler.submit(ALICE, request("[slow] a fox", steps=50))
    with pytest.raises(ValueError, match="job_id"):
        await core.scheduler.refund_undelivered(job.id, "too early")
    await core.scheduler.cancel(job.id)
    await finished(core, job.id)
    await assert_consistent(core)
