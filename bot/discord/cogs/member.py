"""A member's own commands: /settings (a private panel of selects and switches), /prefer
(suffix and named shortcuts), /info, and Delete in a message's Apps menu.

The panel's components are DynamicItems with fixed custom_ids (`settings:<field>`): the panel
is private to the member who opened it, so whoever presses it is whose settings change, and it
keeps working after a restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot.app import render
from bot.app.actions import UserError
from bot.core.preferences import (
    MAX_OPTION_VALUE_CHARS,
    MAX_SUFFIX_CHARS,
    Preferences,
    normalise_option_name,
)
from bot.discord.cogs.after_grid import delete_result
from generation.contract import Sampler

if TYPE_CHECKING:
    from bot.discord.client import ImagineBot

DEFAULT = "default"
ASPECTS = ["1:1", "3:2", "2:3", "4:3", "3:4", "16:9", "9:16", "21:9", "9:21"]
STEP_CHOICES = [10, 15, 20, 25, 30, 40, 50, 75, 100]
DELETE_COMMAND = "Delete image"


# Discord's limit on a select menu's options.
MAX_SELECT_OPTIONS = 25


def _options(
    current: str | None, choices: list[tuple[str, str]], default_label: str
) -> list[discord.SelectOption]:
    """The default, then the choices; a server with more models than a menu holds shows the
    first ones and the member's current choice (the others are still typed with --model)."""
    room = MAX_SELECT_OPTIONS - 1
    shown = choices[:room]
    if current is not None and all(value != current for _, value in shown):
        shown = shown[: room - 1] + [c for c in choices if c[1] == current][:1]
    options = [discord.SelectOption(label=default_label, value=DEFAULT, default=current is None)]
    options += [
        discord.SelectOption(label=label, value=value, default=value == current)
        for label, value in shown
    ]
    return options


def settings_view(bot: ImagineBot, prefs: Preferences) -> discord.ui.View:
    engine = bot.config.engine
    view = discord.ui.View(timeout=None)
    steps = [str(s) for s in STEP_CHOICES if s <= engine.max_steps]
    selects: list[tuple[str, str | None, list[tuple[str, str]], str]] = [
        ("aspect", prefs.aspect, [(a, a) for a in ASPECTS], "Aspect: server default (1:1)"),
        ("model", prefs.model, [(m.name, m.name) for m in engine.models], "Model: server default"),
        ("sampler", prefs.sampler, [(s.a1111_name, s.value) for s in Sampler], "Sampler: default"),
        (
            "steps",
            None if prefs.steps is None else str(prefs.steps),
            [(f"{s} steps", s) for s in steps],
            f"Steps: server default ({engine.default_steps})",
        ),
    ]
    for row, (field, current, choices, default_label) in enumerate(selects):
        view.add_item(SettingsSelect(field, _options(current, choices, default_label), row=row))
    for field, on, label in (
        ("previews", prefs.previews, "Previews"),
        ("remix", prefs.remix, "Remix"),
    ):
        style = discord.ButtonStyle.success if on else discord.ButtonStyle.secondary
        view.add_item(SettingsButton(field, f"{label}: {'on' if on else 'off'}", style))
    return view


