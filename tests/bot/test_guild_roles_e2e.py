"""The Discord client's answer to "is this member an admin of that server" for front ends outside
an interaction (bot/discord/guild_roles.py), asked of the fake Discord over real sockets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bot.app.access import AdminScope
from bot.app.admin import seat_for
from bot.discord.guild_roles import DiscordGuildRoles
from tests.bot.helpers import make_bot
from tests.fakediscord import MANAGE_GUILD, FakeDiscord


async def test_members_roles_and_manage_server_come_from_discord_once_per_ttl(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        managers = fake.add_role("managers", MANAGE_GUILD)
        moderator = fake.add_user("moderator", roles=[managers])
        alice = fake.add_user("alice", roles=["artists"])
        second = fake.add_guild("Second")
        elsewhere = fake.add_user("elsewhere", guild=second, roles=[])
        bot = make_bot(
            fake,
            tmp_path / "data",
            bot_engine_settings,
            shared_engine,
            discord={"guild_ids": [fake.guild_id, second.id]},
        )
        async with fake.run_bot(bot):
            now = [0.0]
            roles = DiscordGuildRoles(bot, bot.actors, ttl_s=30, monotonic=lambda: now[0])
            assert fake.owner.id in roles.owner_ids()

            found = await roles.membership(fake.guild_id, moderator.id)
            assert found is not None and found.manage_guild
            assert found.role_ids == (managers.id,)
            member = await roles.membership(fake.guild_id, alice.id)
            assert member is not None and not member.manage_guild
            assert member.role_ids == (fake.role("artists").id,)
            assert await roles.membership(fake.guild_id, elsewhere.id) is None
            assert await roles.membership(fake.snowflake(), alice.id) is None

            config = bot.config.discord
            assert (await seat_for(config, roles, moderator.id, fake.guild_id)).scope is (
                AdminScope.SERVER
            )
            assert (await seat_for(config, roles, moderator.id, second.id)).scope is (
                AdminScope.NONE
            )
            assert (await seat_for(config, roles, alice.id, fake.guild_id)).scope is (
                AdminScope.NONE
            )
            assert (await seat_for(config, roles, fake.owner.id, None)).scope is (AdminScope.OWNER)

            def lookups() -> int:
                return sum(1 for r in fake.requests if r.matches("GET", "/guilds/*/members/*"))

            asked = lookups()
            assert asked > 0
            await roles.membership(fake.guild_id, moderator.id)
            assert lookups() == asked
            # Past the TTL a role taken away counts: Discord is asked again.
            moderator.roles.clear()
            now[0] = 31.0
            again = await roles.membership(fake.guild_id, moderator.id)
            assert again is not None and not again.manage_guild

            # Discord failing to answer gives no rights and is not kept: the next view asks.
            now[0] = 62.0
            fake.inject("GET", "/guilds/*/members/*", status=503, times=10)
            assert await roles.membership(fake.guild_id, alice.id) is None
            fake.faults.clear()
            found = await roles.membership(fake.guild_id, alice.id)
            assert found is not None and found.role_ids == (fake.role("artists").id,)
