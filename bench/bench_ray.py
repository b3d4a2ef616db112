"""Ray backend benchmarks (figures only, no assertions), on a local Ray cluster started here
(`ray.cluster_utils.Cluster`: a head node and one node whose "GPUs" are custom resources).

    python bench/bench_ray.py                    # all three
    python bench/bench_ray.py overhead --jobs 300
    python bench/bench_ray.py throughput failover

The engine is the tests' fake engine with 0 s steps (one 64x64 image a job): what is measured
is the worker machinery, not generation.

1. overhead: per-job time of `Worker.run` (send the job, run it, get the PNG back, write it)
   on a local ProcessWorker and on a Ray actor, one job at a time; and their ratio.
2. throughput: jobs/s through the whole scheduler (hold -> dispatch -> run -> settle) with 1, 2
   and 4 actors, for no-op jobs and for jobs that take 200 ms in the actor.
3. failover: an actor is killed (`ray.kill`) while its job runs; the time until the job is
   running again on another actor (dispatched, and its first progress step).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
from ray.cluster_utils import Cluster

from bench._common import percentile, small_request
from bot.config import Config, CreditsConfig, SchedulerConfig, WorkersConfig
from bot.core import Core, Finished, JobEvent, Owner, ProcessWorker, ProgressUpdate, Started
from bot.core.execute import WorkItem
from bot.core.ray_workers import NAMESPACE, RayPool, RayWorker
from bot.core.workers import Worker
from generation.contract import GenerationRequest
from generation.settings import EngineSettings
from tests.core.conftest import ready_workers
from tests.core.ray_temp import private_ray_temp

NOOP = "tests.core.fakes:create_fake_engine"
ACTOR_COUNTS = (1, 2, 4)


@contextmanager
def local_cluster() -> Iterator[Cluster]:
    # One node offers g1=1, g2=2 and g4=4: a pool asking for resource gN gets N actors.
    with private_ray_temp() as temp_dir:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": str(temp_dir)},
        )
        try:
            cluster.add_node(num_cpus=1, resources={f"g{n}": n for n in ACTOR_COUNTS})
            cluster.wait_for_nodes()
            # This script's own driver, to kill actors from outside the bot.
            ray.init(address=cluster.address, log_to_driver=False)
            yield cluster
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()


def bench_config(root: Path, cluster: Cluster, resource: str, step_s: float = 0.0) -> Config:
    return Config(
        data_dir=root / "data",
        engine=EngineSettings(cache_dir=root / "models", extra={"fake_step_s": str(step_s)}),
        scheduler=SchedulerConfig(max_running_per_user=4, max_queued_per_user=1000, max_queue=5000),
        credits=CreditsConfig(daily_allowance=1_000_000, cost_imagine=0),
        workers=WorkersConfig(
            backend="ray",
            ray_address=cluster.address,
            ray_gpu_resource=resource,
            ray_watch_interval_s=0.2,
        ),
    )


def noop_request(seed: int, steps: int = 1) -> GenerationRequest:
    return dataclasses.replace(small_request(seed, candidates=1), steps=steps)


def items(count: int) -> Iterator[WorkItem]:
    for index in range(count):
        request = noop_request(index)
        yield WorkItem(index + 1, 1, request.to_json(), None, f"images/{index + 1}")


async def time_runs(worker: Worker, jobs: int) -> list[float]:
    await worker.run(next(items(1)), lambda step, total: None, 60.0)  # warm
    samples = []
    for item in items(jobs):
        started = time.perf_counter()
        await worker.run(item, lambda step, total: None, 60.0)
        samples.append(time.perf_counter() - started)
    return samples


def describe(samples: list[float]) -> str:
    return (
        f"p50 {percentile(samples, 50) * 1000:.2f} ms · p90 {percentile(samples, 90) * 1000:.2f} ms"
        f" · mean {statistics.fmean(samples) * 1000:.2f} ms (n={len(samples)})"
    )


async def overhead(cluster: Cluster, jobs: int) -> None:
    print(f"\n== per-job overhead of Worker.run, no-op engine, {jobs} jobs one at a time ==")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = bench_config(root, cluster, "g1")
        local = ProcessWorker(config.engine, root / "local", NOOP, startup_timeout_s=120)
        await local.start()
        try:
            local_s = await time_runs(local, jobs)
        finally:
            await local.close()

        pool = RayPool(config, NOOP)
        host = _Collect()
        await pool.start(host)
        (worker,) = host.workers
        await worker.start()
        try:
            ray_s = await time_runs(worker, jobs)
        finally:
            await pool.stop_watching()
            await worker.close()
            await pool.disconnect()
    print(f"local ProcessWorker: {describe(local_s)}")
    print(f"Ray actor:           {describe(ray_s)}")
    ratio = percentile(ray_s, 50) / percentile(local_s, 50)
    print(f"Ray / local (p50):   {ratio:.2f}x")


class _Collect:
    """A host that only keeps the workers the pool hands it (no scheduler)."""

    def __init__(self) -> None:
        self.workers: list[RayWorker] = []

    def add_worker(self, worker: Worker) -> None:
        assert isinstance(worker, RayWorker)
        self.workers.append(worker)

    async def remove_worker(self, worker: Worker) -> None:
        self.workers = [w for w in self.workers if w is not worker]


async def jobs_per_second(
    cluster: Cluster, actors: int, jobs: int, steps: int, step_s: float
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(Path(tmp), cluster, f"g{actors}", step_s)
        core = await Core.open(config, engine_factory=NOOP)
        try:
            await ready_workers(core, actors, 120)
            done = asyncio.Event()
            left = {"n": jobs}

            def on_event(event: JobEvent) -> None:
                if isinstance(event, Finished):
                    left["n"] -= 1
                    if left["n"] == 0:
                        done.set()

            core.scheduler.add_listener(on_event)
            started = time.perf_counter()
            for index in range(jobs):
                owner = Owner(user_id=1000 + index % 50)
                await core.scheduler.submit(owner, noop_request(index, steps))
            await asyncio.wait_for(done.wait(), 600)
            return jobs / (time.perf_counter() - started)
        finally:
            await core.close(5.0)


async def throughput(cluster: Cluster, jobs: int) -> None:
    print(f"\n== jobs/s through the scheduler, {jobs} jobs from 50 users ==")
    for label, steps, step_s in (("no-op jobs", 1, 0.0), ("200 ms jobs", 4, 0.05)):
        count = jobs if step_s == 0 else max(20, jobs // 10)
        figures = []
        for actors in ACTOR_COUNTS:
            rate = await jobs_per_second(cluster, actors, count, steps, step_s)
            figures.append(f"{actors} actor(s): {rate:.1f} jobs/s")
        print(f"{label} (n={count}): " + " · ".join(figures))


async def failover(cluster: Cluster, rounds: int) -> None:
    print(f"\n== an actor killed mid-job: until its job runs on another actor ({rounds} kills) ==")
    to_dispatch: list[float] = []
    to_progress: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(Path(tmp), cluster, "g2", step_s=0.02)
        core = await Core.open(config, engine_factory=NOOP)
        assert core.ray_pool is not None
        try:
            for index in range(rounds):
                await ready_workers(core, 2, 120)
                job = await core.scheduler.submit(Owner(user_id=1), noop_request(index, 150))
                killed_at = None
                redispatched = None
                async with core.scheduler.subscribe(job.id) as events:
                    async for event in events:
                        if isinstance(event, ProgressUpdate) and killed_at is None:
                            running = {s.name for s in core.scheduler.worker_states() if s.jobs}
                            (worker,) = [w for w in core.ray_pool.workers if w.name in running]
                            killed_at = time.perf_counter()
                            assert worker.actor_name is not None
                            ray.kill(ray.get_actor(worker.actor_name, namespace=NAMESPACE))
                        elif isinstance(event, Started) and killed_at is not None:
                            # The last start counts: the killed worker hands the job back
                            # while its actor is replaced, and another worker takes it.
                            redispatched = time.perf_counter()
                        elif isinstance(event, ProgressUpdate) and redispatched is not None:
                            assert killed_at is not None
                            to_dispatch.append(redispatched - killed_at)
                            to_progress.append(time.perf_counter() - killed_at)
                            await core.scheduler.cancel(job.id)
                            redispatched = None
                        elif isinstance(event, Finished):
                            break
        finally:
            await core.close(5.0)
    print(f"death -> dispatched on another actor: {describe(to_dispatch)}")
    print(f"death -> first step on another actor: {describe(to_progress)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = ("overhead", "throughput", "failover")
    parser.add_argument("benches", nargs="*", help=f"any of {', '.join(names)} (default: all)")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    if unknown := set(args.benches) - set(names):
        parser.error(f"benches: unknown {', '.join(sorted(unknown))}")
    args.benches = args.benches or list(names)
    logging.basicConfig(level=logging.WARNING)
    print(f"ray {ray.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPU(s)")
    with local_cluster() as cluster:
        if "overhead" in args.benches:
            await overhead(cluster, args.jobs)
        if "throughput" in args.benches:
            await throughput(cluster, args.jobs)
        if "failover" in args.benches:
            await failover(cluster, args.kills)


if __name__ == "__main__":
    asyncio.run(main())
