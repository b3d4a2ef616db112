"""The /shorten result's buttons: 1–5 imagine that shorter prompt (an ordinary paid job).

A button carries the job id and the prompt's number (`shorten:I:<job>:<n>`, well under
Discord's 100 characters); the prompt itself is stored with the job's result in SQLite, so the
buttons keep working after a restart.
"""

from __future__ import annotations

import re
from typing import Any, Self

import discord

from bot.app.shorten import shorter_prompts
from bot.core.models import Job
from bot.discord.views.buttons import CustomIdError, PersistentButton

_TEMPLATE = re.compile(r"shorten:I:(?P<job>[0-9]{1,19}):(?P<index>[1-5])")


def parse_shorten_button(custom_id: str) -> tuple[int, int]:
    """(job id, prompt number) of a button under a /shorten, or CustomIdError."""
    match = _TEMPLATE.fullmatch(custom_id)
    if match is None:
        raise CustomIdError(f"not a /shorten button: {custom_id[:100]!r}")
    return int(match["job"]), int(match["index"])


def custom_id(job_id: int, index: int) -> str:
    return f"shorten:I:{job_id}:{index}"


class ShortenButton(PersistentButton, template=_TEMPLATE):
    def __init__(self, job_id: int, index: int) -> None:
        super().__init__(custom_id(job_id, index), label=str(index))
        self.job_id = job_id
        self.index = index

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(*parse_shorten_button(match.string))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        # The client hands the press to the shorten cog.
        await interaction.client.on_shorten_button(interaction, self.job_id, self.index)


def shorten_view(job: Job) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for index in range(1, min(5, len(shorter_prompts(job))) + 1):
        view.add_item(ShortenButton(job.id, index))
    return view
