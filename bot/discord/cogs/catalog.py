"""The Discord side of what the server offers: /models, the autocomplete of the /imagine `model`
and `lora` options (the `control_image` a --cn ControlNet follows is fetched by the app).

The text and the suggestions come from `bot.catalog`; this module only wires them to discord.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot.app import catalog

if TYPE_CHECKING:
    from bot.discord.client import ImagineBot

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


def _choices(choices: list[catalog.Choice]) -> list[app_commands.Choice[str]]:
    return [app_commands.Choice(name=choice.name, value=choice.value) for choice in choices]


def _clip(text: str) -> str:
    return text if len(text) <= EMBED_CHARS else text[: EMBED_CHARS - 2] + " …"
