"""Pictures in, on Discord: /imagine's image options and image links, /blend, /describe and the
buttons under a /describe.

Fetching a picture can take longer than the 3 seconds Discord gives a command, so these
commands acknowledge first, privately ("thinking…" only the member sees); a refusal (a link
from a host that isn't allowed, a file that is no image, a flagged picture) then stays private,
and each job's status message is a public follow-up that is edited like any other. Attachments
are fetched through the same policy as links (bot/app/fetch.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot.app.actions import Submitted, UserError
from bot.app.application import picture_inputs as app_picture_inputs
from bot.app.fetch import FetchPolicy
from bot.app.inputs import BlendShape, InputScreen, PictureInputs
from bot.discord.delivery import JobMessage
from bot.discord.permissions import missing_for_delivery, refusal_text
from bot.discord.views.describe import DescribeAction, DescribeButton
from generation.prompt import ImagineOptions
from generation.references import LINK

if TYPE_CHECKING:
    from bot.discord.client import ImagineBot

log = logging.getLogger(__name__)


def picture_inputs(bot: ImagineBot, policy: FetchPolicy) -> PictureInputs:
    """The app's picture handling, judging age restriction as the bot sees channels."""
    screen = InputScreen(bot.config.moderation, bot.is_nsfw_channel, bot.core.audit)
    return app_picture_inputs(bot.config, screen, policy)


def wants_pictures(prompt: str, *attachments: discord.Attachment | None) -> bool:
    """Whether /imagine has pictures to fetch (attachments, or links anywhere in the prompt)."""
    return any(a is not None for a in attachments) or LINK.search(prompt) is not None


async def imagine_with_pictures(
    bot: ImagineBot,
    interaction: discord.Interaction[Any],
    prompt: str,
    options: ImagineOptions,
    model: str | None,
    attachments: Sequence[discord.Attachment | None],
    control_image: discord.Attachment | None = None,
) -> None:
    """/imagine with pictures, acknowledged (privately) by the caller. The app fetches them
    only once the command may go ahead (cooldown, prompt, queue and credits checked)."""
    batch = await bot.app.imagine(
        bot.actor(interaction),
        prompt,
        options,
        model,
        attachments=[a for a in attachments if a is not None],
        control_image=control_image,
    )
    await announce(bot, interaction, batch)


async def announce(
    bot: ImagineBot, interaction: discord.Interaction[Any], batch: Sequence[Submitted]
) -> None:
    """Close the private "thinking…" with what was queued, then give each job its public
    status message (a follow-up), which delivery edits into the result."""
    jobs = ", ".join(str(s.job.id) for s in batch)
    try:
        await interaction.edit_original_response(
            content=f"✅ Queued: job{'s' if len(batch) > 1 else ''} {jobs}."
        )
    except discord.HTTPException as exc:
        # While "thinking…" stands, a follow-up would replace it (privately): post to the
        # channel instead.
        log.info("jobs %s: acknowledgement not edited (%s)", jobs, exc)
        for submitted in batch:
            bot.delivery.track(JobMessage(submitted.job, submitted.notes))
        return
    for submitted in batch:
        await bot.follow_up(interaction, submitted)


async def describe_pressed(
    interaction: discord.Interaction[Any], action: DescribeAction, job_id: int, index: int
) -> None:
    """Buttons 1–4 and 🔄 under a /describe result."""
    from bot.discord.client import report_error

    bot: ImagineBot = interaction.client
    try:
        # Acknowledged before any database work, as the grid's buttons are.
        await interaction.response.defer()
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        actor = bot.actor(interaction)
        if action is DescribeAction.AGAIN:
            batch = [await bot.app.describe_again(actor, job_id)]
        else:
            batch = await bot.app.imagine_suggestion(actor, job_id, index)
        for submitted in batch:
            # A reply to the pressed message, as a grid button's job gets.
            await bot.post_status(interaction, submitted)
    except Exception as exc:
        await report_error(interaction, exc)


def add_picture_commands(bot: ImagineBot) -> None:
    """/blend and /describe, and the buttons under a /describe."""
    tree = bot.tree
    bot.add_dynamic_items(DescribeButton)
    model_choices = [
        app_commands.Choice(name=m.name, value=m.name) for m in bot.config.engine.models
    ]

    @tree.command(name="blend", description="Mix 2 to 5 pictures into a new grid")
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
        model=model_choices,
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
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        given = [image1, image2, image3, image4, image5]
        if sum(a is not None for a in given) < 2:
            raise UserError("images: /blend needs at least 2 pictures (up to 5).")
        await interaction.response.defer(ephemeral=True, thinking=True)
        submitted = await bot.app.blend(
            bot.actor(interaction),
            [a for a in given if a is not None],
            BlendShape(shape or BlendShape.SQUARE.value),
            model,
        )
        await announce(bot, interaction, [submitted])

    @tree.command(name="describe", description="Four prompt suggestions for a picture")
    @app_commands.describe(
        image="The picture to describe", link="Or a link to it (Discord attachments only)"
    )
    async def describe(
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
        submitted = await bot.app.describe(bot.actor(interaction), picture)
        await announce(bot, interaction, [submitted])
