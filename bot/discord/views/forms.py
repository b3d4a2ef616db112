"""The forms (modals) a press can open: Remix (edit the prompt before a variation, zoom or pan),
Custom Zoom (prompt and factor) and Vary (Region) (regions or a mask, and the region's prompt).

A form's custom_id names what it is for, the job and the image, so a form opened before a
restart can still be submitted: it is rebuilt from its custom_id (`form_from_custom_id`).
"""

from __future__ import annotations

import asyncio
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import discord
from PIL import Image

from bot.app import render
from bot.app.actions import Action, Submitted, UserError
from bot.app.application import ImagineApp
from bot.discord.actors import Actors
from bot.discord.interactions import report_error
from bot.discord.permissions import missing_for_delivery, refusal_text
from bot.discord.status import StatusMessages
from bot.discord.views.buttons import CustomIdError, UiAction
from generation import canvas
from generation.contract import MAX_ZOOM, Region
from generation.prompt import MAX_INPUT_CHARS

# A text input holds at most 4000 characters; a prompt with flags is shorter still.
PROMPT_INPUT_CHARS = min(MAX_INPUT_CHARS, 4000)
# An uploaded mask: black and white, so a few MB is plenty; larger is refused before it is
# downloaded. Its pixel limit is generation.canvas's.
MAX_MASK_BYTES = 8 * 1024 * 1024
# A form's custom_id names what it is for (Custom Zoom, Vary (Region), or Remix before an
# action), the job and the image, so a form opened before a restart can still be submitted.
FORM_PREFIX = "imagine-form:"
_FORM_ID = re.compile(
    rf"{FORM_PREFIX}(?P<what>CZ|VR|RX-(?P<action>[A-Z0-9]{{1,4}})):(?P<job>[0-9]{{1,19}}):"
    r"(?P<index>[0-9])"
)
FORM_EXPIRED = "This form has expired — press the button under the image again."


@dataclass(frozen=True)
class FormServices:
    """What a submitted form needs: who submits it, the app that starts the job, and the status
    message it gets. `open_forms`: the live forms by custom_id, so a submit discord.py has no
    live form for (the bot restarted since, or the form timed out) is answered from its id."""

    app: ImagineApp
    actors: Actors
    status: StatusMessages
    open_forms: weakref.WeakValueDictionary[str, discord.ui.Modal] = field(
        default_factory=weakref.WeakValueDictionary
    )


def form_custom_id(what: str, job_id: int, index: int) -> str:
    return f"{FORM_PREFIX}{what}:{job_id}:{index}"


class JobForm(discord.ui.Modal):
    """A form about image `index` of job `job_id`; errors become the usual private replies."""

    def __init__(
        self, services: FormServices, title: str, what: str, job_id: int, index: int
    ) -> None:
        custom_id = form_custom_id(what, job_id, index)
        super().__init__(title=title, timeout=900, custom_id=custom_id)
        self.services = services
        self.job_id = job_id
        self.index = index
        services.open_forms[custom_id] = self

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        await interaction.response.defer()
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        await self.services.status.post_status(interaction, await self.submit(interaction))

    async def submit(self, interaction: discord.Interaction[Any]) -> Submitted:
        raise NotImplementedError

    async def on_error(  # type: ignore[override]
        self, interaction: discord.Interaction[Any], error: Exception, /
    ) -> None:
        await report_error(interaction, error)


def _prompt_input(prompt: str, label: str = "Prompt") -> discord.ui.TextInput[Any]:
    return discord.ui.TextInput(
        custom_id="prompt",
        label=label,
        style=discord.TextStyle.paragraph,
        default=prompt[:PROMPT_INPUT_CHARS],
        max_length=PROMPT_INPUT_CHARS,
        required=True,
    )


class RemixForm(JobForm):
    """Remix: the member edits the prompt before a variation, zoom or pan."""

    def __init__(
        self, services: FormServices, action: Action, job_id: int, index: int, prompt: str = ""
    ) -> None:
        super().__init__(services, "Remix: edit the prompt", f"RX-{action.value}", job_id, index)
        self.action = action
        self.prompt: discord.ui.TextInput[Any] = _prompt_input(prompt)
        self.add_item(self.prompt)

    async def submit(self, interaction: discord.Interaction[Any]) -> Submitted:
        actor = self.services.actors.actor(interaction)
        return await self.services.app.press(
            actor, self.job_id, self.action, self.index, prompt=self.prompt.value
        )


class CustomZoomForm(JobForm):
    """Custom Zoom: the prompt (an `--ar` in it changes the canvas shape) and a factor."""

    def __init__(self, services: FormServices, job_id: int, index: int, prompt: str = "") -> None:
        super().__init__(services, "Custom Zoom", UiAction.CUSTOM_ZOOM.value, job_id, index)
        self.prompt: discord.ui.TextInput[Any] = _prompt_input(prompt)
        self.factor: discord.ui.TextInput[Any] = discord.ui.TextInput(
            custom_id="factor",
            label=f"Zoom out by (1.0 to {MAX_ZOOM:g})",
            default="2",
            max_length=8,
            required=True,
        )
        self.add_item(self.prompt)
        self.add_item(self.factor)

    async def submit(self, interaction: discord.Interaction[Any]) -> Submitted:
        actor = self.services.actors.actor(interaction)
        return await self.services.app.custom_zoom(
            actor, self.job_id, self.index, prompt=self.prompt.value, factor=self.factor.value
        )


