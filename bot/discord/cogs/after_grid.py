"""What a member does with a finished image on Discord: U1–U4 separate it (free), Remix and
Custom Zoom edit the prompt in a form first, Vary (Region) picks regions or takes a mask, and
Delete removes a result message.

The jobs themselves are the app's (`ImagineApp.press`, `custom_zoom`, `vary_region`); this
module only turns buttons and forms into those calls and renders what comes back. A form
(modal) must be Discord's first answer to a press, so the checks before it (whose job, is Remix
on) read only what is quick: the member's settings come from memory, the job from one row.
"""

from __future__ import annotations

import asyncio
import logging
import re
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import discord
from PIL import Image

from bot.app import render
from bot.app.actions import Action, Actor, UserError
from bot.app.application import ImagineApp
from bot.core.models import ImageExpired, Job
from bot.discord.permissions import missing_for_delivery, refusal_text
from bot.discord.views.buttons import CustomIdError, Fits, UiAction, image_view
from generation import canvas
from generation.contract import MAX_ZOOM, PanDirection, Region, UpscaleMode
from generation.prompt import MAX_INPUT_CHARS

if TYPE_CHECKING:
    from bot.discord.client import ImagineBot

log = logging.getLogger(__name__)

# Presses that open the Remix form first when the member has Remix on.
REMIX_ACTIONS = frozenset(
    {
        "VARY",
        "VARY_SUBTLE",
        "VARY_STRONG",
        "ZOOM_OUT_2",
        "ZOOM_OUT_1_5",
        "PAN_LEFT",
        "PAN_RIGHT",
        "PAN_UP",
        "PAN_DOWN",
    }
)
_PANS = {
    "PAN_LEFT": PanDirection.LEFT,
    "PAN_RIGHT": PanDirection.RIGHT,
    "PAN_UP": PanDirection.UP,
    "PAN_DOWN": PanDirection.DOWN,
}
NOT_YOURS = "This isn't your job — use /imagine to start your own."
# A text input holds at most 4000 characters; a prompt with flags is shorter still.
PROMPT_INPUT_CHARS = min(MAX_INPUT_CHARS, 4000)
# An uploaded mask: black and white, so a few MB is plenty; larger is refused before it is
# downloaded. Its pixel limit is generation.canvas's.
MAX_MASK_BYTES = 8 * 1024 * 1024
_JOB_IN_CUSTOM_ID = re.compile(r"^imagine(?:-ui)?:\w+:([0-9]{1,19})")
# A form's custom_id names what it is for (Custom Zoom, Vary (Region), or Remix before an
# action), the job and the image, so a form opened before a restart can still be submitted.
FORM_PREFIX = "imagine-form:"
_FORM_ID = re.compile(
    rf"{FORM_PREFIX}(?P<what>CZ|VR|RX-(?P<action>[A-Z0-9]{{1,4}})):(?P<job>[0-9]{{1,19}}):"
    r"(?P<index>[0-9])"
)
FORM_EXPIRED = "This form has expired — press the button under the image again."


# ----- which buttons fit -----------------------------------------------------------------------


def fits_for(app: ImagineApp) -> Callable[[Job], Fits]:
    """`job -> Fits`: whether each button under a job's image can work on this server."""

    def for_job(job: Job) -> Fits:
        def fits(action: Action, index: int) -> bool:
            return action_fits(app, job, action, index)

        return fits

    return for_job


def action_fits(app: ImagineApp, job: Job, action: Action, index: int) -> bool:
    if job.result is None:
        return False
    if action is Action.UPSCALE_SUBTLE:
        return app.can_upscale(job, UpscaleMode.SUBTLE)
    if action is Action.UPSCALE_CREATIVE:
        return app.can_upscale(job, UpscaleMode.CREATIVE)
    if action.name in _PANS:
        return app.can_pan(job, index, _PANS[action.name])
    if action is Action.MAKE_SQUARE:
        return app.can_make_square(job, index)
    return True


# ----- U1–U4: separate an image -------------------------------------------------------------


async def owned_job(app: ImagineApp, actor: Actor, job_id: int) -> Job:
    job = await app.job(actor, job_id)
    if not actor.may_manage(job.owner):
        raise UserError(NOT_YOURS)
    return job


