"""The buttons under job messages. Their custom_id carries the job id (and the image's
index), so they keep working after a restart: `imagine:U:<job_id>:<index>` is resolved from
SQLite, never from memory.

`imagine:<action>:…` buttons are the app's `Action`s; `imagine-ui:<what>:…` buttons are the
Discord layer's own (Custom Zoom and Vary (Region) open a form, Delete removes the message).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Self

import discord

from bot.app.actions import Action
from bot.app.drafts import is_draft
from bot.core.models import Job

# Longest first, so that "VS" is never read as "V" followed by junk.
_ACTIONS = "|".join(sorted((re.escape(a.value) for a in Action), key=len, reverse=True))
_TEMPLATE = re.compile(
    rf"imagine:(?P<action>{_ACTIONS}):(?P<job>[0-9]{{1,19}})(?::(?P<index>[1-9]))?"
)

_JOB_IN_CUSTOM_ID = re.compile(r"^imagine(?:-ui)?:\w+:([0-9]{1,19})")

# Whether the button for an action on image `index` (1-based) of a job fits the server's
# limits (max_pixels, a pan that can still grow); a button that can't work is not shown.
Fits = Callable[[Action, int], bool]


class CustomIdError(ValueError):
    """A custom_id that none of the bot's components made (forged by a client, or another
    bot's); the message is safe to log."""


def parse_job_button(custom_id: str) -> tuple[Action, int, int]:
    """(action, job id, index) of a job button's custom_id, or CustomIdError. The job id may
    name no job (even one past what SQLite can hold): the app answers that it doesn't exist."""
    match = _TEMPLATE.fullmatch(custom_id)
    if match is None:
        raise CustomIdError(f"not a job button: {custom_id[:100]!r}")
    return Action(match["action"]), int(match["job"]), int(match["index"] or 0)


def parse_ui_button(custom_id: str) -> tuple[UiAction, int, int]:
    """(what, job id, index) of a form or Delete button's custom_id, or CustomIdError."""
    match = _UI_TEMPLATE.fullmatch(custom_id)
    if match is None:
        raise CustomIdError(f"not a button of ours: {custom_id[:100]!r}")
    return UiAction(match["what"]), int(match["job"]), int(match["index"])


def job_in_custom_id(custom_id: str) -> int:
    """The job id a job or image button's custom_id carries, or CustomIdError."""
    match = _JOB_IN_CUSTOM_ID.match(custom_id)
    if match is None:
        raise CustomIdError(f"no job in {custom_id[:100]!r}")
    return int(match[1])


def job_of_message(message: discord.Message, own_user_id: int | None) -> int | None:
    """The job a message of the bot's is about, from its buttons' custom_ids."""
    if own_user_id is None or message.author.id != own_user_id:
        return None
    for row in message.components:
        for child in getattr(row, "children", ()):
            try:
                return job_in_custom_id(getattr(child, "custom_id", None) or "")
            except CustomIdError:
                continue
    return None


def custom_id(action: Action, job_id: int, index: int = 0) -> str:
    shown = action.needs_index or index > 0
    return f"imagine:{action.value}:{job_id}" + (f":{index}" if shown else "")


def _action(name: str) -> Action | None:
    """An action by member name, or None where the app has no such action."""
    return Action.__members__.get(name)


class PersistentButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"(?!)"):
    """A button whose custom_id carries everything a press needs (the job id, the image …), so
    it works after a restart: discord.py rebuilds it from the id with `from_match`. Subclasses
    give their own `template` (this base's matches nothing, so it is never dispatched)."""

    def __init__(
        self,
        button_id: str,
        *,
        label: str | None = None,
        emoji: str | None = None,
        style: discord.ButtonStyle = discord.ButtonStyle.secondary,
        row: int | None = None,
    ) -> None:
        super().__init__(
            discord.ui.Button(label=label, emoji=emoji, style=style, row=row, custom_id=button_id)
        )

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        """The button a custom_id that matched the template names."""
        raise NotImplementedError

    @classmethod
    async def from_custom_id(
        cls,
        interaction: discord.Interaction[Any],
        item: discord.ui.Item[Any],
        match: re.Match[str],
        /,
    ) -> Self:
        return cls.from_match(match)


class JobButton(PersistentButton, template=_TEMPLATE):
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
        button_id = custom_id(action, job_id, index)
        super().__init__(button_id, label=label, emoji=emoji, style=style, row=row)
        self.action = action
        self.job_id = job_id
        self.index = index

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(*parse_job_button(match.string))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await interaction.client.on_job_button(interaction, self.action, self.job_id, self.index)


class UiAction(StrEnum):
    """Buttons the Discord layer answers itself rather than with a job."""

    CUSTOM_ZOOM = "CZ"  # a form: prompt and zoom factor
    VARY_REGION = "VR"  # a form: regions or a mask, and the region's prompt
    DELETE = "DEL"


