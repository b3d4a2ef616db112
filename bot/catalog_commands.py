"""The Discord side of what the server offers: /models, the autocomplete of the /imagine `model`
and `lora` options, and the `control_image` a --cn ControlNet follows.

The text and the suggestions come from `bot.catalog`; this module only wires them to discord.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot import catalog
from bot.app import UserError
from bot.fetch import FetchRefused, attachment_image, fetch_image
from bot.inputs import shown_source
from generation.contract import InputImage, InputRole
from generation.prompt import control_link

if TYPE_CHECKING:
    from bot.discord_bot import ImagineBot

log = logging.getLogger(__name__)

# Discord's limit for an embed's description.
EMBED_CHARS = 4096


def add_catalog_commands(bot: ImagineBot, imagine: app_commands.Command[Any, ..., Any]) -> None:
    """/models, and the suggestions of /imagine's `model` and `lora` options (before sync)."""
    config = bot.config

    @imagine.autocomplete("model")
    async def model_autocomplete(
        interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        return _choices(catalog.model_choices(config, current))

    @imagine.autocomplete("lora")
    async def lora_autocomplete(
        interaction: discord.Interaction[Any], current: str
    ) -> list[app_commands.Choice[str]]:
        # The LoRAs that fit the model picked in the same command, else the member's default
        # model (/settings), else the server's.
        model = getattr(interaction.namespace, "model", None)
        if not model:
            preferences = await bot.app.preferences.get(interaction.user.id)
            model = preferences.prompt_defaults(config.engine).model
        return _choices(catalog.lora_choices(config, current, model))

    @bot.tree.command(
        name="models", description="The models, LoRAs and ControlNets this server offers"
    )
    async def models(interaction: discord.Interaction[Any]) -> None:
        embeds = [
            discord.Embed(title=title, description=_clip(text), colour=discord.Colour.blurple())
            for title, text in catalog.catalog_sections(config)
        ]
        await interaction.response.send_message(embeds=embeds, ephemeral=True)


async def control_input(
    bot: ImagineBot,
    interaction: discord.Interaction[Any],
    attachment: discord.Attachment | None,
    prompt: str = "",
) -> InputImage | None:
    """The picture a --cn ControlNet follows: the `control_image` option, else the link after
    `--cn NAME` in the prompt, fetched and screened like every member's picture, or a UserError
    naming the option or the link; nothing is queued or charged before this returns. (With
    both, the option is taken and the parser refuses the pair.)"""
    pictures = bot.app.pictures
    link = control_link(prompt)
    try:
        if attachment is not None:
            where = f"control_image {attachment.filename}"
            picture = await attachment_image(attachment, pictures.policy)
        elif link is not None:
            where = f"--cn {shown_source(link)}"
            picture = await fetch_image(link, pictures.policy)
        else:
            return None
        await pictures.screen.check(bot.actor(interaction).owner, [picture])
    except FetchRefused as exc:
        reason = exc.reason.removeprefix(f"{attachment.filename}: " if attachment else "")
        raise UserError(f"{where}: {reason}") from None
    return InputImage(
        InputRole.CONTROL, picture.image, source=picture.source, sha256=picture.sha256
    )


def _choices(choices: list[catalog.Choice]) -> list[app_commands.Choice[str]]:
    return [app_commands.Choice(name=choice.name, value=choice.value) for choice in choices]


def _clip(text: str) -> str:
    return text if len(text) <= EMBED_CHARS else text[: EMBED_CHARS - 2] + " …"