async def separate(
    bot: ImagineBot, interaction: discord.Interaction[Any], job_id: int, index: int
) -> None:
    """Post image `index` of a grid as its own reply with the next row of buttons: no job,
    no charge (the candidates are already full size)."""
    await interaction.response.defer()
    actor = bot.actor(interaction)
    missing = missing_for_delivery(interaction)
    if missing:
        raise UserError(refusal_text(missing))
    job = await owned_job(bot.app, actor, job_id)
    if job.result is None or not 1 <= index <= len(job.result.image_paths):
        raise UserError(f"Image {index} doesn't exist in job {job_id}.")
    try:
        file = await bot.delivery.image_file(job, index - 1, interaction.filesize_limit)
    except ImageExpired as exc:
        raise UserError(exc.reason) from None
    channel = interaction.channel
    assert channel is not None and interaction.message is not None
    try:
        await channel.send(  # type: ignore[union-attr]
            render.separated_text(job, index, f"<@{actor.user_id}>"),
            file=file,
            view=image_view(job, index, bot.fits_for(job)),
            reference=interaction.message.to_reference(fail_if_not_exists=False),
        )
    except discord.HTTPException as exc:
        if exc.status < 500 and exc.status != 429:
            raise
        # Nothing was charged and nothing is lost: the image is still on file.
        log.info("job %s: image %d not posted (%s)", job.id, index, exc)
        raise UserError(f"Discord didn't take the image just now; press U{index} again.") from None


# ----- forms -----------------------------------------------------------------------------------


# Each bot's open forms by custom_id: a submit discord.py has no live form for (the bot restarted
# since the form was opened, or the form timed out) is answered from the custom_id instead.
_open_forms: weakref.WeakKeyDictionary[Any, weakref.WeakValueDictionary[str, discord.ui.Modal]] = (
    weakref.WeakKeyDictionary()
)


def form_custom_id(what: str, job_id: int, index: int) -> str:
    return f"{FORM_PREFIX}{what}:{job_id}:{index}"


class _JobForm(discord.ui.Modal):
    """A form about image `index` of job `job_id`; errors become the usual private replies."""

    def __init__(self, bot: ImagineBot, title: str, what: str, job_id: int, index: int) -> None:
        custom_id = form_custom_id(what, job_id, index)
        super().__init__(title=title, timeout=900, custom_id=custom_id)
        self.bot = bot
        self.job_id = job_id
        self.index = index
        _open_forms.setdefault(bot, weakref.WeakValueDictionary())[custom_id] = self

    async def on_submit(self, interaction: discord.Interaction[Any]) -> None:
        await interaction.response.defer()
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        await self.bot.post_status(interaction, await self.submit(interaction))

    async def submit(self, interaction: discord.Interaction[Any]) -> Any:
        raise NotImplementedError

    async def on_error(  # type: ignore[override]
        self, interaction: discord.Interaction[Any], error: Exception, /
    ) -> None:
        from bot.discord.client import report_error

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


class RemixForm(_JobForm):
    """Remix: the member edits the prompt before a variation, zoom or pan."""

    def __init__(
        self, bot: ImagineBot, action: Action, job_id: int, index: int, prompt: str = ""
    ) -> None:
        super().__init__(bot, "Remix: edit the prompt", f"RX-{action.value}", job_id, index)
        self.action = action
        self.prompt: discord.ui.TextInput[Any] = _prompt_input(prompt)
        self.add_item(self.prompt)

    async def submit(self, interaction: discord.Interaction[Any]) -> Any:
        actor = self.bot.actor(interaction)
        return await self.bot.app.press(
            actor, self.job_id, self.action, self.index, prompt=self.prompt.value
        )


class CustomZoomForm(_JobForm):
    """Custom Zoom: the prompt (an `--ar` in it changes the canvas shape) and a factor."""

    def __init__(self, bot: ImagineBot, job_id: int, index: int, prompt: str = "") -> None:
        super().__init__(bot, "Custom Zoom", UiAction.CUSTOM_ZOOM.value, job_id, index)
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

    async def submit(self, interaction: discord.Interaction[Any]) -> Any:
        actor = self.bot.actor(interaction)
        return await self.bot.app.custom_zoom(
            actor, self.job_id, self.index, prompt=self.prompt.value, factor=self.factor.value
        )


def region_options() -> list[discord.SelectOption]:
    return [discord.SelectOption(label=region.label, value=region.value) for region in Region]


