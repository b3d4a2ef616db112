"""One Discord message per job, edited in place from queue position to progress to result.

Long (about 580 lines): one job message's whole life (status edits, the result post, its
retries, refunds for what cannot be posted, recovery after a restart) is one state machine,
and its guards only make sense read together.

The status message is edited through the interaction token while it lives (15 minutes); once
Discord says the token is gone, the same message is edited with the bot token (a non-ephemeral
interaction response is an ordinary message of the bot's). Only when that message is gone is
the result posted as a new channel message. Results are claimed in SQLite before they are
sent, so a result is never posted twice, not even across a restart.

Discord errors that retrying cannot fix (the bot may not post or attach files in the channel,
or the channel is gone) are not retried: the owner gets what can still be sent (a text message
without the images, or a DM) and the job is refunded and recorded as undelivered.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord

from bot.app import render
from bot.app.catalog import control_thumbnail
from bot.app.inputs import pictures_thumbnail
from bot.app.shorten import shorten_text
from bot.core.models import (
    EndingDelayed,
    Finished,
    Job,
    JobKind,
    JobState,
    ProgressUpdate,
    Queued,
    Started,
)
from bot.discord.views.buttons import Fits, result_view
from bot.discord.views.describe import DescribeAction, describe_text, describe_view
from bot.discord.views.describe import custom_id as suggestion_id
from bot.discord.views.shorten import custom_id as shorter_id
from bot.discord.views.shorten import shorten_view
from generation.images import encode_for_upload

if TYPE_CHECKING:
    from bot.core.jobs import JobStore
    from bot.core.scheduler import Scheduler

log = logging.getLogger(__name__)

RESULT = "result"
# Where a job's status message is (channel and message id), so a restarted bot edits it.
STATUS = "status"
# A failed result post is retried after these delays, then left for the next start.
RETRY_DELAYS_S = (2.0, 10.0, 30.0, 120.0)
# How far back a restarted bot looks for a result it may have posted just before it died.
RECOVERY_HISTORY_LIMIT = 100
# Errors saying the interaction token no longer works (expired after 15 minutes, or its
# message was deleted): the bot-token route to the same message takes over.
TOKEN_ERROR_CODES = frozenset({50027, 10015, 10008})
# Missing Permissions, Missing Access, Unknown Channel: the same request can never succeed.
PERMANENT_ERROR_CODES = frozenset({50013, 50001, 10003})
# Queue positions are worth an edit near the front; further back, at most one every 10 s (each
# dispatch moves every waiting job, and each edit counts against Discord's rate limits).
POSITION_EDIT_TOP = 5
POSITION_EDIT_INTERVAL_S = 10.0
# Shown while the core cannot write how a job's run ended (bot/core/lifecycle.py).
ENDING_DELAYED = (
    "this job has run, but the bot cannot save how it ended yet (its storage may be full); "
    "it keeps trying, and nothing is charged twice"
)


def result_nonce(job_id: int) -> str:
    """The nonce of a job's result post: Discord takes a string of up to 25 characters, and a
    job id has at most 19 digits."""
    return f"r{job_id}"


def is_token_error(error: BaseException) -> bool:
    return isinstance(error, discord.HTTPException) and error.code in TOKEN_ERROR_CODES


def is_permanent(error: BaseException) -> bool:
    return isinstance(error, discord.HTTPException) and error.code in PERMANENT_ERROR_CODES


class Undeliverable(Exception):
    """The result can't be posted where it was asked for, and retrying won't change that."""


class StatusMessageGone(Exception):
    """The job's status message was deleted, or can't be reached any more."""


@dataclass
class JobMessage:
    """A job's status message: reachable through the interaction token while it lives, and
    through `message` (edited with the bot token) always."""

    job: Job
    notes: tuple[str, ...] = ()
    interaction: discord.Interaction[Any] | None = None
    message: discord.Message | discord.PartialMessage | None = None
    # A follow-up of the interaction (a further job of one /imagine) rather than its response.
    followup_id: int | None = None
    # The status message can't be edited any more (deleted, or no access to its channel).
    broken: bool = False
    last_edit: float = 0.0
    shown_position: int | None = None


ChannelLookup = Callable[[int], Awaitable["discord.abc.Messageable | None"]]
DirectMessages = Callable[[int], Awaitable["discord.abc.Messageable"]]
# (guild id or None, channel id, message id) -> the message, edited with the bot token.
MessageAt = Callable[[int | None, int, int], "discord.PartialMessage"]


class Delivery:
    def __init__(
        self,
        scheduler: Scheduler,
        jobs: JobStore,
        *,
        data_dir: Path,
        progress_edit_interval_s: float,
        find_channel: ChannelLookup,
        open_dm: DirectMessages,
        message_at: MessageAt,
        own_user_id: Callable[[], int | None],
        is_flagged: Callable[[Job], Awaitable[bool]],
        fits_for: Callable[[Job], Fits],
        position_edit_interval_s: float = POSITION_EDIT_INTERVAL_S,
        page_url: Callable[[Job], str | None] | None = None,
        prompt_refused: Callable[[str], bool] | None = None,
    ) -> None:
        """`find_channel` returns None for a channel that is gone or hidden from the bot (and
        raises on transient errors); `open_dm` opens a DM channel with a user; `message_at`
        names a message without fetching it."""
        self.scheduler = scheduler
        self.jobs = jobs
        self.data_dir = data_dir
        self.progress_edit_interval_s = progress_edit_interval_s
        self.position_edit_interval_s = position_edit_interval_s
        self._find_channel = find_channel
        # The prompt filter, for text the bot shows that no member typed (/shorten's prompts).
        self._prompt_refused = prompt_refused
        self._open_dm = open_dm
        self._message_at = message_at
        self._own_user_id = own_user_id
        self._is_flagged = is_flagged
        self._fits_for = fits_for
        # The job's page on the web home (a Web link button under its grid), when it is on.
        self._page_url = page_url or (lambda _job: None)
        self.tasks: set[asyncio.Task[None]] = set()
        self._delivering: set[int] = set()

    def track(self, target: JobMessage) -> None:
        self._spawn(self._follow(target), f"deliver-job-{target.job.id}")

    def status_message(self, job: Job, message_id: int | None) -> discord.PartialMessage | None:
        """The job's status message (an interaction response is an ordinary message of the
        bot's), to be edited with the bot token."""
        if message_id is None or job.owner.channel_id is None:
            return None
        return self._message_at(job.owner.guild_id, job.owner.channel_id, message_id)

    async def remember(self, target: JobMessage) -> None:
        """Record where the status message is, so that a restarted bot edits it instead of
        leaving it at "Queued" (with a live Cancel button) and posting the result elsewhere."""
        if target.message is None:
            return
        where = {"channel_id": target.message.channel.id, "message_id": target.message.id}
        await self.jobs.complete_delivery(target.job.id, STATUS, where)

    async def recovered(self, job: Job) -> JobMessage:
        """A job from before a restart, with its status message if one was recorded."""
        record = (await self.jobs.deliveries(job.id)).get(STATUS)
        if record is None or "message_id" not in record.info:
            return JobMessage(job)
        message = self._message_at(
            job.owner.guild_id, int(record.info["channel_id"]), int(record.info["message_id"])
        )
        return JobMessage(job, message=message)

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
        # (text, queue position, preview PNG) of the edit waiting for its turn.
        pending: tuple[str, int | None, bytes | None] | None = None
        due = 0.0
        async with self.scheduler.subscribe(target.job.id) as events:
            iterator = aiter(events)
            while True:
                wait_s = None if pending is None else max(0.0, due - time.monotonic())
                try:
                    event = await asyncio.wait_for(anext(iterator), wait_s)
                except TimeoutError:
                    assert pending is not None
                    await self._edit_status(target, *pending)
                    pending = None
                    continue
                except StopAsyncIteration:
                    return
                if isinstance(event, Finished):
                    await self.deliver(event.job, target)
                    return
                position = event.position if isinstance(event, Queued) else None
                if position is not None and position == target.shown_position:
                    pending = None
                    continue
                # Discord rate-limits edits: the newest text waits for its turn, and replaces
                # any older one still waiting (keeping a preview image it carried: previews
                # come a few times per job, text at every step).
                preview = getattr(event, "preview_png", None) or (pending and pending[2])
                pending = (self._status_text(target, event), position, preview or None)
                due = target.last_edit + self._spacing_s(position)
                if time.monotonic() >= due:
                    await self._edit_status(target, *pending)
                    pending = None

    def _spacing_s(self, position: int | None) -> float:
        if position is None or position <= POSITION_EDIT_TOP:
            return self.progress_edit_interval_s
        return max(self.progress_edit_interval_s, self.position_edit_interval_s)

    def _status_text(self, target: JobMessage, event: Any) -> str:
        if isinstance(event, Queued):
            return render.queued_text(target.job, event.position, target.notes)
        if isinstance(event, ProgressUpdate):
            return render.running_text(target.job, event.step, event.total, target.notes)
        if isinstance(event, EndingDelayed):
            steps = int(target.job.request_data["steps"])
            return render.running_text(target.job, steps, steps, (*target.notes, ENDING_DELAYED))
        assert isinstance(event, Started)
        return render.running_text(
            target.job, 0, int(target.job.request_data["steps"]), target.notes
        )

    async def _edit_status(
        self, target: JobMessage, content: str, position: int | None, preview: bytes | None
    ) -> None:
        target.last_edit = time.monotonic()
        if target.broken:
            return
        options: dict[str, Any] = {"content": content}
        if preview is not None:
            # Replaces the previous preview; text-only edits leave the last one showing.
            options["attachments"] = [discord.File(io.BytesIO(preview), filename="preview.png")]
        try:
            await self._edit(target, **options)
        except (discord.HTTPException, StatusMessageGone) as exc:
            # Progress is cosmetic: a failed edit is skipped, the next one may work.
            self._count_error(exc)
            log.info("job %s: progress edit refused (%s)", target.job.id, exc)
            return
        target.shown_position = position

    async def _edit(self, target: JobMessage, **options: Any) -> discord.Message:
        """Edit the status message through the interaction token while it works, then with
        the bot token. Raises StatusMessageGone once the message can't be reached at all."""
        if target.interaction is not None:
            try:
                if target.followup_id is not None:
                    return await target.interaction.followup.edit_message(
                        target.followup_id, **options
                    )
                return await target.interaction.edit_original_response(**options)
            except discord.HTTPException as exc:
                if not is_token_error(exc):
                    raise  # not a reason to change routes: the caller retries or skips
                log.info(
                    "job %s: interaction token no longer works (%s); editing with the bot token",
                    target.job.id,
                    exc,
                )
                target.interaction = None
                # The failed request read the files; they are sent again from the start.
                for file in options.get("attachments") or ():
                    file.reset()
        if target.message is None:
            target.broken = True
            raise StatusMessageGone("the interaction token expired and no message id is known")
        try:
            return await target.message.edit(**options)
        except discord.NotFound as exc:
            if is_permanent(exc):
                raise  # the channel itself is gone
            target.broken = True
            raise StatusMessageGone(str(exc)) from exc

    # ----- results ---------------------------------------------------------------------------

    async def deliver(self, job: Job, target: JobMessage | None = None, attempt: int = 0) -> None:
        """Post a finished job exactly once: edit its message if we can, else a new channel
        message. A transient failure gives its claim back and is retried later; a claim left by
        a process that died mid-send is settled by looking for the message in the channel; a
        permanent refusal is reported to the owner and refunded, never retried."""
        if job.id in self._delivering:
            return
        # Claimed here before any await, so a second delivery of this job in this process
        # (a redelivery at reconnect) cannot slip in while this one waits for the database.
        self._delivering.add(job.id)
        try:
            await self._deliver_claimed(job, target, attempt)
        finally:
            self._delivering.discard(job.id)

    async def _deliver_claimed(self, job: Job, target: JobMessage | None, attempt: int) -> None:
        jobs = self.jobs
        if not await jobs.claim_delivery(job.id, RESULT):
            record = (await jobs.deliveries(job.id)).get(RESULT)
            if record is None or record.state in ("done", "undelivered"):
                log.info("job %s: result already delivered (or given up)", job.id)
                return
            posted = await self._find_posted(job)
            if posted is not None:
                log.info(
                    "job %s: result was posted before a restart (message %s)", job.id, posted.id
                )
                await jobs.complete_delivery(job.id, RESULT, _where(posted))
                return
            log.info("job %s: an interrupted delivery is resumed", job.id)
        elif attempt > 0:
            # A retry after a failed try, which may have posted before its answer was lost
            # (and Discord keeps an enforced nonce for a few minutes only).
            posted = await self._find_posted(job)
            if posted is not None:
                log.info("job %s: the failed try had posted the result (%s)", job.id, posted.id)
                await jobs.complete_delivery(job.id, RESULT, _where(posted))
                return
        try:
            message, pinged = await self._post(job, target)
        except Exception as exc:
            self._count_error(exc)
            if is_permanent(exc) or isinstance(exc, Undeliverable):
                await self._give_up(job, target, exc)
                return
            await jobs.release_delivery(job.id, RESULT)
            self._retry_later(job, target, attempt, exc)
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

    async def _post(self, job: Job, target: JobMessage | None) -> tuple[discord.Message, bool]:
        """The result message, and whether it already pinged the owner."""
        notes = target.notes if target else ()
        content = (
            render.result_text(job, notes=notes)
            if job.state is JobState.SUCCEEDED
            else render.finished_text(job)
        )
        # A refused job may have images on disk (withheld by the safety check): never post them.
        succeeded = job.state is JobState.SUCCEEDED and job.result is not None
        view = result_view(job, self._fits_for(job), self._page_url(job)) if succeeded else None
        if succeeded and job.kind is JobKind.DESCRIBE:
            # Text, not images: the suggestions with their buttons (bot/discord/views/describe.py).
            content, view = describe_text(job, notes), describe_view(job)
        if succeeded and job.kind is JobKind.SHORTEN:
            # The words weighted and the shorter prompts with their buttons (views/shorten.py).
            content = shorten_text(job, notes, self._prompt_refused)
            view = shorten_view(job)

        if target is not None and not target.broken:
            try:
                files = await self._files(job, _upload_limit(target))
                message = await self._edit(target, content=content, attachments=files, view=view)
                return message, False
            except StatusMessageGone as exc:
                log.info("job %s: status message gone (%s), posting to the channel", job.id, exc)
        channel = await self._channel(job)
        files = await self._files(job, _guild_upload_limit(channel))
        message = await channel.send(
            content=f"<@{job.owner.user_id}>\n{content}",
            files=files,
            view=view or discord.utils.MISSING,
            allowed_mentions=_owner_only(job),
            # The same nonce on every try (discord.py sends it with enforce_nonce): when a post
            # was made but its answer lost, Discord answers a retry with that message.
            nonce=result_nonce(job.id),
        )
        return message, True

    async def _channel(self, job: Job) -> discord.abc.Messageable:
        channel_id = job.owner.channel_id
        channel = await self._find_channel(channel_id) if channel_id is not None else None
        if channel is None:
            raise Undeliverable(f"channel {channel_id} is gone or hidden from the bot")
        return channel

    async def _give_up(self, job: Job, target: JobMessage | None, error: BaseException) -> None:
        """Tell the owner what can still be told (edit the status message without images, else
        a channel message, else a DM), then refund the job and record it as undelivered."""
        reason = error.text if isinstance(error, discord.HTTPException) else str(error)
        reason = reason or "Discord refused it"
        log.warning("job %s: result can't be delivered: %s", job.id, reason)
        text = render.undelivered_text(job, reason)
        told = False
        if target is not None and not target.broken:
            try:
                await self._edit(target, content=text, attachments=[], view=None)
                told = True
            except (discord.HTTPException, StatusMessageGone) as exc:
                log.info("job %s: status message not updated (%s)", job.id, exc)
        if not told:
            told = await self._tell_owner(job, text)
        refunded = await self.scheduler.refund_undelivered(job.id, reason)
        self.scheduler.metrics.delivery_lost()
        log.info(
            "job %s: undelivered (owner told: %s); %d credits refunded", job.id, told, refunded
        )

    async def _tell_owner(self, job: Job, text: str) -> bool:
        mention = f"<@{job.owner.user_id}>\n"
        try:
            channel = await self._channel(job)
            await channel.send(mention + text, allowed_mentions=_owner_only(job))
            return True
        except (discord.HTTPException, Undeliverable) as exc:
            log.info("job %s: channel message not sent (%s); trying a DM", job.id, exc)
        try:
            direct = await self._open_dm(job.owner.user_id)
            await direct.send(text)
            return True
        except discord.HTTPException as exc:
            log.info("job %s: DM not sent either (%s)", job.id, exc)
            return False

    def _count_error(self, error: BaseException) -> None:
        if isinstance(error, discord.HTTPException):
            self.scheduler.metrics.discord_error(error.code)

    def _retry_later(
        self, job: Job, target: JobMessage | None, attempt: int, error: BaseException
    ) -> None:
        if attempt + 1 >= len(RETRY_DELAYS_S):
            # Left claimable: the next start of the bot delivers it (see on_ready).
            log.error(
                "job %s: result not delivered after %d attempts: %s", job.id, attempt + 1, error
            )
            return
        delay_s = RETRY_DELAYS_S[attempt]
        self.scheduler.metrics.delivery_retried()
        log.warning(
            "job %s: delivering the result failed (%s); retrying in %.0f s", job.id, error, delay_s
        )

        async def retry() -> None:
            await asyncio.sleep(delay_s)
            await self.deliver(job, target, attempt + 1)

        self._spawn(retry(), f"redeliver-job-{job.id}")

    async def _find_posted(self, job: Job) -> discord.Message | None:
        """This job's result among the bot's recent messages in its channel, if it is there."""
        own_id = self._own_user_id()
        try:
            channel = await self._channel(job)
        except (discord.HTTPException, Undeliverable):
            return None
        if own_id is None:
            return None
        result_ids = {f"imagine:U:{job.id}:1", f"imagine:VS:{job.id}", f"imagine:VS:{job.id}:1"}
        result_ids.add(suggestion_id(DescribeAction.AGAIN, job.id))
        result_ids.add(shorter_id(job.id, 1))
        marker = render.finished_marker(job)
        try:
            async for message in channel.history(limit=RECOVERY_HISTORY_LIMIT):
                if message.author.id != own_id:
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

    async def image_file(self, job: Job, index: int, limit_bytes: int | None) -> discord.File:
        """Kept image `index` (0-based) of a finished job as an upload (a separated U1–U4),
        behind a spoiler where the job's images are. Raises ImageExpired after retention."""
        path = job.image_path(self.data_dir, index)
        return await self._upload(job, path, limit_bytes, f"job-{job.id}-{index + 1}")

    async def _upload(
        self, job: Job, path: Path, limit_bytes: int | None, stem: str
    ) -> discord.File:
        """The image at `path` as an upload named after `stem` that fits the limit (Discord's
        default without one), behind a spoiler where the job's images are."""
        spoiler = await self._is_flagged(job)
        data, name = await asyncio.to_thread(
            _upload_bytes, path, limit_bytes or discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES, stem
        )
        return discord.File(io.BytesIO(data), filename=name, spoiler=spoiler)

    async def _files(self, job: Job, limit_bytes: int | None) -> list[discord.File]:
        if job.state is not JobState.SUCCEEDED or job.result is None:
            return []
        if not job.result.image_paths:
            # A /describe: the picture it read is shown with the suggestions.
            return await self._pictures_file(job, spoiler=False)
        path = job.grid_file(self.data_dir) if len(job.result.image_paths) > 1 else None
        path = path or job.image_path(self.data_dir, 0)
        grid = await self._upload(job, path, limit_bytes, f"job-{job.id}")
        files = [grid, *await self._pictures_file(job, spoiler=grid.spoiler)]
        if job.result.control_map_path is not None:
            # What a ControlNet followed, small beside the grid (bot/app/catalog.py).
            path = self.data_dir / job.result.control_map_path
            thumbnail = await asyncio.to_thread(control_thumbnail, path)
            if thumbnail is not None:
                name = f"job-{job.id}-control.png"
                files.append(
                    discord.File(io.BytesIO(thumbnail), filename=name, spoiler=grid.spoiler)
                )
        return files

    async def _pictures_file(self, job: Job, *, spoiler: bool) -> list[discord.File]:
        """The member's pictures (image prompts, /blend, references, the described picture),
        small beside the result, so every input is shown with it (bot/app/inputs.py)."""
        strip = await asyncio.to_thread(pictures_thumbnail, self.data_dir, job.request_data)
        if strip is None:
            return []
        name = f"job-{job.id}-pictures.png"
        return [discord.File(io.BytesIO(strip), filename=name, spoiler=spoiler)]


def _upload_limit(target: JobMessage) -> int | None:
    if target.interaction is not None:
        return target.interaction.filesize_limit
    if target.message is not None and target.message.guild is not None:
        return target.message.guild.filesize_limit
    return None


def _guild_upload_limit(channel: discord.abc.Messageable) -> int | None:
    guild = getattr(channel, "guild", None)
    return guild.filesize_limit if isinstance(guild, discord.Guild) else None


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
