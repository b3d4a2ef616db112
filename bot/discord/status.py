"""A job's status message when a command, a button or a form starts it: the acknowledgement,
the message itself (a reply to the pressed message, or a follow-up of the command), and the
hand-over to delivery, which edits it from queue position to progress to result."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import discord

from bot.app import render
from bot.app.actions import Actor, Submitted
from bot.core.models import CancelNotSaved, Job
from bot.discord.delivery import Delivery, JobMessage
from bot.discord.interactions import clip
from bot.discord.views.buttons import cancel_view

if TYPE_CHECKING:
    from bot.core.scheduler import Scheduler

log = logging.getLogger(__name__)


class StatusMessages:
    def __init__(self, delivery: Delivery, scheduler: Scheduler) -> None:
        self.delivery = delivery
        self.scheduler = scheduler

    async def post_status(
        self, interaction: discord.Interaction[Any], submitted: Submitted
    ) -> None:
        """The status message of a job started from a button or a form: a reply to the
        message it was pressed on, edited until the result lands in it."""
        job = submitted.job
        channel = interaction.channel
        message: discord.Message | None = None
        try:
            assert channel is not None and interaction.message is not None
            message = await channel.send(  # type: ignore[union-attr]
                render.queued_text(job, submitted.position, submitted.notes),
                view=cancel_view(job.id),
                reference=interaction.message.to_reference(fail_if_not_exists=False),
            )
        except discord.HTTPException as exc:
            # The job is accepted and paid for: without a status message its result still
            # goes to the channel when it is ready.
            log.info("job %s: status message not posted (%s)", job.id, exc)
        shown = submitted.position if message is not None else None
        target = JobMessage(job, submitted.notes, message=message, shown_position=shown)
        target.last_edit = time.monotonic()
        await self.delivery.remember(target)
        self.delivery.track(target)

    async def acknowledge(
        self, interaction: discord.Interaction[Any], jobs: Sequence[Job], actor: Actor
    ) -> int | None:
        """Acknowledge a command whose jobs are already queued; returns the id of the response
        message. If Discord no longer takes the acknowledgement, the jobs are cancelled and
        refunded rather than run unseen."""
        try:
            response = await interaction.response.defer(thinking=True)
            return response.message_id if response is not None else None
        except discord.HTTPException:
            for job in jobs:
                try:
                    cancelled = await self.scheduler.cancel(job.id, actor.user_id)
                except CancelNotSaved:
                    cancelled = False  # it goes on: its result goes to the channel
                if not cancelled:
                    # Too late to cancel (it already finished): the result goes to the channel.
                    self.delivery.track(JobMessage(job))
            raise

    async def follow_up(self, interaction: discord.Interaction[Any], submitted: Submitted) -> None:
        """A further job of one /imagine: its status message is a follow-up of the command
        (edited through the interaction token while it lives, then with the bot token)."""
        job = submitted.job
        content = clip(render.queued_text(job, submitted.position, submitted.notes))
        try:
            message = await interaction.followup.send(content, view=cancel_view(job.id), wait=True)
        except discord.HTTPException as exc:
            # The job is accepted and paid for: without a status message its result still
            # goes to the channel when it is ready.
            log.info("job %s: status message not posted (%s)", job.id, exc)
            self.delivery.track(JobMessage(job, submitted.notes))
            return
        target = JobMessage(
            job,
            submitted.notes,
            interaction=interaction,
            followup_id=message.id,
            message=self.delivery.status_message(job, message.id),
            shown_position=submitted.position,
        )
        target.last_edit = time.monotonic()
        await self.delivery.remember(target)
        self.delivery.track(target)

    async def announce(
        self, interaction: discord.Interaction[Any], batch: Sequence[Submitted]
    ) -> None:
        """After a private "thinking…" (a command with pictures to fetch): close it with what
        was queued, then give each job its public status message (a follow-up), which delivery
        edits into the result."""
        jobs = ", ".join(str(s.job.id) for s in batch)
        try:
            await interaction.edit_original_response(
                content=f"✅ Queued: job{'s' if len(batch) > 1 else ''} {jobs}."
            )
        except discord.HTTPException as exc:
            # While "thinking…" stands, a follow-up would replace it (privately): post to the
            # channel instead.
            log.info("jobs %s: acknowledgement not edited (%s)", jobs, exc)
            for submitted in batch:
                self.delivery.track(JobMessage(submitted.job, submitted.notes))
            return
        for submitted in batch:
            await self.follow_up(interaction, submitted)
