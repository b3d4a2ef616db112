"""Relax scheduling under load (figures only, no assertions).

    python bench/bench_modes.py                       # defaults below
    python bench/bench_modes.py --fast-users 6 --relax-users 4 --on-s 4 --off-s 3

The real core (scheduler, ledger, SQLite in WAL mode) with no-op workers that take `--service-s`
per job, so the figures are the scheduler's, not a GPU's. Two phases:

1. fast load on: every fast member keeps `--depth` fast jobs queued (a new one as soon as one
   starts), which saturates the worker slots; every relax member keeps its allowed relax jobs
   queued (`relax_max_queued_per_user`) the whole time.
2. fast load off: the fast members stop submitting; the relax members go on.

Printed: relax jobs started while fast jobs were waiting (the rule says none), the wait of each
mode's jobs (queued to started) by the phase they were queued in, and how evenly the relax
members were served (Jain's index over their relax jobs started; 1.0 is perfectly even).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import jain, small_request, spread
from bot.config import Config, CreditsConfig, ModesConfig, SchedulerConfig
from bot.core import Core, JobEvent, Mode, Owner, Started, WorkItem, WorkOutcome
from generation.settings import EngineSettings


class TimedWorker:
    """A worker whose generator only takes `service_s`: the scheduler is what is measured."""

    def __init__(self, name: str, service_s: float) -> None:
        self.name = name
        self.capacity = 1
        self._service_s = service_s

    async def start(self) -> None:
        pass

    async def run(self, item: WorkItem, on_progress: object, timeout_s: float) -> WorkOutcome:
        await asyncio.sleep(self._service_s)
        return WorkOutcome(image_paths=(), grid_path=None, seeds=(), clip_scores=())

    async def cancel(self, job_id: int) -> None:
        pass

    async def close(self) -> None:
        pass


async def bench(args: argparse.Namespace) -> None:
    print(
        f"== relax under load: {args.workers} worker slots x {args.service_s * 1000:.0f} ms a job; "
        f"{args.fast_users} fast members keeping {args.depth} queued for {args.on_s:g} s, then "
        f"off for {args.off_s:g} s; {args.relax_users} relax members =="
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        modes = ModesConfig(relax_max_per_day=1_000_000)
        config = Config(
            data_dir=root / "data",
            engine=EngineSettings(cache_dir=root / "models"),
            scheduler=SchedulerConfig(
                max_queued_per_user=max(args.depth, modes.relax_max_queued_per_user),
                max_queue=10_000,
            ),
            credits=CreditsConfig(daily_allowance=1_000_000),
            modes=modes,
        )
        workers = [TimedWorker(f"w{i}", args.service_s) for i in range(args.workers)]
        core = await Core.open(config, workers=workers)
        scheduler = core.scheduler
        fast_on = True
        relax_on = True
        queued_at: dict[int, float] = {}
        queued_in: dict[int, str] = {}
        job_mode: dict[int, Mode] = {}
        job_owner: dict[int, int] = {}
        # (mode, phase) -> waits in seconds
        waits: dict[tuple[Mode, str], list[float]] = collections.defaultdict(list)
        relax_started_while_fast_waited = 0
        relax_served: collections.Counter[int] = collections.Counter()
        pending: set[asyncio.Task[None]] = set()

        async def submit(user: int, mode: Mode) -> None:
            job = await scheduler.submit(Owner(user, guild_id=1), small_request(user), mode=mode)
            queued_at[job.id] = time.perf_counter()
            queued_in[job.id] = "fast load on" if fast_on else "fast load off"
            job_mode[job.id] = mode
            job_owner[job.id] = user

        def later(user: int, mode: Mode) -> None:
            task = asyncio.ensure_future(submit(user, mode))
            pending.add(task)
            task.add_done_callback(pending.discard)

        def on_event(event: JobEvent) -> None:
            nonlocal relax_started_while_fast_waited
            if not isinstance(event, Started) or event.job_id not in job_mode:
                return
            mode = job_mode[event.job_id]
            waits[(mode, queued_in[event.job_id])].append(
                time.perf_counter() - queued_at[event.job_id]
            )
            user = job_owner[event.job_id]
            if mode is Mode.RELAX:
                relax_served[user] += 1
                if scheduler.waiting(Mode.FAST):
                    relax_started_while_fast_waited += 1
                if relax_on:
                    later(user, Mode.RELAX)
            elif fast_on:
                later(user, Mode.FAST)

        scheduler.add_listener(on_event)
        fast_users = [1000 + i for i in range(args.fast_users)]
        relax_users = [2000 + i for i in range(args.relax_users)]
        for user in fast_users:
            for _ in range(args.depth):
                await submit(user, Mode.FAST)
        for user in relax_users:
            for _ in range(modes.relax_max_queued_per_user):
                await submit(user, Mode.RELAX)
        await asyncio.sleep(args.on_s)
        served_on = dict(relax_served)
        fast_on = False
        await asyncio.sleep(args.off_s)
        relax_on = False
        await asyncio.gather(*pending, return_exceptions=True)
        report = await core.credits.check_consistency()
        await core.close(drain_timeout_s=5.0)

    print(f"relax jobs started while a fast job waited: {relax_started_while_fast_waited}")
    for phase in ("fast load on", "fast load off"):
        for mode in (Mode.FAST, Mode.RELAX):
            print(f"{mode.value:5} wait, queued {phase:13}: {spread(waits[(mode, phase)])}")
    on_counts = [served_on.get(user, 0) for user in relax_users]
    all_counts = [relax_served[user] for user in relax_users]
    print(f"relax jobs started per relax member, fast load on: {on_counts}")
    print(f"relax jobs started per relax member, in all: {all_counts}")
    print(f"Jain's index over relax members (all): {jain([float(c) for c in all_counts]):.3f}")
    print(f"ledger: {report}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--service-s", type=float, default=0.05)
    parser.add_argument("--fast-users", type=int, default=4)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--relax-users", type=int, default=3)
    parser.add_argument("--on-s", type=float, default=4.0)
    parser.add_argument("--off-s", type=float, default=3.0)
    asyncio.run(bench(parser.parse_args()))


if __name__ == "__main__":
    main()
