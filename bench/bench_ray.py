"""Ray backend benchmarks (figures only, no assertions), on a local Ray cluster started here
(`ray.cluster_utils.Cluster`: a head node and one node whose "GPUs" are custom resources).

    python bench/bench_ray.py                    # all four
    python bench/bench_ray.py overhead --jobs 300
    python bench/bench_ray.py throughput failover
    python bench/bench_ray.py bridge --actors 1,8,50

The engine is the tests' fake engine with 0 s steps (one 64x64 image a job): what is measured
is the worker machinery, not generation.

1. overhead: per-job time of `Worker.run` (send the job, run it, get the PNG back, write it)
   on a local ProcessWorker and on a Ray actor, one job at a time; and their ratio.
2. throughput: jobs/s through the whole scheduler (hold -> dispatch -> run -> settle) with 1, 2
   and 4 actors, for no-op jobs and for jobs that take 200 ms in the actor.
3. failover: an actor is killed (`ray.kill`) while its job runs; the time until the job is
   running again on another actor (dispatched, and its first progress step).
4. bridge: the traffic between the bot and its bridge process while N simulated GPUs (actors of
   the fake engine, 20 steps of 50 ms a job) run jobs back to back: bridge calls/s, messages/s
   from the bridge, the bot's and the bridge's CPU per job, and the bridge's peak thread count.
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

import psutil
import ray
from ray.cluster_utils import Cluster

from bench._common import percentile, small_request
from bot.config import Config, CreditsConfig, SchedulerConfig, WorkersConfig
from bot.core import Core, Finished, JobEvent, Owner, ProcessWorker, ProgressUpdate, Started
from bot.core.execute import WorkItem
from bot.core.ray_bridge import RayBridge
from bot.core.ray_workers import NAMESPACE, RayPool, RayWorker
from bot.core.workers import Worker
from generation.contract import GenerationRequest
from generation.settings import EngineSettings
from tests.core.conftest import ready_workers
from tests.core.ray_temp import private_ray_temp

NOOP = "tests.core.fakes:create_fake_engine"
ACTOR_COUNTS = (1, 2, 4)
# The bridge bench's simulated GPUs: resource simN has N units on the node.
SIMULATED = (1, 8, 50)


@contextmanager
def local_cluster() -> Iterator[Cluster]:
    # One node offers g1=1, g2=2 and g4=4: a pool asking for resource gN gets N actors.
    with private_ray_temp() as temp_dir:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "include_dashboard": False, "temp_dir": str(temp_dir)},
        )
        try:
            resources = {f"g{n}": n for n in ACTOR_COUNTS}
            resources.update({f"sim{n}": n for n in SIMULATED})
            cluster.add_node(num_cpus=1, resources=resources)
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


class _BridgeTraffic:
    """Counts what crosses the bot's end of every bridge: calls sent (`call`, and `stream` where
    the bridge has it) and messages received, wrapped around the class so any version of the
    bridge is measured the same way."""

    def __init__(self) -> None:
        self.calls = 0
        self.messages = 0
        self._saved: dict[str, object] = {}

    def __enter__(self) -> _BridgeTraffic:
        for name in ("call", "stream"):
            original = getattr(RayBridge, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def counted(bridge: RayBridge, *args: object, _original=original, **kw: object):
                self.calls += 1
                return _original(bridge, *args, **kw)

            setattr(RayBridge, name, counted)
        settle = RayBridge._settle
        self._saved["_settle"] = settle

        def settled(bridge: RayBridge, message: tuple[object, ...]) -> None:
            self.messages += 1
            settle(bridge, message)

        RayBridge._settle = settled  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(RayBridge, name, original)


async def bridge_load(cluster: Cluster, actors: int, jobs_per_actor: int) -> str:
    steps, step_s = 20, 0.05
    jobs = actors * jobs_per_actor
    with tempfile.TemporaryDirectory() as tmp:
        config = bench_config(Path(tmp), cluster, f"sim{actors}", step_s)
        config = dataclasses.replace(
            config,
            scheduler=dataclasses.replace(config.scheduler, max_running_per_user=actors),
        )
        core = await Core.open(config, engine_factory=NOOP)
        try:
            await ready_workers(core, actors, 900)
            assert core.ray_pool is not None and core.ray_pool.bridge_pid is not None
            bridge = psutil.Process(core.ray_pool.bridge_pid)
            done = asyncio.Event()
            left = {"n": jobs}

            def on_event(event: JobEvent) -> None:
                if isinstance(event, Finished):
                    left["n"] -= 1
                    if left["n"] == 0:
                        done.set()

            core.scheduler.add_listener(on_event)
            threads = [bridge.num_threads()]

            async def sample_threads() -> None:
                while True:
                    await asyncio.sleep(0.2)
                    threads.append(bridge.num_threads())

            sampler = asyncio.create_task(sample_threads())
            with _BridgeTraffic() as traffic:
                bridge_cpu = sum(bridge.cpu_times()[:2])
                bot_cpu = time.process_time()
                started = time.perf_counter()
                for index in range(jobs):
                    owner = Owner(user_id=1000 + index % actors)
                    await core.scheduler.submit(owner, noop_request(index, steps))
                await asyncio.wait_for(done.wait(), 900)
                elapsed = time.perf_counter() - started
                bot_cpu = time.process_time() - bot_cpu
                bridge_cpu = sum(bridge.cpu_times()[:2]) - bridge_cpu
            sampler.cancel()
            return (
                f"{actors:>2} actor(s), {jobs} jobs in {elapsed:.1f} s: "
                f"{traffic.calls / elapsed:.0f} bridge calls/s ({traffic.calls / jobs:.1f} a job), "
                f"{traffic.messages / elapsed:.0f} messages/s from the bridge · "
                f"CPU a job: bot {bot_cpu / jobs * 1000:.1f} ms, "
                f"bridge {bridge_cpu / jobs * 1000:.1f} ms · "
                f"bridge threads peak {max(threads)}"
            )
        finally:
            await core.close(5.0)


async def bridge(cluster: Cluster, counts: list[int], jobs_per_actor: int) -> None:
    print(
        f"\n== bot <-> bridge traffic, jobs of 20 steps x 50 ms back to back, "
        f"{jobs_per_actor} jobs an actor =="
    )
    for actors in counts:
        print(await bridge_load(cluster, actors, jobs_per_actor), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = ("overhead", "throughput", "failover", "bridge")
    parser.add_argument("benches", nargs="*", help=f"any of {', '.join(names)} (default: all)")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument(
        "--actors", default="1,8,50", help="bridge: simulated GPU counts (each of 1, 8, 50)"
    )
    parser.add_argument("--jobs-per-actor", type=int, default=4)
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
        if "bridge" in args.benches:
            counts = [int(n) for n in args.actors.split(",")]
            if unknown_counts := set(counts) - set(SIMULATED):
                parser.error(f"--actors: {sorted(unknown_counts)} not among {SIMULATED}")
            await bridge(cluster, counts, args.jobs_per_actor)


if __name__ == "__main__":
    asyncio.run(main())
