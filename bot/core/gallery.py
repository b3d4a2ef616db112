"""Pages of jobs for the web home: a member's own jobs (My images) and a server's shared ones
(Explore), newest first, with prompt search (SQLite FTS5) and filters.

Pages are keyset-paged: the next page is "ids below the last one shown", which an index walks
from where the previous page stopped, so page 2,000 of 100,000 jobs costs what page 1 does
(OFFSET would read and drop every earlier row).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from bot.core.clock import from_db, to_db
from bot.core.db import Database
from bot.core.models import JobKind

# A search is at most this many words, each at most this long: FTS5 query cost grows with both.
MAX_SEARCH_TERMS = 8
MAX_TERM_LENGTH = 40
MAX_PAGE_SIZE = 200
# How far a job's width:height may be from the aspect asked for (sizes round to multiples of 8).
ASPECT_TOLERANCE = 0.04

_COLUMNS = (
    "j.id, j.user_id, j.guild_id, j.channel_id, j.kind, j.state, j.request, j.result, "
    "j.created_at, j.images_expired_at"
)
_ASPECT = re.compile(r"^(\d{1,3}):(\d{1,3})$")
_WORD = re.compile(r"\w+", re.UNICODE)


class FilterError(ValueError):
    """A filter the gallery can't apply; the message is written for the member."""


@dataclass(frozen=True)
class GalleryFilter:
    text: str = ""
    model: str = ""
    kind: str = ""
    aspect: str = ""
    since: date | None = None
    until: date | None = None

    def __post_init__(self) -> None:
        if self.kind and self.kind not in {k.value for k in JobKind}:
            raise FilterError(f"Unknown kind {self.kind!r}.")
        if self.aspect and aspect_bounds(self.aspect) is None:
            raise FilterError("Aspect must look like 16:9, or be square, landscape or portrait.")
        if len(self.model) > 100:
            raise FilterError("That model name is too long.")
        if self.since and self.until and self.since > self.until:
            raise FilterError("The 'from' date is after the 'to' date.")

    @property
    def active(self) -> bool:
        return any((self.text, self.model, self.kind, self.aspect, self.since, self.until))


@dataclass(frozen=True)
class GalleryItem:
    job_id: int
    user_id: int
    guild_id: int | None
    channel_id: int | None
    kind: str
    state: str
    prompt: str
    model: str
    width: int
    height: int
    created_at: datetime
    image_count: int
    images_expired: bool

    @property
    def has_images(self) -> bool:
        # A refused job may still name files the safety filter withheld: never shown.
        return self.state == "succeeded" and self.image_count > 0 and not self.images_expired


@dataclass(frozen=True)
class GalleryPage:
    items: tuple[GalleryItem, ...]
    # Pass as `before` for the next (older) page; None on the last page.
    next_before: int | None


def aspect_bounds(aspect: str) -> tuple[float, float] | None:
    """The width/height ratios an aspect filter accepts, or None if it isn't one."""
    named = {"square": (1.0, 1.0), "landscape": (1.0, 1e9), "portrait": (0.0, 1.0)}
    if aspect in named:
        low, high = named[aspect]
        if aspect == "square":
            return (1 - ASPECT_TOLERANCE, 1 + ASPECT_TOLERANCE)
        return (low + ASPECT_TOLERANCE, high) if aspect == "landscape" else (low, high - 0.01)
    match = _ASPECT.match(aspect)
    if match is None or int(match[1]) == 0 or int(match[2]) == 0:
        return None
    ratio = int(match[1]) / int(match[2])
    return ratio * (1 - ASPECT_TOLERANCE), ratio * (1 + ASPECT_TOLERANCE)


def fts_query(text: str) -> str:
    """The member's words as an FTS5 query: each word a quoted string (so nothing they type is
    FTS5 syntax), all of them required, the last also as a prefix (search as you type)."""
    words = [w[:MAX_TERM_LENGTH] for w in _WORD.findall(text)][:MAX_SEARCH_TERMS]
    if not words:
        return ""
    quoted = [f'"{w}"' for w in words]
    quoted[-1] += "*"
    return " AND ".join(quoted)


