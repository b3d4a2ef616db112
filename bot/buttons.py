"""The buttons under job messages. Their custom_id carries the job id, so they keep working
after a restart: `imagine:U:<job_id>:<index>` is resolved from SQLite, never from memory."""

from __future__ import annotations

import re
from typing import Any

import discord

from bot.app import Action
from bot.core.models import Job, JobKind

_TEMPLATE = re.compile(
    r"imagine:(?P<action>U|V|R|VS|VX|UP|X):(?P<job>[0-9]{1,19})(?::(?P<index>[1-9]))?"
)


def custom_id(action: Action, job_id: int, index: int = 0) -> str:
    return f"imagine:{action.value}:{job_id}" + (f":{index}" if action.needs_index else "")


class JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=_TEMPLATE):
    def __init__(
        self,
        action: Action,
        job_id: int,
        index: int = 0,
        *,
        label: str | None = None,
        emoji: str | None = None,
        style: discord.ButtonStyle = discord.ButtonStyle.secondary,
        row: int | None = None,
    ) -> None:
        super().__init__(
            discord.ui.Button(
                label=label,
                emoji=emoji,
                style=style,
                row=row,
                custom_id=custom_id(action, job_id, index),
            )
        )
        self.action = action
        self.job_id = job_id
        self.index = index

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> JobButton:
        return cls(Action(match["action"]), int(match["job"]), int(match["index"] or 0))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await interaction.client.on_job_button(interaction, self.action, self.job_id, self.index)


def cancel_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(
        JobButton(Action.CANCEL, job_id, label="Cancel", style=discord.ButtonStyle.danger)
    )
    return view


def grid_view(job: Job, can_upscale: bool = True) -> discord.ui.View:
    """U1–U4 on the first row (only where a 2x upscale fits the server's pixel budget), V1–V4
    on the second, 🔄 on the third."""
    assert job.result is not None
    count = len(job.result.image_paths)
    view = discord.ui.View(timeout=None)
    for index in range(1, count + 1 if can_upscale else 1):
        view.add_item(JobButton(Action.UPSCALE, job.id, index, label=f"U{index}", row=0))
    for index in range(1, count + 1):
        view.add_item(JobButton(Action.VARY, job.id, index, label=f"V{index}", row=1))
    view.add_item(JobButton(Action.REROLL, job.id, emoji="🔄", row=2))
    return view


def upscale_view(job: Job, can_upscale: bool) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(JobButton(Action.VARY_SUBTLE, job.id, label="Vary (Subtle)", emoji="🪄"))
    view.add_item(JobButton(Action.VARY_STRONG, job.id, label="Vary (Strong)", emoji="🪄"))
    if can_upscale:
        view.add_item(JobButton(Action.UPSCALE_AGAIN, job.id, label="Upscale (2x)", emoji="🔍"))
    return view


def result_view(job: Job, can_upscale: bool) -> discord.ui.View:
    if job.kind is JobKind.UPSCALE:
        return upscale_view(job, can_upscale)
    return grid_view(job, can_upscale)
