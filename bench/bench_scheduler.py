"""Scheduler benchmarks (figures only, no assertions).

    python bench/bench_scheduler.py                # all three
    python bench/bench_scheduler.py throughput lag fairness --jobs 2000
    python bench/bench_scheduler.py aging           # fair share when waits >> aging_s

1. throughput: jobs/s through submit -> hold -> dispatch -> settle on SQLite in WAL mode, with a
   no-op worker (the generator returns at once), plus submit latency and event-loop lag.
2. lag: event-loop lag (p50/p99/max) while real tiny-model jobs run in the ProcessWorker child.
3. fairness: 100 users with Zipf-skewed submission rates against a saturated worker, default
   per-user limits. Jain's index of service relative to the max-min fair share, for the fair
   scheduler and for a near-FIFO baseline (aging so strong it orders by arrival).
4. aging (on request): shares of ten heavy users and one light user when every wait is far
   longer than `aging_s`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import LagProbe, jain, small_request, spread
from bot.config import Config, CreditsConfig, SchedulerConfig
from bot.core import (
    Core,
    Finished,
    JobEvent,
    JobState,
    Owner,
    ProcessWorker,
    Refused,
    Started,
    WorkItem,
    WorkOutcome,
)
from generation.contract import GenerationRequest, JobKind
from generation.settings import EngineSettings


class NoopWorker:
    """A worker whose generator does nothing (optionally for a fixed time): measures the
    scheduler, the ledger and SQLite alone."""

    def __init__(self, capacity: int = 1, service_s: float = 0.0) -> None:
        self.name = "noop"
        self.capacity = capacity
        self._service_s = service_s

    async def start(self) -> None:
        pass

    async def run(self, item: WorkItem, on_progress: object, timeout_s: float) -> WorkOutcome:
        if self._service_s:
            await asyncio.sleep(self._service_s)
        return WorkOutcome(image_paths=(), grid_path=None, seeds=(), clip_scores=())

    async def cancel(self, job_id: int) -> None:
        pass

    async def close(self) -> None:
        pass


def max_min_fair(demands: list[float], capacity: float) -> list[float]:
    """Water-filling: every user gets min(demand, level) with the level that uses capacity."""
    shares = [0.0] * len(demands)
    remaining = sorted(range(len(demands)), key=lambda i: demands[i])
    left = capacity
    while remaining:
        level = left / len(remaining)
        index = remaining[0]
        if demands[index] <= level:
            shares[index] = demands[index]
            left -= demands[index]
            remaining.pop(0)
        else:
            for i in remaining:
                shares[i] = level
            break
    return shares


def bench_config(root: Path, scheduler: SchedulerConfig, credits: CreditsConfig) -> Config:
    return Config(
        data_dir=root / "data",
        engine=EngineSettings(cache_dir=root / "models"),
        scheduler=scheduler,
        credits=credits,
    )


async def bench_throughput(jobs: int, users: int, capacity: int) -> None:
    print(f"\n== throughput: {jobs} jobs from {users} users, no-op worker x{capacity} ==")
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(
            Path(tmp),
            SchedulerConfig(
                max_running_per_user=capacity, max_queued_per_user=jobs, max_queue=jobs
            ),
            CreditsConfig(daily_allowance=jobs),
        )
        core = await Core.open(config, workers=[NoopWorker(capacity)])
        done = asyncio.Event()
        finished = 0

        def on_event(event: JobEvent) -> None:
            nonlocal finished
            if isinstance(event, Finished):
                finished += 1
                if finished == jobs:
                    done.set()

        core.scheduler.add_listener(on_event)
        probe = LagProbe(interval_s=0.005)
        probe.start()
        submit_s: list[float] = []
        started = time.perf_counter()

        async def submit(index: int) -> None:
            t0 = time.perf_counter()
            await core.scheduler.submit(Owner(1 + index % users), small_request(index))
            submit_s.append(time.perf_counter() - t0)

        # Submitters arrive in waves of 50 concurrent calls, as a busy server would see them.
        for wave in range(0, jobs, 50):
            await asyncio.gather(*(submit(i) for i in range(wave, min(jobs, wave + 50))))
        submitted = time.perf_counter()
        await done.wait()
        elapsed = time.perf_counter() - started
        lag = spread(await probe.stop())
        report = await core.credits.check_consistency()
        await core.close()
    print(f"submit phase: {jobs / (submitted - started):.0f} submits/s")
    print(f"end to end:   {jobs / elapsed:.0f} jobs/s ({elapsed:.2f} s for {jobs} jobs)")
    print(f"submit latency (50 concurrent): {spread(submit_s)}")
    print(f"event-loop lag: {lag}")
    print(f"ledger: {report}")


async def bench_lag(jobs: int, cache_dir: Path | None) -> None:
    print(f"\n== event-loop lag while {jobs} real tiny-model jobs run in the worker process ==")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = bench_config(
            root, SchedulerConfig(max_queued_per_user=jobs), CreditsConfig(daily_allowance=1000)
        )
        engine = replace(config.engine, cache_dir=cache_dir or root / "models", device="cpu")
        config = replace(config, engine=engine)
        worker = ProcessWorker(config.engine, config.data_dir, startup_timeout_s=600)
        t0 = time.perf_counter()
        core = await Core.open(config, workers=[worker])
        await worker.start()
        print(f"worker process ready (models built and loaded) in {time.perf_counter() - t0:.1f} s")
        request = GenerationRequest(
            kind=JobKind.IMAGINE,
            prompt="a lighthouse at dusk",
            width=128,
            height=128,
            steps=20,
            num_candidates=8,
            num_kept=4,
            seed=1,
        )
        # One warm-up job so the figures are for steady-state work.
        warm = await core.scheduler.submit(Owner(1), request)
        await wait_finished(core, warm.id)
        probe = LagProbe(interval_s=0.005)
        probe.start()
        t1 = time.perf_counter()
        submitted = [
            await core.scheduler.submit(Owner(1), request.with_changes(seed=i)) for i in range(jobs)
        ]
        progress_events = 0

        def count(event: JobEvent) -> None:
            nonlocal progress_events
            progress_events += type(event).__name__ == "ProgressUpdate"

        core.scheduler.add_listener(count)
        states = [await wait_finished(core, job.id) for job in submitted]
        elapsed = time.perf_counter() - t1
        lag = spread(await probe.stop())
        await core.close()
    print(
        f"{jobs} jobs (128x128, 20 steps, 8 candidates, CPU) in {elapsed:.1f} s, "
        f"states {sorted({s.value for s in states})}, {progress_events} progress events"
    )
    print(f"event-loop lag: {lag}")


async def wait_finished(core: Core, job_id: int) -> JobState:
    async with core.scheduler.subscribe(job_id) as events:
        async for event in events:
            if isinstance(event, Finished):
                return event.job.state
    raise RuntimeError(f"job {job_id} ended without finishing")


async def bench_fairness(duration_s: float, service_s: float, seed: int) -> None:
    print(f"\n== fairness: 100 users, Zipf-skewed rates, {duration_s:g} s at 2x capacity ==")
    for label, aging_s in (("fair scheduler (aging_s=30)", 30.0), ("near-FIFO baseline", 1e-6)):
        served, demands, refused = await _fairness_run(duration_s, service_s, aging_s, seed)
        capacity = sum(served)
        shares = max_min_fair(demands, capacity)
        normalised = [s / f for s, f in zip(served, shares, strict=True) if f > 0]
        saturated = [s for s, d, f in zip(served, demands, shares, strict=True) if d > f * 1.05]
        print(f"{label}: {capacity} jobs served, {refused} submits refused")
        print(f"  Jain index of service / max-min fair share (100 users): {jain(normalised):.3f}")
        print(
            f"  Jain index of jobs served among the {len(saturated)} users asking for more "
            f"than their share: {jain([float(s) for s in saturated]):.3f}"
        )
        print(
            f"  heaviest user served {served[0]} (asked {demands[0]:.0f}); "
            f"lightest served {served[-1]} (asked {demands[-1]:.0f})"
        )


async def _fairness_run(
    duration_s: float, service_s: float, aging_s: float, seed: int
) -> tuple[list[int], list[float], int]:
    users = 100
    capacity_per_s = 1 / service_s
    weights = [1 / (rank + 1) for rank in range(users)]  # Zipf, s = 1
    rates = [2 * capacity_per_s * w / sum(weights) for w in weights]
    rng = random.Random(seed)
    arrivals: list[tuple[float, int]] = []
    for user, rate in enumerate(rates):
        t = rng.expovariate(rate)
        while t < duration_s:
            arrivals.append((t, user))
            t += rng.expovariate(rate)
    arrivals.sort()
    demands = [0.0] * users
    for _, user in arrivals:
        demands[user] += 1
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(
            Path(tmp),
            SchedulerConfig(aging_s=aging_s),  # default limits: 1 running, 3 queued, 100 total
            CreditsConfig(daily_allowance=100_000),
        )
        core = await Core.open(config, workers=[NoopWorker(1, service_s)])
        served = [0] * users
        window_open = True

        def on_event(event: JobEvent) -> None:
            if (
                window_open
                and isinstance(event, Finished)
                and event.job.state is JobState.SUCCEEDED
            ):
                served[event.job.owner.user_id - 1] += 1

        core.scheduler.add_listener(on_event)
        refused = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        pending = []
        for at, user in arrivals:
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(
                asyncio.ensure_future(core.scheduler.submit(Owner(user + 1), small_request()))
            )
        results = await asyncio.gather(*pending, return_exceptions=True)
        refused = sum(isinstance(r, Refused) for r in results)
        window_open = False
        await core.close(drain_timeout_s=0)
    # Demand the scheduler could act on = what was asked within the window.
    return served, demands, refused


async def bench_aging(dispatches: int, service_s: float, aging_s: float) -> None:
    """Ten heavy users keep three jobs queued (the per-user limit), one light user keeps one,
    each submitting again the moment a job of theirs starts; a job waits about 31 services,
    far longer than `aging_s`. Fair share gives each of the eleven 1/11 of the dispatches."""
    print(
        f"\n== aging: 10 heavy users (3 queued) + 1 light user (1 queued), {dispatches} "
        f"dispatches, waits ~{31 * service_s:g} s vs aging_s={aging_s:g} =="
    )
    depth = {user: 3 for user in range(1, 11)} | {99: 1}
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(
            Path(tmp),
            SchedulerConfig(aging_s=aging_s),  # default limits: 1 running, 3 queued
            CreditsConfig(daily_allowance=100_000),
        )
        core = await Core.open(config, workers=[NoopWorker(1, service_s)])
        served = dict.fromkeys(depth, 0)
        done = asyncio.Event()
        owners: dict[int, int] = {}
        resubmits: set[asyncio.Task[Any]] = set()

        async def submit(user: int) -> None:
            job = await core.scheduler.submit(Owner(user), small_request())
            owners[job.id] = user

        def on_event(event: JobEvent) -> None:
            if not isinstance(event, Started) or done.is_set():
                return
            user = owners.get(event.job_id)
            if user is None:
                return
            served[user] += 1
            if sum(served.values()) >= dispatches:
                done.set()
                return
            task = asyncio.ensure_future(submit(user))
            resubmits.add(task)
            task.add_done_callback(resubmits.discard)

        core.scheduler.add_listener(on_event)
        for user, jobs in depth.items():
            for _ in range(jobs):
                await submit(user)
        await done.wait()
        await core.close(drain_timeout_s=0)
    total = sum(served.values())
    heavy = [served[u] / total for u in range(1, 11)]
    print(f"  fair share: {1 / 11:.1%} each")
    print(f"  light user: {served[99] / total:.1%} of {total} dispatches")
    print(f"  heavy users: {min(heavy):.1%} .. {max(heavy):.1%}")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("which", nargs="*", default=["throughput", "lag", "fairness"])
    parser.add_argument("--jobs", type=int, default=2000, help="throughput: jobs to push")
    parser.add_argument("--users", type=int, default=100, help="throughput: distinct users")
    parser.add_argument("--capacity", type=int, default=1, help="throughput: worker slots")
    parser.add_argument("--lag-jobs", type=int, default=3, help="lag: real tiny-model jobs")
    parser.add_argument("--cache-dir", type=Path, help="lag: tiny model cache (default: temp)")
    parser.add_argument("--duration", type=float, default=10.0, help="fairness: seconds")
    parser.add_argument("--service-ms", type=float, default=5.0, help="fairness: ms per job")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dispatches", type=int, default=2000, help="aging: dispatches")
    parser.add_argument("--aging-s", type=float, default=0.01, help="aging: aging_s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if "throughput" in args.which:
        await bench_throughput(args.jobs, args.users, args.capacity)
    if "lag" in args.which:
        await bench_lag(args.lag_jobs, args.cache_dir)
    if "fairness" in args.which:
        await bench_fairness(args.duration, args.service_ms / 1000, args.seed)
    if "aging" in args.which:
        await bench_aging(args.dispatches, args.service_ms / 1000, args.aging_s)


if __name__ == "__main__":
    asyncio.run(main())
