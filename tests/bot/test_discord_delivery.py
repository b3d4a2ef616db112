"""Delivery on the real path, end to end: channels where the bot lacks a permission, buttons
pressed in quick succession or while the bot is busy, long queues, and the command schema.

Each test runs the real discord.py bot against the fake Discord with the real tiny-model engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from bot.core.models import JobKind, JobState, Owner
from bot.discord.client import ImagineBot
from tests.bot.conftest import GatedEngine, bot_config, in_process_workers
from tests.bot.helpers import (
    ALLOWANCE,
    JOB_TIMEOUT_S,
    assert_ledger_consistent,
    available,
    delivery_state,
    eventually,
    has_cancel,
    imagined_grid,
    is_grid,
    job_id_of,
    make_bot,
)
from tests.core.conftest import finished, request
from tests.core.test_lifecycle import DISK_FULL_ON_SUCCESS, run_sql
from tests.fakediscord import FakeDiscord, SchemaViolation
from tests.fakediscord.model import ATTACH_FILES, SEND_MESSAGES_IN_THREADS, VIEW_CHANNEL


async def test_imagine_and_buttons_refused_where_results_cannot_be_posted(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """Nobody is charged for a job whose result the bot could not post: the refusal is
    private and names the missing permission (Attach Files is in `app_permissions` anyway)."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        quiet = fake.add_channel("quiet")
        fake.deny_bot(quiet, SEND_MESSAGES_IN_THREADS)
        thread = fake.add_thread("ideas", parent=quiet)
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            grid = await imagined_grid(fake, alice, "a red fox", seed=5)
            spent = await available(bot, alice.id)

            fake.deny_bot(fake.general, ATTACH_FILES)
            await fake.wait_for(lambda: _bot_sees_denied(bot, fake.general.id, "attach_files"))
            refused = await fake.slash(alice, "imagine", prompt="a blue fox")
            assert await refused.wait_acked() == 4
            assert refused.ephemeral and "**Attach Files**" in refused.original.content
            assert "Nothing was charged" in refused.original.content

            pressed = await fake.click(alice, grid, label="U1")
            assert await pressed.wait_acked() == 6
            refusal = await pressed.wait_followup(lambda m: m.ephemeral)
            assert "**Attach Files**" in refusal.content

            in_thread = await fake.slash(alice, "imagine", prompt="a fox", channel=thread)
            assert await in_thread.wait_acked() == 4
            assert "**Send Messages in Threads**" in in_thread.original.content

            assert len(await bot.core.jobs.for_user(alice.id)) == 1
            assert await available(bot, alice.id) == spent


def _bot_sees_denied(bot: Any, channel_id: int, flag: str) -> bool:
    channel = bot.get_channel(channel_id)
    me = channel.guild.me if channel is not None else None
    return me is not None and not getattr(channel.permissions_for(me), flag)


async def test_a_result_the_bot_may_not_post_is_refunded_once_and_never_retried(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """Permissions taken away while jobs run, with tokens expired so the bot token must be
    used: the owner gets the news without the images (in the status message, or by DM when
    the channel is out of reach), the job is refunded and recorded as undelivered."""
    engine = GatedEngine(shared_engine)
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        hidden = fake.add_channel("hidden")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, engine)
        async with fake.run_bot(bot):
            no_files = await fake.slash(alice, "imagine", prompt="a lighthouse")
            await no_files.wait_original(has_cancel)
            await asyncio.to_thread(engine.entered.wait, 10)
            unseen = await fake.slash(alice, "imagine", prompt="a harbour", channel=hidden)
            await unseen.wait_original(has_cancel)
            held = await bot.core.credits.balance(alice.id)
            assert held.available < ALLOWANCE

            fake.deny_bot(fake.general, ATTACH_FILES)
            fake.deny_bot(hidden, VIEW_CHANNEL)
            fake.clock.advance(16 * 60)
            engine.gate.set()

            told = await no_files.wait_original(
                lambda m: "can't post the images" in m.content, timeout=JOB_TIMEOUT_S
            )
            assert not told.attachments and not has_cancel(told) and "refunded" in told.content
            dm = await fake.wait_for_message(
                lambda m: fake.channel(m.channel_id).kind == "dm", timeout=JOB_TIMEOUT_S
            )
            assert "can't post the images" in dm.content and "refunded" in dm.content
            assert fake.channel(dm.channel_id).recipient is alice

            job_ids = [*_job_ids_in(told.content), *_job_ids_in(dm.content)]
            assert len(job_ids) == 2
            for job_id in job_ids:
                assert await eventually(lambda j=job_id: delivery_state(bot, j), "undelivered")
            assert await available(bot, alice.id) == ALLOWANCE
            assert await bot.core.jobs.undelivered() == []
            refusals = fake.count("*", "/channels/*", status=403)
            # Past the first retry delay a transient error would have been tried again.
            await asyncio.sleep(2.5)
            assert fake.count("*", "/channels/*", status=403) == refusals
            await assert_ledger_consistent(bot)
            registry = bot.core.scheduler.metrics.registry
            assert registry.get_sample_value("imagine_deliveries_lost_total") == 2
            assert registry.get_sample_value("imagine_deliveries_retried_total") == 0
            errors = [
                s.value
                for family in registry.collect()
                if family.name == "imagine_discord_api_errors"
                for s in family.samples
                if s.name.endswith("_total")
            ]
            assert sum(errors) >= 2
        assert not [m for m in fake.messages if m.attachments]


