"""Pictures in: /blend (mix 2-5 pictures into a grid), /describe (four prompt suggestions for a
picture) and the buttons under a /describe's result. (/imagine's image options and image links
are the imagine cog's.)

Fetching a picture can take longer than the 3 seconds Discord gives a command, so these commands
acknowledge first, privately ("thinking…" only the member sees); a refusal (a link from a host
that isn't allowed, a file that is no image, a flagged picture) then stays private, and each
job's status message is a public follow-up that is edited like any other. Attachments are fetched
through the same policy as links (bot/app/fetch.py).
"""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.app.actions import UserError
from bot.app.application import ImagineApp
from bot.app.inputs import BlendShape
from bot.config import Config
from bot.discord.actors import Actors
from bot.discord.interactions import report_error
from bot.discord.permissions import missing_for_delivery, refusal_text
from bot.discord.status import StatusMessages
from bot.discord.views.describe import DescribeAction


class PicturesCog(commands.Cog, name="Pictures"):
    def __init__(
        self, config: Config, app: ImagineApp, actors: Actors, status: StatusMessages
    ) -> None:
        self.config = config
        self.app = app
        self.actors = actors
        self.status = status
        # Built here, not in the class body: its `model` choices are the configured models.
        self.blend = self._blend_command()
        self.__cog_app_commands__ = [*self.__cog_app_commands__, self.blend]

    def _blend_command(self) -> app_commands.Command[Any, ..., None]:
        cog = self

        @app_commands.command(name="blend", description="Mix 2 to 5 pictures into a new grid")
        @app_commands.describe(
            image1="First picture",
            image2="Second picture",
            image3="Third picture (optional)",
            image4="Fourth picture (optional)",
            image5="Fifth picture (optional)",
            shape="portrait 2:3, square (default) or landscape 3:2",
            model="Which model to use",
        )
        @app_commands.choices(
            shape=[
                app_commands.Choice(name="portrait (2:3)", value=BlendShape.PORTRAIT.value),
                app_commands.Choice(name="square (1:1)", value=BlendShape.SQUARE.value),
                app_commands.Choice(name="landscape (3:2)", value=BlendShape.LANDSCAPE.value),
            ],
            model=[
                app_commands.Choice(name=m.name, value=m.name) for m in self.config.engine.models
            ],
        )
        async def blend(
            interaction: discord.Interaction[Any],
            image1: discord.Attachment,
            image2: discord.Attachment | None = None,
            image3: discord.Attachment | None = None,
            image4: discord.Attachment | None = None,
            image5: discord.Attachment | None = None,
            shape: str | None = None,
            model: str | None = None,
        ) -> None:
            pictures = [image1, image2, image3, image4, image5]
            await cog.run_blend(interaction, [a for a in pictures if a is not None], shape, model)

        return blend

    async def run_blend(
        self,
        interaction: discord.Interaction[Any],
        pictures: list[discord.Attachment],
        shape: str | None,
        model: str | None,
    ) -> None:
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        if len(pictures) < 2:
            raise UserError("images: /blend needs at least 2 pictures (up to 5).")
        await interaction.response.defer(ephemeral=True, thinking=True)
        submitted = await self.app.blend(
            self.actors.actor(interaction),
            pictures,
            BlendShape(shape or BlendShape.SQUARE.value),
            model,
        )
        await self.status.announce(interaction, [submitted])

    @app_commands.command(name="describe", description="Four prompt suggestions for a picture")
    @app_commands.describe(
        image="The picture to describe", link="Or a link to it (Discord attachments only)"
    )
    async def describe(
        self,
        interaction: discord.Interaction[Any],
        image: discord.Attachment | None = None,
        link: app_commands.Range[str, 1, 1000] | None = None,
    ) -> None:
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        if (image is None) == (link is None):
            raise UserError("image/link: give /describe one picture, as an image or a link.")
        await interaction.response.defer(ephemeral=True, thinking=True)
        picture = image if image is not None else (link or "").strip().strip("<>")
        submitted = await self.app.describe(self.actors.actor(interaction), picture)
        await self.status.announce(interaction, [submitted])

    async def on_describe_button(
        self, interaction: discord.Interaction[Any], action: DescribeAction, job_id: int, index: int
    ) -> None:
        """Buttons 1–4 and 🔄 under a /describe result (the client hands their presses here)."""
        try:
            # Acknowledged before any database work, as the grid's buttons are.
            await interaction.response.defer()
            missing = missing_for_delivery(interaction)
            if missing:
                raise UserError(refusal_text(missing))
            actor = self.actors.actor(interaction)
            if action is DescribeAction.AGAIN:
                batch = [await self.app.describe_again(actor, job_id)]
            else:
                batch = await self.app.imagine_suggestion(actor, job_id, index)
            for submitted in batch:
                # A reply to the pressed message, as a grid button's job gets.
                await self.status.post_status(interaction, submitted)
        except Exception as exc:
            await report_error(interaction, exc)
