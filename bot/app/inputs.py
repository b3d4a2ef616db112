"""Members' pictures as job inputs: fetched, checked, and attached to requests.

A prompt's `image_refs` (image links, /imagine's attachment options, --sref/--oref/--cref) and
the pictures of /blend and /describe all come through here, whatever the front end:

* links are fetched once each per command under the fetch policy (bot/app/fetch.py), attachments
  arrive already fetched by the front end through the same policy;
* every picture is scored by the image safety classifier (bot/app/moderation.py's `ImageSafety`)
  under the channel's policy: anything goes in an age-restricted channel; elsewhere a flagged
  picture is refused and audited, whatever `nsfw_policy` says (an input can't be posted behind
  a spoiler: it steers every image of the job);
* each becomes an `InputImage` with the role and weight the prompt asked for, its source and
  the sha256 of the bytes fetched.

Refusals are `FetchRefused` naming the picture and the reason; nothing here charges anyone.
No discord imports.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from PIL import Image

from bot.app.fetch import (
    ATTACHMENT_PREFIX,
    FetchedImage,
    FetchPolicy,
    FetchRefused,
    attachment_image,
    fetch_image,
)
from bot.app.moderation import ImageSafety, shared_image_safety
from bot.config import ModerationConfig
from bot.core.audit import AuditLog
from bot.core.execute import safe_path
from bot.core.models import Owner
from generation.contract import MAX_PIXELS, GenerationRequest, InputImage, InputRole, JobKind
from generation.prompt import ParsedPrompt, size_for_aspect
from generation.references import DEFAULT_IMAGE_WEIGHT
from generation.settings import EngineSettings

log = logging.getLogger(__name__)

AUDIT_INPUT_FLAG = "input_flagged"

Fetch = Callable[[str, FetchPolicy], Awaitable[FetchedImage]]
FetchAttachment = Callable[[Any, FetchPolicy], Awaitable[FetchedImage]]
# A member's picture as a command brings it: already fetched, or a Discord attachment (anything
# with `filename`, `size` and `url`) that is fetched only once the command may go ahead.
Picture = FetchedImage | Any

DEFAULT_MAX_FETCHES = 8
DEFAULT_MAX_FETCHES_PER_MEMBER = 2


class InputScreen:
    """The image safety check of members' pictures, before anything is queued or charged."""

    def __init__(
        self,
        config: ModerationConfig,
        is_nsfw_channel: Callable[[int | None], bool],
        audit: AuditLog | None = None,
        safety: ImageSafety | None = None,
    ) -> None:
        self.config = config
        self.is_nsfw_channel = is_nsfw_channel
        self.audit = audit
        # The output check's session (one classifier per process).
        self.safety = safety if safety is not None else shared_image_safety()

    async def check(self, owner: Owner, pictures: Sequence[FetchedImage]) -> None:
        if not pictures or not self.config.nsfw_check or self.is_nsfw_channel(owner.channel_id):
            return
        scores = await self.safety.ascore([picture.image for picture in pictures])
        threshold = self.config.nsfw_threshold
        for picture, score in zip(pictures, scores, strict=True):
            if score < threshold:
                continue
            if self.audit is not None:
                await self.audit.record(
                    AUDIT_INPUT_FLAG,
                    f"{picture.source} scored {score:.3f} (threshold {threshold:g}); refused",
                    user_id=owner.user_id,
                    guild_id=owner.guild_id,
                    channel_id=owner.channel_id,
                    prompt=picture.source,
                )
            raise FetchRefused(
                f"{shown_source(picture.source)}: the safety filter flagged this picture; "
                "pictures like it are only taken in age-restricted channels"
            )


