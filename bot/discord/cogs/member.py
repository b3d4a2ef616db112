"""A member's own commands: /balance, /jobs, /info, /settings (a private panel of selects and
switches, bot/discord/views/settings.py) and /prefer (a suffix and named shortcuts)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.app import render
from bot.app.actions import UserError
from bot.app.application import ImagineApp
from bot.config import Config
from bot.core.clock import Clock
from bot.core.preferences import (
    MAX_OPTION_VALUE_CHARS,
    MAX_SUFFIX_CHARS,
    Preferences,
    normalise_option_name,
)
from bot.core.service import Core
from bot.core.web_store import WebStore
from bot.discord.actors import Actors
from bot.discord.interactions import reply, report_error
from bot.discord.views.settings import EXPLORE_FIELD, settings_view


class MemberCog(commands.Cog, name="Member"):
    def __init__(
        self, config: Config, app: ImagineApp, core: Core, actors: Actors, clock: Clock
    ) -> None:
        self.config = config
        self.app = app
        self.core = core
        self.actors = actors
        self.clock = clock

    @app_commands.command(
        name="balance", description="Your credits, today's free allowance and recent activity"
    )
    async def balance(self, interaction: discord.Interaction[Any]) -> None:
        actor = self.actors.actor(interaction)
        current = await self.core.credits.balance(actor.user_id, actor.role_ids)
        entries = await self.core.credits.ledger(actor.user_id, 5)
        modes = await self.app.modes.balance_lines(actor)
        await reply(interaction, render.balance_text(current, entries, self.clock(), modes))

    @app_commands.command(name="jobs", description="Your queued and running jobs")
    async def jobs(self, interaction: discord.Interaction[Any]) -> None:
        active = await self.core.scheduler.user_jobs(interaction.user.id)
        await reply(interaction, render.jobs_text(active))

    @app_commands.command(name="info", description="Your credits, jobs in the queue and settings")
    async def info(self, interaction: discord.Interaction[Any]) -> None:
        found = await self.app.info(self.actors.actor(interaction))
        await reply(interaction, render.info_text(found, self.config.engine, self.clock()))

    # ----- /settings and its panel -------------------------------------------------------------

    @app_commands.command(name="settings", description="Your defaults, previews and Remix")
    async def settings(self, interaction: discord.Interaction[Any]) -> None:
        prefs = await self.app.preferences.get(interaction.user.id)
        explore = await self._explore(interaction.user.id, interaction.guild_id)
        await interaction.response.send_message(
            render.settings_text(prefs, self.config.engine),
            view=settings_view(self.config.engine, prefs, explore),
            ephemeral=True,
        )

    async def _explore(self, user_id: int, guild_id: int | None) -> bool | None:
        """Whether the member shares in the web home's Explore; None when it is off."""
        if not self.config.web.enabled:
            return None
        return await WebStore(self.core.db, self.clock).shares(user_id, guild_id)

    async def on_settings_change(
        self, interaction: discord.Interaction[Any], field: str, value: object
    ) -> None:
        """A select of the panel (the client hands its presses here)."""
        await self._change(interaction, **{field: value})

    async def on_settings_toggle(self, interaction: discord.Interaction[Any], field: str) -> None:
        """A switch of the panel: the opposite of the member's current setting."""
        if field == EXPLORE_FIELD:
            shared = await self._explore(interaction.user.id, interaction.guild_id)
            if shared is not None:
                store = WebStore(self.core.db, self.clock)
                await store.set_share(interaction.user.id, not shared)
            await self._change(interaction)
            return
        prefs = await self.app.preferences.get(interaction.user.id)
        await self._change(interaction, **{field: not getattr(prefs, field)})

    async def _change(self, interaction: discord.Interaction[Any], **changes: Any) -> None:
        try:
            prefs = await self.app.preferences.update(interaction.user.id, **changes)
        except ValueError as exc:
            await report_error(interaction, UserError(f"Not saved: {exc}"))
            return
        explore = await self._explore(interaction.user.id, interaction.guild_id)
        await interaction.response.edit_message(
            content=render.settings_text(prefs, self.config.engine),
            view=settings_view(self.config.engine, prefs, explore),
        )

    # ----- /prefer -----------------------------------------------------------------------------

    prefer = app_commands.Group(name="prefer", description="Text added to your prompts")
    option = app_commands.Group(
        name="option", description="Your named shortcuts like --mystyle", parent=prefer
    )

    @prefer.command(name="suffix", description="Text added to the end of every prompt")
    @app_commands.describe(text="Leave out to remove your suffix")
    async def suffix(
        self,
        interaction: discord.Interaction[Any],
        text: app_commands.Range[str, 1, MAX_SUFFIX_CHARS] | None = None,
    ) -> None:
        prefs = await _saved(self.app.preferences.set_suffix(interaction.user.id, text))
        shown = render.quote_prompt(prefs.suffix) if prefs.suffix else "nothing"
        await reply(interaction, f"Your prompts now end with {shown}.")

    @option.command(name="set", description="Make --name in your prompts stand for some text")
    @app_commands.describe(name="The shortcut, e.g. mystyle", value="What --name stands for")
    async def option_set(
        self,
        interaction: discord.Interaction[Any],
        name: app_commands.Range[str, 1, 34],
        value: app_commands.Range[str, 1, MAX_OPTION_VALUE_CHARS],
    ) -> None:
        prefs = await _saved(self.app.preferences.set_option(interaction.user.id, name, value))
        saved = normalise_option_name(name)
        await reply(
            interaction, f"`--{saved}` now stands for {render.quote_prompt(prefs.options[saved])}."
        )

    @option.command(name="list", description="Your shortcuts")
    async def option_list(self, interaction: discord.Interaction[Any]) -> None:
        prefs = await self.app.preferences.get(interaction.user.id)
        await reply(interaction, render.options_text(prefs))

    @option.command(name="unset", description="Remove a shortcut")
    @app_commands.describe(name="The shortcut to remove")
    async def option_unset(
        self, interaction: discord.Interaction[Any], name: app_commands.Range[str, 1, 34]
    ) -> None:
        await _saved(self.app.preferences.unset_option(interaction.user.id, name))
        await reply(interaction, f"Removed `--{normalise_option_name(name)}`.")


async def _saved(change: Awaitable[Preferences]) -> Preferences:
    try:
        return await change
    except ValueError as exc:
        raise UserError(f"Not saved: {exc}") from None
