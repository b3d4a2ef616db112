"""What a member does with a finished image: U1–U4 separate it (free), the other buttons start
jobs (Remix and Custom Zoom edit the prompt in a form first, Vary (Region) picks regions or takes
a mask), and Delete removes a result message (a button, or the message's Apps menu).

The jobs themselves are the app's (`ImagineApp.press`, `custom_zoom`, `vary_region`); this cog
only turns presses and forms into those calls and renders what comes back. A form (modal) must
be Discord's first answer to a press, so the checks before it (whose job, is Remix on) read only
what is quick: the member's settings come from memory, the job from one row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.app import render
from bot.app.actions import Action, Actor, UserError
from bot.app.application import ImagineApp
from bot.core.models import ImageExpired, Job
from bot.discord.actors import Actors
from bot.discord.delivery import Delivery
from bot.discord.interactions import reply, report_error
from bot.discord.permissions import missing_for_delivery, refusal_text
from bot.discord.status import StatusMessages
from bot.discord.views.buttons import UiAction, image_view, job_of_message
from bot.discord.views.fits import fits_for
from bot.discord.views.forms import (
    FORM_EXPIRED,
    FORM_PREFIX,
    FormServices,
    form_from_custom_id,
    job_form,
)

log = logging.getLogger(__name__)

# Presses that open the Remix form first when the member has Remix on.
REMIX_ACTIONS = frozenset(
    {
        Action.VARY,
        Action.VARY_SUBTLE,
        Action.VARY_STRONG,
        Action.ZOOM_OUT_2,
        Action.ZOOM_OUT_1_5,
        Action.PAN_LEFT,
        Action.PAN_RIGHT,
        Action.PAN_UP,
        Action.PAN_DOWN,
    }
)
NOT_YOURS = "This isn't your job — use /imagine to start your own."
DELETE_COMMAND = "Delete image"


class AfterGridCog(commands.Cog, name="AfterGrid"):
    def __init__(
        self,
        app: ImagineApp,
        actors: Actors,
        delivery: Delivery,
        status: StatusMessages,
        own_user_id: Callable[[], int | None],
    ) -> None:
        self.app = app
        self.actors = actors
        self.delivery = delivery
        self.status = status
        self.own_user_id = own_user_id
        self.forms = FormServices(app, actors, status)
        self.fits_for = fits_for(app)
        # Delete in a message's Apps menu. discord.py builds a context menu of a cog only this
        # way, not with a decorator, and doesn't add it with the cog: the client adds it.
        self.delete_menu = app_commands.ContextMenu(
            name=DELETE_COMMAND, callback=self.delete_from_menu
        )

    # ----- presses (the client hands the persistent buttons' presses here) --------------------

    async def on_job_button(
        self, interaction: discord.Interaction[Any], action: Action, job_id: int, index: int
    ) -> None:
        try:
            if action is Action.UPSCALE:
                # U1–U4 separate an image: free, no job (the candidates are full size).
                await self.separate(interaction, job_id, index)
                return
            if await self.wants_remix(interaction.user.id, action):
                # A form must be the first answer; the member's settings are in memory.
                await self.open_form(interaction, action, job_id, index)
                return
            # Acknowledged before any database read, image decoding or transaction: Discord
            # allows 3 seconds, which a busy bot may need for those. The grid is left as it
            # is; refusals come as private follow-ups, the new job gets its own message.
            await interaction.response.defer()
            await self._job_button(interaction, action, job_id, index)
        except Exception as exc:
            await report_error(interaction, exc)

    async def on_ui_button(
        self, interaction: discord.Interaction[Any], what: UiAction, job_id: int, index: int
    ) -> None:
        try:
            if what is UiAction.DELETE:
                await interaction.response.defer()
                await self.delete_result(interaction, interaction.message)
            else:
                await self.open_form(interaction, what, job_id, index)
        except Exception as exc:
            await report_error(interaction, exc)

    @commands.Cog.listener()
    async def on_interaction(self, interaction: discord.Interaction[Any]) -> None:
        # A form opened before a restart has no live Modal behind it; it is still answered.
        try:
            await self.submit_orphan_form(interaction)
        except Exception as exc:
            await report_error(interaction, exc)

    async def _job_button(
        self, interaction: discord.Interaction[Any], action: Action, job_id: int, index: int
    ) -> None:
        actor = self.actors.actor(interaction)
        if action is Action.CANCEL:
            job = await self.app.cancel(actor, job_id)
            await reply(interaction, f"Cancelling job {job.id} — its credits are refunded.")
            return
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        submitted = await self.app.press(actor, job_id, action, index)
        await self.status.post_status(interaction, submitted)

    # ----- U1–U4: separate an image ---------------------------------------------------------

    async def separate(
        self, interaction: discord.Interaction[Any], job_id: int, index: int
    ) -> None:
        """Post image `index` of a grid as its own reply with the next row of buttons: no job,
        no charge (the candidates are already full size)."""
        await interaction.response.defer()
        actor = self.actors.actor(interaction)
        missing = missing_for_delivery(interaction)
        if missing:
            raise UserError(refusal_text(missing))
        job = await owned_job(self.app, actor, job_id)
        if job.result is None or not 1 <= index <= len(job.result.image_paths):
            raise UserError(f"Image {index} doesn't exist in job {job_id}.")
        try:
            file = await self.delivery.image_file(job, index - 1, interaction.filesize_limit)
        except ImageExpired as exc:
            raise UserError(exc.reason) from None
        channel = interaction.channel
        assert channel is not None and interaction.message is not None
        try:
            await channel.send(  # type: ignore[union-attr]
                render.separated_text(job, index, f"<@{actor.user_id}>"),
                file=file,
                view=image_view(job, index, self.fits_for(job)),
                reference=interaction.message.to_reference(fail_if_not_exists=False),
            )
        except discord.HTTPException as exc:
            if exc.status < 500 and exc.status != 429:
                raise
            # Nothing was charged and nothing is lost: the image is still on file.
            log.info("job %s: image %d not posted (%s)", job.id, index, exc)
            raise UserError(
                f"Discord didn't take the image just now; press U{index} again."
            ) from None
        # The pick teaches the member's taste (--p): this image over the grid's others.
        await self.app.personal.picked(actor, job, index - 1)

    # ----- forms -----------------------------------------------------------------------------

    async def wants_remix(self, user_id: int, action: Action) -> bool:
        if action not in REMIX_ACTIONS:
            return False
        return (await self.app.preferences.get(user_id)).remix

    async def open_form(
        self,
        interaction: discord.Interaction[Any],
        what: UiAction | Action,
        job_id: int,
        index: int,
    ) -> None:
        """Answer a press with a form about the owner's image (others are told privately)."""
        actor = self.actors.actor(interaction)
        job = await owned_job(self.app, actor, job_id)
        if job.result is None:
            raise UserError(f"Job {job.id} has no images to work from ({job.state.value}).")
        # Custom Zoom and Vary (Region) sit under one image; a Remix keeps the press's index.
        shown = (index or 1) if isinstance(what, UiAction) else index
        await interaction.response.send_modal(job_form(self.forms, what, job.id, shown, job.prompt))

    async def submit_orphan_form(self, interaction: discord.Interaction[Any]) -> None:
        """A form of ours submitted with no live form behind it in this process (opened before
        a restart, or left open past its timeout): rebuilt from its custom_id and run like the
        live one, so nothing the member typed is lost; a form that can't be rebuilt is answered
        with a private note instead of Discord's bare "interaction failed"."""
        if interaction.type is not discord.InteractionType.modal_submit or interaction.data is None:
            return
        custom_id = str(interaction.data.get("custom_id", ""))
        if not custom_id.startswith(FORM_PREFIX):
            return
        live = self.forms.open_forms.get(custom_id)
        if live is not None and not live.is_finished():
            return  # discord.py has handed the submit to it already
        form = form_from_custom_id(self.forms, custom_id)
        # discord.py hands a submit only to a form it created in this process; its own dispatch
        # (the values parsed into the items, uploads resolved, errors to on_error) is reused.
        dispatch = getattr(form, "_dispatch_submit", None)
        if form is None or dispatch is None:
            log.info("form %s submitted after it expired; asked to press again", custom_id)
            await reply(interaction, FORM_EXPIRED)
            return
        data: Any = interaction.data
        await dispatch(interaction, data.get("components", []), data.get("resolved", {}))
        form.stop()

    # ----- Delete ----------------------------------------------------------------------------

    async def delete_from_menu(
        self, interaction: discord.Interaction[Any], message: discord.Message
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await self.delete_result(interaction, message)

    async def delete_result(
        self, interaction: discord.Interaction[Any], message: discord.Message | None
    ) -> None:
        """Delete a job's result message for its owner or an admin. The files stay until the
        retention rules remove them: other results' buttons may still work from them."""
        job_id = job_of_message(message, self.own_user_id()) if message is not None else None
        if message is None or job_id is None:
            raise UserError("Only this bot's image messages can be deleted this way.")
        job = await self.app.check_delete(self.actors.actor(interaction), job_id)
        try:
            await message.delete()
        except discord.NotFound:
            pass  # already gone: what was asked for
        await reply(interaction, f"Deleted the message of job {job.id}.")


async def owned_job(app: ImagineApp, actor: Actor, job_id: int) -> Job:
    job = await app.job(actor, job_id)
    if not actor.may_manage(job.owner):
        raise UserError(NOT_YOURS)
    return job
