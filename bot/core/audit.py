"""The audit table: refusals, flagged images and admin actions, newest first for `/admin audit`.

Links are stored without their query string or fragment (`without_link_queries`): a Discord
attachment link is signed there (`?ex=…&is=…&hm=…`), and a signed link lets whoever reads it
fetch the picture until it expires; the path says which picture it was.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime

from bot.core.clock import Clock, from_db, to_db
from bot.core.db import Database, Transaction
from bot.core.models import AuditEntry

MAX_PROMPT_CHARS = 4000
_WORD = re.compile(r"\S+")
_CLOSERS = ",;)]}>\"'"


def without_link_queries(text: str) -> str:
    """`text` with the query string and fragment cut from every link in it: from "?" or "#"
    to the next whitespace, in every word with a scheme ("https://…") or a host and a path
    ("cdn.discordapp.com/…") before it. Linear in the text, whatever a member typed."""
    return _WORD.sub(_cut_tail, text)


def _cut_tail(match: re.Match[str]) -> str:
    word = match.group(0)
    cut = min((i for i in (word.find("?"), word.find("#")) if i >= 0), default=-1)
    if cut < 0:
        return word
    head = word[:cut]
    host, slash, _path = head.partition("/")
    if "://" not in head and not (slash and "." in host):
        return word
    # Punctuation closing the link ("…?a=1)" in markdown, "…?a=1," in a {…} list) stays.
    tail = word[cut:]
    return head + tail[len(tail.rstrip(_CLOSERS)) :]


class AuditLog:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    async def record(
        self,
        kind: str,
        reason: str,
        *,
        user_id: int | None = None,
        actor_id: int | None = None,
        job_id: int | None = None,
        guild_id: int | None = None,
        channel_id: int | None = None,
        prompt: str | None = None,
    ) -> None:
        """kind: e.g. "refusal", "flag", "ban", "unban", "pause", "resume"."""

        async def work(txn: Transaction) -> None:
            await self.record_in(
                txn,
                kind,
                reason,
                user_id=user_id,
                actor_id=actor_id,
                job_id=job_id,
                guild_id=guild_id,
                channel_id=channel_id,
                prompt=prompt,
            )

        await self._db.transaction(work)

    async def record_in(
        self,
        txn: Transaction,
        kind: str,
        reason: str,
        *,
        user_id: int | None = None,
        actor_id: int | None = None,
        job_id: int | None = None,
        guild_id: int | None = None,
        channel_id: int | None = None,
        prompt: str | None = None,
    ) -> None:
        await txn.execute(
            "INSERT INTO audit (kind, user_id, actor_id, job_id, guild_id, channel_id, reason, "
            "prompt, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                kind,
                user_id,
                actor_id,
                job_id,
                guild_id,
                channel_id,
                without_link_queries(reason),
                None if prompt is None else without_link_queries(prompt)[:MAX_PROMPT_CHARS],
                to_db(self._clock()),
            ),
        )

    async def recent(
        self, limit: int = 20, user_id: int | None = None, guild_id: int | None = None
    ) -> list[AuditEntry]:
        """The newest rows, of one member and/or of one server (a row of no server, such as a
        ban, belongs to none) when those are given."""
        return await self.page(limit, user_id=user_id, guild_id=guild_id)

    async def page(
        self,
        limit: int = 20,
        *,
        user_id: int | None = None,
        guild_id: int | None = None,
        kinds: Sequence[str] = (),
        since: datetime | None = None,
        until: datetime | None = None,
        before_id: int | None = None,
    ) -> list[AuditEntry]:
        """Newest first, filtered: one member, one server, some kinds, written in
        [since, until), and older than row `before_id` (keyset paging: the next page starts
        below the last row shown, so rows written meanwhile never shift it)."""
        if not isinstance(limit, int) or not 1 <= limit <= 1000:
            raise ValueError(f"limit: must be between 1 and 1000, got {limit!r}")
        if len(kinds) > 20:
            raise ValueError(f"kinds: at most 20, got {len(kinds)}")
        # NULL matches every row: "? IS NULL OR column = ?" keeps the statement constant but
        # for the kinds' placeholders (no kinds: the leading ? is true, `IN ()` never asked).
        kind_marks = ", ".join("?" for _ in kinds)
        rows = await self._db.read(
            "SELECT * FROM audit WHERE (? IS NULL OR user_id = ?) AND (? IS NULL OR guild_id = ?) "
            f"AND (? OR kind IN ({kind_marks})) AND (? IS NULL OR created_at >= ?) "
            "AND (? IS NULL OR created_at < ?) AND (? IS NULL OR id < ?) "
            "ORDER BY id DESC LIMIT ?",
            (
                user_id,
                user_id,
                guild_id,
                guild_id,
                not kinds,
                *kinds,
                to_db(since),
                to_db(since),
                to_db(until),
                to_db(until),
                before_id,
                before_id,
                limit,
            ),
        )
        return [
            AuditEntry(
                id=int(r["id"]),
                kind=r["kind"],
                user_id=r["user_id"],
                actor_id=r["actor_id"],
                job_id=r["job_id"],
                guild_id=r["guild_id"],
                channel_id=r["channel_id"],
                reason=r["reason"],
                prompt=r["prompt"],
                created_at=from_db(r["created_at"]),  # type: ignore[arg-type]
            )
            for r in rows
        ]
