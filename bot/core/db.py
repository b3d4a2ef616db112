"""The one SQLite connection of the bot: WAL mode, schema migrations, serialised transactions.

aiosqlite runs every statement on one thread per connection, so statements never overlap, but
coroutines could still interleave *between* statements. All access therefore goes through
`Database.transaction` / `Database.read`, which hold an asyncio lock for the whole unit of work,
and write transactions run as a shielded task so a caller being cancelled can never leave a
transaction half applied.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

log = logging.getLogger(__name__)

T = TypeVar("T")

# Positional (`?`) or named (`:name`) statement parameters.
Params = Sequence[Any] | Mapping[str, Any]


# Migration n brings a database from version n-1 to n. Never edit a released step: append one.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL,
            guild_id INTEGER,
            channel_id INTEGER,
            kind TEXT NOT NULL,
            parent_job_id INTEGER REFERENCES jobs(id),
            parent_index INTEGER,
            request TEXT NOT NULL,
            init_image_path TEXT,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            cost INTEGER NOT NULL CHECK (cost >= 0),
            hold_allowance INTEGER NOT NULL CHECK (hold_allowance >= 0),
            hold_granted INTEGER NOT NULL CHECK (hold_granted >= 0),
            hold_day TEXT NOT NULL,
            tier INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT,
            result TEXT
        )
        """,
        "CREATE INDEX jobs_state ON jobs(state, id)",
        "CREATE INDEX jobs_user_state ON jobs(user_id, state)",
        """
        CREATE TABLE ledger (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL,
            amount INTEGER NOT NULL,
            allowance_delta INTEGER NOT NULL,
            granted_delta INTEGER NOT NULL,
            kind TEXT NOT NULL,
            job_id INTEGER REFERENCES jobs(id),
            reason TEXT NOT NULL DEFAULT '',
            actor_id INTEGER,
            created_at TEXT NOT NULL,
            CHECK (amount = allowance_delta + granted_delta)
        )
        """,
        "CREATE INDEX ledger_user ON ledger(user_id, id)",
        "CREATE INDEX ledger_job ON ledger(job_id)",
        # The ledger is the record of truth: rows are only ever appended.
        """
        CREATE TRIGGER ledger_no_update BEFORE UPDATE ON ledger
        BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END
        """,
        """
        CREATE TRIGGER ledger_no_delete BEFORE DELETE ON ledger
        BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END
        """,
        """
        CREATE TABLE balances (
            user_id INTEGER PRIMARY KEY,
            granted INTEGER NOT NULL DEFAULT 0 CHECK (granted >= 0),
            allowance_left INTEGER NOT NULL DEFAULT 0 CHECK (allowance_left >= 0),
            allowance_level INTEGER NOT NULL DEFAULT 0,
            allowance_day TEXT NOT NULL DEFAULT '',
            allowance_override INTEGER,
            banned INTEGER NOT NULL DEFAULT 0,
            -- Written by the hold statement itself, so the split of a hold needs no second read.
            last_hold_allowance INTEGER NOT NULL DEFAULT 0
        )
        """,
        """
        CREATE TABLE role_allowances (
            role_id INTEGER PRIMARY KEY,
            amount INTEGER NOT NULL CHECK (amount >= 0),
            actor_id INTEGER,
            updated_at TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            user_id INTEGER,
            actor_id INTEGER,
            job_id INTEGER,
            guild_id INTEGER,
            channel_id INTEGER,
            reason TEXT NOT NULL DEFAULT '',
            prompt TEXT,
            created_at TEXT NOT NULL
        )
        """,
        "CREATE INDEX audit_time ON audit(id DESC)",
        """
        CREATE TABLE deliveries (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            key TEXT NOT NULL,
            state TEXT NOT NULL,
            info TEXT NOT NULL DEFAULT '{}',
            updated_at TEXT NOT NULL,
            PRIMARY KEY (job_id, key)
        )
        """,
        "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    # Today's allowance is derived from what was used (left = max(0, level - used)), so a level
    # that goes down and up again cannot hand out the same credits twice.
    2: (
        "ALTER TABLE balances ADD COLUMN allowance_used INTEGER NOT NULL DEFAULT 0 "
        "CHECK (allowance_used >= 0)",
        "UPDATE balances SET allowance_used = max(0, allowance_level - allowance_left)",
    ),
    # Retention: image files of old finished jobs are deleted; the row remembers when.
    3: (
        "ALTER TABLE jobs ADD COLUMN images_expired_at TEXT",
        "CREATE INDEX jobs_finished ON jobs(finished_at) WHERE images_expired_at IS NULL",
    ),
    # Per-member settings (/settings, /prefer): defaults for new prompts, previews, remix.
    4: (
        """
        CREATE TABLE member_settings (
            user_id INTEGER PRIMARY KEY,
            aspect TEXT,
            model TEXT,
            sampler TEXT,
            steps INTEGER CHECK (steps IS NULL OR steps >= 1),
            previews INTEGER NOT NULL DEFAULT 1,
            remix INTEGER NOT NULL DEFAULT 0,
            suffix TEXT NOT NULL DEFAULT '',
            updated_at TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE member_options (
            user_id INTEGER NOT NULL,
            name TEXT NOT NULL,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (user_id, name)
        )
        """,
    ),
    # Retention of jobs and the audit log: an old job's content is erased (the row stays for
    # the ledger) and remembers when; old audit rows are deleted by age.
    5: (
        "ALTER TABLE jobs ADD COLUMN pruned_at TEXT",
        "CREATE INDEX jobs_unpruned ON jobs(finished_at) WHERE pruned_at IS NULL",
        "CREATE INDEX audit_created ON audit(created_at)",
    ),
    # A cancel is written to the job's row before it is acknowledged, so it outlives a crash or
    # a run's end that could not be written: the next start ends such a job cancelled.
    6: (
        "ALTER TABLE jobs ADD COLUMN cancel_requested_at TEXT",
        "ALTER TABLE jobs ADD COLUMN cancel_requested_by INTEGER",
    ),
    # 7: personalization (bot/core/taste.py). Every ranked candidate's CLIP image embedding,
    # compact (generation/taste.py: projected to at most 256 dimensions, int8 with a scale per
    # vector: 260 bytes a candidate, about 2.3 KB per 8-candidate job with the row overhead),
    # erased with its job by retention; members' preference pairs between two candidates; each
    # member's profile (share code, fitted weights, how many pairs they came from); and the
    # /settings switch that makes --p the default.
    7: (
        """
        CREATE TABLE candidate_embeddings (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            candidate INTEGER NOT NULL CHECK (candidate >= 0),
            space TEXT NOT NULL,
            vector BLOB NOT NULL,
            scale REAL NOT NULL,
            PRIMARY KEY (job_id, candidate)
        ) WITHOUT ROWID
        """,
        """
        CREATE TABLE taste_pairs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            user_id INTEGER NOT NULL,
            winner_job INTEGER NOT NULL,
            winner_candidate INTEGER NOT NULL,
            loser_job INTEGER NOT NULL,
            loser_candidate INTEGER NOT NULL,
            source TEXT NOT NULL CHECK (source IN ('implicit', 'explicit')),
            created_at TEXT NOT NULL,
            UNIQUE (user_id, winner_job, winner_candidate, loser_job, loser_candidate)
        )
        """,
        "CREATE INDEX taste_pairs_winner_job ON taste_pairs(winner_job)",
        "CREATE INDEX taste_pairs_loser_job ON taste_pairs(loser_job)",
        """
        CREATE TABLE taste_profiles (
            user_id INTEGER PRIMARY KEY,
            code TEXT NOT NULL UNIQUE,
            space TEXT,
            weights BLOB,
            pairs INTEGER NOT NULL DEFAULT 0 CHECK (pairs >= 0),
            last_pair_id INTEGER NOT NULL DEFAULT 0,
            updated_at TEXT NOT NULL
        )
        """,
        "ALTER TABLE member_settings ADD COLUMN personalize INTEGER NOT NULL DEFAULT 0",
    ),
    # Relax and Fast modes: each job's mode (its queue and what it was charged follow from it;
    # relax use per member and UTC day is counted from these rows by hold_day), the mode each
    # member chose (/fast, /relax, /turbo), and each server's relax switch (/admin relax).
    8: (
        "ALTER TABLE jobs ADD COLUMN mode TEXT NOT NULL DEFAULT 'fast' "
        "CHECK (mode IN ('turbo', 'fast', 'relax'))",
        "CREATE INDEX jobs_user_mode_day ON jobs(user_id, mode, hold_day)",
        """
        CREATE TABLE member_modes (
            user_id INTEGER PRIMARY KEY,
            mode TEXT NOT NULL CHECK (mode IN ('turbo', 'fast', 'relax')),
            updated_at TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE server_modes (
            guild_id INTEGER PRIMARY KEY,
            relax_enabled INTEGER NOT NULL CHECK (relax_enabled IN (0, 1)),
            actor_id INTEGER,
            updated_at TEXT NOT NULL
        )
        """,
    ),
    # 9: the web home (bot/web/). Prompt search: an FTS5 table of each job's prompt, its rowid
    # the job's id, kept in step by triggers (retention's erasure of a request removes it);
    # indexes for paging a member's jobs and a server's shared jobs by id (keyset paging);
    # one-time sign-in links (/web) and web sessions, stored as hashes of their secrets; and
    # Explore: each member's sharing switch, and a server's default for members who never chose.
    9: (
        "CREATE VIRTUAL TABLE job_search "
        "USING fts5(prompt, tokenize='unicode61 remove_diacritics 2')",
        """
        CREATE TRIGGER job_search_insert AFTER INSERT ON jobs
        WHEN json_valid(new.request) AND json_extract(new.request, '$.prompt') IS NOT NULL
        BEGIN
            INSERT INTO job_search (rowid, prompt)
            VALUES (new.id, json_extract(new.request, '$.prompt'));
        END
        """,
        """
        CREATE TRIGGER job_search_update AFTER UPDATE OF request ON jobs
        BEGIN
            DELETE FROM job_search WHERE rowid = old.id;
            INSERT INTO job_search (rowid, prompt)
            SELECT new.id, json_extract(new.request, '$.prompt')
            WHERE json_valid(new.request) AND json_extract(new.request, '$.prompt') IS NOT NULL;
        END
        """,
        """
        CREATE TRIGGER job_search_delete AFTER DELETE ON jobs
        BEGIN DELETE FROM job_search WHERE rowid = old.id; END
        """,
        """
        INSERT INTO job_search (rowid, prompt)
        SELECT id, json_extract(request, '$.prompt') FROM jobs
        WHERE json_valid(request) AND json_extract(request, '$.prompt') IS NOT NULL
        """,
        "CREATE INDEX jobs_user_id ON jobs(user_id, id)",
        "CREATE INDEX jobs_user_kind ON jobs(user_id, kind, id)",
        "CREATE INDEX jobs_user_guild ON jobs(user_id, guild_id)",
        "CREATE INDEX jobs_guild_shown ON jobs(guild_id, id) "
        "WHERE state = 'succeeded' AND images_expired_at IS NULL",
        """
        CREATE TABLE web_links (
            token_hash TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            guild_id INTEGER,
            admin_scope TEXT NOT NULL DEFAULT 'none',
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            used_at TEXT
        )
        """,
        "CREATE INDEX web_links_expiry ON web_links(expires_at)",
        """
        CREATE TABLE web_sessions (
            id_hash TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            guild_id INTEGER,
            admin_scope TEXT NOT NULL DEFAULT 'none',
            via TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            ended_at TEXT
        )
        """,
        "CREATE INDEX web_sessions_expiry ON web_sessions(expires_at)",
        "CREATE INDEX web_sessions_user ON web_sessions(user_id)",
        """
        CREATE TABLE explore_sharing (
            user_id INTEGER PRIMARY KEY,
            share INTEGER NOT NULL CHECK (share IN (0, 1)),
            updated_at TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE explore_defaults (
            guild_id INTEGER PRIMARY KEY,
            share INTEGER NOT NULL CHECK (share IN (0, 1)),
            actor_id INTEGER,
            updated_at TEXT NOT NULL
        )
        """,
    ),
}

