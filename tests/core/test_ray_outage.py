"""A Ray cluster that goes away and comes back: a real head started the way an operator starts
one (`ray start --head`, a process of its own), killed, and started again on the same port."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from bot.app.health import core_checks
from bot.config import Config, WorkersConfig
from bot.core import Core, JobState, Owner, ProgressUpdate, ray_workers
from bot.core.ray_workers import CONNECT_TIMEOUT_S
from tests.core.conftest import (
    assert_consistent,
    finished,
    make_config,
    ready_workers,
    request,
)
from tests.core.fakes import FACTORY
from tests.core.ray_temp import private_ray_temp

pytest.importorskip("ray")

FAKE_GPU = "fake_gpu"
ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
BOB = Owner(user_id=202, guild_id=1, channel_id=2)


class Head:
    """`ray start --head --block` on a fixed port; `kill` ends it and everything it started at
    once, as a crashed box would."""

    def __init__(self, temp_dir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._temp_dir = temp_dir
        self._process: subprocess.Popen[bytes] | None = None
        # Taken after private_ray_temp set it: RAY_TMPDIR and a throwaway cluster's settings.
        self._environment = dict(os.environ)

    def start(self) -> None:
        ray = Path(sys.executable).parent / "ray"
        command = [
            str(ray),
            "start",
            "--head",
            "--block",
            f"--port={self.port}",
            "--num-cpus=1",
            f"--resources={json.dumps({FAKE_GPU: 1})}",
            "--include-dashboard=false",
            f"--temp-dir={self._temp_dir}",
        ]
        with (self._temp_dir / "head.log").open("ab") as output:
            self._process = subprocess.Popen(
                command,
                env=self._environment,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killed as one below
            )

    def gcs_pid(self) -> int:
        """The head's GCS server (a process `ray start` started)."""
        assert self._process is not None
        (gcs,) = [
            child
            for child in psutil.Process(self._process.pid).children(recursive=True)
            if "gcs_server" in child.name()
        ]
        return gcs.pid

    def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(30)


@pytest.fixture
def head() -> Iterator[Head]:
    with private_ray_temp() as temp_dir:
        started = Head(temp_dir)
        try:
            yield started
        finally:
            started.kill()


def head_config(tmp_path: Path, head: Head, step_s: float = 0.002, grace_s: float = 1.0) -> Config:
    config = make_config(tmp_path, step_s=step_s)
    workers = WorkersConfig(
        backend="ray",
        ray_address=f"127.0.0.1:{head.port}",
        ray_gpu_resource=FAKE_GPU,
        ray_watch_interval_s=0.5,
        ray_outage_grace_s=grace_s,
    )
    return dataclasses.replace(config, workers=workers)


