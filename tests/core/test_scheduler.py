"""The scheduler end to end on a real SQLite file, with the fake engine in a worker thread."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from PIL import Image

from bot.core import (
    Core,
    Finished,
    InProcessWorker,
    JobEvent,
    JobKind,
    JobState,
    LedgerKind,
    ManualClock,
    Owner,
    ProgressUpdate,
    Queued,
    RefusalCode,
    Refused,
    Started,
    WorkItem,
    WorkOutcome,
)
from generation.images import read_parameters
from generation.requests import variation_request
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request
from tests.core.fakes import create_fake_engine

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
BOB = Owner(user_id=202, guild_id=1, channel_id=2)


class StalledWorker:
    """A worker whose models never finish loading: everything stays queued."""

    name = "stalled"
    capacity = 1

    async def start(self) -> None:
        await asyncio.Event().wait()

    async def run(self, item: WorkItem, on_progress: object, timeout_s: float) -> WorkOutcome:
        raise AssertionError("a stalled worker runs nothing")

    async def cancel(self, job_id: int) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_a_job_runs_with_events_images_and_a_settled_hold(core: Core) -> None:
    job = await core.scheduler.submit(ALICE, request("a red fox", steps=6))
    assert job.state is JobState.QUEUED and job.cost >= 1
    events: list[JobEvent] = []
    async with core.scheduler.subscribe(job.id) as subscription:
        async for event in subscription:
            events.append(event)
    assert isinstance(events[0], Queued | Started | ProgressUpdate)
    assert any(isinstance(e, ProgressUpdate) for e in events)
    last_progress = [e for e in events if isinstance(e, ProgressUpdate)][-1]
    assert (last_progress.step, last_progress.total) == (6, 6)
    final = events[-1]
    assert isinstance(final, Finished) and final.job.state is JobState.SUCCEEDED

    stored = await core.jobs.require(job.id)
    assert stored.result is not None
    assert len(stored.result.image_paths) == 4
    assert stored.result.seeds == (1, 2, 3, 4)
    assert stored.attempts == 1 and stored.finished_at is not None
    data_dir = core.config.data_dir
    grid = stored.grid_file(data_dir)
    assert grid is not None
    with Image.open(grid) as image:
        assert image.size == (128, 128)
    with Image.open(stored.image_path(data_dir, 1)) as image:
        assert image.size == (64, 64)
        assert "Seed: 2" in (read_parameters(image) or "")
    # Only generated names under the data folder, and no temporaries left behind.
    assert sorted(p.name for p in (data_dir / "images" / str(job.id)).iterdir()) == [
        "0.png",
        "1.png",
        "2.png",
        "3.png",
        "grid.png",
    ]
    kinds = [e.kind for e in await core.credits.ledger(ALICE.user_id)]
    assert kinds[:2] == [LedgerKind.SETTLE, LedgerKind.HOLD]
    balance = await core.credits.balance(ALICE.user_id)
    assert balance.available == 20 - job.cost and balance.held == 0
    await assert_consistent(core)


async def test_a_late_user_runs_within_the_next_two_dispatches(tmp_path: Path) -> None:
    config = make_config(tmp_path, scheduler={"max_queued_per_user": 10}, step_s=0.01)
    core = await open_core(config)
    try:
        started: list[int] = []
        core.scheduler.add_listener(
            lambda e: started.append(e.job_id) if isinstance(e, Started) else None
        )
        a_jobs = [await core.scheduler.submit(ALICE, request(seed=i)) for i in range(10)]
        b_job = await core.scheduler.submit(BOB, request())
        dispatched_before_b = len(started)
        await finished(core, b_job.id)
        position = started.index(b_job.id) - dispatched_before_b + 1
        assert position <= 2, started
        for job in a_jobs:
            await finished(core, job.id)
        assert len(started) == 11
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_waiting_overtakes_a_higher_tier_that_never_stops(
    tmp_path: Path, clock: ManualClock
) -> None:
    high = Owner(user_id=1)
    config = make_config(
        tmp_path,
        scheduler={"user_tiers": {1: 50}, "aging_s": 30.0},
        credits={"daily_allowance": 500},
    )
    core = await open_core(config, clock)
    try:
        order: list[int] = []
        refills: list[asyncio.Task[object]] = []

        def on_event(event: JobEvent) -> None:
            if isinstance(event, Started):
                order.append(event.job_id)
                clock.advance(seconds=10)  # every job takes ten seconds of the core's time
            elif (
                isinstance(event, Finished)
                and event.job.owner.user_id == high.user_id
                and not core.scheduler.paused
            ):
                refills.append(asyncio.ensure_future(core.scheduler.submit(high, request())))

        core.scheduler.add_listener(on_event)
        for _ in range(3):
            await core.scheduler.submit(high, request())
        low_jobs = [await core.scheduler.submit(ALICE, request(seed=s)) for s in (1, 2)]
        await finished(core, low_jobs[1].id)
        # Fair share alone would give the tier-0 user one dispatch in 51.
        assert order.index(low_jobs[1].id) < 10, order
        await core.admin.pause()  # stop the refills
        await asyncio.gather(*refills, return_exceptions=True)
    finally:
        await core.close(2.0)


async def test_limits_refuse_at_once_and_charge_nothing(tmp_path: Path) -> None:
    config = make_config(tmp_path, scheduler={"max_queued_per_user": 3, "max_queue": 5})
    core = await open_core(config, workers=[StalledWorker()])
    try:
        for _ in range(3):
            await core.scheduler.submit(ALICE, request())
        before = await core.credits.balance(ALICE.user_id)
        ledger_before = await core.credits.ledger(ALICE.user_id)
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(ALICE, request())
        assert refused.value.reason == (
            "You already have 3 jobs queued (limit 3); wait for one to start."
        )
        assert refused.value.code is RefusalCode.USER_QUEUE_FULL
        await core.scheduler.submit(BOB, request())
        await core.scheduler.submit(Owner(303), request())
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(Owner(404), request())
        assert refused.value.reason == "The queue is full (5 jobs) — try again in a minute."
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(Owner(505), request(width=2048, height=2048, steps=150))
        assert refused.value.code is RefusalCode.QUEUE_FULL
        assert await core.credits.ledger(404) == [] or all(
            e.kind is LedgerKind.ALLOWANCE_TOPUP for e in await core.credits.ledger(404)
        )
        await core.admin.pause(actor_id=1)
        with pytest.raises(Refused, match="paused by an admin"):
            await core.scheduler.submit(Owner(606), request())
        assert await core.credits.balance(ALICE.user_id) == before
        assert await core.credits.ledger(ALICE.user_id) == ledger_before
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_insufficient_credits_message_says_when_the_allowance_resets(
    tmp_path: Path, clock: ManualClock
) -> None:
    core = await open_core(make_config(tmp_path, credits={"daily_allowance": 2}), clock)
    try:
        expensive = request(width=512, height=512, steps=30, num_candidates=12)
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(ALICE, expensive)
        # 12:00 UTC: twelve hours to go.
        assert refused.value.reason == (
            "Not enough credits: this costs 6, you have 2 (free allowance resets in 12 h)."
        )
        assert (await core.credits.balance(ALICE.user_id)).available == 2
        assert [e.kind for e in await core.credits.ledger(ALICE.user_id)] == [
            LedgerKind.ALLOWANCE_TOPUP
        ]
    finally:
        await core.close(0.5)


@pytest.mark.parametrize(
    ("prompt", "error"),
    [
        ("[raise] a fox", "the generator failed (RuntimeError)"),
        ("[oom] a fox", "the GPU ran out of memory"),
        ("[invalid] a fox", "invalid request: steps:"),
    ],
)
async def test_engine_failures_refund_in_full(core: Core, prompt: str, error: str) -> None:
    await core.admin.grant(ALICE.user_id, 7, actor_id=1)
    before = await core.credits.balance(ALICE.user_id)
    job = await core.scheduler.submit(ALICE, request(prompt))
    done = await finished(core, job.id)
    assert done.state is JobState.FAILED
    assert done.error is not None and done.error.startswith(error)
    after = await core.credits.balance(ALICE.user_id)
    assert (after.allowance_left, after.granted) == (before.allowance_left, before.granted)
    refund = (await core.credits.ledger(ALICE.user_id))[0]
    assert refund.kind is LedgerKind.REFUND and refund.amount == job.cost
    # The worker is still fine.
    ok = await core.scheduler.submit(ALICE, request())
    assert (await finished(core, ok.id)).state is JobState.SUCCEEDED
    await assert_consistent(core)


async def test_timeout_fails_and_refunds(tmp_path: Path) -> None:
    config = make_config(tmp_path, scheduler={"job_timeout_s": 0.3})
    core = await open_core(config)
    try:
        job = await core.scheduler.submit(ALICE, request("[slow] a fox", steps=40))
        done = await finished(core, job.id)
        assert done.state is JobState.FAILED and done.error == "timed out after 0.3 s"
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_cancel_queued_and_running_jobs_refunds(tmp_path: Path) -> None:
    core = await open_core(make_config(tmp_path, scheduler={"max_queued_per_user": 5}))
    try:
        running = await core.scheduler.submit(ALICE, request("[slow] a fox", steps=150))
        queued = await core.scheduler.submit(BOB, request())
        async with core.scheduler.subscribe(running.id) as events:
            async for event in events:
                if isinstance(event, ProgressUpdate):
                    break
        assert await core.scheduler.cancel(queued.id, actor_id=BOB.user_id)
        assert await core.scheduler.cancel(running.id, actor_id=ALICE.user_id)
        assert (await finished(core, queued.id)).state is JobState.CANCELLED
        done = await finished(core, running.id, timeout_s=5)
        assert done.state is JobState.CANCELLED
        for user in (ALICE, BOB):
            assert (await core.credits.balance(user.user_id)).available == 20
        refund = (await core.credits.ledger(ALICE.user_id))[0]
        assert refund.kind is LedgerKind.REFUND and refund.actor_id == ALICE.user_id
        # Cancelling a finished job does nothing.
        assert not await core.scheduler.cancel(running.id)
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_queue_positions_follow_fair_order(tmp_path: Path) -> None:
    core = await open_core(make_config(tmp_path), workers=[StalledWorker()])
    try:
        a = [await core.scheduler.submit(ALICE, request()) for _ in range(3)]
        b = await core.scheduler.submit(BOB, request())
        positions = [core.scheduler.queue_position(j.id) for j in (*a, b)]
        assert positions == [1, 3, 4, 2]
        mine = await core.scheduler.user_jobs(ALICE.user_id)
        assert [(x.job.id, x.position) for x in mine] == [(a[0].id, 1), (a[1].id, 3), (a[2].id, 4)]
        snapshot = await core.admin.queue()
        assert [x.job.id for x in snapshot.queued] == [a[0].id, b.id, a[1].id, a[2].id]
        assert snapshot.running == () and not snapshot.paused

        subscription = core.scheduler.subscribe(a[2].id)
        first = await anext(subscription)
        assert first == Queued(a[2].id, 4)
        await core.scheduler.cancel(b.id)
        update = await asyncio.wait_for(anext(subscription), 2)
        assert update == Queued(a[2].id, 3)
        subscription.close()
    finally:
        await core.close(0.5)


async def test_subscribe_to_finished_and_unknown_jobs(core: Core) -> None:
    job = await core.scheduler.submit(ALICE, request())
    await finished(core, job.id)
    events = [e async for e in core.scheduler.subscribe(job.id)]
    assert len(events) == 1 and isinstance(events[0], Finished)
    with pytest.raises(LookupError):
        await anext(core.scheduler.subscribe(999_999))


async def test_variation_upscale_and_reroll_use_the_parent(core: Core) -> None:
    parent = await core.scheduler.submit(ALICE, request(seed=40))
    await finished(core, parent.id)
    source = await core.jobs.image(parent.id, 1)
    parent_request = await core.jobs.request(parent.id)
    variation = variation_request(parent_request, source, strength=0.7, seed=77)
    job = await core.scheduler.submit(ALICE, variation, JobKind.VARIATION, parent=(parent.id, 1))
    done = await finished(core, job.id)
    assert done.state is JobState.SUCCEEDED
    assert done.parent_job_id == parent.id and done.parent_index == 1
    # The parent's image is referred to, not copied.
    parent_done = await core.jobs.require(parent.id)
    assert parent_done.result is not None
    assert done.init_image_path == parent_done.result.image_paths[1]
    assert not (core.config.data_dir / "images" / "inputs").exists()
    # The stored request round-trips, image included, for the next button press.
    again = await core.jobs.request(done)
    assert again.init_image is not None and again.init_image.size == (64, 64)
    rerolled_variation = await core.scheduler.submit(
        ALICE, again.with_changes(seed=78), JobKind.REROLL, parent=(done.id, None)
    )
    assert rerolled_variation.init_image_path == done.init_image_path
    assert (await finished(core, rerolled_variation.id)).state is JobState.SUCCEEDED
    reroll = await core.scheduler.submit(
        ALICE, parent_request.with_changes(seed=99), JobKind.REROLL, parent=(parent.id, None)
    )
    assert (await finished(core, reroll.id)).result.seeds[0] == 99  # type: ignore[union-attr]
    with pytest.raises(Refused, match="there is no image 5"):
        await core.scheduler.submit(ALICE, variation, JobKind.VARIATION, parent=(parent.id, 4))
    with pytest.raises(ValueError, match=r"^kind:"):
        await core.scheduler.submit(ALICE, variation, JobKind.IMAGINE)
    await assert_consistent(core)


async def test_output_check_refusal_refunds(tmp_path: Path) -> None:
    async def withhold(job: object, outcome: WorkOutcome) -> str | None:
        return "flagged by the image check"

    core = await open_core(make_config(tmp_path), output_check=withhold)
    try:
        job = await core.scheduler.submit(ALICE, request())
        done = await finished(core, job.id)
        assert done.state is JobState.REFUSED and done.error == "flagged by the image check"
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_deliveries_are_claimed_once(core: Core) -> None:
    job = await core.scheduler.submit(ALICE, request())
    await finished(core, job.id)
    assert [j.id for j in await core.jobs.undelivered()] == [job.id]
    await core.jobs.update_delivery(job.id, "progress", {"message_id": 5})
    assert await core.jobs.claim_delivery(job.id)
    assert not await core.jobs.claim_delivery(job.id)
    await core.jobs.complete_delivery(job.id, info={"message_id": 6, "channel_id": 2})
    deliveries = await core.jobs.deliveries(job.id)
    assert deliveries["result"].state == "done"
    assert deliveries["result"].info == {"message_id": 6, "channel_id": 2}
    assert deliveries["progress"].info == {"message_id": 5}
    assert await core.jobs.undelivered() == []


async def test_drained_shutdown_hands_running_jobs_back(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    core = await open_core(config)
    slow = await core.scheduler.submit(ALICE, request("[slow] a fox", steps=150))
    quick_owner = await core.scheduler.submit(BOB, request())
    async with core.scheduler.subscribe(slow.id) as events:
        async for event in events:
            if isinstance(event, ProgressUpdate):
                break
    await core.close(drain_timeout_s=0.2)
    job = await _read_job(config.database_path, slow.id)
    assert job == ("queued", 0)
    assert (await _read_job(config.database_path, quick_owner.id))[0] == "queued"

    reopened = await open_core(config)
    try:
        # The handed-back job is first in line again; cancel it to let the other one run.
        assert await reopened.scheduler.cancel(slow.id)
        assert (await finished(reopened, slow.id)).state is JobState.CANCELLED
        assert (await finished(reopened, quick_owner.id)).state is JobState.SUCCEEDED
        await assert_consistent(reopened)
    finally:
        await reopened.close(0.5)


async def test_drain_lets_a_short_job_finish(tmp_path: Path) -> None:
    core = await open_core(make_config(tmp_path, step_s=0.02))
    job = await core.scheduler.submit(ALICE, request(steps=10))
    async with core.scheduler.subscribe(job.id) as events:
        async for event in events:
            if isinstance(event, ProgressUpdate):
                break
    await core.close(drain_timeout_s=10)
    assert (await _read_job(core.config.database_path, job.id))[0] == "succeeded"


async def test_recovery_requeues_interrupted_jobs_then_gives_up(tmp_path: Path) -> None:
    config = make_config(tmp_path, scheduler={"max_attempts": 2})
    core = await open_core(config, workers=[StalledWorker()])
    retry = await core.scheduler.submit(ALICE, request())
    exhausted = await core.scheduler.submit(BOB, request())
    later = await core.scheduler.submit(ALICE, request())
    await core.close(0.5)
    # What a crash leaves behind: jobs marked running by a process that is gone.
    conn = sqlite3.connect(config.database_path)
    conn.execute("UPDATE jobs SET state = 'running', attempts = 2 WHERE id = ?", (retry.id,))
    conn.execute("UPDATE jobs SET state = 'running', attempts = 3 WHERE id = ?", (exhausted.id,))
    conn.commit()
    conn.close()

    reopened = await open_core(config)
    try:
        failed = await finished(reopened, exhausted.id)
        assert failed.state is JobState.FAILED and "interrupted 3 times" in (failed.error or "")
        rerun = await finished(reopened, retry.id)
        assert rerun.attempts == 3
        done_later = await finished(reopened, later.id)
        assert done_later.state is JobState.SUCCEEDED
        # The interrupted job kept its place ahead of its owner's later job: the one worker ran
        # it first. (Times, not Started events: the rerun may start while the core opens.)
        assert rerun.finished_at is not None and done_later.started_at is not None
        assert rerun.finished_at <= done_later.started_at
        assert (await reopened.credits.balance(BOB.user_id)).available == 20
        await assert_consistent(reopened)
    finally:
        await reopened.close(0.5)


async def _read_job(path: Path, job_id: int) -> tuple[str, int]:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT state, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return str(row[0]), int(row[1])
    finally:
        conn.close()


def test_in_process_worker_is_a_worker() -> None:
    from bot.core import Worker

    settings = make_config(Path("/nonexistent")).engine
    worker = InProcessWorker(settings, Path("."), create_fake_engine)
    assert isinstance(worker, Worker)