def _job_ids_in(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\(job (\d+)\)", text)]


async def test_variation_buttons_pressed_in_a_row_are_not_held_by_the_cooldown(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """V1–V4 pressed one after the other, as Midjourney users do: the /imagine cooldown holds
    none of them; with the GPU busy, the fourth meets the queue limit and is told the count."""
    engine = GatedEngine(shared_engine)
    engine.gate.set()
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bob = fake.add_user("bob")
        bot = make_bot(
            fake,
            tmp_path / "data",
            bot_engine_settings,
            engine,
            discord={"command_cooldown_s": 60.0},
            scheduler={"max_queued_per_user": 3},
        )
        async with fake.run_bot(bot):
            grid = await imagined_grid(fake, alice, "four foxes", seed=9)
            engine.gate.clear()
            engine.entered.clear()
            busy = await fake.slash(bob, "imagine", prompt="keeps the GPU busy")
            await busy.wait_acked()
            await asyncio.to_thread(engine.entered.wait, 10)

            presses = [await fake.click(alice, grid, label=f"V{i}") for i in range(1, 5)]
            for press in presses:
                assert await press.wait_acked() == 6
            # V4's refusal comes after V1-V3 are each read, checked and queued: three submits,
            # not one answer, so the wait is a job's (the suite's busiest moments took over 5 s).
            refusal = await presses[3].wait_followup(lambda m: m.ephemeral, timeout=JOB_TIMEOUT_S)
            assert "3 jobs queued" in refusal.content and "limit 3" in refusal.content
            await fake.wait_for(
                lambda: len([m for m in fake.messages if has_cancel(m) and m.referenced]) == 3,
                timeout=JOB_TIMEOUT_S,
            )
            assert all(not press.followups for press in presses[:3]), "V1–V3 were accepted"
            jobs = await bot.core.jobs.for_user(alice.id)
            variations = [j for j in jobs if j.kind is JobKind.VARIATION]
            assert sorted(j.parent_index for j in variations) == [0, 1, 2]

            # /imagine itself still has its cooldown.
            again = await fake.slash(alice, "imagine", prompt="a fifth fox")
            assert await again.wait_acked() == 4
            assert "Slow down" in again.original.content
            for variation in variations:
                await bot.core.scheduler.cancel(variation.id, alice.id)
            engine.gate.set()


async def test_buttons_are_acknowledged_before_any_database_work(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """The database is held busy while a button is pressed: the press is acknowledged at once
    anyway (a bot that read first would miss Discord's 3 seconds), and the job follows."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            grid = await imagined_grid(fake, alice, "a fox", seed=2)

            release = asyncio.Event()
            entered = asyncio.Event()

            async def hold(_txn: Any) -> None:
                entered.set()
                await release.wait()

            holder = asyncio.create_task(bot.core.db.transaction(hold))
            await entered.wait()
            try:
                press = await fake.click(alice, grid, label="V2")
                # Acknowledged while every database read still waits.
                assert await press.wait_acked(timeout=2.5) == 6
                assert not release.is_set()
            finally:
                release.set()
                await holder
            status = await fake.wait_for_message(lambda m: has_cancel(m) and m.referenced is grid)
            variation = await bot.core.jobs.require(job_id_of(status))
            assert variation.kind is JobKind.VARIATION and variation.parent_index == 1
            await bot.core.scheduler.cancel(variation.id, alice.id)


async def test_queue_positions_are_edited_near_the_front_only(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """Nine jobs ahead leave one by one: the last job's message is not edited for every step
    back there (positions 9–6 come within 10 s of its first text), only from position 5 on."""
    engine = GatedEngine(shared_engine)
    async with FakeDiscord() as fake:
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, engine)
        async with fake.run_bot(bot):
            busy = await fake.slash(fake.add_user("busy"), "imagine", prompt="running")
            await busy.wait_acked()
            await asyncio.to_thread(engine.entered.wait, 10)
            ahead = []
            for number in range(9):
                user = fake.add_user(f"user{number}")
                waiting = await fake.slash(user, "imagine", prompt=f"waiting {number}")
                ahead.append((job_id_of(await waiting.wait_original(has_cancel)), user.id))
            last = await fake.slash(fake.add_user("last"), "imagine", prompt="the last one")
            message = await last.wait_original(has_cancel)
            assert _positions(message.contents) == [10]

            for job_id, user_id in ahead:
                await bot.core.scheduler.cancel(job_id, user_id)
                await asyncio.sleep(0.4)  # past the position publish delay and edit spacing
            await fake.wait_for(lambda: _positions(message.contents)[-1] == 1, timeout=5)
            shown = _positions(message.contents)
            assert not set(shown) & {6, 7, 8, 9}, shown
            assert shown[0] == 10 and shown[-1] == 1 and len(shown) >= 3, shown
            engine.gate.set()


def _positions(contents: list[str]) -> list[int]:
    return [int(m[1]) for text in contents if (m := re.search(r"position (\d+) in", text))]


async def test_the_steps_option_allows_the_configured_maximum_only(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    settings = dataclasses.replace(bot_engine_settings, max_steps=20)
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", settings, shared_engine)
        async with fake.run_bot(bot):
            steps = next(o for o in fake.command("imagine")["options"] if o["name"] == "steps")
            assert (steps["min_value"], steps["max_value"]) == (1, 20)
            with pytest.raises(SchemaViolation):
                await fake.slash(alice, "imagine", prompt="a fox", steps=21)
            assert await bot.core.jobs.for_user(alice.id) == []


async def test_an_edit_error_that_is_not_about_the_token_keeps_the_route(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """Only a refused token moves the result off the interaction: any other error is retried
    on the same message, so the result never lands in a second message."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        refused = fake.inject(
            "PATCH", "/webhooks/*/messages/@original", status=400, with_files=True
        )
        async with fake.run_bot(bot):
            grid = await imagined_grid(fake, alice, "a red fox")
            assert refused.hits == 1 and grid.state.via == "interaction"
            ping = await fake.wait_for_message(lambda m: m.pings.users == {alice.id})
            assert ping.referenced is grid
            assert not [r for r in fake.requests_matching("POST", "/channels/*") if r.files]
            assert await eventually(lambda: delivery_state(bot, job_id_of(grid)), "done")
        assert [m for m in fake.messages if m.attachments] == [grid]


async def test_a_job_whose_end_cannot_be_saved_says_so_and_then_posts_once(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """The database refuses to record the job's success (as on a full disk): the member's
    message says the job ran but can't be saved yet; once the write works, the grid lands in
    the same message, charged once."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        config = bot_config(tmp_path / "data", bot_engine_settings, fake.guild_id)
        bot = ImagineBot(
            config,
            core_options={
                "workers": in_process_workers(config, shared_engine),
                "end_retry_s": 0.2,
            },
            guild_ready_timeout=0.05,
        )
        async with fake.run_bot(bot):
            await run_sql(config.database_path, DISK_FULL_ON_SUCCESS)
            job = await fake.slash(alice, "imagine", prompt="a red fox")
            told = await job.wait_original(
                lambda m: "cannot save how it ended" in m.content, timeout=JOB_TIMEOUT_S
            )
            assert has_cancel(told)  # still the member's to cancel
            job_id = job_id_of(told)
            assert (await bot.core.jobs.require(job_id)).state is JobState.RUNNING

            await run_sql(config.database_path, "DROP TRIGGER disk_full")
            grid = await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            assert grid.id == told.id
            cost = (await bot.core.jobs.require(job_id)).cost
            assert await available(bot, alice.id) == ALLOWANCE - cost
            await assert_ledger_consistent(bot)
        assert [m for m in fake.messages if m.attachments] == [grid]


async def test_two_deliveries_of_one_job_at_once_post_it_once(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """Two deliveries of the same finished job start together in one process (a reconnect's
    redelivery while the job's own delivery runs), the first one's upload held back by a rate
    limit: one result message, not two."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            owner = Owner(alice.id, fake.guild_id, fake.general.id)
            job = await bot.core.scheduler.submit(owner, request("a red fox"))
            done = await finished(bot.core, job.id, timeout_s=JOB_TIMEOUT_S)
            assert done.state is JobState.SUCCEEDED  # not posted: nobody followed it
            fake.rate_limit_next("POST", "/channels/*/messages", retry_after=1.0, with_files=True)
            await asyncio.gather(bot.delivery.deliver(done), bot.delivery.deliver(done))
            assert await eventually(lambda: delivery_state(bot, job.id), "done")
            await assert_ledger_consistent(bot)
        assert len([m for m in fake.messages if m.attachments]) == 1
