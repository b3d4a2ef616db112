"""/rank (teach `--p` one's taste: the better of two of one's own images, as many rounds as one
likes) and erasing one's taste profile from the /settings panel.

Everything is private to the member: /rank answers in an ephemeral message that each press
edits into the next round; the pictures come from the member's own kept jobs
(bot/app/personalize.py decides which and checks the buttons' claims).
"""

from __future__ import annotations

import io
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.app.application import ImagineApp
from bot.app.personalize import Choice, RankRound, rank_text
from bot.core.taste import Ref
from bot.discord.actors import Actors
from bot.discord.interactions import report_error
from bot.discord.views.taste import erase_view, rank_view


def _file(round_: RankRound) -> discord.File:
    return discord.File(io.BytesIO(round_.png), filename="rank.png")


class RankCog(commands.Cog, name="Rank"):
    def __init__(self, app: ImagineApp, actors: Actors) -> None:
        self.app = app
        self.actors = actors

    @app_commands.command(
        name="rank", description="Pick the better of two of your images: teaches --p your taste"
    )
    async def rank(self, interaction: discord.Interaction[Any]) -> None:
        # Private from the first answer: the round reads files and the database.
        await interaction.response.defer(ephemeral=True, thinking=True)
        round_ = await self.app.personal.next_round(self.actors.actor(interaction))
        await interaction.followup.send(
            rank_text(round_), file=_file(round_), view=rank_view(round_), ephemeral=True
        )

    async def on_rank_button(
        self, interaction: discord.Interaction[Any], left: Ref, right: Ref, choice: Choice
    ) -> None:
        """Left, right or skip: recorded, then the same message shows the next round."""
        try:
            await interaction.response.defer()
            round_ = await self.app.personal.answer(
                self.actors.actor(interaction), left, right, choice
            )
            await interaction.edit_original_response(
                content=rank_text(round_), attachments=[_file(round_)], view=rank_view(round_)
            )
        except Exception as exc:
            await report_error(interaction, exc)

    async def on_erase_button(self, interaction: discord.Interaction[Any], sure: bool) -> None:
        """The /settings panel's "Erase taste profile" asks first; "Yes" erases."""
        try:
            actor = self.actors.actor(interaction)
            if not sure:
                profile = await self.app.personal.profile(actor)
                await interaction.response.send_message(
                    f"Erase your taste profile? Its {profile.pairs} ratings are deleted, `--p` "
                    f"starts from nothing and your code `{profile.code}` stops working for "
                    "whoever you shared it with. This can't be undone.",
                    view=erase_view(),
                    ephemeral=True,
                )
                return
            erased = await self.app.personal.erase(actor)
            await interaction.response.edit_message(
                content=f"Your taste profile is erased ({erased} ratings deleted). New picks and "
                "/rank answers start a new one, with a new code.",
                view=None,
            )
        except Exception as exc:
            await report_error(interaction, exc)
