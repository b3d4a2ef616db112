"""The servers as the bot sees them, for front ends that aren't in an interaction (the web): who
the owners are, and a member's roles and Manage Server in a server (bot/app/admin.py's
`GuildRoles`).

A member comes from the gateway cache when it has them (the bot asks for no members intent, so
mostly it doesn't), else from Discord (GET /guilds/{id}/members/{id}). Answers are kept for
`ttl_s` so a page view costs no request each time; a role taken away therefore counts for at
most that long on the web (Discord's own interactions are always current).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import discord

from bot.app.admin import Membership
from bot.discord.actors import Actors

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 30.0
_MAX_CACHED = 10_000


class DiscordGuildRoles:
    def __init__(
        self,
        client: discord.Client,
        actors: Actors,
        ttl_s: float = DEFAULT_TTL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._actors = actors
        self._ttl_s = ttl_s
        self._monotonic = monotonic
        self._cache: dict[tuple[int, int], tuple[float, Membership | None]] = {}

    def owner_ids(self) -> frozenset[int]:
        # admin_user_ids, and the application's owner or team once the client has asked.
        return self._actors.owner_ids

    async def membership(self, guild_id: int, user_id: int) -> Membership | None:
        key = (guild_id, user_id)
        now = self._monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        try:
            found = await self._look_up(guild_id, user_id)
        except discord.HTTPException as exc:
            # Discord didn't answer: no rights this time, and nothing kept, so the next page
            # view asks again.
            log.warning("could not look up member %s of server %s: %s", user_id, guild_id, exc)
            return None
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = (now, found)
        return found

    async def _look_up(self, guild_id: int, user_id: int) -> Membership | None:
        guild = self._client.get_guild(guild_id)
        if guild is None:
            return None
        member = guild.get_member(user_id)
        if member is None:
            try:
                member = await guild.fetch_member(user_id)
            except discord.NotFound:
                return None
        roles = tuple(role.id for role in member.roles if role.id != guild_id)
        return Membership(roles, member.guild_permissions.manage_guild)