class PictureInputs:
    """Fetches, screens and attaches the pictures of one command's jobs.

    At most `max_fetches` pictures are fetched and decoded at a time by the whole bot, and
    `max_fetches_per_member` for any one member; the others wait their turn. So a burst of
    commands full of links costs at most that much memory and that many threads, and other
    members' pictures still get their share."""

    def __init__(
        self,
        policy: FetchPolicy,
        screen: InputScreen,
        fetch: Fetch = fetch_image,
        fetch_attachment: FetchAttachment = attachment_image,
        *,
        max_fetches: int = DEFAULT_MAX_FETCHES,
        max_fetches_per_member: int = DEFAULT_MAX_FETCHES_PER_MEMBER,
    ):
        if max_fetches < 1 or max_fetches_per_member < 1:
            raise ValueError("max_fetches, max_fetches_per_member: must be at least 1")
        self.policy = policy
        self.screen = screen
        self._fetch = fetch
        self._fetch_attachment = fetch_attachment
        self._all = asyncio.Semaphore(max_fetches)
        self._per_member = max_fetches_per_member
        # Each member's semaphore while they have fetches waiting or running, with how many.
        self._members: dict[int, tuple[asyncio.Semaphore, int]] = {}
        self.fetches_started = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    async def _limited(
        self, user_id: int, fetch: Callable[[], Awaitable[FetchedImage]]
    ) -> FetchedImage:
        semaphore, users = self._members.get(user_id, (asyncio.Semaphore(self._per_member), 0))
        self._members[user_id] = (semaphore, users + 1)
        try:
            async with semaphore, self._all:
                self.fetches_started += 1
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                try:
                    return await fetch()
                finally:
                    self.in_flight -= 1
        finally:
            semaphore, users = self._members[user_id]
            if users <= 1:
                del self._members[user_id]
            else:
                self._members[user_id] = (semaphore, users - 1)

    async def fetch_links(self, links: Sequence[str], user_id: int = 0) -> dict[str, FetchedImage]:
        """Each link once, within the limits; the first refusal (in the given order) wins and
        the fetches not started yet are called off."""
        unique = list(dict.fromkeys(links))
        jobs = [functools.partial(self._fetch_link, link, user_id) for link in unique]
        return dict(zip(unique, await _in_order(jobs), strict=True))

    async def _fetch_link(self, link: str, user_id: int) -> FetchedImage:
        try:
            return await self._limited(user_id, lambda: self._fetch(link, self.policy))
        except FetchRefused as exc:
            raise FetchRefused(f"{shown_source(link)}: {exc.reason}") from None

    async def fetch_attachments(
        self, attachments: Sequence[Picture], user_id: int = 0
    ) -> list[FetchedImage]:
        """A command's attachments (the ones already fetched as they are), in order, each with
        its source from `attachment_sources`; the first refusal wins."""
        sources = attachment_sources(attachments)
        jobs = [
            functools.partial(self._fetch_one, picture, source, user_id)
            for picture, source in zip(attachments, sources, strict=True)
        ]
        return await _in_order(jobs)

    async def _fetch_one(self, picture: Picture, source: str, user_id: int) -> FetchedImage:
        if isinstance(picture, FetchedImage):
            return replace(picture, source=source)
        fetched = await self._limited(user_id, lambda: self._fetch_attachment(picture, self.policy))
        return replace(fetched, source=source)

    async def fetch_control(
        self, owner: Owner, attachment: Picture | None, link: str | None
    ) -> FetchedImage | None:
        """The picture a --cn ControlNet follows: the `control_image` attachment, else the link
        after `--cn NAME`; screened like every member's picture. FetchRefused names the option
        or the link."""
        if attachment is None and link is None:
            return None
        try:
            if attachment is not None:
                where = f"control_image {_filename(attachment)}"
                (picture,) = await self.fetch_attachments([attachment], owner.user_id)
            else:
                assert link is not None
                where = f"--cn {shown_source(link)}"
                picture = await self._limited(owner.user_id, lambda: self._fetch(link, self.policy))
            await self.screen.check(owner, [picture])
        except FetchRefused as exc:
            reason = exc.reason
            if attachment is not None:
                reason = reason.removeprefix(f"{_filename(attachment)}: ")
            raise FetchRefused(f"{where}: {reason}") from None
        return picture

    async def attach(
        self,
        owner: Owner,
        parsed: Sequence[ParsedPrompt],
        attachments: Mapping[str, FetchedImage] = {},
    ) -> list[ParsedPrompt]:
        """The parsed jobs with their pictures appended to `request.inputs`."""
        wanted = [ref for job in parsed for ref in job.image_refs]
        if not wanted:
            return list(parsed)
        links = [ref.source for ref in wanted if ref.is_link and ref.source not in attachments]
        pictures = {**attachments, **await self.fetch_links(links, owner.user_id)}
        missing = [ref.source for ref in wanted if ref.source not in pictures]
        if missing:
            raise FetchRefused(f"{shown_source(missing[0])}: that picture was not received")
        sources = dict.fromkeys(ref.source for ref in wanted)
        await self.screen.check(owner, [pictures[source] for source in sources])
        return [
            job.with_pictures(
                tuple(as_input(pictures[r.source], r.role, r.weight) for r in job.image_refs)
            )
            for job in parsed
        ]


class BlendShape(StrEnum):
    """/blend's shape option (Midjourney's dimensions)."""

    PORTRAIT = "portrait"
    SQUARE = "square"
    LANDSCAPE = "landscape"

    @property
    def ratio(self) -> tuple[int, int]:
        return {"portrait": (2, 3), "square": (1, 1), "landscape": (3, 2)}[self.value]


MIN_BLEND = 2
MAX_BLEND = 5


