"""What the bot needs in a channel to deliver results there, checked before anyone is charged.

A result edits the job's interaction response while the token lives, but after 15 minutes, for
button jobs (their status message is a channel message) and after a restart it is posted or
edited with the bot token, which obeys the bot's channel permissions. Discord's
`app_permissions` always includes Attach Files and Embed Links (interaction responses may use
them anywhere), so those are read from the channel's permissions computed from the gateway cache
when the bot has it.
"""

from __future__ import annotations

from typing import Any

import discord

_THREAD_TYPES = (
    discord.ChannelType.public_thread,
    discord.ChannelType.private_thread,
    discord.ChannelType.news_thread,
)
# Permission flag -> the name Discord shows server admins.
_NAMES = {
    "view_channel": "View Channel",
    "send_messages": "Send Messages",
    "send_messages_in_threads": "Send Messages in Threads",
    "attach_files": "Attach Files",
    "read_message_history": "Read Message History",
}


def needed_for_delivery(in_thread: bool) -> tuple[str, ...]:
    """Permission flags delivery uses: posting (in a thread: Send Messages in Threads), the
    image, replies and the restart path's look at recent messages."""
    send = "send_messages_in_threads" if in_thread else "send_messages"
    return ("view_channel", send, "attach_files", "read_message_history")


def missing_for_delivery(interaction: discord.Interaction[Any]) -> list[str]:
    """Names of the permissions the bot lacks in the interaction's channel; empty in DMs."""
    if interaction.guild_id is None or interaction.channel_id is None:
        return []
    granted = interaction.app_permissions
    cached = _cached_permissions(interaction)
    if cached is not None:
        granted = granted & cached
    channel_type = getattr(interaction.channel, "type", None)
    needed = needed_for_delivery(channel_type in _THREAD_TYPES)
    return [_NAMES[flag] for flag in needed if not getattr(granted, flag)]


def refusal_text(missing: list[str]) -> str:
    names = ", ".join(f"**{name}**" for name in missing)
    plural = "s" if len(missing) > 1 else ""
    return (
        f"I can't deliver images in this channel: I'm missing the {names} permission{plural} "
        "here. Ask a server admin to grant it, or use me in another channel. Nothing was charged."
    )


def _cached_permissions(interaction: discord.Interaction[Any]) -> discord.Permissions | None:
    """The bot's permissions in the channel from the gateway cache; None where the cache lacks
    the guild, the bot's member or the channel (then `app_permissions` alone decides)."""
    assert interaction.guild_id is not None and interaction.channel_id is not None
    guild = interaction.client.get_guild(interaction.guild_id)
    if guild is None or guild.me is None:
        return None
    channel = guild.get_channel_or_thread(interaction.channel_id)
    if channel is None:
        return None
    try:
        return channel.permissions_for(guild.me)
    except discord.ClientException:  # a thread whose parent channel isn't cached
        return None
