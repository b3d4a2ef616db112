"""Servers the bot serves and whose word counts there, end to end through the fake Discord with
three servers: the main one and a second one are listed in `[discord] guild_ids`, a third (a
stranger invited the bot to it) is not.

The hole this closes: Manage Server anywhere used to make a global admin, so whoever invited the
bot to a server of their own could grant themselves credits, ban members of the real server,
pause everyone's queue and read every server's prompts.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bot.app.access import DM_COMMAND, UNLISTED_SERVER
from bot.core.models import JobState
from bot.discord.client import ImagineBot
from tests.bot.conftest import GatedEngine
from tests.bot.helpers import (
    JOB_TIMEOUT_S,
    assert_ledger_consistent,
    eventually,
    has_cancel,
    is_grid,
    job_id_of,
    make_bot,
)
from tests.fakediscord import MANAGE_GUILD, FakeDiscord, FakeInteraction, Guild, User
from tests.fakediscord.model import Channel

TABLES = ("ledger", "balances", "role_allowances", "audit", "settings", "member_settings")


async def _state(bot: ImagineBot) -> dict[str, Any]:
    """Everything an admin command could change, read from the bot's own SQLite file."""
    state: dict[str, Any] = {}
    for table in TABLES:
        rows = await bot.core.db.read(f"SELECT * FROM {table} ORDER BY rowid")
        state[table] = [tuple(row) for row in rows]
    jobs = await bot.core.db.read("SELECT id, state, cost FROM jobs ORDER BY id")
    state["jobs"] = [tuple(row) for row in jobs]
    state["paused"] = bot.core.scheduler.paused
    return state


def _attempts(target: User, guild: Guild) -> list[tuple[str, dict[str, Any]]]:
    """Every /admin subcommand, aimed at a member of the main server where it takes one."""
    return [
        ("admin credits grant", {"user": target, "amount": 1_000_000, "reason": "mine now"}),
        ("admin credits set", {"user": target, "amount": 0}),
        ("admin credits show", {"user": target}),
        ("admin quota user", {"user": target, "amount": 1_000_000}),
        ("admin quota role", {"role": guild.everyone, "amount": 1_000_000}),
        ("admin ban", {"user": target, "reason": "gone"}),
        ("admin unban", {"user": target}),
        ("admin ledger", {"user": target}),
        ("admin audit", {}),
        ("admin queue show", {}),
        ("admin queue pause", {}),
        ("admin queue resume", {}),
        ("admin workers", {}),
    ]


async def _answer(interaction: FakeInteraction) -> str:
    """The text of the interaction's first message (its response or a follow-up), which must
    be private."""
    await interaction.wait_acked()
    message = await interaction.wait_message(lambda m: bool(m.content))
    assert message.ephemeral, f"{interaction!r} was answered in public: {message.content}"
    return message.content


