"""Relax, Fast and Turbo under attack in the application: a speed flag in a Remix prompt is
honoured (the member pays the mode they asked for, never silently another), and a free job
can't buy turbo's place in line for nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.app.actions import Action, Actor, UserError
from bot.app.modes import wait_words
from bot.core import Mode
from tests.bot.helpers import (
    JOB_TIMEOUT_S,
    assert_ledger_consistent,
    available,
    is_grid,
    job_id_of,
    make_bot,
    private_answer,
)
from tests.bot.test_discord_post_grid import finished_reply, imagined_grid, separated
from tests.bot.test_modes_app import ALICE, _app, _finished, _with_modes
from tests.fakediscord import MANAGE_GUILD, FakeDiscord


async def test_a_speed_flag_in_a_remix_prompt_sets_that_jobs_mode(tmp_path: Path) -> None:
    app = await _app(_with_modes(tmp_path, relax_max_queued_per_user=5))
    try:
        await app.modes.choose(ALICE, Mode.TURBO)
        (parent,) = await app.imagine(ALICE, "a fox")
        assert parent.job.mode is Mode.TURBO
        await _finished(app, parent.job.id)
        before = (await app.core.credits.balance(ALICE.user_id)).available
        # The member asked for relax in the edited prompt: relax it is, free, not turbo.
        reroll = await app.press(ALICE, parent.job.id, Action.REROLL, prompt="a fox --relax")
        assert reroll.job.mode is Mode.RELAX and reroll.job.cost == 0
        await _finished(app, reroll.job.id)
        vary = await app.press(ALICE, parent.job.id, Action.VARY_STRONG, 1, prompt="a fox --fast")
        assert vary.job.mode is Mode.FAST
        await _finished(app, vary.job.id)
        zoom = await app.custom_zoom(ALICE, parent.job.id, 1, prompt="a fox --relax", factor=1.5)
        assert zoom.job.mode is Mode.RELAX and zoom.job.cost == 0
        await _finished(app, zoom.job.id)
        after = (await app.core.credits.balance(ALICE.user_id)).available
        assert before - after == vary.job.cost
    finally:
        await app.core.close(drain_timeout_s=5.0)


async def test_relax_server_reaches_only_its_own_server_and_only_its_managers(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    # A server may override Discord's default permissions and show /relax-server to everyone:
    # the bot checks the rights itself.
    async with FakeDiscord(enforce_default_permissions=False) as fake:
        alice = fake.add_user("alice")
        mallory = fake.add_user("mallory")
        second = fake.add_guild("Second")
        second_admin = fake.add_user("second admin", guild=second, permissions=MANAGE_GUILD)
        assert second.general is not None
        bot = make_bot(
            fake,
            tmp_path / "data",
            bot_engine_settings,
            shared_engine,
            discord={"guild_ids": [fake.guild_id, second.id], "refusal_limit": 1000},
        )
        async with fake.run_bot(bot):
            refused = await private_answer(await fake.slash(mallory, "relax-server", enabled=False))
            assert "Only this server's managers" in refused
            off = await private_answer(
                await fake.slash(
                    second_admin, "relax-server", channel=second.general, enabled=False
                )
            )
            assert "Relax mode is off in this server" in off
            modes = bot.core.scheduler.modes
            assert await modes.relax_enabled(fake.guild_id)
            assert not await modes.relax_enabled(second.id)
            # The main server's members still relax.
            job = await fake.slash(alice, "imagine", prompt="a harbour --relax")
            grid = await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            assert (await bot.core.jobs.require(job_id_of(grid))).mode is Mode.RELAX
            await assert_ledger_consistent(bot)


async def test_custom_zoom_with_relax_in_its_form_runs_relax_for_a_turbo_member(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            assert "Turbo mode on" in await private_answer(await fake.slash(alice, "turbo"))
            grid = await imagined_grid(fake, alice, "a red fox", seed=3)
            assert (await bot.core.jobs.require(job_id_of(grid))).mode is Mode.TURBO
            image = await separated(fake, alice, grid, 2)
            before = await available(bot, alice.id)
            form = await fake.click(alice, image, label="Custom Zoom")
            assert await form.wait_acked() == 9
            await fake.submit_modal(form, {"prompt": "a red fox, wide --relax", "factor": "1.5"})
            zoomed = await finished_reply(fake, image, set())
            zoom = await bot.core.jobs.require(job_id_of(zoomed))
            assert zoom.kind.value == "zoom" and (zoom.mode, zoom.cost) == (Mode.RELAX, 0)
            assert await available(bot, alice.id) == before
            await assert_ledger_consistent(bot)


async def test_relax_off_in_a_dm_says_here_not_this_server(tmp_path: Path) -> None:
    app = await _app(_with_modes(tmp_path, relax_enabled=False))
    try:
        in_dm = Actor(user_id=21)
        for attempt in (app.modes.choose(in_dm, Mode.RELAX), app.imagine(in_dm, "a fox --relax")):
            with pytest.raises(UserError) as refused:
                await attempt
            assert "switched off here" in str(refused.value)
            assert "server" not in str(refused.value)
    finally:
        await app.core.close(drain_timeout_s=5.0)


def test_any_wait_can_be_worded() -> None:
    # A huge (finite) wait_estimate_run_s times the jobs ahead overflows to inf: the reply of
    # a job already queued and charged must still be written.
    assert wait_words(2 * 1e308) == "in more than a day"
    assert wait_words(float("nan")) == "in more than a day"
    assert wait_words(1e300) == "in more than a day"
    assert wait_words(86_399) == "in about 24 h"
