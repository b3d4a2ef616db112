"""Relax, Fast and Turbo under attack in the core, on a real SQLite file and the real
scheduler: turbo's place in line is never given for nothing, and fan-out can't stretch the
relax caps."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bot.core import JobState, LedgerKind, ManualClock, Mode, RefusalCode, Refused
from tests.core.conftest import assert_consistent, finished, open_core, request
from tests.core.test_modes import (
    ALICE,
    BOB,
    IN_DM,
    HeldRunWorker,
    gated_core,
    modes_config,
    start_order,
)


async def test_a_free_job_asked_in_turbo_runs_as_fast(tmp_path: Path, clock: ManualClock) -> None:
    # Jobs free in fast mode (here every imagine; by default /shorten): turbo of nothing is
    # nothing, so a member with no credits would go ahead of every paying fast member.
    config = modes_config(
        tmp_path,
        scheduler={"max_queued_per_user": 5},
        credits={"daily_allowance": 0, "cost_imagine": 0},
    )
    core, gate = await gated_core(config, clock)
    try:
        order = start_order(core)
        fast = await core.scheduler.submit(BOB, request("f"))
        turbo = await core.scheduler.submit(ALICE, request("t"), mode=Mode.TURBO)
        assert (turbo.mode, turbo.cost) == (Mode.FAST, 0)
        assert core.scheduler.queue_position(fast.id) == 1
        gate.set()
        done = await finished(core, turbo.id)
        assert done.mode is Mode.FAST and done.state is JobState.SUCCEEDED
        assert order == [fast.id, turbo.id]
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_a_paid_turbo_job_stays_turbo(tmp_path: Path, clock: ManualClock) -> None:
    config = modes_config(tmp_path, credits={"daily_allowance": 100})
    core = await open_core(config, clock)
    try:
        turbo = await core.scheduler.submit(ALICE, request(), mode=Mode.TURBO)
        assert turbo.mode is Mode.TURBO and turbo.cost > 0
        await finished(core, turbo.id)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_fan_out_and_cancels_cannot_stretch_the_daily_relax_cap(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = modes_config(
        tmp_path,
        scheduler={"max_queued_per_user": 10},
        modes={"relax_max_queued_per_user": 10, "relax_max_per_day": 3},
    )
    core, gate = await gated_core(config, clock)
    try:
        # Four jobs from one prompt ({a,b} permutations, --repeat) against a day of three.
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit_many(ALICE, [request() for _ in range(4)], mode=Mode.RELAX)
        assert refused.value.code is RefusalCode.RELAX_LIMIT
        assert await core.jobs.for_user(ALICE.user_id) == []
        jobs = await core.scheduler.submit_many(
            ALICE, [request() for _ in range(3)], mode=Mode.RELAX
        )
        # Cancelling queued relax jobs gives no day back.
        for job in jobs:
            await core.scheduler.cancel(job.id, ALICE.user_id)
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX)
        assert refused.value.code is RefusalCode.RELAX_LIMIT
        gate.set()
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_a_share_and_a_multiple_stay_exact_across_a_crash_a_cancel_and_a_restart(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = modes_config(
        tmp_path,
        scheduler={"max_queued_per_user": 5},
        credits={"daily_allowance": 10_000, "cost_imagine": 10_000},
        modes={"relax_cost_percent": 50, "turbo_cost_percent": 150},
    )
    worker = HeldRunWorker(config, "relax")
    core = await open_core(config, clock, workers=[worker])
    try:
        relax = await core.scheduler.submit(ALICE, request("relax"), mode=Mode.RELAX)
        await worker.entered.wait()
        # While the relax job runs (and then crashes), a turbo job waits and is cancelled.
        turbo = await core.scheduler.submit(ALICE, request("turbo"), mode=Mode.TURBO)
        assert 0 < relax.cost < turbo.cost
        assert await core.scheduler.cancel(turbo.id, ALICE.user_id)
        worker.release.set()
        done = await finished(core, relax.id)
        assert done.state is JobState.SUCCEEDED and done.attempts == 2
        assert (await core.credits.balance(ALICE.user_id)).available == 10_000 - relax.cost
        rows = [
            (e.kind, e.amount)
            for e in await core.credits.ledger(ALICE.user_id, 100)
            if e.job_id in (relax.id, turbo.id)
        ]
        # One hold each (the crash re-queued the relax job without holding again); a settle
        # only marks the hold spent.
        assert sorted(rows, key=str) == sorted(
            [
                (LedgerKind.HOLD, -relax.cost),
                (LedgerKind.SETTLE, 0),
                (LedgerKind.HOLD, -turbo.cost),
                (LedgerKind.REFUND, turbo.cost),
            ],
            key=str,
        )
        # A turbo job queued when the bot stops is held once across the restart.
        waiting = await core.scheduler.submit(ALICE, request("waiting"), mode=Mode.TURBO)
    finally:
        await core.close(drain_timeout_s=2.0)
    core = await open_core(config, clock)
    try:
        done = await finished(core, waiting.id)
        assert done.mode is Mode.TURBO and done.cost == waiting.cost
        balance = await core.credits.balance(ALICE.user_id)
        assert balance.available == 10_000 - relax.cost - waiting.cost
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


class MidnightClock(ManualClock):
    """A clock that, once armed, crosses midnight right after its next reading: a submit that
    starts at 23:59:59.999999 and is still in its transaction at 00:00."""

    def __init__(self) -> None:
        super().__init__(datetime(2025, 1, 1, 12, 0, tzinfo=UTC))
        self.armed = False

    def __call__(self) -> datetime:
        now = self.now
        if self.armed:
            self.armed = False
            self.now = datetime(2025, 1, 2, 0, 0, 0, 500, tzinfo=UTC)
        return now


async def test_a_submit_across_midnight_counts_against_the_day_it_is_charged_to(
    tmp_path: Path,
) -> None:
    clock = MidnightClock()
    config = modes_config(
        tmp_path,
        scheduler={"max_queued_per_user": 10},
        modes={"relax_max_queued_per_user": 10, "relax_max_per_day": 2},
    )
    core, gate = await gated_core(config, clock)
    try:
        await core.scheduler.submit_many(ALICE, [request(), request()], mode=Mode.RELAX)
        clock.set(datetime(2025, 1, 1, 23, 59, 59, 999_999, tzinfo=UTC))
        clock.armed = True
        # Allowed or refused, it must not make a third relax job of January 1st.
        try:
            await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX)
        except Refused as refused:
            assert refused.code is RefusalCode.RELAX_LIMIT
        rows = await asyncio.to_thread(
            _read,
            config.database_path,
            "SELECT hold_day, COUNT(*) FROM jobs WHERE mode = 'relax' GROUP BY hold_day",
        )
        assert max(count for _day, count in rows) <= 2, rows
        gate.set()
    finally:
        await core.close(drain_timeout_s=2.0)


def _read(path: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def test_too_few_credits_for_turbo_says_turbo_and_the_fast_price(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = modes_config(tmp_path, credits={"cost_imagine": 10_000})
    core = await open_core(config, clock)
    try:
        fast_cost = core.credits.cost(request())
        config = modes_config(
            tmp_path, credits={"cost_imagine": 10_000, "daily_allowance": fast_cost}
        )
    finally:
        await core.close(drain_timeout_s=2.0)
    core = await open_core(config, clock)
    try:
        for look in (
            core.scheduler.submit(ALICE, request(), mode=Mode.TURBO),
            core.scheduler.check_submit(ALICE, [request()], Mode.TURBO),
        ):
            with pytest.raises(Refused) as refused:
                await look
            assert refused.value.code is RefusalCode.INSUFFICIENT_CREDITS
            reason = refused.value.reason
            assert (
                "turbo" in reason.lower()
                and f"fast mode (/fast or --fast) it costs {fast_cost}" in reason
            )
        assert await core.jobs.for_user(ALICE.user_id) == []
        # The fast price fits, as the refusal said.
        await finished(core, (await core.scheduler.submit(ALICE, request())).id)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_relax_off_in_a_dm_does_not_blame_a_server(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = modes_config(tmp_path, modes={"relax_enabled": False})
    core = await open_core(config, clock)
    try:
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(IN_DM, request(), mode=Mode.RELAX)
        assert refused.value.code is RefusalCode.RELAX_OFF
        assert "server" not in refused.value.reason and "switched off here" in refused.value.reason
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX)
        assert "switched off in this server" in refused.value.reason
    finally:
        await core.close(drain_timeout_s=2.0)
