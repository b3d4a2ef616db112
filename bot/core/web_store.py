"""What the web home keeps in SQLite: one-time sign-in links, web sessions (both by the hash
of their secret, never the secret), and Explore sharing (each member's switch, each server's
default). Policy (signing, lifetimes, who may) lives above, in bot/app and bot/web."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from bot.core.clock import Clock, from_db, to_db
from bot.core.db import Database, Transaction

log = logging.getLogger(__name__)

# Used and expired links are kept this long after they expire, so that a replay is told the
# link was used (not "unknown"); then retention deletes them.
LINK_KEPT_AFTER_EXPIRY = timedelta(days=1)


class LinkUse(StrEnum):
    OK = "ok"
    USED = "used"
    EXPIRED = "expired"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class LinkGrant:
    """Who a redeemed link signs in, and from where it was asked for."""

    user_id: int
    name: str
    guild_id: int | None
    admin_scope: str


@dataclass(frozen=True)
class WebSession:
    user_id: int
    name: str
    # The server a /web link was asked for in (None after an OAuth sign-in).
    guild_id: int | None
    # The member's admin rights there when the link was made ("none", "server", "owner").
    admin_scope: str
    via: str
    created_at: datetime
    expires_at: datetime


class WebStore:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    # ----- one-time links ------------------------------------------------------------------

    async def add_link(
        self,
        token_hash: str,
        user_id: int,
        name: str,
        guild_id: int | None,
        admin_scope: str,
        ttl_s: float,
    ) -> datetime:
        now = self._clock()
        expires = now + timedelta(seconds=ttl_s)

        async def work(txn: Transaction) -> None:
            await txn.execute(
                "INSERT INTO web_links (token_hash, user_id, name, guild_id, admin_scope, "
                "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    token_hash,
                    user_id,
                    name[:100],
                    guild_id,
                    admin_scope,
                    to_db(now),
                    to_db(expires),
                ),
            )

        await self._db.transaction(work)
        return expires

    async def use_link(self, token_hash: str) -> tuple[LinkUse, LinkGrant | None]:
        """Mark the link used, in one statement, so two redeems at once can't both win."""
        now = to_db(self._clock())

        async def work(txn: Transaction) -> tuple[LinkUse, LinkGrant | None]:
            changed = await txn.execute(
                "UPDATE web_links SET used_at = ? "
                "WHERE token_hash = ? AND used_at IS NULL AND expires_at > ?",
                (now, token_hash, now),
            )
            row = await txn.fetchone(
                "SELECT user_id, name, guild_id, admin_scope, used_at FROM web_links "
                "WHERE token_hash = ?",
                (token_hash,),
            )
            if row is None:
                return LinkUse.UNKNOWN, None
            if not changed:
                return (LinkUse.USED if row["used_at"] else LinkUse.EXPIRED), None
            grant = LinkGrant(
                int(row["user_id"]), str(row["name"]), row["guild_id"], str(row["admin_scope"])
            )
            return LinkUse.OK, grant

        return await self._db.transaction(work)

    # ----- sessions --------------------------------------------------------------------------

    async def add_session(
        self,
        id_hash: str,
        *,
        user_id: int,
        name: str,
        guild_id: int | None,
        admin_scope: str,
        via: str,
        ttl_s: float,
    ) -> WebSession:
        now = self._clock()
        session = WebSession(
            user_id, name[:100], guild_id, admin_scope, via, now, now + timedelta(seconds=ttl_s)
        )

        async def work(txn: Transaction) -> None:
            await txn.execute(
                "INSERT INTO web_sessions (id_hash, user_id, name, guild_id, admin_scope, via, "
                "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    id_hash,
                    user_id,
                    session.name,
                    guild_id,
                    admin_scope,
                    via,
                    to_db(now),
                    to_db(session.expires_at),
                ),
            )

        await self._db.transaction(work)
        return session

    async def session(self, id_hash: str) -> WebSession | None:
        row = await self._db.read_one(
            "SELECT * FROM web_sessions WHERE id_hash = ? AND ended_at IS NULL AND expires_at > ?",
            (id_hash, to_db(self._clock())),
        )
        if row is None:
            return None
        return WebSession(
            user_id=int(row["user_id"]),
            name=str(row["name"]),
            guild_id=row["guild_id"],
            admin_scope=str(row["admin_scope"]),
            via=str(row["via"]),
            created_at=from_db(row["created_at"]),  # type: ignore[arg-type]
            expires_at=from_db(row["expires_at"]),  # type: ignore[arg-type]
        )

    async def end_session(self, id_hash: str) -> None:
        async def work(txn: Transaction) -> None:
            await txn.execute(
                "UPDATE web_sessions SET ended_at = ? WHERE id_hash = ? AND ended_at IS NULL",
                (to_db(self._clock()), id_hash),
            )

        await self._db.transaction(work)

    # ----- Explore sharing -------------------------------------------------------------------

    async def share_choice(self, user_id: int) -> bool | None:
        """The member's own choice; None if they never made one (the server's default holds)."""
        row = await self._db.read_one(
            "SELECT share FROM explore_sharing WHERE user_id = ?", (user_id,)
        )
        return None if row is None else bool(row["share"])

    async def set_share(self, user_id: int, share: bool) -> None:
        async def work(txn: Transaction) -> None:
            await txn.execute(
                "INSERT INTO explore_sharing (user_id, share, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(user_id) DO UPDATE SET share = excluded.share, "
                "updated_at = excluded.updated_at",
                (user_id, int(share), to_db(self._clock())),
            )

        await self._db.transaction(work)

    async def guild_default(self, guild_id: int) -> bool:
        row = await self._db.read_one(
            "SELECT share FROM explore_defaults WHERE guild_id = ?", (guild_id,)
        )
        return False if row is None else bool(row["share"])

    async def set_guild_default(self, guild_id: int, share: bool, actor_id: int | None) -> None:
        async def work(txn: Transaction) -> None:
            await txn.execute(
                "INSERT INTO explore_defaults (guild_id, share, actor_id, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(guild_id) DO UPDATE SET "
                "share = excluded.share, actor_id = excluded.actor_id, "
                "updated_at = excluded.updated_at",
                (guild_id, int(share), actor_id, to_db(self._clock())),
            )

        await self._db.transaction(work)

    async def shares(self, user_id: int, guild_id: int | None) -> bool:
        """Whether the member's jobs in `guild_id` show on its Explore page."""
        choice = await self.share_choice(user_id)
        if choice is not None:
            return choice
        return guild_id is not None and await self.guild_default(guild_id)

    # ----- retention -------------------------------------------------------------------------

    async def prune(self) -> int:
        """Delete links a day past their expiry and sessions past theirs (or ended a day
        ago); returns how many rows went."""
        now = self._clock()
        kept_from = to_db(now - LINK_KEPT_AFTER_EXPIRY)

        async def work(txn: Transaction) -> int:
            links = await txn.execute("DELETE FROM web_links WHERE expires_at < ?", (kept_from,))
            sessions = await txn.execute(
                "DELETE FROM web_sessions WHERE expires_at < ? OR ended_at < ?",
                (to_db(now), kept_from),
            )
            return links + sessions

        removed = await self._db.transaction(work)
        if removed:
            log.info("retention: deleted %d expired web sign-in links and sessions", removed)
        return removed
