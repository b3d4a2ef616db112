"""Speed modes: /fast, /relax and /turbo choose a member's mode (bot/app/modes.py), and
/relax-server switches relax on or off for a server (its admins and the bot's owners)."""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.app.modes import ModeDesk
from bot.core.models import Mode
from bot.discord.actors import Actors
from bot.discord.interactions import reply


class ModesCog(commands.Cog, name="Modes"):
    def __init__(self, modes: ModeDesk, actors: Actors) -> None:
        self.modes = modes
        self.actors = actors

    @app_commands.command(name="fast", description="Fast mode: your jobs use credits and go first")
    async def fast(self, interaction: discord.Interaction[Any]) -> None:
        await self._choose(interaction, Mode.FAST)

    @app_commands.command(
        name="relax", description="Relax mode: your jobs wait for a free GPU and cost less"
    )
    async def relax(self, interaction: discord.Interaction[Any]) -> None:
        await self._choose(interaction, Mode.RELAX)

    @app_commands.command(
        name="turbo", description="Turbo mode: your jobs go ahead of fast ones, at a higher cost"
    )
    async def turbo(self, interaction: discord.Interaction[Any]) -> None:
        await self._choose(interaction, Mode.TURBO)

    async def _choose(self, interaction: discord.Interaction[Any], mode: Mode) -> None:
        # A refusal (relax switched off here) is a UserError: the one error handler answers it
        # privately and nothing is saved.
        text = await self.modes.choose(self.actors.actor(interaction), mode)
        await reply(interaction, text)

    @app_commands.command(
        name="relax-server", description="Switch relax mode on or off for this server (admins)"
    )
    @app_commands.describe(enabled="Whether members of this server may use relax mode")
    @app_commands.default_permissions(manage_guild=True)
    @app_commands.guild_only()
    async def relax_server(self, interaction: discord.Interaction[Any], enabled: bool) -> None:
        # Checked in the app as well (bot/app/access.py): a server may override Discord's
        # default permissions.
        text = await self.modes.set_server_relax(self.actors.actor(interaction), enabled)
        await reply(interaction, text)
