"""Reading jobs back (for buttons, /jobs, delivery after a restart) and delivery bookkeeping.

Jobs are written only by the scheduler; this module reads them and records what the front end
delivered, so a result is never delivered twice even across restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite
from PIL import Image

from bot.core.clock import Clock, from_db, to_db
from bot.core.db import Database, Transaction
from bot.core.execute import input_paths, load_request_images
from bot.core.models import (
    Delivery,
    ImageExpired,
    Job,
    JobKind,
    JobResult,
    JobState,
    Mode,
    Owner,
)
from generation.contract import GenerationRequest

log = logging.getLogger(__name__)

INPUTS_DIR = "images/inputs"


def row_to_job(row: aiosqlite.Row | Mapping[str, Any]) -> Job:
    result = row["result"]
    return Job(
        id=int(row["id"]),
        owner=Owner(
            user_id=int(row["user_id"]), guild_id=row["guild_id"], channel_id=row["channel_id"]
        ),
        kind=JobKind(row["kind"]),
        request_data=json.loads(row["request"]),
        state=JobState(row["state"]),
        cost=int(row["cost"]),
        attempts=int(row["attempts"]),
        created_at=from_db(row["created_at"]),  # type: ignore[arg-type]
        parent_job_id=row["parent_job_id"],
        parent_index=row["parent_index"],
        init_image_path=row["init_image_path"],
        tier=int(row["tier"]),
        error=row["error"],
        started_at=from_db(row["started_at"]),
        finished_at=from_db(row["finished_at"]),
        result=JobResult.from_json(json.loads(result)) if result else None,
        images_expired_at=from_db(row["images_expired_at"]),
        pruned_at=from_db(row["pruned_at"]),
        mode=Mode(row["mode"]),
    )


def output_dir_for(job_id: int) -> str:
    return f"images/{job_id}"


def save_input_image(image: Image.Image, data_dir: Path) -> str:
    """Store a variation/upscale source image under a generated name; returns its relative path."""
    relative = f"{INPUTS_DIR}/{uuid.uuid4().hex}.png"
    path = data_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return relative


@dataclass(frozen=True)
class StoredInputs:
    """A request as the jobs table stores it: its JSON, where each of the member's pictures
    (`inputs`) carries the `path` of its file, and the file of its source image, if any."""

    init_path: str | None
    request_data: dict[str, Any]

    def paths(self) -> list[str]:
        own = [] if self.init_path is None else [self.init_path]
        return own + input_paths(self.request_data)


def remove_stale_temporaries(data_dir: Path) -> int:
    """Temporary files are only ever left by a crash mid-write; they are never results."""
    removed = 0
    images = data_dir / "images"
    if images.is_dir():
        for path in images.rglob(".tmp-*"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


class JobStore:
    def __init__(self, db: Database, data_dir: Path, clock: Clock) -> None:
        self._db = db
        self.data_dir = data_dir
        self._clock = clock

    async def get(self, job_id: int) -> Job | None:
        if not isinstance(job_id, int) or isinstance(job_id, bool):
            raise ValueError(f"job_id: must be an integer, got {job_id!r}")
        row = await self._db.read_one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return row_to_job(row) if row else None

    async def require(self, job_id: int) -> Job:
        job = await self.get(job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        return job

    async def for_user(
        self, user_id: int, states: Sequence[JobState] | None = None, limit: int = 20
    ) -> list[Job]:
        """The user's jobs, newest first, optionally only in the given states."""
        if states:
            marks = ", ".join("?" for _ in states)
            rows = await self._db.read(
                f"SELECT * FROM jobs WHERE user_id = ? AND state IN ({marks}) "
                "ORDER BY id DESC LIMIT ?",
                (user_id, *(s.value for s in states), limit),
            )
        else:
            rows = await self._db.read(
                "SELECT * FROM jobs WHERE user_id = ? ORDER BY id DESC LIMIT ?", (user_id, limit)
            )
        return [row_to_job(r) for r in rows]

    async def request(self, job: Job | int) -> GenerationRequest:
        """The job's generation request, with its source image loaded when it has one; a
        reroll is `request.with_changes(seed=...)` of this."""
        if isinstance(job, int):
            job = await self.require(job)
        path = job.init_image_path
        data = dict(job.request_data)
        if path is None and not input_paths(data):
            return GenerationRequest.from_json(data)
        if job.images_expired:
            raise ImageExpired(job.id)
        return await asyncio.to_thread(self._load_with_images, job.id, data, path)

    def _load_with_images(
        self, job_id: int, data: dict[str, Any], init_path: str | None
    ) -> GenerationRequest:
        try:
            return load_request_images(self.data_dir, data, init_path)
        except FileNotFoundError:
            # A source image shared with an older job whose images have expired.
            raise ImageExpired(job_id) from None

    async def image(self, job_id: int, index: int) -> Image.Image:
        """Kept image `index` (0-based, best first) of a succeeded job, loaded off the loop."""
        job = await self.require(job_id)
        path = job.image_path(self.data_dir, index)

        def load() -> Image.Image:
            try:
                with Image.open(path) as image:
                    return image.convert("RGB")
            except FileNotFoundError:
                if job.state.terminal:  # deleted while the row was read
                    raise ImageExpired(job_id) from None
                raise

        return await asyncio.to_thread(load)

    # ----- deliveries ------------------------------------------------------------------------

    async def claim_delivery(self, job_id: int, key: str = "result") -> bool:
        """Atomically claim delivering `key` of a job; False if it was claimed before (by this
        process or one before a restart). Claim before sending, complete after."""
        now = to_db(self._clock())

        async def work(txn: Transaction) -> bool:
            changed = await txn.execute(
                "INSERT OR IGNORE INTO deliveries (job_id, key, state, info, updated_at) "
                "VALUES (?, ?, 'claimed', '{}', ?)",
                (job_id, key, now),
            )
            return changed == 1

        return await self._db.transaction(work)

    async def release_delivery(self, job_id: int, key: str = "result") -> None:
        """Give up a claim whose send failed, so a later attempt can claim it again. A record
        already marked done is left alone."""

        async def work(txn: Transaction) -> None:
            await txn.execute(
                "DELETE FROM deliveries WHERE job_id = ? AND key = ? AND state = 'claimed'",
                (job_id, key),
            )

        await self._db.transaction(work)

    async def complete_delivery(
        self, job_id: int, key: str = "result", info: Mapping[str, Any] | None = None
    ) -> None:
        """Mark `key` delivered, merging `info` (e.g. message and channel ids) into its record."""
        await self._upsert_delivery(job_id, key, "done", info or {})

    async def update_delivery(self, job_id: int, key: str, info: Mapping[str, Any]) -> None:
        """Merge `info` into a delivery record without changing its state (e.g. the id of the
        progress message being edited); creates a 'claimed' record if there is none."""
        await self._upsert_delivery(job_id, key, None, info)

    async def _upsert_delivery(
        self, job_id: int, key: str, state: str | None, info: Mapping[str, Any]
    ) -> None:
        now = to_db(self._clock())
        payload = json.dumps(dict(info))

        async def work(txn: Transaction) -> None:
            await txn.execute(
                "INSERT INTO deliveries (job_id, key, state, info, updated_at) "
                "VALUES (?, ?, COALESCE(?, 'claimed'), ?, ?) "
                "ON CONFLICT(job_id, key) DO UPDATE SET "
                "state = COALESCE(?, deliveries.state), "
                "info = json_patch(deliveries.info, excluded.info), "
                "updated_at = excluded.updated_at",
                (job_id, key, state, payload, now, state),
            )

        await self._db.transaction(work)

    async def deliveries(self, job_id: int) -> dict[str, Delivery]:
        rows = await self._db.read("SELECT * FROM deliveries WHERE job_id = ?", (job_id,))
        return {
            r["key"]: Delivery(
                job_id=int(r["job_id"]),
                key=r["key"],
                state=r["state"],
                info=json.loads(r["info"]),
                updated_at=from_db(r["updated_at"]),  # type: ignore[arg-type]
            )
            for r in rows
        }

    async def undelivered(self, key: str = "result", limit: int = 100) -> list[Job]:
        """Finished jobs whose `key` delivery was never completed nor given up as
        'undelivered', oldest first: what the front end should (re)deliver after a restart. A
        'claimed' record means a send may have been attempted; check `deliveries()` before
        sending again."""
        rows = await self._db.read(
            "SELECT j.* FROM jobs j WHERE j.state NOT IN ('queued', 'running') "
            # A pruned job's delivery records went with its content: it was delivered long ago.
            "AND j.pruned_at IS NULL AND NOT EXISTS "
            "(SELECT 1 FROM deliveries d WHERE d.job_id = j.id AND d.key = ? "
            "AND d.state IN ('done', 'undelivered')) "
            "ORDER BY j.id LIMIT ?",
            (key, limit),
        )
        return [row_to_job(r) for r in rows]