async def test_jobs_stay_queued_while_the_cluster_is_down_and_run_when_it_returns(
    tmp_path: Path, head: Head, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bot.core.ray_workers")
    head.start()
    config = head_config(tmp_path, head, step_s=0.02)
    core = await Core.open(config, engine_factory=FACTORY)
    try:
        # The head takes a few seconds to come up; until then the pool reports it unreachable.
        await ready_workers(core, 1, timeout_s=90)
        first = await core.scheduler.submit(ALICE, request("a red fox"))
        assert (await finished(core, first.id, timeout_s=60)).state is JobState.SUCCEEDED
        assert core.ray_pool is not None
        bridge_before = core.ray_pool.bridge_pid
        caplog.clear()

        # The head goes down under a running job (its actor goes with it): a worker crash.
        slow = await core.scheduler.submit(BOB, request("a slow snail", steps=150))
        async with core.scheduler.subscribe(slow.id) as events:
            async for event in events:
                if isinstance(event, ProgressUpdate):
                    break
        head.kill()
        await ready_workers(core, 0, timeout_s=20)
        status = core.admin.workers().backend
        assert f"Ray cluster at 127.0.0.1:{head.port} unreachable" in status
        reason = await core_checks(core)["workers"]()
        assert reason is not None and "unreachable" in reason

        jobs = [
            await core.scheduler.submit(ALICE, request("a blue owl")),
            await core.scheduler.submit(BOB, request("a green frog")),
        ]
        for job in (slow, *jobs):
            assert (await core.jobs.require(job.id)).state is JobState.QUEUED
        down = [r.getMessage() for r in caplog.records if "is unreachable" in r.getMessage()]
        # One line when it goes away, not one per look.
        assert len(down) == 1 and "jobs stay queued until it answers" in down[0]

        head.start()
        for job in jobs:
            done = await finished(core, job.id, timeout_s=90)
            assert done.state is JobState.SUCCEEDED, done.error
            assert done.attempts == 1
        rerun = await finished(core, slow.id, timeout_s=60)
        assert rerun.state is JobState.SUCCEEDED, rerun.error
        assert rerun.attempts == 2  # the run the head took down, and this one
        assert any("answers again" in r.getMessage() for r in caplog.records)
        # A new connection: Ray's driver does not outlive the head it joined.
        assert core.ray_pool.bridge_pid not in (None, bridge_before)
        assert core.admin.workers().backend.endswith(f"1 {FAKE_GPU} on 1 node(s)")

        costs = [(await core.jobs.require(j.id)).cost for j in (first, *jobs)]
        alice = await core.credits.balance(ALICE.user_id)
        assert alice.held == 0 and alice.available == 20 - costs[0] - costs[1]
        bob = await core.credits.balance(BOB.user_id)
        assert bob.held == 0 and bob.available == 20 - costs[2] - rerun.cost
        await assert_consistent(core)
    finally:
        await core.close(drain_timeout_s=5.0)


@pytest.mark.starts_no_ray_cluster
async def test_an_address_where_nothing_listens_is_reported_unreachable_at_once(
    tmp_path: Path, head: Head, caplog: pytest.LogCaptureFixture
) -> None:
    # `head` is never started: its port takes no connection (where `ray.init` would retry for
    # minutes).
    caplog.set_level(logging.INFO, logger="bot.core.ray_workers")
    started = time.monotonic()
    core = await Core.open(head_config(tmp_path, head), engine_factory=FACTORY)
    try:
        assert time.monotonic() - started < CONNECT_TIMEOUT_S
        status = core.admin.workers().backend
        assert status.startswith(f"Ray cluster at 127.0.0.1:{head.port} unreachable")
        assert "Connection refused" in status
        reason = await core_checks(core)["workers"]()
        assert reason is not None and "unreachable" in reason
        job = await core.scheduler.submit(ALICE, request("a red fox"))
        await asyncio.sleep(1.5)  # three more looks
        assert (await core.jobs.require(job.id)).state is JobState.QUEUED
        down = [r for r in caplog.records if "is unreachable" in r.getMessage()]
        assert len(down) == 1
    finally:
        await core.close(drain_timeout_s=2.0)


def failed_looks(status: str) -> int:
    found = re.search(r"not answering for \d+ s \((\d+) failed look", status)
    return int(found.group(1)) if found else 0


async def until(condition: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.1)


async def test_a_head_that_stops_answering_for_a_while_costs_no_job_and_no_reload(
    tmp_path: Path, head: Head, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The head's GCS is frozen (SIGSTOP) under a running job: it takes TCP connections and
    # answers nothing, so looks at the cluster time out. The actor's calls do not go through the
    # head, so the job carries on; several failed looks, shorter than the grace, must not throw
    # the connection away (which would re-queue the job and reload the models).
    caplog.set_level(logging.INFO, logger="bot.core.ray_workers")
    monkeypatch.setattr(ray_workers, "LOOK_TIMEOUT_S", 0.5)
    head.start()
    config = head_config(tmp_path, head, step_s=0.05, grace_s=20.0)
    core = await Core.open(config, engine_factory=FACTORY)
    gcs: int | None = None
    try:
        await ready_workers(core, 1, timeout_s=90)
        assert core.ray_pool is not None
        (worker,) = core.ray_pool.workers
        bridge, actor = core.ray_pool.bridge_pid, worker.actor_name
        caplog.clear()  # the head took a few seconds to come up
        job = await core.scheduler.submit(ALICE, request("a slow snail", steps=80))
        async with core.scheduler.subscribe(job.id) as events:
            async for event in events:
                if isinstance(event, ProgressUpdate):
                    break
        gcs = head.gcs_pid()
        os.kill(gcs, signal.SIGSTOP)
        pool = core.ray_pool
        await until(lambda: failed_looks(pool.status) >= 3, timeout_s=30)
        os.kill(gcs, signal.SIGCONT)
        gcs = None
        done = await finished(core, job.id, timeout_s=60)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.attempts == 1
        # The same connection, worker and actor: nothing was torn down or reloaded.
        assert core.ray_pool.bridge_pid == bridge
        assert core.ray_pool.workers == [worker] and worker.actor_name == actor
        assert worker.restarts == 0
        await until(lambda: pool.status.endswith(f"1 {FAKE_GPU} on 1 node(s)"), timeout_s=30)
        assert not [r for r in caplog.records if "is unreachable" in r.getMessage()]
        assert any("nothing was lost" in r.getMessage() for r in caplog.records)
        await assert_consistent(core)
    finally:
        if gcs is not None:
            os.kill(gcs, signal.SIGCONT)
        await core.close(drain_timeout_s=5.0)


@pytest.mark.starts_no_ray_cluster
async def test_connecting_again_backs_off_while_the_cluster_does_not_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A port that takes TCP connections and never answers (a hung head): each try starts a
    # bridge process that waits for Ray until the connect timeout. Tries must space out
    # (2 s, 4 s, 8 s ...), not come every `ray_watch_interval_s`.
    monkeypatch.setattr(ray_workers, "CONNECT_TIMEOUT_S", 2.0)
    with private_ray_temp(), socket.socket() as black_hole:
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(64)  # never accepted: the kernel completes the handshakes
        port = black_hole.getsockname()[1]
        config = make_config(tmp_path)
        workers = WorkersConfig(
            backend="ray",
            ray_address=f"127.0.0.1:{port}",
            ray_gpu_resource=FAKE_GPU,
            ray_watch_interval_s=0.2,
        )
        core = await Core.open(dataclasses.replace(config, workers=workers))
        try:
            assert core.ray_pool is not None
            pool = core.ray_pool
            delays: list[int] = []

            def next_delay() -> bool:
                found = re.search(r"next try in (\d+) s", pool.status)
                if found and (not delays or delays[-1] != int(found.group(1))):
                    delays.append(int(found.group(1)))
                    assert pool.bridges_started == len(delays)
                    assert pool.bridge_pid is None
                return len(delays) == 3

            await until(next_delay, timeout_s=90)
            assert delays == [2, 4, 8]
            # Well inside the 8 s wait, far past the 0.2 s between looks.
            await asyncio.sleep(3.0)
            assert pool.bridges_started == 3
            job = await core.scheduler.submit(ALICE, request("a red fox"))
            assert (await core.jobs.require(job.id)).state is JobState.QUEUED
        finally:
            await core.close(drain_timeout_s=2.0)
