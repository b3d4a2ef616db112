"""Relax, Fast and Turbo through the real discord.py bot and the wire-level fake Discord: /relax
then /imagine (the reply says relax and when it should start; no credits move), /balance, a
server admin switching relax off (/relax-server), and the private refusals that follow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bot.core.models import JobState, LedgerKind, Mode
from tests.bot.helpers import (
    ALLOWANCE,
    JOB_TIMEOUT_S,
    assert_ledger_consistent,
    available,
    has_cancel,
    is_grid,
    job_id_of,
    make_bot,
    private_answer,
)
from tests.fakediscord import MANAGE_GUILD, FakeDiscord


async def test_relax_then_imagine_says_relax_and_moves_no_credits(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            chosen = await private_answer(await fake.slash(alice, "relax"))
            assert "Relax mode on" in chosen and "free" in chosen

            job = await fake.slash(alice, "imagine", prompt="a quiet harbour", seed=5)
            queued = await job.wait_original(has_cancel)
            assert "🐢 Relax mode (free)" in queued.content
            # Nothing else waits, so it starts at once; the wait estimate is the app test's.
            assert "starting now" in queued.content or "expected to start" in queued.content
            grid = await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            stored = await bot.core.jobs.require(job_id_of(grid))
            assert stored.state is JobState.SUCCEEDED and stored.mode is Mode.RELAX
            assert stored.cost == 0
            assert await available(bot, alice.id) == ALLOWANCE
            rows = [e for e in await bot.core.credits.ledger(alice.id, 50) if e.job_id]
            assert {e.kind for e in rows} == {LedgerKind.HOLD, LedgerKind.SETTLE}
            assert all(e.amount == 0 for e in rows)

            balance = await private_answer(await fake.slash(alice, "balance"))
            assert "Mode: 🐢 relax" in balance and "1 of 30 relax jobs used today" in balance

            # --fast in the prompt wins over the member's mode for that job, and is charged.
            fast = await fake.slash(alice, "imagine", prompt="a busy harbour --fast", seed=6)
            fast_grid = await fast.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            paid = await bot.core.jobs.require(job_id_of(fast_grid))
            assert paid.mode is Mode.FAST and paid.cost > 0
            assert await available(bot, alice.id) == ALLOWANCE - paid.cost
            await assert_ledger_consistent(bot)


async def test_relax_switched_off_by_a_server_admin_is_refused_privately(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        moderator = fake.add_user("moderator", permissions=MANAGE_GUILD)
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            switched = await private_answer(
                await fake.slash(moderator, "relax-server", enabled=False)
            )
            assert "Relax mode is off in this server" in switched

            refused = await private_answer(await fake.slash(alice, "relax"))
            assert "Relax mode is switched off in this server" in refused
            flagged = await private_answer(
                await fake.slash(alice, "imagine", prompt="a harbour --relax")
            )
            assert "Relax mode is switched off in this server" in flagged
            assert await bot.core.jobs.for_user(alice.id) == []
            assert await available(bot, alice.id) == ALLOWANCE
            assert await bot.core.scheduler.modes.member_mode(alice.id) is Mode.FAST

            await private_answer(await fake.slash(moderator, "relax-server", enabled=True))
            job = await fake.slash(alice, "imagine", prompt="a harbour --relax")
            grid = await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            assert (await bot.core.jobs.require(job_id_of(grid))).mode is Mode.RELAX
            await assert_ledger_consistent(bot)


async def test_relax_caps_are_refused_privately_and_charge_nothing(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(
            fake,
            tmp_path / "data",
            bot_engine_settings,
            shared_engine,
            modes={"relax_max_per_day": 1},
            credits={"daily_allowance": 0},
        )
        async with fake.run_bot(bot):
            # No credits at all: relax still runs.
            job = await fake.slash(alice, "imagine", prompt="a harbour --relax")
            await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            capped = await private_answer(
                await fake.slash(alice, "imagine", prompt="a pier --relax")
            )
            assert "Relax limit reached: 1 relax jobs a day" in capped
            broke = await private_answer(await fake.slash(alice, "imagine", prompt="a pier"))
            assert "Not enough credits" in broke
            assert len(await bot.core.jobs.for_user(alice.id)) == 1
            await assert_ledger_consistent(bot)