class VaryRegionForm(_JobForm):
    """Vary (Region): Discord has no brush, so the member picks regions (halves, the centre,
    the cells of a 3x3 grid; several at once) or uploads a black-and-white mask (white is
    repainted), and writes the prompt for that region."""

    def __init__(self, bot: ImagineBot, job_id: int, index: int, prompt: str = "") -> None:
        super().__init__(bot, "Vary (Region)", UiAction.VARY_REGION.value, job_id, index)
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

    async def submit(self, interaction: discord.Interaction[Any]) -> Any:
        regions = frozenset(Region(value) for value in self.regions.values)
        uploads = self.mask.values
        if not regions and not uploads:
            raise UserError("regions: pick at least one region, or attach a mask")
        if regions and uploads:
            raise UserError("mask: pick regions or attach a mask, not both")
        mask = await read_mask(uploads[0]) if uploads else None
        actor = self.bot.actor(interaction)
        return await self.bot.app.vary_region(
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


# ----- opening forms from buttons ---------------------------------------------------------


async def open_form(
    bot: ImagineBot,
    interaction: discord.Interaction[Any],
    what: UiAction | Action,
    job_id: int,
    index: int,
) -> None:
    """Answer a press with a form about the owner's image (others are told privately)."""
    actor = bot.actor(interaction)
    job = await owned_job(bot.app, actor, job_id)
    if job.result is None:
        raise UserError(f"Job {job.id} has no images to work from ({job.state.value}).")
    form: discord.ui.Modal
    if what is UiAction.CUSTOM_ZOOM:
        form = CustomZoomForm(bot, job.id, index or 1, job.prompt)
    elif what is UiAction.VARY_REGION:
        form = VaryRegionForm(bot, job.id, index or 1, job.prompt)
    else:
        assert isinstance(what, Action)
        form = RemixForm(bot, what, job.id, index, job.prompt)
    await interaction.response.send_modal(form)


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


def form_from_custom_id(bot: ImagineBot, custom_id: str) -> _JobForm | None:
    """The form a custom_id of ours names, rebuilt empty (its values come with the submit)."""
    try:
        what, job_id, index = parse_form_id(custom_id)
    except CustomIdError:
        return None
    if what is UiAction.CUSTOM_ZOOM:
        return CustomZoomForm(bot, job_id, index)
    if what is UiAction.VARY_REGION:
        return VaryRegionForm(bot, job_id, index)
    assert isinstance(what, Action)
    return RemixForm(bot, what, job_id, index)


async def submit_orphan_form(bot: ImagineBot, interaction: discord.Interaction[Any]) -> None:
    """A form of ours submitted with no live form behind it in this process (opened before a
    restart, or left open past its timeout): rebuilt from its custom_id and run like the live
    one, so nothing the member typed is lost; a form that can't be rebuilt is answered with a
    private note instead of Discord's bare "interaction failed"."""
    if interaction.type is not discord.InteractionType.modal_submit or interaction.data is None:
        return
    custom_id = str(interaction.data.get("custom_id", ""))
    if not custom_id.startswith(FORM_PREFIX):
        return
    forms = _open_forms.get(bot)
    live = forms.get(custom_id) if forms is not None else None
    if live is not None and not live.is_finished():
        return  # discord.py has handed the submit to it already
    form = form_from_custom_id(bot, custom_id)
    # discord.py hands a submit only to a form it created in this process; its own dispatch
    # (the values parsed into the items, uploads resolved, errors to on_error) is reused.
    dispatch = getattr(form, "_dispatch_submit", None)
    if form is None or dispatch is None:
        log.info("form %s submitted after it expired; asked to press again", custom_id)
        from bot.discord.client import reply

        await reply(interaction, FORM_EXPIRED)
        return
    data: Any = interaction.data
    await dispatch(interaction, data.get("components", []), data.get("resolved", {}))
    form.stop()


async def wants_remix(bot: ImagineBot, user_id: int, action: Action) -> bool:
    if action.name not in REMIX_ACTIONS:
        return False
    return (await bot.app.preferences.get(user_id)).remix


# ----- Delete --------------------------------------------------------------------------------


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


def job_in_custom_id(custom_id: str) -> int:
    """The job id a job or image button's custom_id carries, or CustomIdError."""
    match = _JOB_IN_CUSTOM_ID.match(custom_id)
    if match is None:
        raise CustomIdError(f"no job in {custom_id[:100]!r}")
    return int(match[1])


async def delete_result(
    bot: ImagineBot, interaction: discord.Interaction[Any], message: discord.Message | None
) -> None:
    """Delete a job's result message for its owner or an admin. The files stay until the
    retention rules remove them: other results' buttons may still work from them."""
    own_id = bot.user.id if bot.user is not None else None
    job_id = job_of_message(message, own_id) if message is not None else None
    if message is None or job_id is None:
        raise UserError("Only this bot's image messages can be deleted this way.")
    job = await bot.app.check_delete(bot.actor(interaction), job_id)
    try:
        await message.delete()
    except discord.NotFound:
        pass  # already gone: what was asked for
    from bot.discord.client import reply

    await reply(interaction, f"Deleted the message of job {job.id}.")