def _where(flt: GalleryFilter, before: int | None) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if before is not None:
        clauses.append("j.id < ?")
        params.append(before)
    if flt.kind:
        clauses.append("j.kind = ?")
        params.append(flt.kind)
    if flt.model:
        clauses.append("json_extract(j.request, '$.model') = ?")
        params.append(flt.model)
    if flt.aspect:
        bounds = aspect_bounds(flt.aspect)
        assert bounds is not None
        clauses.append(
            "json_extract(j.request, '$.width') * 1.0 / json_extract(j.request, '$.height') "
            "BETWEEN ? AND ?"
        )
        params.extend(bounds)
    if flt.since:
        clauses.append("j.created_at >= ?")
        params.append(to_db(datetime.combine(flt.since, time(), tzinfo=UTC)))
    # The calendar's last day has no next day to stop before: no upper bound then.
    if flt.until and flt.until < date.max:
        clauses.append("j.created_at < ?")
        params.append(to_db(datetime.combine(flt.until + timedelta(days=1), time(), UTC)))
    query = fts_query(flt.text)
    if flt.text and not query:
        clauses.append("0")
    elif query:
        clauses.append("j.id IN (SELECT rowid FROM job_search WHERE job_search MATCH ?)")
        params.append(query)
    return clauses, params


def _item(row: Any) -> GalleryItem:
    request = json.loads(row["request"]) if row["request"] else {}
    result = json.loads(row["result"]) if row["result"] else {}
    return GalleryItem(
        job_id=int(row["id"]),
        user_id=int(row["user_id"]),
        guild_id=row["guild_id"],
        channel_id=row["channel_id"],
        kind=str(row["kind"]),
        state=str(row["state"]),
        prompt=str(request.get("prompt", "")),
        model=str(request.get("model", "")),
        width=int(request.get("width", 0) or 0),
        height=int(request.get("height", 0) or 0),
        created_at=from_db(row["created_at"]),  # type: ignore[arg-type]
        image_count=len(result.get("image_paths", ())),
        images_expired=row["images_expired_at"] is not None,
    )


class Gallery:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def _page(
        self, base: list[str], params: list[Any], flt: GalleryFilter, before: int | None, size: int
    ) -> GalleryPage:
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise ValueError(f"size: must be 1..{MAX_PAGE_SIZE}")
        clauses, extra = _where(flt, before)
        sql = (
            f"SELECT {_COLUMNS} FROM jobs j {base[0]} WHERE "
            + " AND ".join([*base[1:], *clauses])
            + " ORDER BY j.id DESC LIMIT ?"
        )
        rows = await self._db.read(sql, [*params, *extra, size + 1])
        items = tuple(_item(r) for r in rows[:size])
        more = len(rows) > size
        return GalleryPage(items, items[-1].job_id if more and items else None)

    async def member_page(
        self, user_id: int, flt: GalleryFilter, before: int | None = None, size: int = 48
    ) -> GalleryPage:
        """The member's own jobs, every kind and state, newest first."""
        return await self._page(["", "j.user_id = ?"], [user_id], flt, before, size)

    async def explore_page(
        self, guild_id: int, flt: GalleryFilter, before: int | None = None, size: int = 48
    ) -> GalleryPage:
        """The server's finished jobs with images whose owners share them: their own switch,
        or the server's default for those who never chose."""
        default = await self._db.read_one(
            "SELECT share FROM explore_defaults WHERE guild_id = ?", (guild_id,)
        )
        shared_by_default = 0 if default is None else int(default["share"])
        return await self._page(
            [
                "LEFT JOIN explore_sharing s ON s.user_id = j.user_id",
                "j.guild_id = ?",
                "j.state = 'succeeded'",
                "j.images_expired_at IS NULL",
                "coalesce(s.share, ?) = 1",
            ],
            [guild_id, shared_by_default],
            flt,
            before,
            size,
        )

    async def member_guilds(self, user_id: int, guild_ids: Sequence[int]) -> list[int]:
        """Which of `guild_ids` the member has made a job in."""
        found = []
        for guild_id in guild_ids:
            row = await self._db.read_one(
                "SELECT 1 FROM jobs WHERE user_id = ? AND guild_id = ? LIMIT 1",
                (user_id, guild_id),
            )
            if row is not None:
                found.append(guild_id)
        return found

    async def models(self, user_id: int) -> list[str]:
        """The models of the member's latest jobs, for the filter's choices."""
        rows = await self._db.read(
            "SELECT DISTINCT json_extract(request, '$.model') AS model FROM "
            "(SELECT request FROM jobs WHERE user_id = ? ORDER BY id DESC LIMIT 500) "
            "WHERE model IS NOT NULL ORDER BY model",
            (user_id,),
        )
        return [str(r["model"]) for r in rows]
