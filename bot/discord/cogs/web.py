"""/web: a private, one-time link that signs the member in to the web home (for owners who
don't register an OAuth redirect). The link is made by the app (bot/app/sign_in.py); this cog
only says who asks, from where, with which rights."""

from __future__ import annotations

from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.app.sign_in import SignInLinks
from bot.discord.actors import Actors
from bot.discord.interactions import reply


class WebCog(commands.Cog, name="Web"):
    def __init__(self, links: SignInLinks, actors: Actors) -> None:
        self.links = links
        self.actors = actors

    @app_commands.command(
        name="web", description="A private link that signs you in to the web home"
    )
    async def web(self, interaction: discord.Interaction[Any]) -> None:
        user = interaction.user
        link = await self.links.mint(
            user.id,
            user.display_name,
            interaction.guild_id,
            self.actors.admin_scope(interaction).value,
        )
        minutes = max(1, round(link.ttl_s / 60))
        view = discord.ui.View()
        view.add_item(discord.ui.Button(label="Open the web home", url=link.url))
        await reply(
            interaction,
            f"Your sign-in link (only you see it; it works once, for {minutes} minutes; "
            "don't share it):\n" + link.url,
            view=view,
            suppress_embeds=True,
        )
