"""One Discord message per job, edited in place from queue position to progress to result.

Edits go through the interaction token while it lives (15 minutes); anything after that, or any
edit Discord refuses, falls back to a normal channel message sent with the bot token. Results are
claimed in SQLite before they are sent, so a result is never posted twice, not even across a
restart.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord

from bot import render
from bot.buttons import result_view
from bot.core.models import Finished, Job, JobState, ProgressUpdate, Queued, Started
from generation.images import encode_for_upload

if TYPE_CHECKING:
    from bot.discord_bot import ImagineBot

log = logging.getLogger(__name__)

RESULT = "result"
# A failed result post is retried after these delays, then left for the next start.
RETRY_DELAYS_S = (2.0, 10.0, 30.0, 120.0)
# How far back a restarted bot looks for a result it may have posted just before it died.
RECOVERY_HISTORY_LIMIT = 100


@dataclass
class JobMessage:
    """Where a job's status lives: the interaction's original response, or a channel message."""

    job: Job
    notes: tuple[str, ...] = ()
    interaction: discord.Interaction[Any] | None = None
    message: discord.Message | None = None
    # Once Discord refused an edit, nothing more is tried through that route.
    broken: bool = False
    last_edit: float = field(default=0.0)


class Delivery:
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.tasks: set[asyncio.Task[None]] = set()
        self._delivering: set[int] = set()

    def track(self, target: JobMessage) -> None:
        self._spawn(self._follow(target), f"deliver-job-{target.job.id}")

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        # Kept until done, so a task isn't garbage-collected mid-flight and close() finds it.
        task = asyncio.create_task(work, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    # ----- following a job -------------------------------------------------------------------

    async def _follow(self, target: JobMessage) -> None:
        try:
            await self._follow_events(target)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivering job %s failed", target.job.id)

    async def _follow_events(self, target: JobMessage) -> None:
        interval_s = self.bot.config.discord.progress_edit_interval_s
        pending: str | None = None
        async with self.bot.core.scheduler.subscribe(target.job.id) as events:
            iterator = aiter(events)
            while True:
                wait_s = None
                if pending is not None:
                    wait_s = max(0.0, interval_s - (time.monotonic() - target.last_edit))
                try:
                    event = await asyncio.wait_for(anext(iterator), wait_s)
                except TimeoutError:
                    await self._edit_status(target, pending)  # type: ignore[arg-type]
                    pending = None
                    continue
                except StopAsyncIteration:
                    return
                if isinstance(event, Finished):
                    await self.deliver(event.job, target)
                    return
                pending = self._status_text(target, event)
                # Discord rate-limits edits; at most one every `interval_s`, the newest wins.
                if time.monotonic() - target.last_edit >= interval_s:
                    await self._edit_status(target, pending)
                    pending = None

    def _status_text(self, target: JobMessage, event: Any) -> str:
        if isinstance(event, Queued):
            return render.queued_text(target.job, event.position, target.notes)
        if isinstance(event, ProgressUpdate):
            return render.running_text(target.job, event.step, event.total, target.notes)
        assert isinstance(event, Started)
        return render.running_text(
            target.job, 0, int(target.job.request_data["steps"]), target.notes
        )

    async def _edit_status(self, target: JobMessage, content: str) -> None:
        target.last_edit = time.monotonic()
        if target.broken:
            return
        try:
            if target.message is not None and target.interaction is None:
                await target.message.edit(content=content)
            elif target.interaction is not None:
                await target.interaction.edit_original_response(content=content)
        except discord.HTTPException as exc:
            # Progress is cosmetic: stop editing, the result still arrives by another route.
            log.info(
                "job %s: progress edit refused (%s), switching to channel delivery",
                target.job.id,
                exc,
            )
            target.broken = True

    # ----- results ---------------------------------------------------------------------------

    async def deliver(self, job: Job, target: JobMessage | None = None, attempt: int = 0) -> None:
        """Post a finished job exactly once: edit its message if we can, else a new channel
        message. A failed send gives its claim back and is retried later; a claim left by a
        process that died mid-send is settled by looking for the message in the channel."""
        jobs = self.bot.core.jobs
        if job.id in self._delivering:
            return
        if not await jobs.claim_delivery(job.id, RESULT):
            record = (await jobs.deliveries(job.id)).get(RESULT)
            if record is None or record.state == "done":
                log.info("job %s: result already delivered", job.id)
                return
            posted = await self._find_posted(job)
            if posted is not None:
                log.info(
                    "job %s: result was posted before a restart (message %s)", job.id, posted.id
                )
                await jobs.complete_delivery(job.id, RESULT, _where(posted))
                return
            log.info("job %s: an interrupted delivery is resumed", job.id)
        self._delivering.add(job.id)
        try:
            message, pinged = await self._post(job, target)
        except Exception as exc:
            await jobs.release_delivery(job.id, RESULT)
            self._retry_later(job, attempt, exc)
            return
        finally:
            self._delivering.discard(job.id)
        if message is None:
            await jobs.complete_delivery(job.id, RESULT, {"lost": True})
            return
        await jobs.complete_delivery(job.id, RESULT, _where(message))

        # Edits don't notify anyone; a short new message does. Cancelling your own job doesn't.
        if not pinged and job.state is not JobState.CANCELLED:
            try:
                await message.channel.send(
                    render.done_ping(job, f"<@{job.owner.user_id}>"),
                    reference=message.to_reference(fail_if_not_exists=False),
                    allowed_mentions=_owner_only(job),
                )
            except discord.HTTPException as exc:
                log.info("job %s: done notice not sent (%s)", job.id, exc)

    async def _post(
        self, job: Job, target: JobMessage | None
    ) -> tuple[discord.Message | None, bool]:
        """The result message, and whether it already pinged the owner; None if the channel
        is gone (the images stay on disk)."""
        notes = target.notes if target else ()
        content = (
            render.result_text(job, notes=notes)
            if job.state is JobState.SUCCEEDED
            else render.finished_text(job)
        )
        # A refused job may have images on disk (withheld by the safety check): never post them.
        succeeded = job.state is JobState.SUCCEEDED and job.result is not None
        view = result_view(job, self.bot.app.can_upscale(job)) if succeeded else None

        if target is not None and not target.broken and (target.interaction or target.message):
            try:
                files = await self._files(job, self._upload_limit(target))
                return await self._edit_result(target, content, files, view), False
            except discord.HTTPException as exc:
                log.info("job %s: result edit refused (%s), posting to the channel", job.id, exc)
                target.broken = True
        channel = await self.bot.job_channel(job)
        if channel is None:
            log.warning(
                "job %s: channel %s is gone; result kept on disk", job.id, job.owner.channel_id
            )
            return None, False
        files = await self._files(job, channel.guild.filesize_limit if channel.guild else None)
        message = await channel.send(
            content=f"<@{job.owner.user_id}>\n{content}",
            files=files,
            view=view or discord.utils.MISSING,
            allowed_mentions=_owner_only(job),
        )
        return message, True

    def _retry_later(self, job: Job, attempt: int, error: BaseException) -> None:
        if attempt + 1 >= len(RETRY_DELAYS_S):
            # Left claimable: the next start of the bot delivers it (see on_ready).
            log.error(
                "job %s: result not delivered after %d attempts: %s", job.id, attempt + 1, error
            )
            return
        delay_s = RETRY_DELAYS_S[attempt]
        log.warning(
            "job %s: delivering the result failed (%s); retrying in %.0f s", job.id, error, delay_s
        )

        async def retry() -> None:
            await asyncio.sleep(delay_s)
            await self.deliver(job, None, attempt + 1)

        self._spawn(retry(), f"redeliver-job-{job.id}")

    async def _find_posted(self, job: Job) -> discord.Message | None:
        """This job's result among the bot's recent messages in its channel, if it is there."""
        channel = await self.bot.job_channel(job)
        if channel is None or self.bot.user is None:
            return None
        result_ids = {f"imagine:U:{job.id}:1", f"imagine:VS:{job.id}"}
        marker = render.finished_marker(job)
        try:
            async for message in channel.history(limit=RECOVERY_HISTORY_LIMIT):
                if message.author.id != self.bot.user.id:
                    continue
                custom_ids = {
                    child.custom_id
                    for row in message.components
                    for child in getattr(row, "children", ())
                    if getattr(child, "custom_id", None)
                }
                if custom_ids & result_ids or (marker in message.content and not custom_ids):
                    return message
        except discord.HTTPException as exc:
            log.info("job %s: channel history unavailable (%s)", job.id, exc)
        return None

    async def _edit_result(
        self,
        target: JobMessage,
        content: str,
        files: list[discord.File],
        view: discord.ui.View | None,
    ) -> discord.Message:
        options: dict[str, Any] = {"content": content, "attachments": files, "view": view}
        if target.interaction is not None:
            return await target.interaction.edit_original_response(**options)
        assert target.message is not None
        return await target.message.edit(**options)

    def _upload_limit(self, target: JobMessage) -> int | None:
        if target.interaction is not None:
            return target.interaction.filesize_limit
        if target.message is not None and target.message.guild is not None:
            return target.message.guild.filesize_limit
        return None

    async def _files(self, job: Job, limit_bytes: int | None) -> list[discord.File]:
        if job.state is not JobState.SUCCEEDED or job.result is None:
            return []
        data_dir = self.bot.config.data_dir
        path = job.grid_file(data_dir) if len(job.result.image_paths) > 1 else None
        path = path or job.image_path(data_dir, 0)
        spoiler = await self.bot.flagged(job)
        data, name = await asyncio.to_thread(
            _upload_bytes,
            path,
            limit_bytes or discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES,
            f"job-{job.id}",
        )
        return [discord.File(io.BytesIO(data), filename=name, spoiler=spoiler)]


def _owner_only(job: Job) -> discord.AllowedMentions:
    return discord.AllowedMentions(users=[discord.Object(job.owner.user_id)])


def _where(message: discord.Message) -> dict[str, int]:
    return {"channel_id": message.channel.id, "message_id": message.id}


def _upload_bytes(path: Path, limit_bytes: int, stem: str) -> tuple[bytes, str]:
    """The file as stored (with its PNG metadata) when it fits, else re-encoded to fit."""
    data = path.read_bytes()
    if len(data) <= limit_bytes:
        return data, f"{stem}{path.suffix}"
    from PIL import Image

    from generation.images import read_parameters

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return encode_for_upload(image, limit_bytes, read_parameters(data), stem)
