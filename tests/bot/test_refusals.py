"""A member refused too often in a short time is cooled down (bot/app/refusals.py): unit, and end to
end through the fake Discord while another member is served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.app.refusals import RefusalLimiter
from bot.discord.client import ImagineBot
from tests.bot.conftest import bot_config, in_process_workers
from tests.bot.helpers import imagined_grid, private_answer
from tests.fakediscord import FakeDiscord

COOLED = "Too many refused commands"


def test_the_limit_counts_refusals_within_the_window() -> None:
    now = [100.0]
    limiter = RefusalLimiter(3, 60.0, monotonic=lambda: now[0])
    for _ in range(2):
        limiter.record(1)
    assert limiter.cooling(1) == 0.0
    now[0] += 10
    limiter.record(1)
    assert limiter.cooling(1) == pytest.approx(50.0)  # the first of the three leaves at 160
    assert limiter.cooling(2) == 0.0
    assert "wait 50 s" in limiter.message(limiter.cooling(1))
    now[0] += 50
    assert limiter.cooling(1) == 0.0
    # Refusals spread wider than the window never add up.
    for _ in range(10):
        now[0] += 30
        limiter.record(3)
        assert limiter.cooling(3) == 0.0


def test_members_who_went_quiet_are_forgotten_when_many_are_tracked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("bot.app.refusals._MAX_TRACKED", 3)
    now = [0.0]
    limiter = RefusalLimiter(2, 10.0, monotonic=lambda: now[0])
    for user in (1, 2, 3):
        limiter.record(user)
    now[0] += 11
    limiter.record(4)
    assert set(limiter._times) == {4}


async def test_a_member_spamming_refused_commands_is_cooled_down_and_others_are_served(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    now = [1000.0]
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bob = fake.add_user("bob")
        config = bot_config(
            tmp_path / "data",
            bot_engine_settings,
            fake.guild_id,
            moderation={"banned_words": ["forbidden"]},
            discord={"refusal_limit": 3, "refusal_window_s": 60},
        )
        bot = ImagineBot(
            config,
            core_options={"workers": in_process_workers(config, shared_engine)},
            guild_ready_timeout=0.05,
            monotonic=lambda: now[0],
        )
        async with fake.run_bot(bot):
            for i in range(3):
                refused = await fake.slash(alice, "imagine", prompt=f"a forbidden thing {i}")
                assert "blocked term" in await private_answer(refused)
            assert len(await bot.core.admin.audit(100)) == 3
            # Cooled down: whatever she sends gets one line; no job, no audit row, no lookup.
            for prompt in ("a fine fox", "a forbidden thing"):
                cooled = await fake.slash(alice, "imagine", prompt=prompt)
                assert COOLED in await private_answer(cooled)
            balance = await fake.slash(alice, "balance")
            assert COOLED in await private_answer(balance)
            assert await bot.core.jobs.for_user(alice.id) == []
            assert len(await bot.core.admin.audit(100)) == 3
            # Meanwhile everyone else is served; the owner is never cooled down.
            await imagined_grid(fake, bob, "a calm lake")
            for _ in range(4):
                owner_refused = await fake.slash(fake.owner, "imagine", prompt="forbidden")
                assert "blocked term" in await private_answer(owner_refused)
            # A minute after her last refused command she is served again.
            now[0] += 61
            await imagined_grid(fake, alice, "a fine fox")
