"""Who acts in an interaction: the `Actor` the app is given (member, server, channel, roles and
how far their admin rights reach), and which channels are age-restricted as the bot sees them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import discord

from bot.app import access
from bot.app.access import AdminScope
from bot.app.actions import Actor
from bot.config import DiscordConfig


class Actors:
    def __init__(self, config: DiscordConfig, get_channel: Callable[[int], Any]) -> None:
        """`get_channel`: the gateway's channel cache (None for a channel it lacks)."""
        self.config = config
        self._get_channel = get_channel
        # admin_user_ids, and the application's owner or team once the client has asked.
        self.owner_ids: frozenset[int] = config.admin_user_ids
        self.nsfw_channels: set[int] = set()

    def actor(self, interaction: discord.Interaction[Any]) -> Actor:
        user = interaction.user
        roles = tuple(r.id for r in getattr(user, "roles", ()) if r.id != interaction.guild_id)
        channel = interaction.channel
        if channel is not None and getattr(channel, "is_nsfw", lambda: False)():
            self.nsfw_channels.add(channel.id)
        scope = self.admin_scope(interaction)
        return Actor(
            user_id=user.id,
            guild_id=interaction.guild_id,
            channel_id=interaction.channel_id,
            role_ids=roles,
            is_admin=scope is not AdminScope.NONE,
            is_owner=scope is AdminScope.OWNER,
        )

    def is_nsfw_channel(self, channel_id: int | None) -> bool:
        """Discord's age-restricted flag, from the gateway's channel cache, or as seen on an
        interaction (threads and channels the cache lacks)."""
        channel = self._get_channel(channel_id) if channel_id is not None else None
        is_nsfw = getattr(channel, "is_nsfw", None)
        if is_nsfw is not None:
            return bool(is_nsfw())
        return channel_id in self.nsfw_channels

    def admin_scope(self, interaction: discord.Interaction[Any]) -> AdminScope:
        """Checked here, in the bot: Discord's default_permissions can be overridden by a
        server, and Manage Server counts only in a server the bot serves (bot/app/access.py)."""
        guild_id = interaction.guild_id
        return access.admin_scope(
            self.config,
            user_id=interaction.user.id,
            guild_id=guild_id,
            role_ids=[role.id for role in getattr(interaction.user, "roles", ())],
            manage_guild=guild_id is not None and interaction.permissions.manage_guild,
            owner_ids=self.owner_ids,
        )
