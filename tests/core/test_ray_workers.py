"""The Ray backend on a real local Ray cluster (`ray.cluster_utils.Cluster`: a head node and a
node whose "GPUs" are a custom resource), with the real scheduler, SQLite and data folder.

One cluster serves the whole module (starting it takes a few seconds); each test opens its own
core, whose pool connects to the cluster's address and makes its own actors. A test that changes
the cluster's nodes puts them back as they were, so the tests run in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
from PIL import Image
from ray.cluster_utils import Cluster

from bot.app.health import core_checks
from bot.config import Config, WorkersConfig
from bot.core import Core, JobKind, JobState, Owner, ProgressUpdate, Started
from bot.core.execute import WorkItem
from bot.core.models import Finished, LedgerKind
from bot.core.ray_bridge import RayBridge
from bot.core.ray_workers import NAMESPACE, ActorSpec, RayWorker, actor_cpus, actor_options
from bot.core.workers import WorkerStartFailed
from generation.images import parse_a1111_parameters, read_parameters
from generation.requests import variation_request
from generation.taste import vector
from tests.core.conftest import (
    assert_consistent,
    finished,
    make_config,
    ready_workers,
    request,
)
from tests.core.ray_temp import private_ray_temp

FAKE_GPU = "fake_gpu"
# A second resource of the same node with a single unit: one worker, whose replacement can only
# be placed once the actor it replaces has let go of the unit.
SOLO_GPU = "solo_gpu"
GPU_NODE = {FAKE_GPU: 2, SOLO_GPU: 1}
RECORDING = "tests.core.fakes:create_engine_recording_its_jobs"
DEVICE_RECORDING = "tests.core.fakes:create_engine_recording_its_device"
# A node of its own for the token test, started with the token in its environment.
TOKEN_NODE = "token_node"
TOKEN = "MTIzNDU2Nzg5.worker-must-not-see.this-token"
ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
BOB = Owner(user_id=202, guild_id=1, channel_id=2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with private_ray_temp() as temp_dir:
        started = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "include_dashboard": False,
                "temp_dir": str(temp_dir),
                # An actor killed while it cannot answer (frozen, hung) is SIGKILLed this long
                # after its SIGTERM (Ray's default: 5 s), which its replacement waits for.
                "_system_config": {"kill_worker_timeout_milliseconds": 500},
            },
        )
        try:
            started.add_node(num_cpus=1, resources=GPU_NODE)
            started.wait_for_nodes()
            # The tests' own driver, to kill actors from outside the bot as Ray or an operator
            # would.
            ray.init(address=started.address, log_to_driver=False)
            yield started
        finally:
            if ray.is_initialized():
                ray.shutdown()
            started.shutdown()


def ray_config(
    tmp_path: Path, cluster: Cluster, resource: str = FAKE_GPU, **options: Any
) -> Config:
    config = make_config(tmp_path, **options)
    workers = WorkersConfig(
        backend="ray",
        ray_address=cluster.address,
        ray_gpu_resource=resource,
        ray_watch_interval_s=0.2,
    )
    return dataclasses.replace(config, workers=workers)


async def test_jobs_run_in_ray_actors_on_the_real_tiny_engine(
    tmp_path: Path, cluster: Cluster, tiny_models: Path
) -> None:
    config = ray_config(tmp_path, cluster)
    # The run's tiny models, built once: not once more in each actor.
    engine = dataclasses.replace(
        config.engine, cache_dir=tiny_models, device="cpu", extra={}, preview_interval_s=0.0
    )
    config = dataclasses.replace(config, engine=engine)
    core = await Core.open(config)
    try:
        await ready_workers(core, 2, timeout_s=180)
        view = core.admin.workers()
        assert view.backend.endswith(f"2 {FAKE_GPU} on 1 node(s)")
        assert sorted(w.device for w in view.workers) == [f"{FAKE_GPU} #0", f"{FAKE_GPU} #1"]
        assert all(w.node and w.name.startswith("ray-") for w in view.workers)

        job = await core.scheduler.submit(
            ALICE,
            request(
                "a lighthouse at dusk", steps=3, num_candidates=2, num_kept=2, seed=5, preview=True
            ),
        )
        previews: list[bytes | None] = []
        async with asyncio.timeout(120), core.scheduler.subscribe(job.id) as events:
            async for event in events:
                if isinstance(event, ProgressUpdate):
                    previews.append(event.preview_png)
                if isinstance(event, Finished):
                    done = event.job
                    break
        # Live previews come back from the actor with the steps: the candidates as they stand,
        # two 64x64 ones as two 8x8 latents, doubled, side by side.
        shown = [p for p in previews if p is not None]
        assert shown, previews
        with Image.open(io.BytesIO(shown[-1])) as preview:
            assert (preview.format, preview.size) == ("PNG", (32, 16))
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.result is not None and sorted(done.result.seeds) == [5, 6]
        # Every ranked candidate's compact CLIP embedding came back from the actor, stored.
        stored = await core.db.read(
            "SELECT candidate, space FROM candidate_embeddings WHERE job_id = ?", (job.id,)
        )
        assert sorted((r["candidate"], r["space"]) for r in stored) == [
            (0, "tiny:32"),
            (1, "tiny:32"),
        ]
        # As int8 with a positive scale, 32 bytes each, restoring the unit-length CLIP
        # embedding the engine ranked with (within the rounding of int8).
        vectors = await core.db.read(
            "SELECT vector, scale FROM candidate_embeddings WHERE job_id = ?", (job.id,)
        )
        for row in vectors:
            assert len(row["vector"]) == 32 and 0 < row["scale"] < 1
            restored = vector(bytes(row["vector"]), float(row["scale"]))
            assert abs(float(np.linalg.norm(restored)) - 1.0) < 0.02
        # Written by the bot into its own data folder, with the engine's PNG metadata.
        with Image.open(done.image_path(config.data_dir, 0)) as image:
            assert image.size == (64, 64)
            parameters = parse_a1111_parameters(read_parameters(image) or "")
        assert parameters["Prompt"] == "a lighthouse at dusk"
        assert parameters["Seed"] == str(done.result.seeds[0])
        assert (config.data_dir / f"images/{job.id}/grid.png").is_file()
        ran_on = [w for w in core.admin.workers().workers if w.models]
        assert [w.models for w in ran_on] == [("tiny",)]

        # A variation's source image travels to the actor with the job.
        source = await core.jobs.image(job.id, 0)
        variation = variation_request(
            await core.jobs.request(job.id), source, strength=0.7, seed=11
        )
        child = await core.scheduler.submit(ALICE, variation, JobKind.VARIATION, (job.id, 0))
        varied = await finished(core, child.id, timeout_s=120)
        assert varied.state is JobState.SUCCEEDED, varied.error
        assert varied.result is not None and len(varied.result.image_paths) == 2

        balance = await core.credits.balance(ALICE.user_id)
        assert balance.held == 0
        assert balance.available == 20 - done.cost - varied.cost
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=5.0)


async def test_a_killed_actor_costs_one_attempt_and_the_job_completes_on_another(
    tmp_path: Path, cluster: Cluster
) -> None:
    config = ray_config(tmp_path, cluster, step_s=0.05)
    core = await Core.open(config, engine_factory=RECORDING)
    finishes: list[Finished] = []
    core.scheduler.add_listener(lambda e: finishes.append(e) if isinstance(e, Finished) else None)
    try:
        await ready_workers(core, 2)
        assert core.ray_pool is not None
        job = await core.scheduler.submit(ALICE, request("a fox in the snow", steps=20))
        killed_pid = None
        async with core.scheduler.subscribe(job.id) as events:
            async for event in events:
                if isinstance(event, ProgressUpdate) and killed_pid is None:
                    (worker,) = [w for w in core.ray_pool.workers if job.id in _jobs_of(core, w)]
                    killed_pid = worker.pid
                    assert worker.actor_name is not None
                    ray.kill(ray.get_actor(worker.actor_name, namespace=NAMESPACE))
                if isinstance(event, Finished):
                    done = event.job
                    break
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.attempts == 2
        # The result came from one run only, in another process than the one killed.
        runs = (tmp_path / "markers" / "jobs").read_text().splitlines()
        assert [line.split(" ", 1)[1] for line in runs] == ["a fox in the snow"]
        assert killed_pid is not None and runs[0].split()[0] != str(killed_pid)
        assert [f.job.id for f in finishes] == [job.id]

        entries = await core.credits.ledger(ALICE.user_id, 20)
        kinds = sorted(e.kind for e in entries if e.job_id == job.id)
        assert kinds == sorted([LedgerKind.HOLD, LedgerKind.SETTLE])
        balance = await core.credits.balance(ALICE.user_id)
        assert balance.held == 0 and balance.available == 20 - done.cost
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=5.0)


def test_the_gpu_resource_asks_ray_for_a_whole_gpu_and_any_other_for_one_unit() -> None:
    gpu = actor_options("GPU", 2.0)
    assert gpu["num_gpus"] == 1 and "resources" not in gpu
    custom = actor_options(FAKE_GPU, 0.5)
    assert custom["resources"] == {FAKE_GPU: 1} and "num_gpus" not in custom
    assert (gpu["num_cpus"], custom["num_cpus"]) == (2.0, 0.5)


@pytest.mark.parametrize(
    ("wanted", "node_cpus", "units", "cpus"),
    [
        (4.0, 64.0, 8, 4.0),  # plenty: what is asked for
        (4.0, 8.0, 4, 2.0),  # a node's CPUs shared among its GPUs, so each GPU gets an actor
        (4.0, 1.0, 3, 0.3333),  # rounded down to Ray's precision
        (4.0, 0.0, 2, 0.0),  # a node that offers no CPU
        (0.0, 64.0, 8, 0.0),  # asked for none
    ],
)
def test_an_actor_asks_for_its_cpus_but_never_more_than_its_share_of_the_node(
    wanted: float, node_cpus: float, units: int, cpus: float
) -> None:
    assert actor_cpus(wanted, node_cpus, units) == cpus


async def test_with_ray_gpus_each_actor_is_pinned_to_its_own_gpu(
    tmp_path: Path, cluster: Cluster
) -> None:
    # A node that declares two GPUs: Ray hands each actor one and sets its CUDA_VISIBLE_DEVICES
    # (no CUDA is needed for that; the fake engine records what its process was given). Its
    # four CPUs are shared out too: asked for 4 each (the default), each actor gets 2, and Ray
    # sets its OMP_NUM_THREADS to 2 (an actor that takes no CPU gets 1).
    node = cluster.add_node(num_cpus=4, num_gpus=2)
    try:
        config = ray_config(tmp_path, cluster, resource="GPU")
        assert config.workers.ray_actor_cpus == 4.0  # the default
        core = await Core.open(config, engine_factory=DEVICE_RECORDING)
        try:
            await ready_workers(core, 2)
            view = core.admin.workers()
            assert view.backend.endswith("2 GPU on 1 node(s)")
            assert sorted(w.device for w in view.workers) == ["GPU 0", "GPU 1"]
            assert core.ray_pool is not None
            assert [(w.cpus, w.threads) for w in core.ray_pool.workers] == [(2.0, "2")] * 2
            job = await core.scheduler.submit(ALICE, request("a red fox"))
            assert (await finished(core, job.id, timeout_s=60)).state is JobState.SUCCEEDED
        finally:
            await core.close(drain_timeout_s=5.0)
        seen = sorted(p.read_text() for p in (tmp_path / "markers").glob("device-*"))
        assert seen == ["0", "1"]
    finally:
        cluster.remove_node(node)


def test_a_ray_actor_does_not_see_a_token_its_node_was_started_with(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner exported the token, then ran `ray start` in the same shell: the node (and,
    # unless told otherwise, every worker process it starts) has it.
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    node = cluster.add_node(num_cpus=1, resources={TOKEN_NODE: 1})
    monkeypatch.delenv("DISCORD_TOKEN")
    try:
        probe = ray.remote(EnvironmentProbe).options(**actor_options(TOKEN_NODE)).remote()
        value, started = ray.get(probe.seen.remote(), timeout=120)
        assert not value
        assert TOKEN not in started
        # Its node has it (what the actor's options keep out).
        raylet = node.all_processes["raylet"][0].process.pid
        assert TOKEN in Path(f"/proc/{raylet}/environ").read_bytes().decode(errors="replace")
    finally:
        cluster.remove_node(node)


class EnvironmentProbe:
    """An actor that reports DISCORD_TOKEN as it sees it, and the environment its process was
    started with (as the kernel keeps it)."""

    def seen(self) -> tuple[str | None, str]:
        started = Path(f"/proc/{os.getpid()}/environ")
        text = started.read_bytes().decode(errors="replace") if started.exists() else ""
        return os.environ.get("DISCORD_TOKEN"), text


def _jobs_of(core: Core, worker: RayWorker) -> tuple[int, ...]:
    for state in core.scheduler.worker_states():
        if state.name == worker.name:
            return state.jobs
    return ()


async def test_jobs_wait_while_no_gpu_node_is_up_and_run_when_one_joins(
    tmp_path: Path, cluster: Cluster
) -> None:
    config = ray_config(tmp_path, cluster)
    core = await Core.open(config, engine_factory=RECORDING)
    try:
        await ready_workers(core, 2)
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node)
        await ready_workers(core, 0)
        assert core.admin.workers().backend.endswith(f"0 {FAKE_GPU} on 0 node(s)")
        reason = await core_checks(core)["workers"]()
        assert reason is not None and reason.endswith(f"0 {FAKE_GPU} on 0 node(s)")

        jobs = [
            await core.scheduler.submit(ALICE, request("a red fox")),
            await core.scheduler.submit(BOB, request("a blue owl")),
        ]
        await asyncio.sleep(1.0)
        for job in jobs:
            assert (await core.jobs.require(job.id)).state is JobState.QUEUED
        assert not (tmp_path / "markers" / "jobs").exists()

        cluster.add_node(num_cpus=1, resources={FAKE_GPU: 1})
        for job in jobs:
            done = await finished(core, job.id, timeout_s=60)
            assert done.state is JobState.SUCCEEDED, done.error
            assert done.attempts == 1
        (worker,) = core.admin.workers().workers
        assert worker.device == f"{FAKE_GPU} #0"
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=5.0)
        # The module's other tests, in whatever order they run, find the cluster as it was.
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node)
        cluster.add_node(num_cpus=1, resources=GPU_NODE)
        cluster.wait_for_nodes()


async def test_an_actor_cut_off_mid_job_is_killed_before_its_replacement_takes_its_gpu(
    tmp_path: Path, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The actor is frozen mid-job (SIGSTOP): alive, holding its GPU, and not answering, as behind
    # a network partition. With short gRPC keepalives in the bridge, Ray reports it unavailable
    # (an actor error, not the job's). Its one-unit resource is free for a replacement only once
    # it is killed.
    monkeypatch.setenv("RAY_grpc_client_keepalive_time_ms", "1000")
    monkeypatch.setenv("RAY_grpc_client_keepalive_timeout_ms", "1000")
    config = ray_config(tmp_path, cluster, resource=SOLO_GPU, step_s=0.05)
    core = await Core.open(config, engine_factory=RECORDING)
    frozen: int | None = None
    try:
        await ready_workers(core, 1)
        assert core.ray_pool is not None
        (worker,) = core.ray_pool.workers
        first_actor = worker.actor_name
        job = await core.scheduler.submit(ALICE, request("a fox in the snow", steps=40))
        starts = 0
        async with asyncio.timeout(90):
            async with core.scheduler.subscribe(job.id) as events:
                async for event in events:
                    if isinstance(event, Started):
                        starts += 1
                    if isinstance(event, ProgressUpdate) and frozen is None:
                        frozen = worker.pid
                        assert frozen is not None
                        os.kill(frozen, signal.SIGSTOP)
                    if isinstance(event, Finished):
                        done = event.job
                        break
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.attempts == 2
        # Out of the ready set before the job was re-queued: it waited for the replacement
        # instead of being handed to the worker while its actor was being replaced.
        assert starts == 2
        runs = (tmp_path / "markers" / "jobs").read_text().splitlines()
        assert [line.split(" ", 1)[1] for line in runs] == ["a fox in the snow"]
        assert runs[0].split()[0] != str(frozen)
        # Killed in Ray (its name is free) and no longer held by the bridge.
        assert first_actor is not None and worker.actor_name != first_actor
        with pytest.raises(ValueError):
            ray.get_actor(first_actor, namespace=NAMESPACE)
        assert await core.ray_pool.actors_held() == [worker.actor_name]
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=5.0)
        if frozen is not None:
            # Ray counts it dead once killed; the stopped process itself is ours to end.
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)


async def test_no_actor_is_placed_on_a_node_that_is_gone(tmp_path: Path, cluster: Cluster) -> None:
    config = ray_config(tmp_path, cluster)
    bridge = RayBridge(cluster.address, NAMESPACE, logging.INFO)
    await bridge.start(60)
    spec = ActorSpec(RECORDING, config.engine, FAKE_GPU, 300.0, logging.INFO)
    # A node id the cluster does not know (one that left looks the same).
    worker = RayWorker(bridge, spec, config.data_dir, "ab" * 28, "127.0.0.1", 0)
    try:
        # Checked before placing: not an actor left waiting for the node until its start-up
        # timeout (300 s here).
        async with asyncio.timeout(60):
            with pytest.raises(WorkerStartFailed, match=r"its Ray node 127\.0\.0\.1 is gone"):
                await worker.start()
        assert await bridge.call("held", timeout_s=10) == []
    finally:
        await worker.close()
        await bridge.close()


async def test_a_job_is_one_streaming_call_with_its_steps_as_items(
    tmp_path: Path, cluster: Cluster
) -> None:
    # A worker on its own bridge (no pool looking at the cluster meanwhile): whatever crosses
    # the pipe while the job runs is the job's.
    config = ray_config(tmp_path, cluster, step_s=0.05)
    bridge = RayBridge(cluster.address, NAMESPACE, logging.INFO)
    await bridge.start(60)
    spec = ActorSpec(RECORDING, config.engine, FAKE_GPU, 120.0, logging.INFO)
    (node_id,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and FAKE_GPU in n["Resources"]]
    worker = RayWorker(bridge, spec, config.data_dir, node_id, "127.0.0.1", 0)
    try:
        await worker.start()
        calls, messages = bridge.calls_sent, bridge.messages_received
        steps: list[int] = []
        item = WorkItem(1, 1, request("a red fox", steps=20).to_json(), None, "images/1")
        outcome = await worker.run(item, lambda step, total, *_: steps.append(step), 60.0)
        assert outcome.image_paths
        # One call for the whole job (not one per step); its steps came as items, merged to
        # at most one every 0.1 s (a step is 50 ms here), in order, then its answer.
        assert bridge.calls_sent - calls == 1
        assert 2 <= len(steps) <= 15 and steps == sorted(steps) and steps[-1] <= 20
        assert bridge.messages_received - messages == len(steps) + 2  # items, answer, end
    finally:
        await worker.close()
        await bridge.close()


async def test_a_hung_job_times_out_on_rays_side_and_its_actor_is_replaced(
    tmp_path: Path, cluster: Cluster
) -> None:
    config = ray_config(tmp_path, cluster, resource=SOLO_GPU, scheduler={"job_timeout_s": 2.0})
    core = await Core.open(config, engine_factory=RECORDING)
    try:
        await ready_workers(core, 1)
        assert core.ray_pool is not None
        (worker,) = core.ray_pool.workers
        hung_actor = worker.actor_name
        # The fake engine stops answering at step 2 and ignores the cancel.
        hung = await core.scheduler.submit(ALICE, request("a stuck clock [hang]"))
        done = await finished(core, hung.id, timeout_s=60)
        assert done.state is JobState.FAILED and done.error == "timed out after 2 s"
        after = await core.scheduler.submit(BOB, request("a red fox"))
        assert (await finished(core, after.id, timeout_s=60)).state is JobState.SUCCEEDED
        # The hung actor was killed (its one unit freed) and replaced.
        assert hung_actor is not None and worker.actor_name not in (None, hung_actor)
        with pytest.raises(ValueError):
            ray.get_actor(hung_actor, namespace=NAMESPACE)
        assert await core.ray_pool.actors_held() == [worker.actor_name]
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=5.0)
