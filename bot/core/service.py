"""`Core`: the whole scheduler/credits core built from a `Config`, and the admin service API.

core = await Core.open(config)              # recovers jobs, starts workers and dispatch
job = await core.scheduler.submit(owner, request)
async with core.scheduler.subscribe(job.id) as events: ...
await core.close()                           # drained shutdown
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from bot.config import Config
from bot.core.audit import AuditLog
from bot.core.clock import Clock, system_clock
from bot.core.credits import CreditsService, check_reason, check_user_id
from bot.core.db import Database, Transaction
from bot.core.devices import visible_cuda_devices
from bot.core.execute import DEFAULT_ENGINE_FACTORY
from bot.core.jobs import JobStore, remove_stale_temporaries, row_to_job
from bot.core.models import AuditEntry, Balance, Job, JobState, LedgerEntry, QueueSnapshot
from bot.core.scheduler import OutputCheck, Scheduler, WorkerStatus
from bot.core.storage import DataFolderLock, Retention
from bot.core.workers import ProcessWorker, Worker

if TYPE_CHECKING:
    from bot.core.ray_workers import RayPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkersView:
    """What `/admin workers` shows: a line about the backend, and every worker."""

    backend: str
    workers: tuple[WorkerStatus, ...]


class AdminService:
    """What admins do from Discord, without Discord types. Permission checks are the caller's;
    every method validates its arguments and raises ValueError naming the bad one."""

    def __init__(
        self,
        db: Database,
        credits: CreditsService,
        scheduler: Scheduler,
        audit: AuditLog,
        ray_pool: RayPool | None = None,
    ) -> None:
        self._db = db
        self._credits = credits
        self._scheduler = scheduler
        self._audit = audit
        self._ray_pool = ray_pool

    def workers(self) -> WorkersView:
        """Each worker with its node, device, loaded models and current job."""
        backend = self._ray_pool.status if self._ray_pool else "local worker processes"
        return WorkersView(backend, tuple(self._scheduler.worker_states()))

    async def grant(
        self, user_id: int, amount: int, actor_id: int | None, reason: str = ""
    ) -> Balance:
        return await self._credits.grant(user_id, amount, actor_id, reason)

    async def set_balance(
        self, user_id: int, amount: int, actor_id: int | None, reason: str = ""
    ) -> Balance:
        return await self._credits.set_balance(user_id, amount, actor_id, reason)

    async def revoke(
        self, user_id: int, amount: int, actor_id: int | None, reason: str = ""
    ) -> Balance:
        return await self._credits.revoke(user_id, amount, actor_id, reason)

    async def balance(self, user_id: int, role_ids: Sequence[int] | None = None) -> Balance:
        return await self._credits.balance(user_id, role_ids)

    async def set_user_allowance(
        self,
        user_id: int,
        amount: int | None,
        actor_id: int | None = None,
        role_ids: Sequence[int] | None = None,
    ) -> Balance:
        return await self._credits.set_user_allowance(user_id, amount, actor_id, role_ids)

    async def set_role_allowance(
        self, role_id: int, amount: int | None, actor_id: int | None = None
    ) -> None:
        await self._credits.set_role_allowance(role_id, amount, actor_id)

    def role_allowances(self) -> dict[int, int]:
        return self._credits.role_levels()

    async def user_allowances(self, limit: int = 200) -> list[tuple[int, int]]:
        """Members given their own daily allowance: (user id, credits a day), by user id."""
        rows = await self._db.read(
            "SELECT user_id, allowance_override FROM balances "
            "WHERE allowance_override IS NOT NULL ORDER BY user_id LIMIT ?",
            (limit,),
        )
        return [(int(r[0]), int(r[1])) for r in rows]

    async def ban(self, user_id: int, actor_id: int | None, reason: str = "") -> int:
        """Ban a user: nothing more can be submitted, and their queued jobs are cancelled and
        refunded (a running job finishes). Returns how many queued jobs were cancelled."""
        check_user_id(user_id)
        check_reason(reason)
        await self._set_banned(user_id, True, actor_id, reason)
        return await self._scheduler.cancel_queued_for_user(
            user_id, actor_id, "cancelled: the user was banned"
        )

    async def unban(self, user_id: int, actor_id: int | None, reason: str = "") -> None:
        check_user_id(user_id)
        check_reason(reason)
        await self._set_banned(user_id, False, actor_id, reason)

    async def _set_banned(
        self, user_id: int, banned: bool, actor_id: int | None, reason: str
    ) -> None:
        async def work(txn: Transaction) -> None:
            await self._credits.set_banned(txn, user_id, banned)
            await self._audit.record_in(
                txn, "ban" if banned else "unban", reason, user_id=user_id, actor_id=actor_id
            )

        await self._db.transaction(work)

    async def ledger(
        self,
        user_id: int,
        limit: int = 20,
        guild_id: int | None = None,
        before_id: int | None = None,
    ) -> list[LedgerEntry]:
        """With `guild_id`: only that server's part of the member's ledger (a server admin's
        view, bot/app/access.py); with `before_id`, the rows older than that one."""
        return await self._credits.ledger(user_id, limit, guild_id, before_id)

    async def queue(self, guild_id: int | None = None) -> QueueSnapshot:
        """With `guild_id`: only that server's running and queued jobs (positions stay those
        in the whole queue)."""
        snapshot = await self._scheduler.snapshot()
        if guild_id is None:
            return snapshot
        return dataclasses.replace(
            snapshot,
            running=tuple(a for a in snapshot.running if a.job.owner.guild_id == guild_id),
            queued=tuple(a for a in snapshot.queued if a.job.owner.guild_id == guild_id),
        )

    async def pause(self, actor_id: int | None = None) -> None:
        await self._scheduler.set_paused(True, actor_id)

    async def resume(self, actor_id: int | None = None) -> None:
        await self._scheduler.set_paused(False, actor_id)

    async def audit(
        self, limit: int = 20, user_id: int | None = None, guild_id: int | None = None
    ) -> list[AuditEntry]:
        return await self._audit.recent(limit, user_id, guild_id)

    async def audit_page(
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
        return await self._audit.page(
            limit,
            user_id=user_id,
            guild_id=guild_id,
            kinds=kinds,
            since=since,
            until=until,
            before_id=before_id,
        )

    async def recent_failures(self, limit: int = 10, guild_id: int | None = None) -> list[Job]:
        """The newest failed jobs (of one server with `guild_id`), newest first."""
        rows = await self._db.read(
            "SELECT * FROM jobs WHERE state = ? AND (? IS NULL OR guild_id = ?) "
            "ORDER BY id DESC LIMIT ?",
            (JobState.FAILED.value, guild_id, guild_id, limit),
        )
        return [row_to_job(r) for r in rows]

    async def cancel(self, job_id: int, actor_id: int | None = None) -> bool:
        return await self._scheduler.cancel(job_id, actor_id)


def local_workers(
    config: Config,
    engine_factory: str = DEFAULT_ENGINE_FACTORY,
    devices: Sequence[str] | None = None,
) -> list[ProcessWorker]:
    """The worker processes `[scheduler] workers` asks for. "auto": one per visible CUDA
    device, each pinned to its device, or one on a CPU-only box (`devices`, when given, stands
    for what this box shows). A number: that many, each seeing what the bot sees."""
    startup_timeout_s = config.scheduler.worker_startup_timeout_s
    count = config.scheduler.workers
    if count == "auto":
        found = visible_cuda_devices() if devices is None else list(devices)
        if found:
            log.info("workers = auto: one worker for each of CUDA devices %s", ", ".join(found))
            return [
                ProcessWorker(
                    config.engine,
                    config.data_dir,
                    engine_factory,
                    name=f"cuda-{device}",
                    startup_timeout_s=startup_timeout_s,
                    environment={"CUDA_VISIBLE_DEVICES": device},
                )
                for device in found
            ]
        log.info("workers = auto: no CUDA device found; one worker")
        count = 1
    return [
        ProcessWorker(
            config.engine,
            config.data_dir,
            engine_factory,
            name=f"local-{index}",
            startup_timeout_s=startup_timeout_s,
        )
        for index in range(count)
    ]


@dataclass
class Core:
    config: Config
    db: Database
    credits: CreditsService
    jobs: JobStore
    audit: AuditLog
    scheduler: Scheduler
    admin: AdminService
    retention: Retention | None = None
    lock: DataFolderLock | None = None
    # The Ray cluster's workers ([workers] backend = "ray"); None for local workers.
    ray_pool: RayPool | None = None

    @classmethod
    async def open(
        cls,
        config: Config,
        *,
        workers: Sequence[Worker] | None = None,
        clock: Clock = system_clock,
        engine_factory: str = DEFAULT_ENGINE_FACTORY,
        output_check: OutputCheck | None = None,
        **scheduler_options: Any,
    ) -> Core:
        """Open the database (creating/migrating it), recover interrupted jobs, and start the
        workers and dispatching. By default one `ProcessWorker` per `scheduler.workers`, each
        building the engine from `config.engine` with `engine_factory`. Holds the data
        folder's lock until `close()`; raises DataFolderInUse if another process holds it."""
        data_dir = config.data_dir
        # Before anything is read or written: raises DataFolderInUse if another process has it.
        lock = DataFolderLock.acquire(data_dir)
        try:
            return await cls._open(
                config, lock, workers, clock, engine_factory, output_check, scheduler_options
            )
        except BaseException:
            lock.release()
            raise

    @classmethod
    async def _open(
        cls,
        config: Config,
        lock: DataFolderLock,
        workers: Sequence[Worker] | None,
        clock: Clock,
        engine_factory: str,
        output_check: OutputCheck | None,
        scheduler_options: dict[str, Any],
    ) -> Core:
        data_dir = config.data_dir
        removed = await asyncio.to_thread(remove_stale_temporaries, data_dir)
        if removed:
            log.info("removed %d temporary files left by an interrupted write", removed)
        db = await Database.open(config.database_path)
        try:
            credits = CreditsService(db, config.credits, clock)
            await credits.load()
            jobs = JobStore(db, data_dir, clock)
            audit = AuditLog(db, clock)
            pool = None
            if workers is None and config.workers.backend == "ray":
                # Imported here: the default install has no Ray (raises RayNotInstalled).
                from bot.core.ray_workers import RayPool

                pool = RayPool(config, engine_factory)
                workers = []
                scheduler_options["workers_join_later"] = True
            elif workers is None:
                workers = await asyncio.to_thread(local_workers, config, engine_factory)
            scheduler_options.setdefault("cancel_grace_s", config.scheduler.cancel_grace_s)
            scheduler_options.setdefault("modes", config.modes)
            scheduler = Scheduler(
                db,
                credits,
                jobs,
                config.scheduler,
                workers,
                clock,
                data_dir,
                output_check=output_check,
                **scheduler_options,
            )
            await scheduler.start()
            if pool is not None:
                try:
                    await pool.start(scheduler)
                except BaseException:
                    await scheduler.close(0.0)
                    await pool.disconnect()
                    raise
        except BaseException:
            await db.close()
            raise
        admin = AdminService(db, credits, scheduler, audit, pool)
        retention = Retention(db, data_dir, clock, config.storage)
        await retention.start()
        return cls(config, db, credits, jobs, audit, scheduler, admin, retention, lock, pool)

    async def close(self, drain_timeout_s: float | None = None) -> None:
        """Drained shutdown (call it on SIGTERM): running jobs get `drain_timeout_s` (default
        from config) to finish, then are handed back to the queue for the next start."""
        if drain_timeout_s is None:
            drain_timeout_s = self.config.scheduler.drain_timeout_s
        try:
            if self.retention is not None:
                await self.retention.close()
            if self.ray_pool is not None:
                await self.ray_pool.stop_watching()
            await self.scheduler.close(drain_timeout_s)
            if self.ray_pool is not None:
                await self.ray_pool.disconnect()
        finally:
            await self.db.close()
            if self.lock is not None:
                self.lock.release()

    async def __aenter__(self) -> Core:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
