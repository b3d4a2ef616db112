"""Admission: each limit on its own, and the input file of a submit whose caller went away."""

from __future__ import annotations

import asyncio
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
    Owner,
    RefusalCode,
    Refused,
    Started,
)
from bot.core.db import Transaction
from generation.requests import variation_request
from tests.core.conftest import (
    assert_consistent,
    finished,
    make_config,
    open_core,
    queue_behind_its_back,
    request,
)
from tests.core.fakes import create_fake_engine

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
BOB = Owner(user_id=202, guild_id=1, channel_id=2)


def uploaded_variation() -> object:
    source = Image.new("RGB", (64, 64), (10, 200, 30))
    return variation_request(request(), source, strength=0.7, seed=5)


def input_files(core: Core) -> list[Path]:
    inputs = core.config.data_dir / "images" / "inputs"
    return sorted(inputs.iterdir()) if inputs.exists() else []


async def test_an_input_image_stays_when_the_caller_is_cancelled_after_commit(
    core: Core,
) -> None:
    gate = asyncio.Event()

    async def hold_the_database(txn: Transaction) -> None:
        await gate.wait()

    holder = asyncio.create_task(core.db.transaction(hold_the_database))
    submit = asyncio.create_task(
        core.scheduler.submit(ALICE, uploaded_variation(), JobKind.VARIATION)  # type: ignore[arg-type]
    )
    for _ in range(1000):  # the file is written in a thread before the transaction
        if input_files(core):
            break
        await asyncio.sleep(0.01)
    # The member's interaction goes away while the transaction waits its turn: it still commits.
    submit.cancel()
    gate.set()
    await holder
    with pytest.raises(asyncio.CancelledError):
        await submit
    (job,) = await core.jobs.for_user(ALICE.user_id)
    assert job.init_image_path is not None
    assert (core.config.data_dir / job.init_image_path).exists()
    assert (await finished(core, job.id)).state is JobState.SUCCEEDED
    await assert_consistent(core)


async def test_an_input_image_goes_when_the_submit_is_refused(tmp_path: Path) -> None:
    core = await open_core(make_config(tmp_path, credits={"daily_allowance": 0}))
    try:
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(ALICE, uploaded_variation(), JobKind.VARIATION)  # type: ignore[arg-type]
        assert refused.value.code is RefusalCode.INSUFFICIENT_CREDITS
        assert input_files(core) == []
    finally:
        await core.close(0.5)


async def test_the_per_user_queue_limit_inside_the_transaction_says_count_and_limit(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, scheduler={"max_queued_per_user": 2})
    core = await open_core(config)
    try:
        # Queued rows this process has not loaded: only the check in the transaction sees them.
        await queue_behind_its_back(config, ALICE.user_id, 3)
        before = await core.credits.balance(ALICE.user_id)
        with pytest.raises(Refused) as refused:
            await core.scheduler.submit(ALICE, request())
        assert refused.value.reason == (
            "You already have 3 jobs queued (limit 2); wait for one to start."
        )
        assert refused.value.code is RefusalCode.USER_QUEUE_FULL
        assert await core.credits.balance(ALICE.user_id) == before
        # Someone else is not held back by it.
        await core.scheduler.submit(BOB, request())
    finally:
        await core.close(0.5)


async def test_pressing_u1_to_u4_of_one_grid_says_how_many_are_queued(tmp_path: Path) -> None:
    config = make_config(tmp_path, scheduler={"max_queued_per_user": 3})
    core = await open_core(config)
    try:
        parent = await core.scheduler.submit(ALICE, request())
        await finished(core, parent.id)
        blocker = await core.scheduler.submit(BOB, request("[slow] a blocker", steps=100))
        parent_request = await core.jobs.request(parent.id)
        source = await core.jobs.image(parent.id, 0)
        variation = variation_request(parent_request, source, strength=0.7, seed=9)
        presses = [
            core.scheduler.submit(ALICE, variation, JobKind.VARIATION, parent=(parent.id, index))
            for index in range(4)
        ]
        outcomes = await asyncio.gather(*presses, return_exceptions=True)
        refusals = [o for o in outcomes if isinstance(o, Refused)]
        assert len(refusals) == 1
        assert refusals[0].reason == (
            "You already have 3 jobs queued (limit 3); wait for one to start."
        )
        await core.scheduler.cancel(blocker.id)
        for outcome in outcomes:
            if not isinstance(outcome, BaseException):
                assert (await finished(core, outcome.id)).state is JobState.SUCCEEDED
        await assert_consistent(core)
    finally:
        await core.close(0.5)


async def test_max_running_per_user_on_its_own(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, scheduler={"max_running_per_user": 1, "max_queued_per_user": 5}, step_s=0.01
    )
    workers = [
        InProcessWorker(config.engine, config.data_dir, create_fake_engine, name=f"w{i}")
        for i in range(2)
    ]
    core = await open_core(config, workers=list(workers))
    try:
        running: dict[int, set[int]] = {ALICE.user_id: set(), BOB.user_id: set()}
        most: dict[int, int] = {ALICE.user_id: 0, BOB.user_id: 0}
        owners: dict[int, int] = {}

        def on_event(event: JobEvent) -> None:
            user = owners.get(event.job_id)
            if user is None:
                return
            if isinstance(event, Started):
                running[user].add(event.job_id)
            elif isinstance(event, Finished):
                running[user].discard(event.job_id)
            most[user] = max(most[user], len(running[user]))

        core.scheduler.add_listener(on_event)
        jobs = []
        for owner in (ALICE, ALICE, ALICE, BOB):
            job = await core.scheduler.submit(owner, request(steps=10))
            owners[job.id] = owner.user_id
            jobs.append(job)
        for job in jobs:
            assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        # Two free workers, but Alice never had two jobs running at once; Bob ran beside her.
        assert most == {ALICE.user_id: 1, BOB.user_id: 1}
        assert core.scheduler.busy_counts() == [0, 0]
    finally:
        await core.close(0.5)