_UI_TEMPLATE = re.compile(r"imagine-ui:(?P<what>CZ|VR|DEL):(?P<job>[0-9]{1,19}):(?P<index>[1-9])")


class UiButton(PersistentButton, template=_UI_TEMPLATE):
    def __init__(
        self,
        what: UiAction,
        job_id: int,
        index: int,
        *,
        label: str | None = None,
        emoji: str | None = None,
        style: discord.ButtonStyle = discord.ButtonStyle.secondary,
        row: int | None = None,
    ) -> None:
        button_id = f"imagine-ui:{what.value}:{job_id}:{index}"
        super().__init__(button_id, label=label, emoji=emoji, style=style, row=row)
        self.what = what
        self.job_id = job_id
        self.index = index

    @classmethod
    def from_match(cls, match: re.Match[str]) -> Self:
        return cls(*parse_ui_button(match.string))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        await interaction.client.on_ui_button(interaction, self.what, self.job_id, self.index)


def cancel_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(
        JobButton(Action.CANCEL, job_id, label="Cancel", style=discord.ButtonStyle.danger)
    )
    return view


def grid_view(job: Job, page_url: str | None = None) -> discord.ui.View:
    """U1–U4 (separate an image: free, the candidates are already full size) on the first
    row, V1–V4 on the second, 🔄 on the third (with a Web link to the job's page on the web
    home, when it is on)."""
    assert job.result is not None
    count = len(job.result.image_paths)
    view = discord.ui.View(timeout=None)
    for index in range(1, count + 1):
        view.add_item(JobButton(Action.UPSCALE, job.id, index, label=f"U{index}", row=0))
    for index in range(1, count + 1):
        view.add_item(JobButton(Action.VARY, job.id, index, label=f"V{index}", row=1))
    view.add_item(JobButton(Action.REROLL, job.id, emoji="🔄", row=2))
    if page_url is not None:
        view.add_item(discord.ui.Button(label="Web", url=page_url, row=2))
    if is_draft(job):
        # A draft's images are for choosing: ✨ renders the chosen one at full quality.
        for index in range(1, count + 1):
            view.add_item(JobButton(Action.ENHANCE, job.id, index, label=f"✨ {index}", row=3))
    return view


# (action name, label, emoji, row) of the buttons under one image, in Midjourney's order.
_IMAGE_BUTTONS: tuple[tuple[str, str | None, str | None, int], ...] = (
    ("ENHANCE", "Enhance", "✨", 0),
    ("UPSCALE_SUBTLE", "Upscale (Subtle)", "🔍", 0),
    ("UPSCALE_CREATIVE", "Upscale (Creative)", "🔍", 0),
    ("VARY_SUBTLE", "Vary (Subtle)", "🪄", 0),
    ("VARY_STRONG", "Vary (Strong)", "🪄", 0),
    ("ZOOM_OUT_2", "Zoom Out 2x", "🔎", 1),
    ("ZOOM_OUT_1_5", "Zoom Out 1.5x", "🔎", 1),
    ("MAKE_SQUARE", "Make Square", "↔️", 1),
    ("PAN_LEFT", None, "⬅️", 2),
    ("PAN_RIGHT", None, "➡️", 2),
    ("PAN_UP", None, "⬆️", 2),
    ("PAN_DOWN", None, "⬇️", 2),
)


def image_view(job: Job, index: int, fits: Fits) -> discord.ui.View:
    """The buttons under one image (a separated U1–U4 or an upscale): upscale and vary it,
    Vary (Region), zoom out, make it square, pan, delete. A button whose operation can't fit
    the server's limits (or that this server doesn't offer) is left out."""
    view = discord.ui.View(timeout=None)
    # A draft's image is for choosing: Enhance it first, then edit the full-quality one.
    draft = is_draft(job)
    for name, label, emoji, row in _IMAGE_BUTTONS:
        action = _action(name)
        if action is not None and fits(action, index):
            view.add_item(JobButton(action, job.id, index, label=label, emoji=emoji, row=row))
        if draft:
            continue
        if name == "VARY_STRONG":
            view.add_item(
                UiButton(
                    UiAction.VARY_REGION, job.id, index, label="Vary (Region)", emoji="🖌️", row=0
                )
            )
        if name == "ZOOM_OUT_1_5":
            view.add_item(
                UiButton(
                    UiAction.CUSTOM_ZOOM, job.id, index, label="Custom Zoom", emoji="🔎", row=1
                )
            )
    view.add_item(UiButton(UiAction.DELETE, job.id, index, emoji="🗑️", row=2))
    return view


def result_view(job: Job, fits: Fits, page_url: str | None = None) -> discord.ui.View:
    """A grid for jobs of several images, the single-image row for one (an upscale)."""
    assert job.result is not None
    if len(job.result.image_paths) == 1:
        return image_view(job, 1, fits)
    return grid_view(job, page_url)
