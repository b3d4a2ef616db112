"""A Ray cluster of separate processes, as an owner runs one (tests/core/ray_processes.py): a
head and a GPU node that is not the head, kept running by a supervisor loop that stands in for
systemd's `Restart=always` (deploy/ray/ray-gpu-node.service). Jobs survive the head being killed
and restarted on its port, and the GPU node being SIGKILLed, each mid-job: the node rejoins by
its supervisor, the job runs again there, and the ledger is exact.
"""

from __future__ import annotations

import asyncio
import configparser
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bot.config import Config, WorkersConfig
from bot.core import Core, JobState, Owner, ProgressUpdate
from bot.core.models import Finished, LedgerKind
from tests.core.conftest import assert_consistent, make_config, ready_workers, request
from tests.core.ray_processes import FAKE_GPU, Head, SupervisedNode
from tests.core.ray_temp import private_ray_temp

pytest.importorskip("ray")

RECORDING = "tests.core.fakes:create_engine_recording_its_jobs"
ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "ray"


@dataclasses.dataclass
class Cluster:
    head: Head
    node: SupervisedNode


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with private_ray_temp() as temp_dir:
        # Each node keeps its own folder, as on separate boxes (short: Ray's socket paths).
        head = Head(temp_dir)
        node = SupervisedNode(head, temp_dir.parent / "n")
        try:
            head.start()
            node.start()
            yield Cluster(head, node)
        finally:
            node.stop()
            head.kill()


def cluster_config(tmp_path: Path, cluster: Cluster) -> Config:
    config = make_config(tmp_path, step_s=0.1)
    workers = WorkersConfig(
        backend="ray",
        ray_address=cluster.head.address,
        ray_gpu_resource=FAKE_GPU,
        ray_watch_interval_s=0.5,
        ray_outage_grace_s=2.0,
    )
    return dataclasses.replace(config, workers=workers)


async def run_breaking_it(
    core: Core, prompt: str, steps: int, breaks: Callable[[], None]
) -> Finished:
    """Submit a job, call `breaks()` at its first step, and wait (long) for it to end."""
    job = await core.scheduler.submit(ALICE, request(prompt, steps=steps))
    broken = False
    async with asyncio.timeout(240), core.scheduler.subscribe(job.id) as events:
        async for event in events:
            if isinstance(event, ProgressUpdate) and not broken:
                broken = True
                await asyncio.to_thread(breaks)
            if isinstance(event, Finished):
                return event
    raise AssertionError("the job's events ended without Finished")


async def assert_charged_once(
    core: Core, tmp_path: Path, finished: Finished, prompt: str, orphan_may_finish: bool = False
) -> None:
    done = finished.job
    assert done.state is JobState.SUCCEEDED, done.error
    runs = (tmp_path / "markers" / "jobs").read_text().splitlines()
    prompts = [line.split(" ", 1)[1] for line in runs]
    # The run the head took down may go on to its end on the old node (that its bridge is gone
    # cannot reach it without a head), but its answer has nowhere to go: one result counts.
    assert prompts in ([prompt], [prompt, prompt]) if orphan_may_finish else prompts == [prompt]
    entries = await core.credits.ledger(ALICE.user_id, 20)
    kinds = sorted(e.kind for e in entries if e.job_id == done.id)
    assert kinds == sorted([LedgerKind.HOLD, LedgerKind.SETTLE])
    balance = await core.credits.balance(ALICE.user_id)
    assert balance.held == 0 and balance.available == 20 - done.cost
    await assert_consistent(core)


async def test_a_head_restarted_mid_job_gets_its_gpu_node_back_and_the_job_completes(
    tmp_path: Path, cluster: Cluster
) -> None:
    core = await Core.open(cluster_config(tmp_path, cluster), engine_factory=RECORDING)
    try:
        await ready_workers(core, 1, timeout_s=180)
        assert core.ray_pool is not None
        (before,) = core.ray_pool.workers
        starts = cluster.node.starts

        def restart_head() -> None:
            cluster.head.kill()
            cluster.head.start()  # on the same port

        prompt = "a lighthouse in a storm"
        # The first run goes on without its head (its answer would still reach the bot), so it
        # must outlast the bot's giving up on the connection (ray_outage_grace_s, 2 s) by far:
        # 80 steps, 8 s.
        finished = await run_breaking_it(core, prompt, 80, restart_head)
        # The node's raylet does not outlive its head; its supervisor started it again, and
        # it joined the new head as a new node, where the job ran again.
        assert cluster.node.starts > starts
        await ready_workers(core, 1, timeout_s=60)  # the old node's worker has left
        (after,) = core.ray_pool.workers
        assert after.node_id != before.node_id
        assert finished.job.attempts == 2
        await assert_charged_once(core, tmp_path, finished, prompt, orphan_may_finish=True)
    finally:
        await core.close(drain_timeout_s=5.0)


async def test_a_gpu_node_killed_mid_job_rejoins_and_the_job_completes_there(
    tmp_path: Path, cluster: Cluster
) -> None:
    core = await Core.open(cluster_config(tmp_path, cluster), engine_factory=RECORDING)
    try:
        await ready_workers(core, 1, timeout_s=180)
        assert core.ray_pool is not None
        bridge = core.ray_pool.bridge_pid
        (before,) = core.ray_pool.workers
        starts = cluster.node.starts
        prompt = "a fox in the snow"
        # Killed with its node at its first step, the first run cannot finish: 40 steps (4 s)
        # are plenty, and the run again takes no longer than that.
        finished = await run_breaking_it(core, prompt, 40, cluster.node.kill_node)
        assert cluster.node.starts > starts
        await ready_workers(core, 1, timeout_s=60)  # the old node's worker has left
        (after,) = core.ray_pool.workers
        assert after.node_id != before.node_id
        assert finished.job.attempts == 2
        # The head never went away: the same connection throughout.
        assert core.ray_pool.bridge_pid == bridge
        await assert_charged_once(core, tmp_path, finished, prompt)
    finally:
        await core.close(drain_timeout_s=5.0)


def test_the_shipped_units_restart_ray_start_whenever_it_exits() -> None:
    # What the supervisor above stands in for: systemd starting `ray start --block` again
    # whenever it ends, without ever giving up, on the GPU boxes and on the head.
    for name, command in (
        ("ray-gpu-node.service", ["start", "--address=${RAY_HEAD_ADDRESS}", "--block"]),
        ("ray-head.service", ["start", "--head", "--port=6379", "--num-gpus=0", "--block"]),
    ):
        unit = configparser.ConfigParser(interpolation=None)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read_string((DEPLOY / name).read_text())
        service = unit["Service"]
        assert service["Restart"] == "always", name
        assert service["StartLimitIntervalSec"] == "0", name
        assert service["EnvironmentFile"] == "/etc/imagine-bot/ray.env", name
        assert service["ExecStart"].split()[1 : 1 + len(command)] == command, name
    settings = dict(
        line.split("=", 1)
        for line in (DEPLOY / "ray.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert settings["RAY_AUTH_MODE"] == "token"
    assert 0 < int(settings["RAY_gcs_rpc_server_reconnect_timeout_s"]) <= 60
    assert settings["RAY_HEAD_ADDRESS"].endswith(":6379")