SCHEMA_VERSION = max(_MIGRATIONS)


class Database:
    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Database:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly
        # what `transaction()` spans and never something the driver opened implicitly.
        conn = await aiosqlite.connect(path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        try:
            mode = await (await conn.execute("PRAGMA journal_mode=WAL")).fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise RuntimeError(f"database: could not switch {path} to WAL mode ({mode})")
            # NORMAL in WAL mode survives process crashes (SIGKILL); only power loss can drop
            # the very last commits, and it never corrupts.
            await conn.execute("PRAGMA synchronous=NORMAL")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute("PRAGMA busy_timeout=5000")
            db = cls(conn, path)
            await db._migrate()
        except BaseException:
            await conn.close()
            raise
        return db

    async def _migrate(self) -> None:
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            await self._conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            row = await (await self._conn.execute("SELECT version FROM schema_version")).fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"database: {self.path} has schema version {version}, newer than this "
                    f"bot's {SCHEMA_VERSION}; upgrade the bot"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                log.info("migrating database %s to schema version %d", self.path, step)
                for statement in _MIGRATIONS[step]:
                    await self._conn.execute(statement)
            if row is None:
                await self._conn.execute(
                    "INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,)
                )
            else:
                await self._conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            await self._conn.execute("COMMIT")
        except BaseException:
            await self._conn.execute("ROLLBACK")
            raise

    async def transaction(
        self,
        work: Callable[[Transaction], Awaitable[T]],
    ) -> T:
        """Run `work` inside BEGIN IMMEDIATE … COMMIT, rolled back if it raises.

        Callbacks registered with `Transaction.after_commit` run right after COMMIT, before any
        other coroutine can observe the database, which keeps in-memory state in step with it.
        """
        task = asyncio.ensure_future(self._transaction(work))
        # If our caller is cancelled, nobody awaits the task; still consume its outcome.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    async def _transaction(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        async with self._lock:
            txn = Transaction(self._conn)
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = await work(txn)
                await self._conn.execute("COMMIT")
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            for callback in txn.callbacks:
                try:
                    callback()
                except Exception:
                    log.exception("after-commit callback failed")
            return result

    async def read(self, sql: str, params: Params = ()) -> list[aiosqlite.Row]:
        async with self._lock:
            async with self._conn.execute(sql, params) as cursor:
                return list(await cursor.fetchall())

    async def read_one(self, sql: str, params: Params = ()) -> aiosqlite.Row | None:
        rows = await self.read(sql, params)
        return rows[0] if rows else None

    async def get_setting(self, key: str) -> str | None:
        row = await self.read_one("SELECT value FROM settings WHERE key = ?", (key,))
        return None if row is None else str(row[0])

    async def close(self) -> None:
        async with self._lock:
            await self._conn.close()


class Transaction:
    """The handle a unit of work gets; statements run on the shared connection."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self.callbacks: list[Callable[[], None]] = []

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run a statement and return how many rows it changed."""
        cursor = await self._conn.execute(sql, params)
        try:
            return cursor.rowcount
        finally:
            await cursor.close()

    async def insert(self, sql: str, params: Params = ()) -> int:
        cursor = await self._conn.execute(sql, params)
        try:
            if cursor.lastrowid is None:
                raise RuntimeError("insert produced no row id")
            return cursor.lastrowid
        finally:
            await cursor.close()

    async def fetchall(self, sql: str, params: Params = ()) -> list[aiosqlite.Row]:
        async with self._conn.execute(sql, params) as cursor:
            return list(await cursor.fetchall())

    async def fetchone(self, sql: str, params: Params = ()) -> aiosqlite.Row | None:
        async with self._conn.execute(sql, params) as cursor:
            return await cursor.fetchone()

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(sql, rows)

    async def set_setting(self, key: str, value: str) -> None:
        await self.execute(
            "INSERT INTO settings (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def after_commit(self, callback: Callable[[], None]) -> None:
        self.callbacks.append(callback)
