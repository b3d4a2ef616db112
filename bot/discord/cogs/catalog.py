"""What the server offers and how to use it: /models (its models, LoRAs and ControlNets, from
bot/app/catalog.py) and /help (what the bot does, the flags it understands, and costs)."""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.app import catalog, render
from bot.config import Config
from bot.discord.interactions import chunks

# Discord's limit for an embed's description.
EMBED_CHARS = 4096


class CatalogCog(commands.Cog, name="Catalog"):
    def __init__(self, config: Config) -> None:
        self.config = config

    @app_commands.command(
        name="models", description="The models, LoRAs and ControlNets this server offers"
    )
    async def models(self, interaction: discord.Interaction[Any]) -> None:
        embeds = [
            discord.Embed(title=title, description=_clip(text), colour=discord.Colour.blurple())
            for title, text in catalog.catalog_sections(self.config)
        ]
        await interaction.response.send_message(embeds=embeds, ephemeral=True)

    @app_commands.command(
        name="help", description="What this bot does, the flags it understands, and costs"
    )
    async def help_(self, interaction: discord.Interaction[Any]) -> None:
        text = render.help_text(self.config)
        embeds = [
            discord.Embed(description=chunk, colour=discord.Colour.blurple())
            for chunk in chunks(text, 4000)
        ]
        await interaction.response.send_message(embeds=embeds[:10], ephemeral=True)


def _clip(text: str) -> str:
    return text if len(text) <= EMBED_CHARS else text[: EMBED_CHARS - 2] + " …"
