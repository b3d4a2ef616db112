"""Answering an interaction: the one reply helper, the one place errors meet members, and the
length Discord allows. Shared by every cog and form; it imports no cog and no client."""

from __future__ import annotations

import logging
from typing import Any

import discord
from discord import app_commands

from bot.app.actions import UserError
from bot.app.refusals import RefusalLimiter
from bot.core.service import Core

log = logging.getLogger(__name__)

# Discord caps a message at 2000 characters; longer replies are cut with a marker.
MESSAGE_LIMIT = 2000


async def report_error(interaction: discord.Interaction[Any], error: BaseException) -> None:
    """The one place errors meet users: short and specific for theirs, generic for ours."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    core = getattr(interaction.client, "core", None)
    if isinstance(error, discord.HTTPException) and isinstance(core, Core):
        core.scheduler.metrics.discord_error(error.code)
    refusals = getattr(interaction.client, "refusals", None)
    if isinstance(refusals, RefusalLimiter) and isinstance(
        error, UserError | app_commands.CheckFailure
    ):
        refusals.record(interaction.user.id)
    if isinstance(error, UserError):
        message = str(error)
    elif isinstance(error, app_commands.CheckFailure):
        message = str(error) or "You can't use this command here."
    elif (
        isinstance(error, ValueError)
        and interaction.command
        and interaction.command.qualified_name.startswith("admin")
    ):
        message = f"Not done: {error}"
    else:
        log.error(
            "unexpected error in %s by user %s in channel %s",
            interaction.command.qualified_name if interaction.command else interaction.data,
            interaction.user.id,
            interaction.channel_id,
            exc_info=error,
        )
        message = "Something went wrong on our side; nothing was charged. Please try again."
    await reply(interaction, message, ephemeral=True)


async def reply(
    interaction: discord.Interaction[Any], content: str, *, ephemeral: bool = True, **options: Any
) -> None:
    content = clip(content)
    try:
        if interaction.response.is_done():
            await interaction.followup.send(content, ephemeral=ephemeral, **options)
        else:
            await interaction.response.send_message(content, ephemeral=ephemeral, **options)
    except discord.HTTPException as exc:
        log.warning("could not reply to interaction %s: %s", interaction.id, exc)


def clip(text: str, limit: int = MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 2] + " …"


def chunks(text: str, size: int) -> list[str]:
    """`text` cut at line ends into pieces of at most `size` characters (embeds, long lists)."""
    pieces: list[str] = []
    current = ""
    for line in text.splitlines():
        if len(current) + len(line) + 1 > size:
            pieces.append(current)
            current = ""
        current += line + "\n"
    return [*pieces, current] if current else pieces
