"""Several jobs from one /imagine through the real discord.py bot and the fake Discord: each
job gets its own message, grid and buttons; they are charged together, or not at all."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from bot.core.models import JobState, LedgerKind
from tests.bot.conftest import GatedEngine
from tests.bot.helpers import (
    ALLOWANCE,
    JOB_TIMEOUT_S,
    assert_ledger_consistent,
    has_variations,
    job_id_of,
    make_bot,
)
from tests.fakediscord import FakeDiscord
from tests.fakediscord.model import Message


def is_result(message: Message) -> bool:
    return has_variations(message) and not any(
        c.startswith("imagine:X:") for c in message.custom_ids
    )


async def test_a_permutation_prompt_makes_a_message_grid_and_buttons_per_job(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        # Four candidates per job rather than eight: this test makes five jobs.
        settings = dataclasses.replace(bot_engine_settings, num_candidates=4)
        bot = make_bot(
            fake,
            tmp_path / "data",
            settings,
            shared_engine,
            scheduler={"max_queued_per_user": 4, "max_jobs_per_prompt": 6},
        )
        async with fake.run_bot(bot):
            # Over the configured maximum, and over the member's queue: refused privately,
            # naming the count, and nothing charged.
            too_many = await fake.slash(alice, "imagine", prompt="a {red, green, blue} bird --r 3")
            assert await too_many.wait_acked() == 4
            assert too_many.ephemeral
            assert "this prompt makes 9 jobs" in too_many.original.content
            assert "at most 6" in too_many.original.content
            over_queue = await fake.slash(
                alice, "imagine", prompt="a {red, green, blue, white, black} bird"
            )
            assert await over_queue.wait_acked() == 4
            assert over_queue.ephemeral and over_queue.original.content == (
                "This prompt makes 5 jobs but you can queue 4 (limit 4)."
            )
            assert await bot.core.jobs.for_user(alice.id) == []
            assert (await bot.core.credits.balance(alice.id)).available == ALLOWANCE

            job = await fake.slash(
                alice, "imagine", prompt="a {red, blue} bird --ar {1:1, 2:3} --steps 1"
            )
            assert await job.wait_acked() == 5
            first = await job.wait_original(is_result, timeout=JOB_TIMEOUT_S)
            await job.wait_for(
                lambda i: sum(is_result(m) for m in i.followups) == 3, timeout=JOB_TIMEOUT_S
            )
            grids = [first, *job.followups]
            assert len(grids) == 4 and all(is_result(grid) for grid in grids)
            ids = [job_id_of(grid) for grid in grids]
            stored = [await bot.core.jobs.require(job_id) for job_id in ids]
            assert [
                (j.prompt, j.request_data["width"] < j.request_data["height"]) for j in stored
            ] == [
                ("a red bird", False),
                ("a red bird", True),
                ("a blue bird", False),
                ("a blue bird", True),
            ]
            assert all(j.state is JobState.SUCCEEDED for j in stored)
            # Every grid carries its own job's buttons: U1–U4, V1–V4 and 🔄.
            for grid, job_id in zip(grids, ids, strict=True):
                assert {c.split(":")[2] for c in grid.custom_ids} == {str(job_id)}
            assert [len(grid.buttons) for grid in grids] == [9, 9, 9, 9]
            total = sum(j.cost for j in stored)
            assert f"this prompt made 4 jobs (jobs {ids[0]}–{ids[-1]}), {total} credits" in (
                first.content
            )
            assert "job 4 of 4 from one prompt" in grids[-1].content
            balance = await bot.core.credits.balance(alice.id)
            assert balance.available == ALLOWANCE - total
            ledger = await bot.core.credits.ledger(alice.id, 50)
            for kind in (LedgerKind.HOLD, LedgerKind.SETTLE):
                assert sorted(e.job_id for e in ledger if e.kind is kind) == ids

            # A button on the last grid works like any other.
            vary = await fake.click(alice, grids[-1], label="V1")
            assert await vary.wait_acked() == 6
            varied = await fake.wait_for_message(
                lambda m: m.referenced is grids[-1] and has_variations(m), timeout=JOB_TIMEOUT_S
            )
            variation = await bot.core.jobs.require(job_id_of(varied))
            assert variation.parent_job_id == ids[-1] and variation.parent_index == 0
            await assert_ledger_consistent(bot)


async def test_after_token_expiry_each_job_fills_its_own_message_with_the_bot_token(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """The follow-up of a further job is edited through the interaction token for 15 minutes,
    then with the bot token, like the first job's message: never a new message elsewhere."""
    engine = GatedEngine(shared_engine)
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        settings = dataclasses.replace(bot_engine_settings, num_candidates=4)
        bot = make_bot(fake, tmp_path / "data", settings, engine)
        async with fake.run_bot(bot):
            job = await fake.slash(alice, "imagine", prompt="a {slow, late} sunrise --steps 1")
            await job.wait_for(lambda i: len(i.followups) == 1 and i.original is not None)
            queued = [job.original, *job.followups]
            await asyncio.to_thread(engine.entered.wait, 10)
            fake.clock.advance(16 * 60)
            engine.gate.set()

            await job.wait_for(
                lambda i: all(is_result(m) for m in (i.original, *i.followups)),
                timeout=JOB_TIMEOUT_S,
            )
            grids = [job.original, *job.followups]
            assert grids == queued, "each job's own message became its grid"
            assert all(grid.state.via == "bot" for grid in grids)
            assert (401, 50027) in job.errors
            assert len([m for m in fake.messages if m.attachments]) == 2
            await assert_ledger_consistent(bot)
