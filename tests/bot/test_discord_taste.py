"""Personalization through the fake Discord with the real discord.py client: U1–U4 presses and
/rank rounds record preference pairs, `--p` below the threshold says how many more are needed
and ranks as usual, above it the result says it was personalized (and another member can use
the profile's code), a code naming no profile is refused with nothing queued or charged, /info
shows the code and ratings, and /settings erases the profile.

The engine is the fake one (tests/core/fakes.py) at the GPU's edge: it embeds and ranks its
candidates through the real generation.taste, as the real engine does."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bot.app.actions import Actor, UserError
from bot.app.personalize import Choice
from bot.core.taste import MIN_PAIRS
from bot.discord.client import ImagineBot
from bot.discord.views.taste import parse_rank_button
from tests.bot.helpers import (
    JOB_TIMEOUT_S,
    assert_ledger_consistent,
    available,
    imagined_grid,
    job_id_of,
    make_bot,
)
from tests.core.fakes import FakeEngine
from tests.fakediscord import FakeDiscord
from tests.fakediscord.model import Message, User


async def _pairs(bot: ImagineBot, user_id: int) -> int:
    row = await bot.core.db.read_one(
        "SELECT COUNT(*) AS n FROM taste_pairs WHERE user_id = ?", (user_id,)
    )
    assert row is not None
    return int(row["n"])


async def _press_u(
    fake: FakeDiscord, bot: ImagineBot, user: User, grid: Message, index: int
) -> int:
    """U`index` on a fresh grid of `user`'s; the pairs it recorded (just after the post)."""
    before = await _pairs(bot, user.id)
    press = await fake.click(user, grid, label=f"U{index}")
    assert await press.wait_acked() == 6
    await fake.wait_for_message(lambda m: m.referenced is grid and f"Image #{index}" in m.content)
    for _ in range(200):  # the pairs are written just after the post
        after = await _pairs(bot, user.id)
        if after != before:
            return after - before
        await asyncio.sleep(0.05)
    raise AssertionError("the press recorded no pairs")


def _round_message(message: Message) -> bool:
    return bool(message.attachments) and "Which of these two" in message.content


