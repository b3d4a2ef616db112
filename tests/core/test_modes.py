"""Relax, Fast and Turbo through the real scheduler, on a real SQLite file: the order jobs start
in, fairness among relax members, what each mode holds and settles, the relax caps and switch,
and a restart keeping every job's mode."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from bot.config import Config, ModesConfig
from bot.core import (
    Core,
    InProcessWorker,
    Job,
    JobEvent,
    JobState,
    LedgerKind,
    ManualClock,
    Mode,
    Owner,
    RefusalCode,
    Refused,
    Started,
    WorkItem,
    WorkOutcome,
)
from bot.core.workers import WorkerCrashed
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request
from tests.core.fakes import create_fake_engine

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
BOB = Owner(user_id=202, guild_id=1, channel_id=2)
CAROL = Owner(user_id=303, guild_id=1, channel_id=2)
DAVE = Owner(user_id=404, guild_id=1, channel_id=2)
ELSEWHERE = Owner(user_id=505, guild_id=9, channel_id=3)
IN_DM = Owner(user_id=606)


class GatedWorker(InProcessWorker):
    """A real in-process worker that becomes ready only when the test opens its gate, so a
    whole queue can be built before anything starts."""

    def __init__(self, config: Config, gate: asyncio.Event) -> None:
        super().__init__(config.engine, config.data_dir, create_fake_engine)
        self.gate = gate

    async def start(self) -> None:
        await self.gate.wait()
        await super().start()


class HeldRunWorker(InProcessWorker):
    """A real in-process worker whose first run of the job named `prompt` waits for `release`
    and then dies as a crashed worker process would (or, with `crash=False`, goes on)."""

    def __init__(self, config: Config, prompt: str, crash: bool = True) -> None:
        super().__init__(config.engine, config.data_dir, create_fake_engine)
        self.prompt = prompt
        self.crash = crash
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.held = False

    async def run(self, item: WorkItem, on_progress: Any, timeout_s: float) -> WorkOutcome:
        if item.request_data["prompt"] == self.prompt and not self.held:
            self.held = True
            self.entered.set()
            await self.release.wait()
            if self.crash:
                raise WorkerCrashed("the worker died")
        return await super().run(item, on_progress, timeout_s)


def modes_config(tmp_path: Path, modes: dict[str, Any] | None = None, **options: Any) -> Config:
    config = make_config(tmp_path, **options)
    return dataclasses.replace(config, modes=ModesConfig(**(modes or {})))


async def gated_core(config: Config, clock: ManualClock) -> tuple[Core, asyncio.Event]:
    gate = asyncio.Event()
    core = await open_core(config, clock, workers=[GatedWorker(config, gate)])
    return core, gate


def start_order(core: Core) -> list[int]:
    order: list[int] = []

    def on_event(event: JobEvent) -> None:
        if isinstance(event, Started) and event.job_id not in order:
            order.append(event.job_id)

    core.scheduler.add_listener(on_event)
    return order


async def test_relax_waits_behind_a_saturating_fast_load_and_runs_when_it_stops(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = modes_config(tmp_path, scheduler={"max_queued_per_user": 10})
    core, gate = await gated_core(config, clock)
    try:
        order = start_order(core)
        # The relax job is the oldest in the queue; every fast job still goes first.
        relax = await core.scheduler.submit(DAVE, request("relax"), mode=Mode.RELAX)
        fast = [
            await core.scheduler.submit(owner, request(f"fast {i}"))
            for i in range(8)
            for owner in (ALICE, BOB, CAROL)
        ]
        waits: list[int] = []

        def fast_waiting_when_relax_starts(event: JobEvent) -> None:
            if isinstance(event, Started) and event.job_id == relax.id:
                waits.append(core.scheduler.waiting(Mode.FAST))

        core.scheduler.add_listener(fast_waiting_when_relax_starts)
        # Expected order: 24 fast jobs, the relax one last; its estimate counts them.
        assert core.scheduler.queue_position(relax.id) == len(fast) + 1
        gate.set()
        done = await finished(core, relax.id)
        assert done.state is JobState.SUCCEEDED and done.mode is Mode.RELAX
        assert order[-1] == relax.id and len(order) == len(fast) + 1
        assert waits == [0]
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_relax_progresses_while_no_fast_job_waits(tmp_path: Path, clock: ManualClock) -> None:
    config = modes_config(
        tmp_path, scheduler={"max_queued_per_user": 5}, modes={"relax_max_queued_per_user": 5}
    )
    core = await open_core(config, clock)
    try:
        jobs = [
            await core.scheduler.submit(DAVE, request(f"r{i}"), mode=Mode.RELAX) for i in range(5)
        ]
        for job in jobs:
            assert (await finished(core, job.id)).state is JobState.SUCCEEDED
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_turbo_goes_before_fast_and_fast_before_relax(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = modes_config(tmp_path, scheduler={"max_queued_per_user": 5})
    core, gate = await gated_core(config, clock)
    try:
        order = start_order(core)
        relax = await core.scheduler.submit(ALICE, request("r"), mode=Mode.RELAX)
        fast = await core.scheduler.submit(BOB, request("f"))
        turbo = await core.scheduler.submit(CAROL, request("t"), mode=Mode.TURBO)
        gate.set()
        await finished(core, relax.id)
        assert order == [turbo.id, fast.id, relax.id]
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_relax_members_share_fairly(tmp_path: Path, clock: ManualClock) -> None:
    config = modes_config(
        tmp_path, scheduler={"max_queued_per_user": 10}, modes={"relax_max_queued_per_user": 6}
    )
    core, gate = await gated_core(config, clock)
    try:
        order = start_order(core)
        alice = [await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX) for _ in range(6)]
        clock.advance(seconds=1)
        bob = [await core.scheduler.submit(BOB, request(), mode=Mode.RELAX) for _ in range(2)]
        gate.set()
        for job in alice + bob:
            await finished(core, job.id)
        # Bob's two jobs don't wait behind Alice's six: they alternate.
        assert order[:4] == [alice[0].id, bob[0].id, alice[1].id, bob[1].id]
        assert order[4:] == [j.id for j in alice[2:]]
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_a_member_with_no_credits_can_relax(tmp_path: Path, clock: ManualClock) -> None:
    config = modes_config(tmp_path, credits={"daily_allowance": 0})
    core = await open_core(config, clock)
    try:
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(ALICE, request())
        assert refused.value.code is RefusalCode.INSUFFICIENT_CREDITS
        job = await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX)
        assert job.cost == 0
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        balance = await core.credits.balance(ALICE.user_id)
        assert balance.available == 0
        rows = [e for e in await core.credits.ledger(ALICE.user_id) if e.job_id == job.id]
        assert sorted(e.kind for e in rows) == [LedgerKind.HOLD, LedgerKind.SETTLE]
        assert all(e.amount == 0 for e in rows)
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_a_relax_fraction_is_held_settled_and_refunded_exactly(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = modes_config(
        tmp_path,
        credits={"daily_allowance": 100, "cost_imagine": 10_000},
        modes={"relax_cost_percent": 25, "relax_max_queued_per_user": 3},
    )
    core = await open_core(config, clock)
    try:
        full = (await core.scheduler.submit(BOB, request())).cost
        relax = await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX)
        # 25 % of the fast cost, rounded down.
        assert relax.cost == full * 25 // 100 and 0 < relax.cost < full
        assert (await finished(core, relax.id)).state is JobState.SUCCEEDED
        assert (await core.credits.balance(ALICE.user_id)).available == 100 - relax.cost

        failing = await core.scheduler.submit(ALICE, request("[raise]"), mode=Mode.RELAX)
        assert failing.cost == relax.cost
        assert (await finished(core, failing.id)).state is JobState.FAILED
        # The failed one's hold came back in full; the succeeded one's stays spent.
        assert (await core.credits.balance(ALICE.user_id)).available == 100 - relax.cost
        refunds = [
            e
            for e in await core.credits.ledger(ALICE.user_id)
            if e.job_id == failing.id and e.kind is LedgerKind.REFUND
        ]
        assert [e.amount for e in refunds] == [failing.cost]
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_turbo_costs_its_multiple_rounded_up(tmp_path: Path, clock: ManualClock) -> None:
    config = modes_config(
        tmp_path, credits={"daily_allowance": 100}, modes={"turbo_cost_percent": 150}
    )
    core = await open_core(config, clock)
    try:
        fast = await core.scheduler.submit(ALICE, request())
        turbo = await core.scheduler.submit(BOB, request(), mode=Mode.TURBO)
        assert turbo.cost == -(-fast.cost * 150 // 100)
        await finished(core, turbo.id)
        assert (await core.credits.balance(BOB.user_id)).available == 100 - turbo.cost
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_relax_caps_refuse_and_charge_nothing(tmp_path: Path, clock: ManualClock) -> None:
    config = modes_config(
        tmp_path,
        scheduler={"max_queued_per_user": 10},
        modes={"relax_max_queued_per_user": 2, "relax_max_per_day": 3},
    )
    core, gate = await gated_core(config, clock)
    try:
        first = [await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX) for _ in range(2)]
        before = await core.credits.ledger(ALICE.user_id, 100)
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX)
        assert refused.value.code is RefusalCode.RELAX_LIMIT
        assert "2 relax jobs waiting (limit 2)" in refused.value.reason
        with pytest.raises(Refused):
            await core.scheduler.check_submit(ALICE, [request()], Mode.RELAX)
        # Fast jobs are not held back by the relax cap.
        await core.scheduler.submit(ALICE, request())
        gate.set()
        for job in first:
            await finished(core, job.id)
        # A failed relax job is not the member's doing: it doesn't count.
        failed = await core.scheduler.submit(ALICE, request("[raise]"), mode=Mode.RELAX)
        assert (await finished(core, failed.id)).state is JobState.FAILED
        third = await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX)
        await finished(core, third.id)
        ledger_before = len(await core.credits.ledger(ALICE.user_id, 100))
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX)
        assert refused.value.code is RefusalCode.RELAX_LIMIT
        assert "3 relax jobs a day" in refused.value.reason
        assert len(await core.credits.ledger(ALICE.user_id, 100)) == ledger_before
        use = await core.scheduler.modes.relax_use(ALICE.user_id, ALICE.guild_id)
        assert (use.today, use.per_day, use.queued) == (3, 3, 0)
        # Another member's day is their own; the next UTC day starts afresh.
        await core.scheduler.submit(BOB, request(), mode=Mode.RELAX)
        clock.advance(days=1)
        again = await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX)
        await finished(core, again.id)
        assert len(before) < len(await core.credits.ledger(ALICE.user_id, 100))
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_a_server_can_switch_relax_off(tmp_path: Path, clock: ManualClock) -> None:
    config = modes_config(tmp_path, modes={"relax_enabled": True})
    core = await open_core(config, clock)
    try:
        modes = core.scheduler.modes
        await modes.set_relax_enabled(1, False, actor_id=ALICE.user_id)
        for check in (
            core.scheduler.submit(ALICE, request(), mode=Mode.RELAX),
            core.scheduler.check_submit(ALICE, [request()], Mode.RELAX),
        ):
            with pytest.raises(Refused) as refused:
                await check
            assert refused.value.code is RefusalCode.RELAX_OFF
            assert "switched off in this server" in refused.value.reason
        assert await core.jobs.for_user(ALICE.user_id) == []
        assert [e for e in await core.credits.ledger(ALICE.user_id, 100) if e.job_id] == []
        # Another server, and a DM (the configured default), still relax; fast still runs here.
        for owner in (ELSEWHERE, IN_DM):
            await finished(
                core, (await core.scheduler.submit(owner, request(), mode=Mode.RELAX)).id
            )
        await finished(core, (await core.scheduler.submit(ALICE, request())).id)
        await modes.set_relax_enabled(1, True, actor_id=ALICE.user_id)
        await finished(core, (await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX)).id)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_relax_off_by_default_in_config(tmp_path: Path, clock: ManualClock) -> None:
    config = modes_config(tmp_path, modes={"relax_enabled": False})
    core = await open_core(config, clock)
    try:
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(IN_DM, request(), mode=Mode.RELAX)
        assert refused.value.code is RefusalCode.RELAX_OFF
        await core.scheduler.modes.set_relax_enabled(1, True, actor_id=None)
        await finished(core, (await core.scheduler.submit(ALICE, request(), mode=Mode.RELAX)).id)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_a_restart_keeps_each_jobs_mode(tmp_path: Path, clock: ManualClock) -> None:
    config = modes_config(tmp_path, scheduler={"max_queued_per_user": 5})
    core, _gate = await gated_core(config, clock)
    relax = await core.scheduler.submit(ALICE, request("relax"), mode=Mode.RELAX)
    interrupted = await core.scheduler.submit(BOB, request("relax 2"), mode=Mode.RELAX)
    fast = await core.scheduler.submit(CAROL, request("fast"))
    await core.close(drain_timeout_s=0.1)

    # As if the previous process died while running the second relax job.
    def crash_mid_run() -> None:
        conn = sqlite3.connect(config.database_path)
        try:
            conn.execute(
                "UPDATE jobs SET state = 'running', attempts = 1 WHERE id = ?", (interrupted.id,)
            )
            conn.commit()
        finally:
            conn.close()

    await asyncio.to_thread(crash_mid_run)
    core, gate = await gated_core(config, clock)
    try:
        order = start_order(core)
        for job in (relax, interrupted):
            stored = await core.jobs.require(job.id)
            assert stored.mode is Mode.RELAX and stored.state is JobState.QUEUED
        assert (await core.jobs.require(fast.id)).mode is Mode.FAST
        # A later fast job still goes ahead of both recovered relax jobs.
        later = await core.scheduler.submit(DAVE, request("later fast"))
        gate.set()
        for job in (relax, interrupted):
            await finished(core, job.id)
        assert order[:2] == [fast.id, later.id]
        assert set(order[2:]) == {relax.id, interrupted.id}
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_expected_wait_counts_the_jobs_ahead(tmp_path: Path, clock: ManualClock) -> None:
    config = modes_config(
        tmp_path, scheduler={"max_queued_per_user": 5}, modes={"wait_estimate_run_s": 40}
    )
    core, gate = await gated_core(config, clock)
    try:
        jobs: list[Job] = [await core.scheduler.submit(ALICE, request()) for _ in range(3)]
        relax = await core.scheduler.submit(BOB, request(), mode=Mode.RELAX)
        # One slot: three fast jobs go through it first, 40 s each.
        assert core.scheduler.expected_wait_s(relax.id) == 120.0
        assert core.scheduler.expected_wait_s(jobs[0].id) == 0.0
        gate.set()
        await finished(core, relax.id)
        assert core.scheduler.expected_wait_s(relax.id) is None
    finally:
        await core.close(drain_timeout_s=2.0)


def test_mode_cost_rounding() -> None:
    from bot.core.credits import mode_cost

    config = ModesConfig(relax_cost_percent=30, turbo_cost_percent=250)
    assert [mode_cost(c, Mode.RELAX, config) for c in (0, 1, 3, 4, 10)] == [0, 0, 0, 1, 3]
    assert [mode_cost(c, Mode.TURBO, config) for c in (0, 1, 3, 4)] == [0, 3, 8, 10]
    assert [mode_cost(c, Mode.FAST, config) for c in (0, 1, 7)] == [0, 1, 7]


async def test_a_crashed_relax_job_goes_back_behind_fast_jobs(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = modes_config(tmp_path)
    worker = HeldRunWorker(config, "relax")
    core = await open_core(config, clock, workers=[worker])
    try:
        starts: list[int] = []
        core.scheduler.add_listener(
            lambda event: starts.append(event.job_id) if isinstance(event, Started) else None
        )
        relax = await core.scheduler.submit(ALICE, request("relax"), mode=Mode.RELAX)
        await worker.entered.wait()
        fast = await core.scheduler.submit(BOB, request("fast"))
        worker.release.set()
        done = await finished(core, relax.id)
        assert done.state is JobState.SUCCEEDED and done.attempts == 2
        # Re-queued in its own mode: the fast job that came meanwhile starts first.
        await finished(core, fast.id)
        assert starts == [relax.id, fast.id, relax.id]
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=2.0)


async def test_expected_wait_counts_the_running_jobs_too(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = modes_config(tmp_path, modes={"wait_estimate_run_s": 40})
    worker = HeldRunWorker(config, "long", crash=False)
    core = await open_core(config, clock, workers=[worker])
    try:
        running = await core.scheduler.submit(ALICE, request("long"))
        await worker.entered.wait()
        relax = await core.scheduler.submit(BOB, request(), mode=Mode.RELAX)
        # The only slot is taken: one run ahead.
        assert core.scheduler.expected_wait_s(relax.id) == 40.0
        worker.release.set()
        await finished(core, running.id)
        await finished(core, relax.id)
    finally:
        await core.close(drain_timeout_s=2.0)
