"""A Ray cluster of separate processes, as an owner runs one: a head (`ray start --head`) and a GPU
node that is not the head (`ray start --address=... --block`, its own process group), kept
running by a supervisor loop that stands in for systemd's `Restart=always` (see
deploy/ray-gpu-node.service). Jobs survive the head being killed and restarted on its port,
and the GPU node being SIGKILLed, each mid-job: the node rejoins by its supervisor, the job runs
again there, and the ledger is exact.

Every address is a loopback one: the head listens on 127.0.0.2 and the GPU node on 127.0.0.3
(Ray replaces 127.0.0.1 itself with the box's network address).
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bot.config import Config, WorkersConfig
from bot.core import Core, JobState, Owner, ProgressUpdate
from bot.core.models import Finished, LedgerKind
from tests.core.conftest import assert_consistent, make_config, ready_workers, request
from tests.core.ray_temp import private_ray_temp

pytest.importorskip("ray")

FAKE_GPU = "fake_gpu"
HEAD_IP = "127.0.0.2"
NODE_IP = "127.0.0.3"
RECORDING = "tests.core.fakes:create_engine_recording_its_jobs"
ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
RAY = str(Path(sys.executable).parent / "ray")
DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "ray"
# The head notices a node that is gone within a few seconds (Ray's default is about 30 s).
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}

# A GPU node's raylet gives up on a head that went away after this long (Ray's default: 60 s), and
# its supervisor starts it again to join the restarted head (deploy/ray-gpu-node.service).
NODE_ENVIRONMENT = {"RAY_gcs_rpc_server_reconnect_timeout_s": "10"}


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group and wait until none of it is left (a head started again on its
    port while its old GCS process is still there refuses to start)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


class Head:
    """`ray start --head --block` on a fixed port; `kill` ends it with everything it started."""

    def __init__(self, temp_dir: Path) -> None:
        with socket.socket() as probe:
            probe.bind((HEAD_IP, 0))
            self.port = probe.getsockname()[1]
        self.address = f"{HEAD_IP}:{self.port}"
        self._temp_dir = temp_dir
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # `ray start --head` refuses a port that a raylet on this machine names as its head
        # (it cannot tell the GPU node's raylet, still waiting for its old head, from one of its
        # own) when its temp folder records that address as the last cluster it started. On
        # its own box the GPU node's raylet is not seen; forgetting the record stands in for
        # that.
        (self._temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        command = [
            RAY,
            "start",
            "--head",
            "--block",
            f"--node-ip-address={HEAD_IP}",
            f"--port={self.port}",
            "--num-cpus=1",  # the bot's box runs no job: no GPU resource here
            "--include-dashboard=false",
            f"--temp-dir={self._temp_dir}",
        ]
        with (self._temp_dir.parent / "head.log").open("ab") as output:
            self._process = subprocess.Popen(
                command,
                env={**os.environ, **FAST_HEALTH_CHECKS},
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _kill_group(process)


class SupervisedNode:
    """A GPU node, `ray start --address=<head> --block`, restarted by this loop whenever it
    exits (as systemd's Restart=always does): after its head restarted, or it was killed."""

    RESTART_S = 1.0

    def __init__(self, head: Head, temp_dir: Path) -> None:
        self._head = head
        self._temp_dir = temp_dir
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self.starts = 0
        self._thread = threading.Thread(target=self._supervise, name="node-supervisor")

    def start(self) -> None:
        self._thread.start()

    def _supervise(self) -> None:
        command = [
            RAY,
            "start",
            f"--address={self._head.address}",
            "--block",
            f"--node-ip-address={NODE_IP}",
            "--num-cpus=1",
            f"--resources={json.dumps({FAKE_GPU: 1})}",
            f"--temp-dir={self._temp_dir}",
        ]
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                with (self._temp_dir.parent / "node.log").open("ab") as output:
                    self._process = subprocess.Popen(
                        command,
                        env={**os.environ, **NODE_ENVIRONMENT},
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                self.starts += 1
            self._process.wait()
            self._stopping.wait(self.RESTART_S)

    def kill_node(self) -> None:
        """SIGKILL the node's whole process group (`ray start`, its raylet, its actors), as a
        crashed box would; the supervisor starts it again."""
        with self._lock:
            process = self._process
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None:
            _kill_group(process)
        if self._thread.is_alive():
            self._thread.join(60)


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
        finished = await run_breaking_it(core, prompt, 150, restart_head)
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
        finished = await run_breaking_it(core, prompt, 150, cluster.node.kill_node)
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