def region_options() -> list[discord.SelectOption]:
    return [discord.SelectOption(label=region.label, value=region.value) for region in Region]


class VaryRegionForm(JobForm):
    """Vary (Region): Discord has no brush, so the member picks regions (halves, the centre,
    the cells of a 3x3 grid; several at once) or uploads a black-and-white mask (white is
    repainted), and writes the prompt for that region."""

    def __init__(self, services: FormServices, job_id: int, index: int, prompt: str = "") -> None:
        super().__init__(services, "Vary (Region)", UiAction.VARY_REGION.value, job_id, index)
        options = region_options()
        self.regions: discord.ui.Select[Any] = discord.ui.Select(
            custom_id="regions",
            placeholder="Pick one or more regions",
            options=options,
            min_values=0,
            max_values=len(options),
            required=False,
        )
        self.mask: discord.ui.FileUpload[Any] = discord.ui.FileUpload(
            custom_id="mask", required=False, min_values=0, max_values=1
        )
        self.prompt: discord.ui.TextInput[Any] = _prompt_input(prompt)
        self.add_item(discord.ui.Label(text="Regions to repaint", component=self.regions))
        self.add_item(
            discord.ui.Label(
                text="…or a mask",
                description="A black-and-white picture: white is repainted",
                component=self.mask,
            )
        )
        self.add_item(discord.ui.Label(text="Prompt for the region", component=self.prompt))

    async def submit(self, interaction: discord.Interaction[Any]) -> Submitted:
        regions = frozenset(Region(value) for value in self.regions.values)
        uploads = self.mask.values
        if not regions and not uploads:
            raise UserError("regions: pick at least one region, or attach a mask")
        if regions and uploads:
            raise UserError("mask: pick regions or attach a mask, not both")
        mask = await read_mask(uploads[0]) if uploads else None
        actor = self.services.actors.actor(interaction)
        return await self.services.app.vary_region(
            actor, self.job_id, self.index, prompt=self.prompt.value, regions=regions, mask=mask
        )


async def read_mask(attachment: discord.Attachment) -> Image.Image:
    """The uploaded mask, decoded off the event loop; refused by name when it is too large or
    not a picture. Whether it is black and white and fits the image is the app's check."""
    name = render.quote_prompt(attachment.filename, 60)
    if attachment.size > MAX_MASK_BYTES:
        raise UserError(
            f"mask: {name} is {attachment.size / 1e6:.1f} MB; at most "
            f"{MAX_MASK_BYTES // (1024 * 1024)} MB"
        )
    data = await attachment.read()
    return await asyncio.to_thread(decode_mask, data, name)


def decode_mask(data: bytes, name: str) -> Image.Image:
    if len(data) > MAX_MASK_BYTES:  # the size Discord reported may not be what came
        raise UserError(f"mask: {name} is larger than {MAX_MASK_BYTES // (1024 * 1024)} MB")
    try:
        return canvas.read_mask(data, name)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def job_form(
    services: FormServices, what: UiAction | Action, job_id: int, index: int, prompt: str = ""
) -> JobForm:
    """The form for a press on image `index` of a job: Custom Zoom, Vary (Region), or the
    Remix of an action."""
    if what is UiAction.CUSTOM_ZOOM:
        return CustomZoomForm(services, job_id, index, prompt)
    if what is UiAction.VARY_REGION:
        return VaryRegionForm(services, job_id, index, prompt)
    assert isinstance(what, Action)
    return RemixForm(services, what, job_id, index, prompt)


def parse_form_id(custom_id: str) -> tuple[UiAction | Action, int, int]:
    """(what the form is for: Custom Zoom, Vary (Region) or the Remix of an action; job id;
    index) of a form's custom_id, or CustomIdError."""
    match = _FORM_ID.fullmatch(custom_id)
    if match is None:
        raise CustomIdError(f"not a form of ours: {custom_id[:100]!r}")
    job_id, index = int(match["job"]), int(match["index"])
    if match["action"] is None:
        return UiAction(match["what"]), job_id, index
    action = Action._value2member_map_.get(match["action"])
    if not isinstance(action, Action):
        raise CustomIdError(f"no Remix form for {match['action']!r}")
    return action, job_id, index


def form_from_custom_id(services: FormServices, custom_id: str) -> JobForm | None:
    """The form a custom_id of ours names, rebuilt empty (its values come with the submit)."""
    try:
        what, job_id, index = parse_form_id(custom_id)
    except CustomIdError:
        return None
    return job_form(services, what, job_id, index)