def blend_request(
    settings: EngineSettings,
    pictures: Sequence[FetchedImage],
    shape: BlendShape,
    seed: int,
    model: str | None = None,
) -> GenerationRequest:
    """An IMAGINE with no text whose image prompts are the pictures, each at weight 1, at the
    shape's size for the model's base resolution. ValueError names what is wrong."""
    if not MIN_BLEND <= len(pictures) <= MAX_BLEND:
        raise ValueError(
            f"images: /blend takes {MIN_BLEND} to {MAX_BLEND} images, got {len(pictures)}"
        )
    spec = settings.model(model)
    width, height = size_for_aspect(
        *shape.ratio, spec.base_resolution, min(settings.max_pixels, MAX_PIXELS)
    )
    return GenerationRequest(
        kind=JobKind.IMAGINE,
        prompt="",
        width=width,
        height=height,
        steps=settings.default_steps,
        guidance=settings.default_guidance,
        sampler=settings.default_sampler,
        seed=seed,
        num_candidates=settings.num_candidates,
        num_kept=settings.num_kept,
        model=spec.name,
        inputs=tuple(
            as_input(picture, InputRole.IMAGE_PROMPT, DEFAULT_IMAGE_WEIGHT) for picture in pictures
        ),
    )


# The member's pictures shown with a result: image prompts and references, not a mask or a
# control image (edits and ControlNets show those their own way).
SHOWN_ROLES = frozenset(
    {InputRole.IMAGE_PROMPT.value, InputRole.STYLE.value, InputRole.OBJECT.value}
)
THUMBNAIL_HEIGHT = 128
_THUMBNAIL_GAP = 8


def pictures_thumbnail(data_dir: Path, request_data: Mapping[str, Any]) -> bytes | None:
    """The job's pictures side by side, each `THUMBNAIL_HEIGHT` high, as a PNG for its reply
    (every picture a member gave is shown with the result, in the order of the caption's
    list); None when it has none, or once retention has deleted them. Blocking: call in a
    thread."""
    images = []
    for described in request_data.get("inputs", ()):
        if described.get("role") not in SHOWN_ROLES or not described.get("path"):
            continue
        try:
            with Image.open(safe_path(data_dir, str(described["path"]))) as opened:
                picture = opened.convert("RGB")
        except (FileNotFoundError, ValueError):
            return None
        # Scaled as each is read, so only the small copies are held.
        width = max(1, round(picture.width * THUMBNAIL_HEIGHT / picture.height))
        images.append(picture.resize((width, THUMBNAIL_HEIGHT), Image.Resampling.LANCZOS))
    if not images:
        return None
    return row_png(images, _THUMBNAIL_GAP)


def row_png(images: Sequence[Image.Image], gap: int) -> bytes:
    """`images` (RGB, all one height) side by side on white, `gap` pixels apart, as PNG bytes.
    Blocking: call in a thread."""
    height = images[0].height
    total = sum(image.width for image in images) + gap * (len(images) - 1)
    row = Image.new("RGB", (total, height), (255, 255, 255))
    left = 0
    for image in images:
        row.paste(image, (left, 0))
        left += image.width + gap
    buffer = io.BytesIO()
    row.save(buffer, format="PNG")
    return buffer.getvalue()


def attachment_sources(attachments: Sequence[Picture]) -> list[str]:
    """Each attachment's source, `attachment:<filename>`, made distinct ("a.png (2)") for two of
    one name, as the prompt's image options refer to them."""
    seen: set[str] = set()
    sources = []
    for attachment in attachments:
        if isinstance(attachment, FetchedImage):
            base = attachment.source
        else:
            base = f"{ATTACHMENT_PREFIX}{_filename(attachment)}"
        source, copy = base, 2
        while source in seen:
            source, copy = f"{base} ({copy})", copy + 1
        seen.add(source)
        sources.append(source)
    return sources


def _filename(attachment: Any) -> str:
    return str(getattr(attachment, "filename", "") or "file")


async def _in_order(fetches: Sequence[Callable[[], Awaitable[FetchedImage]]]) -> list[FetchedImage]:
    """Run the fetches together (the limits decide how many at once) and return them in order;
    at the first refusal in that order the rest are called off and it is raised."""
    tasks = [asyncio.ensure_future(fetch()) for fetch in fetches]
    try:
        return [await task for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        # Reaped, so that none is left running or reports an exception nobody retrieved.
        await asyncio.gather(*tasks, return_exceptions=True)


def as_input(picture: FetchedImage, role: InputRole, weight: float) -> InputImage:
    return InputImage(
        role=role,
        image=picture.image,
        weight=weight,
        source=picture.source,
        sha256=picture.sha256,
    )


def shown_source(source: str, limit: int = 60) -> str:
    """A picture's source for a message: the attachment's name, or the link cut short."""
    text = source.removeprefix("attachment:")
    return text if len(text) <= limit else text[:limit] + "…"
