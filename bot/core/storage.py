"""The data folder: one bot process at a time, and what members leave kept only as long as
configured.

`DataFolderLock` is an exclusive `flock` on `<data_dir>/bot.lock`, held for the core's whole
life: two processes writing one SQLite file and one image folder would each trust a queue and a
running table that the other changes. The kernel drops the lock when the process dies, so a
crash never leaves a stale lock behind.

Retention (`[storage]`), run at start and every `prune_interval_s`:
- `prune_images` deletes the image files of jobs that finished more than `image_retention_days`
  ago and marks the jobs `images_expired_at`; the job rows, their results and the ledger stay.
  Files still referred to by a queued or running job (the parent image of a U/V press, or a
  shared source image) are kept until that job is done.
- `prune_jobs` erases what a member wrote and got from jobs that finished more than
  `job_retention_days` ago (prompt and request, result, error) and deletes their delivery
  records (message ids). The row itself stays, as does the append-only ledger: every ledger row
  of a job names it, and the ledger check reads its owner, state, cost and holds. A job's images
  go first (at the shorter of the two ages).
- `prune_audit` deletes audit rows older than `audit_retention_days`, except the ban rows of a
  member who is still banned (why they are).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO

from bot.config import StorageConfig
from bot.core.clock import Clock, to_db
from bot.core.db import Database, Transaction
from bot.core.execute import input_paths, safe_path
from bot.core.jobs import INPUTS_DIR, output_dir_for
from bot.core.taste import forget_jobs
from bot.core.web_store import WebStore

log = logging.getLogger(__name__)

LOCK_FILE = "bot.lock"
# Jobs expired per transaction: keeps each pass short however large the backlog.
PRUNE_BATCH = 200


class DataFolderInUse(RuntimeError):
    """Another bot process holds the data folder."""


class DataFolderLock:
    def __init__(self, handle: IO[str], path: Path) -> None:
        self._handle: IO[str] | None = handle
        self.path = path

    @classmethod
    def acquire(cls, data_dir: Path) -> DataFolderLock:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_FILE
        handle = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DataFolderInUse(
                f"the data folder {data_dir} is in use by another imagine-bot process "
                f"(pid {holder}); stop it first, or give this one its own data_dir"
            ) from None
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return cls(handle, path)

    def release(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


async def prune_images(
    db: Database, data_dir: Path, clock: Clock, retention_days: int
) -> list[int]:
    """Delete the images of jobs that finished over `retention_days` ago; returns their ids."""
    if retention_days <= 0:
        return []
    cutoff = to_db(clock() - timedelta(days=retention_days))
    expired_at = to_db(clock())
    pruned: list[int] = []
    while True:

        async def work(txn: Transaction) -> list[tuple[int, list[str]]]:
            rows = await txn.fetchall(
                "SELECT j.id, j.init_image_path, j.request FROM jobs j "
                "WHERE j.images_expired_at IS NULL AND j.finished_at < ? "
                "AND j.state NOT IN ('queued', 'running') "
                "AND NOT EXISTS (SELECT 1 FROM jobs a WHERE a.state IN ('queued', 'running') "
                "  AND (a.init_image_path LIKE 'images/' || j.id || '/%' "
                "       OR a.init_image_path = j.init_image_path)) "
                "ORDER BY j.id LIMIT ?",
                (cutoff, PRUNE_BATCH),
            )
            batch = []
            for row in rows:
                job_id = int(row["id"])
                await txn.execute(
                    "UPDATE jobs SET images_expired_at = ? WHERE id = ?", (expired_at, job_id)
                )
                # The member's own pictures belong to this job alone.
                paths = [output_dir_for(job_id), *input_paths(json.loads(row["request"]))]
                source = row["init_image_path"]
                # A stored upload goes with the last job that refers to it.
                if source is not None and str(source).startswith(f"{INPUTS_DIR}/"):
                    shared = await txn.fetchone(
                        "SELECT 1 FROM jobs WHERE init_image_path = ? AND id != ? "
                        "AND images_expired_at IS NULL",
                        (source, job_id),
                    )
                    if shared is None:
                        paths.append(str(source))
                batch.append((job_id, paths))
            return batch

        batch = await db.transaction(work)
        if not batch:
            break
        await asyncio.to_thread(_delete, data_dir, [p for _, paths in batch for p in paths])
        pruned += [job_id for job_id, _ in batch]
    if pruned:
        log.info(
            "retention: deleted the images of %d jobs over %d days old", len(pruned), retention_days
        )
    return pruned


def _delete(data_dir: Path, relative_paths: list[str]) -> None:
    for relative in relative_paths:
        try:
            path = safe_path(data_dir, relative)
        except ValueError:
            log.warning("retention: refusing to delete %r outside the data folder", relative)
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


async def prune_jobs(db: Database, clock: Clock, retention_days: int) -> list[int]:
    """Erase the content of jobs that finished over `retention_days` ago and whose images are
    already gone, and delete their delivery records; returns their ids."""
    if retention_days <= 0:
        return []
    cutoff = to_db(clock() - timedelta(days=retention_days))
    pruned_at = to_db(clock())
    pruned: list[int] = []
    while True:

        async def work(txn: Transaction) -> list[int]:
            rows = await txn.fetchall(
                "SELECT id FROM jobs WHERE pruned_at IS NULL AND finished_at < ? "
                "AND images_expired_at IS NOT NULL AND state NOT IN ('queued', 'running') "
                "ORDER BY id LIMIT ?",
                (cutoff, PRUNE_BATCH),
            )
            for row in rows:
                await txn.execute(
                    "UPDATE jobs SET request = ?, result = NULL, error = NULL, pruned_at = ? "
                    "WHERE id = ?",
                    (json.dumps({"pruned": True}), pruned_at, row["id"]),
                )
                await txn.execute("DELETE FROM deliveries WHERE job_id = ?", (row["id"],))
            # Its candidates' embeddings and the preference pairs naming it go with it.
            await forget_jobs(txn, [int(row["id"]) for row in rows])
            return [int(row["id"]) for row in rows]

        batch = await db.transaction(work)
        if not batch:
            break
        pruned += batch
    if pruned:
        log.info("retention: erased %d jobs over %d days old", len(pruned), retention_days)
    return pruned


async def prune_audit(db: Database, clock: Clock, retention_days: int) -> int:
    """Delete audit rows over `retention_days` old (a still-banned member's ban rows stay);
    returns how many."""
    if retention_days <= 0:
        return 0
    cutoff = to_db(clock() - timedelta(days=retention_days))
    deleted = 0
    while True:

        async def work(txn: Transaction) -> int:
            return await txn.execute(
                "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE created_at < ? "
                "AND NOT (kind = 'ban' AND user_id IN (SELECT user_id FROM balances "
                "WHERE banned = 1)) ORDER BY id LIMIT ?)",
                (cutoff, PRUNE_BATCH),
            )

        count = await db.transaction(work)
        deleted += count
        if count < PRUNE_BATCH:
            break
    if deleted:
        log.info("retention: deleted %d audit rows over %d days old", deleted, retention_days)
    return deleted


@dataclass(frozen=True)
class Pruned:
    """What one retention pass removed: jobs whose images went, jobs erased, audit rows."""

    images: tuple[int, ...] = ()
    jobs: tuple[int, ...] = ()
    audit_rows: int = 0
    # The web home's expired sign-in links and sessions (a job's thumbnails go with its
    # images, its prompt's search entry with its request).
    web_rows: int = 0


class Retention:
    """Prunes images, jobs and audit rows now and then every `prune_interval_s` while the core
    is open."""

    def __init__(self, db: Database, data_dir: Path, clock: Clock, storage: StorageConfig) -> None:
        self._db = db
        self._data_dir = data_dir
        self._clock = clock
        self._storage = storage
        # A job's images go at the latest with the job: at the shorter of the two ages.
        ages = [d for d in (storage.image_retention_days, storage.job_retention_days) if d > 0]
        self._image_days = min(ages, default=0)
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._image_days > 0 or self._storage.audit_retention_days > 0

    async def start(self) -> None:
        """Prune once now (the core is not serving yet), then every `prune_interval_s`."""
        if not self.enabled:
            return
        await self._prune_logged()
        self._task = asyncio.create_task(self._run(), name="retention")

    async def prune(self) -> Pruned:
        images = await prune_images(self._db, self._data_dir, self._clock, self._image_days)
        jobs = await prune_jobs(self._db, self._clock, self._storage.job_retention_days)
        audit = await prune_audit(self._db, self._clock, self._storage.audit_retention_days)
        web_rows = await WebStore(self._db, self._clock).prune()
        return Pruned(tuple(images), tuple(jobs), audit, web_rows)

    async def _prune_logged(self) -> None:
        try:
            await self.prune()
        except Exception:
            log.exception("retention: pruning failed; trying again later")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._storage.prune_interval_s)
            await self._prune_logged()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
