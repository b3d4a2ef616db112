"""The /settings panel: selects (aspect, model, sampler, steps) and switches (previews, Remix)
over a member's defaults.

Its components are DynamicItems with fixed custom_ids (`settings:<field>`): the panel is private
to the member who opened it, so whoever presses it is whose settings change, and it keeps
working after a restart. A press goes to the client's `on_settings_change` or
`on_settings_toggle`, which hand it to the member cog.
"""

from __future__ import annotations

from typing import Any

import discord

from bot.core.preferences import Preferences
from bot.discord.views.taste import EraseButton
from generation.contract import Sampler
from generation.settings import EngineSettings

DEFAULT = "default"
ASPECTS = ["1:1", "3:2", "2:3", "4:3", "3:4", "16:9", "9:16", "21:9", "9:21"]
STEP_CHOICES = [10, 15, 20, 25, 30, 40, 50, 75, 100]
# Discord's limit on a select menu's options.
MAX_SELECT_OPTIONS = 25
# The switch that shares a member's images in the web home's Explore (not a Preferences field).
EXPLORE_FIELD = "explore"


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


def settings_view(
    engine: EngineSettings, prefs: Preferences, explore: bool | None = None
) -> discord.ui.View:
    """`explore`: whether the member shares their images in the web home's Explore (None:
    the web home is off, so no switch)."""
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
        ("personalize", prefs.personalize, "--p by default"),
    ):
        style = discord.ButtonStyle.success if on else discord.ButtonStyle.secondary
        view.add_item(SettingsButton(field, f"{label}: {'on' if on else 'off'}", style))
    if explore is not None:
        style = discord.ButtonStyle.success if explore else discord.ButtonStyle.secondary
        label = f"Share in Explore: {'on' if explore else 'off'}"
        view.add_item(SettingsButton(EXPLORE_FIELD, label, style))
    view.add_item(EraseButton())
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
        await interaction.client.on_settings_change(interaction, self.field, chosen)


class SettingsButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"settings:(?P<field>previews|remix|explore|personalize)",
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
        await interaction.client.on_settings_toggle(interaction, self.field)
