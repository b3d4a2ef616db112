"""/shorten (which words of a prompt matter to CLIP, and shorter prompts) and the buttons under
its result. The work is a job like /describe's: CLIP runs on a worker, never here.

The command acknowledges privately first, like /describe, so a refusal (nothing to weigh, a
bad flag) stays private; the job's status message is a public follow-up that delivery edits
into the result (bot/discord/delivery.py, bot/app/shorten.py's text).
"""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.app.actions import UserError
from bot.app.application import ImagineApp
from bot.discord.actors import Actors
from bot.discord.interactions import report_error
from bot.discord.permissions import missing_for_delivery, refusal_text
from bot.discord.status import StatusMessages


class ShortenCog(commands.Cog, name="Shorten"):
    def __init__(self, app: ImagineApp, actors: Actors, status: StatusMessages) -> None:
        self.app = app
        self.actors = actors
        self.status = status

    @app_commands.command(
        name="shorten", description="Which words of a prompt matter, and shorter prompts"
    )
    @app_commands.describe(prompt="The prompt to weigh (its --flags are kept as they are)")
    async def shorten(
        self, interaction: discord.Interaction[Any], prompt: app_commands.Range[str, 1, 6000]
    ) -> None:
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        await interaction.response.defer(ephemeral=True, thinking=True)
        submitted = await self.app.shorten(self.actors.actor(interaction), prompt)
        await self.status.announce(interaction, [submitted])

    async def on_shorten_button(
        self, interaction: discord.Interaction[Any], job_id: int, index: int
    ) -> None:
        """Buttons 1–5 under a /shorten result (the client hands their presses here)."""
        try:
            # Acknowledged before any database work, as the grid's buttons are.
            await interaction.response.defer()
            missing = missing_for_delivery(interaction)
            if missing:
                raise UserError(refusal_text(missing))
            batch = await self.app.imagine_shortened(self.actors.actor(interaction), job_id, index)
            for submitted in batch:
                # A reply to the pressed message, as a grid button's job gets.
                await self.status.post_status(interaction, submitted)
        except Exception as exc:
            await report_error(interaction, exc)