async def test_picks_and_rank_teach_p_which_then_personalizes_and_bad_codes_cost_nothing(
    tmp_path: Path, bot_engine_settings: Any
) -> None:
    engine = FakeEngine(bot_engine_settings)
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bob = fake.add_user("bob")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, engine)
        async with fake.run_bot(bot):
            # /rank before there is anything to compare: a short private message.
            empty = await fake.slash(alice, "rank")
            nothing = await empty.wait_message(lambda m: "Nothing to compare" in m.content)
            assert nothing.ephemeral

            first = await imagined_grid(fake, alice, "a red fox")
            # The pick is preferred to the other 3 shown and the 4 candidates not kept.
            assert await _press_u(fake, bot, alice, first, 2) == 7

            # Below the threshold --p says how many more are needed and ranks as usual.
            early = await fake.slash(alice, "imagine", prompt="a lighthouse --p")
            grid = await early.wait_original(
                lambda m: bool(m.attachments) and len(m.buttons) == 9, timeout=JOB_TIMEOUT_S
            )
            assert f"needs {MIN_PAIRS - 7} more ratings (7 of {MIN_PAIRS}" in grid.content
            assert "Personalized" not in grid.content
            assert engine.calls[-1].personalize is None

            # /rank: two of alice's images; left records a pair, skip records none, and each
            # press edits the same private message into the next round.
            ranking = await fake.slash(alice, "rank")
            round_one = await ranking.wait_message(_round_message)
            assert round_one.ephemeral and len(round_one.buttons) == 3
            assert {b["custom_id"].split(":")[2] for b in round_one.buttons} == {
                "left",
                "right",
                "skip",
            }
            before = await _pairs(bot, alice.id)
            left = await fake.click(alice, round_one, label="⬅️ Left")
            await left.wait_acked()
            await fake.changes.wait_until(
                lambda: "Recorded: left preferred" in round_one.content, 10.0, lambda: "edit"
            )
            assert await _pairs(bot, alice.id) == before + 1
            skip = await fake.click(alice, round_one, label="Skip")
            await skip.wait_acked()
            await fake.changes.wait_until(
                lambda: "Skipped" in round_one.content, 10.0, lambda: "edit"
            )
            assert await _pairs(bot, alice.id) == before + 1
            rank_button = round_one.buttons[0]["custom_id"]

            # More picks until the profile is ready.
            while await _pairs(bot, alice.id) < MIN_PAIRS:
                more = await imagined_grid(fake, alice, "a harbour at dawn")
                await _press_u(fake, bot, alice, more, 1)

            paid = await available(bot, alice.id)
            personal = await fake.slash(alice, "imagine", prompt="a lighthouse --p")
            done = await personal.wait_original(
                lambda m: bool(m.attachments) and "Personalized" in m.content,
                timeout=JOB_TIMEOUT_S,
            )
            assert "ranked by your taste" in done.content
            assert engine.calls[-1].personalize is not None
            job = await bot.core.jobs.require(job_id_of(done))
            assert job.result is not None and job.result.personalized
            assert await available(bot, alice.id) == paid - job.cost

            # /info shows alice's code and ratings; bob ranks with her code.
            info = await fake.slash(alice, "info")
            shown = await info.wait_message(lambda m: "Taste profile" in m.content)
            code = (await bot.app.personal.store.profile(alice.id)).code
            assert f"code `{code}`" in shown.content
            borrowed = await fake.slash(bob, "imagine", prompt=f"a lighthouse --p {code}")
            bobs = await borrowed.wait_original(
                lambda m: bool(m.attachments) and "Personalized" in m.content,
                timeout=JOB_TIMEOUT_S,
            )
            # A /rank answer naming alice's images, from bob: discord.py drops a press of a
            # button its message lacks, and the app refuses by whose the images are.
            pairs = await _pairs(bot, alice.id)
            left_ref, right_ref, _ = parse_rank_button(rank_button)
            with pytest.raises(UserError, match="compares your own images"):
                await bot.app.personal.answer(Actor(bob.id), left_ref, right_ref, Choice.LEFT)
            forged = await fake.forge_click(bob, bobs, rank_button)
            await asyncio.sleep(0.3)
            assert forged.ack is None
            assert await _pairs(bot, alice.id) == pairs and await _pairs(bot, bob.id) == 0

            # A code that names no profile: refused privately, nothing queued or charged.
            jobs = len(await bot.core.jobs.for_user(bob.id))
            left_bob = await available(bot, bob.id)
            bad = await fake.slash(bob, "imagine", prompt="a lighthouse --p zzzz9999")
            refused = await bad.wait_message(lambda m: "no profile has the code" in m.content)
            assert refused.ephemeral and "zzzz9999" in refused.content
            assert len(await bot.core.jobs.for_user(bob.id)) == jobs
            assert await available(bot, bob.id) == left_bob

            # /settings: erase asks first, then deletes the pairs and retires the code.
            settings = await fake.slash(alice, "settings")
            panel = await settings.wait_message(lambda m: bool(m.buttons))
            ask = await fake.click(alice, panel, label="Erase taste profile")
            confirm = await ask.wait_message(lambda m: "Erase your taste profile?" in m.content)
            assert f"{await _pairs(bot, alice.id)} ratings" in confirm.content
            yes = await fake.click(alice, confirm, label="Yes, erase it")
            await yes.wait_acked()
            await fake.changes.wait_until(
                lambda: "is erased" in confirm.content, 10.0, lambda: "erase"
            )
            assert await _pairs(bot, alice.id) == 0
            gone = await fake.slash(bob, "imagine", prompt=f"a lighthouse --p {code}")
            await gone.wait_message(lambda m: "no profile has the code" in m.content)
            await assert_ledger_consistent(bot)