class SettingsSelect(
    discord.ui.DynamicItem[discord.ui.Select[Any]],
    template=r"settings:(?P<field>aspect|model|sampler|steps)",
):
    def __init__(
        self, field: str, options: list[discord.SelectOption] | None = None, row: int | None = None
    ) -> None:
        super().__init__(
            discord.ui.Select(
                custom_id=f"settings:{field}",
                options=options or [discord.SelectOption(label=DEFAULT, value=DEFAULT)],
                row=row,
            )
        )
        self.field = field

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: Any, /
    ) -> SettingsSelect:
        return cls(match["field"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        (value,) = self.item.values
        chosen: object = None if value == DEFAULT else value
        if self.field == "steps" and chosen is not None:
            # A forged value that is no small number goes to the store as it is, which
            # refuses it by name like any wrong setting.
            chosen = (
                int(value) if value.isascii() and value.isdigit() and len(value) <= 6 else value
            )
        await _change(interaction, **{self.field: chosen})


class SettingsButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"settings:(?P<field>previews|remix)",
):
    def __init__(
        self,
        field: str,
        label: str | None = None,
        style: discord.ButtonStyle = discord.ButtonStyle.secondary,
    ) -> None:
        super().__init__(
            discord.ui.Button(label=label, style=style, custom_id=f"settings:{field}", row=4)
        )
        self.field = field

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: Any, /
    ) -> SettingsButton:
        return cls(match["field"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        bot = _bot(interaction)
        prefs = await bot.app.preferences.get(interaction.user.id)
        await _change(interaction, **{self.field: not getattr(prefs, self.field)})


def _bot(interaction: discord.Interaction[Any]) -> ImagineBot:
    return interaction.client


async def _change(interaction: discord.Interaction[Any], **changes: Any) -> None:
    from bot.discord.client import report_error

    bot = _bot(interaction)
    try:
        prefs = await bot.app.preferences.update(interaction.user.id, **changes)
    except ValueError as exc:
        await report_error(interaction, UserError(f"Not saved: {exc}"))
        return
    await interaction.response.edit_message(
        content=render.settings_text(prefs, bot.config.engine), view=settings_view(bot, prefs)
    )


class PreferCommands(app_commands.Group):
    """`/prefer suffix`, `/prefer option set|list|unset`: text a member's prompts get."""

    option = app_commands.Group(name="option", description="Your named shortcuts like --mystyle")

    def __init__(self, bot: ImagineBot) -> None:
        super().__init__(name="prefer", description="Text added to your prompts")
        self.bot = bot

    @app_commands.command(name="suffix", description="Text added to the end of every prompt")
    @app_commands.describe(text="Leave out to remove your suffix")
    async def suffix(
        self,
        interaction: discord.Interaction[Any],
        text: app_commands.Range[str, 1, MAX_SUFFIX_CHARS] | None = None,
    ) -> None:
        prefs = await _saved(self.bot.app.preferences.set_suffix(interaction.user.id, text))
        shown = render.quote_prompt(prefs.suffix) if prefs.suffix else "nothing"
        await _private(interaction, f"Your prompts now end with {shown}.")

    @option.command(name="set", description="Make --name in your prompts stand for some text")
    @app_commands.describe(name="The shortcut, e.g. mystyle", value="What --name stands for")
    async def option_set(
        self,
        interaction: discord.Interaction[Any],
        name: app_commands.Range[str, 1, 34],
        value: app_commands.Range[str, 1, MAX_OPTION_VALUE_CHARS],
    ) -> None:
        store = self.bot.app.preferences
        prefs = await _saved(store.set_option(interaction.user.id, name, value))
        saved = normalise_option_name(name)
        await _private(
            interaction, f"`--{saved}` now stands for {render.quote_prompt(prefs.options[saved])}."
        )

    @option.command(name="list", description="Your shortcuts")
    async def option_list(self, interaction: discord.Interaction[Any]) -> None:
        prefs = await self.bot.app.preferences.get(interaction.user.id)
        await _private(interaction, render.options_text(prefs))

    @option.command(name="unset", description="Remove a shortcut")
    @app_commands.describe(name="The shortcut to remove")
    async def option_unset(
        self, interaction: discord.Interaction[Any], name: app_commands.Range[str, 1, 34]
    ) -> None:
        await _saved(self.bot.app.preferences.unset_option(interaction.user.id, name))
        await _private(interaction, f"Removed `--{normalise_option_name(name)}`.")


async def _saved(change: Any) -> Preferences:
    try:
        return await change
    except ValueError as exc:
        raise UserError(f"Not saved: {exc}") from None


async def _private(interaction: discord.Interaction[Any], text: str) -> None:
    from bot.discord.client import reply

    await reply(interaction, text)


def add_member_commands(bot: ImagineBot) -> None:
    tree = bot.tree
    bot.add_dynamic_items(SettingsSelect, SettingsButton)

    @tree.command(name="settings", description="Your defaults, previews and Remix")
    async def settings(interaction: discord.Interaction[Any]) -> None:
        prefs = await bot.app.preferences.get(interaction.user.id)
        await interaction.response.send_message(
            render.settings_text(prefs, bot.config.engine),
            view=settings_view(bot, prefs),
            ephemeral=True,
        )

    @tree.command(name="info", description="Your credits, jobs in the queue and settings")
    async def info(interaction: discord.Interaction[Any]) -> None:
        found = await bot.app.info(bot.actor(interaction))
        await _private(interaction, render.info_text(found, bot.config.engine, bot.clock()))

    @tree.context_menu(name=DELETE_COMMAND)
    async def delete(interaction: discord.Interaction[Any], message: discord.Message) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await delete_result(bot, interaction, message)

    tree.add_command(PreferCommands(bot))