async def test_admins_of_other_servers_change_and_see_nothing_of_this_one(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        second = fake.add_guild("Second")
        stranger = fake.add_guild("Stranger's")
        second_admin = fake.add_user("second admin", guild=second, permissions=MANAGE_GUILD)
        second_member = fake.add_user("second member", guild=second)
        stranger_admin = fake.add_user("stranger", guild=stranger, permissions=MANAGE_GUILD)
        assert second.general is not None and stranger.general is not None
        engine = GatedEngine(shared_engine)
        bot = make_bot(
            fake,
            tmp_path / "data",
            bot_engine_settings,
            engine,
            # The refusal limit is the other test's subject: here each answer is looked at.
            discord={"guild_ids": [fake.guild_id, second.id], "refusal_limit": 1000},
            moderation={"banned_words": ["forbidden"]},
        )
        async with fake.run_bot(bot):
            # Alice has a row in the audit log (with her prompt) …
            blocked = await fake.slash(alice, "imagine", prompt="a forbidden lighthouse")
            assert "blocked" in await _answer(blocked)
            # … a job that runs (held by the engine's gate), and the second server's member
            # one that waits.
            job = await fake.slash(alice, "imagine", prompt="alice's secret lighthouse")
            queued = await job.wait_original(has_cancel)
            await asyncio.to_thread(engine.entered.wait, 10)
            alice_job = job_id_of(queued)
            cancel_id = next(c for c in queued.custom_ids if c.startswith("imagine:X:"))
            theirs = await fake.slash(
                second_member, "imagine", prompt="a harbour", channel=second.general
            )
            second_job = job_id_of(await theirs.wait_original(has_cancel))
            # The bot synced its commands to the listed servers only; an older setup that
            # synced them globally would have left these in every server, the stranger's too.
            fake.synced_global = [
                {k: v for k, v in c.items() if k != "guild_id"} for c in fake.synced_guild
            ]
            before = await _state(bot)

            # 1. The stranger's server is not served: one short private line, nothing else.
            tried = []
            for command, options in _attempts(alice, stranger):
                refused = await fake.slash(
                    stranger_admin, command, channel=stranger.general, options=options
                )
                assert await _answer(refused) == UNLISTED_SERVER, command
                tried.append(refused)
            typed = await fake.slash(
                stranger_admin, "imagine", prompt="free images", channel=stranger.general
            )
            assert await _answer(typed) == UNLISTED_SERVER
            forged = await fake.forge_click(stranger_admin, refused.original, cancel_id)
            assert await _answer(forged) == UNLISTED_SERVER
            # Each was answered by its callback alone: no follow-up, message or lookup.
            answered = [r for r in fake.requests if r.interaction in (*tried, typed, forged)]
            assert len(answered) == len(tried) + 2
            assert all(r.matches("POST", "/interactions/*/callback") for r in answered)
            assert fake.messages_in(stranger.general) == []

            # 2. The second server is served, but its admins reach only their own server.
            answers = {}
            for command, options in _attempts(alice, second):
                asked = await fake.slash(
                    second_admin, command, channel=second.general, options=options
                )
                answers[command] = await _answer(asked)
            owner_only = {
                "admin credits grant",
                "admin credits set",
                "admin quota user",
                "admin quota role",
                "admin ban",
                "admin unban",
                "admin queue pause",
                "admin queue resume",
                "admin workers",
            }
            for command in owner_only:
                assert "only the bot's owners" in answers[command], (command, answers[command])
            for command in ("admin credits show", "admin ledger"):
                assert "isn't a member of this server" in answers[command], answers[command]
            for command in ("admin audit", "admin queue show"):
                assert str(alice.id) not in answers[command]
                assert f"job {alice_job} " not in answers[command] + " "
            # Their own server's queue they do see.
            assert f"job {second_job} " in answers["admin queue show"]
            # A press of Alice's Cancel button forged onto a message of the bot here: discord.py
            # drops a press whose button the message lacks (and the app would refuse it: see
            # test_access.py), so it is never answered and cancels nothing.
            forged = await fake.forge_click(second_admin, asked.original, cancel_id)
            again = await fake.slash(second_admin, "admin audit", channel=second.general)
            await _answer(again)
            assert not forged.acked

            assert await _state(bot) == before
            assert (await bot.core.jobs.require(alice_job)).state is JobState.RUNNING

            # The same commands still work for the main server's owner.
            grant = await fake.slash(fake.owner, "admin credits grant", user=alice, amount=5)
            assert "Granted 5" in await _answer(grant)
            engine.gate.set()
            await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            await theirs.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            await assert_ledger_consistent(bot)


async def test_a_server_admin_acts_on_their_own_server_only(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """Manage Server in a listed server: that server's members' jobs may be cancelled and its
    audit rows read; Manage Server in another listed server reaches none of it."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        moderator = fake.add_user("moderator", permissions=MANAGE_GUILD)
        second = fake.add_guild("Second")
        engine = GatedEngine(shared_engine)
        bot = make_bot(
            fake,
            tmp_path / "data",
            bot_engine_settings,
            engine,
            discord={"guild_ids": [fake.guild_id, second.id]},
            moderation={"banned_words": ["forbidden"]},
        )
        async with fake.run_bot(bot):
            blocked = await fake.slash(alice, "imagine", prompt="a forbidden thing")
            assert "blocked" in await _answer(blocked)
            audit = await fake.slash(moderator, "admin audit")
            assert "prompt_blocked" in await _answer(audit)
            assert str(alice.id) in audit.original.content

            job = await fake.slash(alice, "imagine", prompt="a lighthouse")
            queued = await job.wait_original(has_cancel)
            job_id = job_id_of(queued)
            await asyncio.to_thread(engine.entered.wait, 10)
            cancel = await fake.click(moderator, queued, label="Cancel")
            await cancel.wait_acked()
            assert "Cancelling" in (await cancel.wait_followup(lambda m: m.ephemeral)).content
            await job.wait_original(lambda m: "Cancelled" in m.content, timeout=JOB_TIMEOUT_S)
            cancelled = await bot.core.jobs.require(job_id)
            assert cancelled.state is JobState.CANCELLED
            engine.gate.set()
            await assert_ledger_consistent(bot)


async def test_commands_from_dms_are_refused_and_unlisted_servers_are_left(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        stranger = fake.add_guild("Stranger's")
        bot = make_bot(
            fake,
            tmp_path / "data",
            bot_engine_settings,
            shared_engine,
            discord={"leave_other_guilds": True},
        )
        async with fake.run_bot(bot):
            # Found at start, left; and one it is added to later is left as it joins.
            await fake.wait_for(lambda: stranger.left)
            later = fake.add_guild("Later")
            await fake.wait_for(lambda: later.left)

            async def guilds() -> list[int]:
                return [g.id for g in bot.guilds]

            assert await eventually(guilds, [fake.guild_id])
            # Stale global commands are cleared at start …
            assert fake.synced_global == []
            # … and if one were still there, a DM command gets a refusal, not a job.
            fake.synced_global = [
                {k: v for k, v in c.items() if k != "guild_id"} for c in fake.synced_guild
            ]
            dm = Channel(id=fake.snowflake(), name="dm", guild_id=None, kind="dm", recipient=alice)
            fake.channels.append(dm)
            refused = await fake.slash(alice, "imagine", prompt="a fox", channel=dm)
            assert await _answer(refused) == DM_COMMAND
            assert await bot.core.jobs.for_user(alice.id) == []
