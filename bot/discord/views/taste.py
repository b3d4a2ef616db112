"""/rank's buttons (left, right, skip) and the /settings panel's "Erase taste profile".

A /rank button's custom_id carries both candidates it compares
(`taste:rank:<choice>:<job>.<candidate>:<job>.<candidate>`), so an answer needs nothing kept in
memory and works after a restart; the cog checks that both images are the presser's own. A
press goes to the Rank cog (bot/discord/cogs/rank.py).
"""

from __future__ import annotations

import re
from typing import Any, Protocol, Self

import discord

from bot.app.personalize import Choice, RankRound
from bot.core.taste import Ref
from bot.discord.views.buttons import CustomIdError, PersistentButton

_RANK = re.compile(
    r"taste:rank:(?P<choice>left|right|skip):"
    r"(?P<lj>[0-9]{1,19})\.(?P<lc>[0-9]{1,2}):(?P<rj>[0-9]{1,19})\.(?P<rc>[0-9]{1,2})"
)
_ERASE = re.compile(r"taste:erase(?P<sure>:yes)?")


class RankHandler(Protocol):
    async def on_rank_button(
        self, interaction: discord.Interaction[Any], left: Ref, right: Ref, choice: Choice
    ) -> None: ...

    async def on_erase_button(self, interaction: discord.Interaction[Any], sure: bool) -> None: ...


def _handler(interaction: discord.Interaction[Any]) -> RankHandler:
    cog = interaction.client.get_cog("Rank")
    if cog is None:
        raise CustomIdError("the Rank cog is not loaded")
    return cog


def parse_rank_button(custom_id: str) -> tuple[Ref, Ref, Choice]:
    match = _RANK.fullmatch(custom_id)
    if match is None:
        raise CustomIdError(f"not a /rank button: {custom_id[:100]!r}")
    left = Ref(int(match["lj"]), int(match["lc"]))
    right = Ref(int(match["rj"]), int(match["rc"]))
    return left, right, Choice(match["choice"])


def rank_custom_id(left: Ref, right: Ref, choice: Choice) -> str:
    return (
        f"taste:rank:{choice.value}:{left.job_id}.{left.candidate}:{right.job_id}.{right.candidate}"
    )


class RankButton(PersistentButton, template=_RANK):
    def __init__(self, left: Ref, right: Ref, choice: Choice) -> None:
        labels = {Choice.LEFT: "⬅️ Left", Choice.RIGHT: "Right ➡️", Choice.SKIP: "Skip"}
        style = (
            discord.ButtonStyle.primary
            if choice is not Choice.SKIP
            else discord.ButtonStyle.secondary
        )
        super().__init__(rank_custom_id(left, right, choice), label=labels[choice], style=style)
        self.left, self.right, self.choice = left, right, choice

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(*parse_rank_button(match.string))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await _handler(interaction).on_rank_button(interaction, self.left, self.right, self.choice)


class EraseButton(PersistentButton, template=_ERASE):
    def __init__(self, sure: bool = False) -> None:
        super().__init__(
            "taste:erase:yes" if sure else "taste:erase",
            label="Yes, erase it" if sure else "Erase taste profile",
            style=discord.ButtonStyle.danger,
            row=4 if not sure else None,
        )
        self.sure = sure

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(sure=bool(match["sure"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await _handler(interaction).on_erase_button(interaction, self.sure)


def rank_view(round_: RankRound) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for choice in (Choice.LEFT, Choice.RIGHT, Choice.SKIP):
        view.add_item(RankButton(round_.left, round_.right, choice))
    return view


def erase_view() -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(EraseButton(sure=True))
    return view
