"""What decides a job's mode and whether relax is open: each member's chosen mode (/fast,
/relax, /turbo), each server's relax switch (/admin relax), and a member's relax use today.

Relax use is counted from the jobs table itself (`mode`, `hold_day`: the UTC day the job was
queued), so the daily cap needs no counter that could drift from what really ran. Jobs that
failed or were withheld by the image check don't count: neither was the member's doing. A
cancelled job does count (it took its place in the queue, and maybe a GPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bot.config import ModesConfig
from bot.core.clock import Clock, to_db, utc_day
from bot.core.credits import check_user_id
from bot.core.db import Database, Transaction
from bot.core.models import JobState, Mode

log = logging.getLogger(__name__)

# States of relax jobs that count against the daily cap.
COUNTED_STATES = (
    JobState.QUEUED.value,
    JobState.RUNNING.value,
    JobState.SUCCEEDED.value,
    JobState.CANCELLED.value,
)


def relax_off_text(guild_id: int | None) -> str:
    """The refusal where relax is off: a server's switch, or (in a DM) the bot's default."""
    where = "in this server" if guild_id is not None else "here"
    return f"Relax mode is switched off {where}; use /fast (or --fast) to run it with credits."


@dataclass(frozen=True)
class RelaxUse:
    """A member's relax use: `today` jobs of at most `per_day`, `queued` waiting of at most
    `max_queued`; `open_here` whether relax is on where they asked."""

    today: int
    per_day: int
    queued: int
    max_queued: int
    open_here: bool


class ModeStore:
    def __init__(self, db: Database, config: ModesConfig, clock: Clock) -> None:
        self._db = db
        self.config = config
        self._clock = clock

    # ----- a member's mode --------------------------------------------------------------------

    async def member_mode(self, user_id: int) -> Mode:
        """The mode a member chose; fast until they choose."""
        row = await self._db.read_one("SELECT mode FROM member_modes WHERE user_id = ?", (user_id,))
        return Mode(row["mode"]) if row is not None else Mode.FAST

    async def set_member_mode(self, user_id: int, mode: Mode) -> None:
        check_user_id(user_id)
        mode = Mode(mode)
        now = to_db(self._clock())

        async def work(txn: Transaction) -> None:
            await txn.execute(
                "INSERT INTO member_modes (user_id, mode, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(user_id) DO UPDATE SET mode = excluded.mode, "
                "updated_at = excluded.updated_at",
                (user_id, mode.value, now),
            )

        await self._db.transaction(work)

    # ----- a server's switch ------------------------------------------------------------------

    async def relax_enabled(self, guild_id: int | None) -> bool:
        row = None
        if guild_id is not None:
            row = await self._db.read_one(
                "SELECT relax_enabled FROM server_modes WHERE guild_id = ?", (guild_id,)
            )
        return self.config.relax_enabled if row is None else bool(row[0])

    async def relax_enabled_in(self, txn: Transaction, guild_id: int | None) -> bool:
        row = None
        if guild_id is not None:
            row = await txn.fetchone(
                "SELECT relax_enabled FROM server_modes WHERE guild_id = ?", (guild_id,)
            )
        return self.config.relax_enabled if row is None else bool(row[0])

    async def set_relax_enabled(self, guild_id: int, enabled: bool, actor_id: int | None) -> None:
        """A server's relax switch. Relax jobs already queued there still run: they were
        accepted, and their owners were told they would."""
        check_user_id(guild_id, "guild_id")
        now = to_db(self._clock())

        async def work(txn: Transaction) -> None:
            await txn.execute(
                "INSERT INTO server_modes (guild_id, relax_enabled, actor_id, updated_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(guild_id) DO UPDATE SET "
                "relax_enabled = excluded.relax_enabled, actor_id = excluded.actor_id, "
                "updated_at = excluded.updated_at",
                (guild_id, int(enabled), actor_id, now),
            )
            await txn.execute(
                "INSERT INTO audit (kind, actor_id, guild_id, reason, created_at) "
                "VALUES (?, ?, ?, '', ?)",
                ("relax_on" if enabled else "relax_off", actor_id, guild_id, now),
            )

        await self._db.transaction(work)

    # ----- relax use --------------------------------------------------------------------------

    async def relax_counts_in(
        self, txn: Transaction, user_id: int, day: str | None = None
    ) -> tuple[int, int]:
        """(relax jobs counted on `day`, relax jobs queued now) of a member, inside a
        transaction: the numbers the caps are checked against. `day` (default today): a
        submit passes the day it charges its jobs to (`hold_day`), read once, so a submit
        that crosses midnight counts against the day its jobs are counted in."""
        marks = ", ".join("?" for _ in COUNTED_STATES)
        row = await txn.fetchone(
            f"SELECT COALESCE(SUM(hold_day = ? AND state IN ({marks})), 0), "
            "COALESCE(SUM(state = 'queued'), 0) FROM jobs WHERE user_id = ? AND mode = 'relax'",
            (day or utc_day(self._clock()), *COUNTED_STATES, user_id),
        )
        assert row is not None
        return int(row[0]), int(row[1])

    async def relax_use(self, user_id: int, guild_id: int | None) -> RelaxUse:
        today, queued = await self._db.transaction(lambda txn: self.relax_counts_in(txn, user_id))
        return RelaxUse(
            today=today,
            per_day=self.config.relax_max_per_day,
            queued=queued,
            max_queued=self.config.relax_max_queued_per_user,
            open_here=await self.relax_enabled(guild_id),
        )
