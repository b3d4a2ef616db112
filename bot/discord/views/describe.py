"""The /describe result: four prompt suggestions with buttons 1–4 (imagine that suggestion, an
ordinary paid job) and 🔄 (describe the same picture again, with other phrases).

The buttons carry the job id (`describe:I:<job>:<n>`, `describe:R:<job>`) and are resolved from
SQLite, so they keep working after a restart, like the grid's buttons.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Self

import discord

from bot.app import render
from bot.core.models import Job
from bot.discord.views.buttons import CustomIdError, PersistentButton

_TEMPLATE = re.compile(r"describe:(?P<action>I|R):(?P<job>[0-9]{1,19})(?::(?P<index>[1-4]))?")


class DescribeAction(StrEnum):
    IMAGINE = "I"  # 1–4: imagine that suggestion
    AGAIN = "R"  # 🔄: describe again


def parse_describe_button(custom_id: str) -> tuple[DescribeAction, int, int]:
    """(action, job id, index) of a button under a /describe, or CustomIdError."""
    match = _TEMPLATE.fullmatch(custom_id)
    if match is None:
        raise CustomIdError(f"not a /describe button: {custom_id[:100]!r}")
    return DescribeAction(match["action"]), int(match["job"]), int(match["index"] or 0)


def custom_id(action: DescribeAction, job_id: int, index: int = 0) -> str:
    suffix = f":{index}" if action is DescribeAction.IMAGINE else ""
    return f"describe:{action.value}:{job_id}{suffix}"


class DescribeButton(PersistentButton, template=_TEMPLATE):
    def __init__(
        self,
        action: DescribeAction,
        job_id: int,
        index: int = 0,
        *,
        label: str | None = None,
        emoji: str | None = None,
    ) -> None:
        super().__init__(custom_id(action, job_id, index), label=label, emoji=emoji)
        self.action = action
        self.job_id = job_id
        self.index = index

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(*parse_describe_button(match.string))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        # The client hands the press to the pictures cog.
        await interaction.client.on_describe_button(
            interaction, self.action, self.job_id, self.index
        )


def suggestions_of(job: Job) -> tuple[str, ...]:
    return job.result.texts if job.result is not None else ()


def describe_view(job: Job) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for index in range(1, len(suggestions_of(job)) + 1):
        view.add_item(DescribeButton(DescribeAction.IMAGINE, job.id, index, label=str(index)))
    view.add_item(DescribeButton(DescribeAction.AGAIN, job.id, emoji="🔄"))
    return view


def describe_text(job: Job, notes: Sequence[str] = ()) -> str:
    lines = [f"**{render.job_title(job)}**"]
    inputs = job.request_data.get("inputs", ())
    described = [render.picture_source(str(i.get("source", ""))) for i in inputs]
    lines += [f"🖼️ described {' · '.join(described)}"] if described else []
    suggestions = suggestions_of(job)
    lines += [f"**{n}.** {render.quote_prompt(text)}" for n, text in enumerate(suggestions, 1)]
    if not suggestions:
        lines.append("No suggestions came out of this picture.")
    lines.append(
        f"Press 1–{len(suggestions)} to imagine a suggestion (an ordinary job, charged as "
        f"/imagine), 🔄 for other suggestions. Job {job.id}, cost {job.cost} "
        f"credit{'s' if job.cost != 1 else ''}."
    )
    lines += [f"ℹ️ {note}" for note in notes]
    return "\n".join(lines)
