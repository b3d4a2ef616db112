"""ProcessWorker: the engine in a child process that can crash, hang or be killed, with the
fake engine running inside the real child."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import multiprocessing.util
import os
import signal
from pathlib import Path

import pytest

from bot.config import Config
from bot.core import Core, JobState, LedgerKind, Owner, ProcessWorker, ProgressUpdate, Worker
from generation.contract import Personalization
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request
from tests.core.fakes import FACTORY, FAKE_SPACE, fake_embedding

FAILING_SPAWNS = "tests.core.fakes:create_engine_failing_on_spawns"

ALICE = Owner(user_id=101)
BOB = Owner(user_id=202)


async def open_process_core(config: Config, **options: object) -> tuple[Core, ProcessWorker]:
    worker = ProcessWorker(config.engine, config.data_dir, FACTORY, startup_timeout_s=60)
    core = await open_core(config, workers=[worker], **options)  # type: ignore[arg-type]
    return core, worker


async def first_progress(core: Core, job_id: int) -> None:
    async with asyncio.timeout(30):
        async with core.scheduler.subscribe(job_id) as events:
            async for event in events:
                if isinstance(event, ProgressUpdate):
                    return


async def test_child_crashes_cost_that_job_only_and_the_next_job_runs(tmp_path: Path) -> None:
    config = make_config(tmp_path, scheduler={"max_attempts": 1})
    core, worker = await open_process_core(config)
    assert isinstance(worker, Worker)
    try:
        crashing = await core.scheduler.submit(ALICE, request("[crash] a fox"))
        other = await core.scheduler.submit(BOB, request("a cat"))
        done = await finished(core, crashing.id, timeout_s=60)
        # Run, re-queued once (max_attempts=1), crashed again: failed and refunded.
        assert done.state is JobState.FAILED and done.attempts == 2
        assert done.error == "the generator crashed 2 times"
        assert (await finished(core, other.id, timeout_s=60)).state is JobState.SUCCEEDED
        assert worker.restarts == 2
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_a_job_interrupted_by_a_kill_is_retried_and_succeeds(tmp_path: Path) -> None:
    config = make_config(tmp_path, step_s=0.05)
    core, worker = await open_process_core(config)
    try:
        job = await core.scheduler.submit(ALICE, request("a fox", steps=20))
        await first_progress(core, job.id)
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # what the kernel's OOM killer does
        done = await finished(core, job.id, timeout_s=60)
        assert done.state is JobState.SUCCEEDED and done.attempts == 2
        assert worker.pid != pid
        kinds = [e.kind for e in await core.credits.ledger(ALICE.user_id)]
        assert kinds.count(LedgerKind.HOLD) == 1 and kinds.count(LedgerKind.SETTLE) == 1
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_a_hung_engine_times_out_and_the_child_is_replaced(tmp_path: Path) -> None:
    config = make_config(tmp_path, scheduler={"job_timeout_s": 1.0})
    core, worker = await open_process_core(config)
    try:
        hung = await core.scheduler.submit(ALICE, request("[hang] a fox"))
        await first_progress(core, hung.id)
        pid = worker.pid
        done = await finished(core, hung.id, timeout_s=30)
        assert done.state is JobState.FAILED and done.error == "timed out after 1 s"
        assert (await core.credits.balance(ALICE.user_id)).available == 20
        nxt = await core.scheduler.submit(ALICE, request())
        assert (await finished(core, nxt.id, timeout_s=60)).state is JobState.SUCCEEDED
        assert worker.pid != pid
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_cancel_reaches_the_child_and_a_deaf_engine_is_aborted(tmp_path: Path) -> None:
    config = make_config(tmp_path, step_s=0.02)
    core, worker = await open_process_core(config, cancel_grace_s=0.5)
    try:
        polite = await core.scheduler.submit(ALICE, request("[slow] a fox", steps=150))
        await first_progress(core, polite.id)
        pid = worker.pid
        assert await core.scheduler.cancel(polite.id, actor_id=ALICE.user_id)
        assert (await finished(core, polite.id, timeout_s=10)).state is JobState.CANCELLED
        assert worker.pid == pid  # stopped between steps: no restart needed

        deaf = await core.scheduler.submit(BOB, request("[hang] a cat"))
        await first_progress(core, deaf.id)
        assert await core.scheduler.cancel(deaf.id, actor_id=1)
        assert (await finished(core, deaf.id, timeout_s=10)).state is JobState.CANCELLED
        for user in (ALICE, BOB):
            assert (await core.credits.balance(user.user_id)).available == 20
        after = await core.scheduler.submit(BOB, request())
        assert (await finished(core, after.id, timeout_s=60)).state is JobState.SUCCEEDED
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_an_engine_that_cannot_start_leaves_jobs_queued(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    worker = ProcessWorker(config.engine, config.data_dir, "tests.core.fakes:no_such_factory")
    core = await open_core(config, workers=[worker], worker_retry_s=60)
    try:
        job = await core.scheduler.submit(ALICE, request())
        await asyncio.sleep(1.5)
        assert (await core.jobs.require(job.id)).state is JobState.QUEUED
        assert core.scheduler.queue_position(job.id) == 1
    finally:
        await core.close(1.0)


async def test_a_child_that_dies_while_idle_is_replaced_at_once(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    core, worker = await open_process_core(config)
    try:
        warm = await core.scheduler.submit(ALICE, request())
        assert (await finished(core, warm.id, timeout_s=60)).state is JobState.SUCCEEDED
        pid = worker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # No job comes to find it dead: the worker notices by itself.
        for _ in range(600):
            if worker.pid not in (pid, None):
                break
            await asyncio.sleep(0.05)
        assert worker.pid not in (pid, None)
        assert worker.restarts == 1
        job = await core.scheduler.submit(ALICE, request())
        done = await finished(core, job.id, timeout_s=60)
        assert done.state is JobState.SUCCEEDED and done.attempts == 1
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_a_worker_that_cannot_restart_costs_no_attempt_and_comes_back(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, scheduler={"max_attempts": 1})
    engine = dataclasses.replace(
        config.engine, extra={**config.engine.extra, "fake_fail_spawns": "2"}
    )
    config = dataclasses.replace(config, engine=engine)
    worker = ProcessWorker(config.engine, config.data_dir, FAILING_SPAWNS, startup_timeout_s=60)
    core = await open_core(config, workers=[worker])
    try:
        # The crash uses the job's one re-run; the restart after it fails (out of memory).
        crashing = await core.scheduler.submit(ALICE, request("[crash-once] a fox"))
        other = await core.scheduler.submit(BOB, request("a cat"))
        done = await finished(core, crashing.id, timeout_s=60)
        # The failed restart was not the job's fault and cost it nothing: it ran again once
        # the worker was back, and the queue behind it was not failed either.
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.attempts == 2
        other_done = await finished(core, other.id, timeout_s=60)
        assert other_done.state is JobState.SUCCEEDED and other_done.attempts == 1
        spawns = int((tmp_path / "markers" / "spawns").read_text())
        assert spawns == 3
        assert core.scheduler.busy_counts() == [0]
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_a_restart_that_times_out_fails_no_job(tmp_path: Path) -> None:
    # Generous for a loaded machine: the first and third processes must start within it.
    startup_timeout_s = 10.0
    config = make_config(tmp_path)
    engine = dataclasses.replace(
        config.engine, extra={**config.engine.extra, "fake_hang_spawns": "2"}
    )
    config = dataclasses.replace(config, engine=engine)
    worker = ProcessWorker(
        config.engine, config.data_dir, FAILING_SPAWNS, startup_timeout_s=startup_timeout_s
    )
    core = await open_core(config, workers=[worker], worker_retry_s=0.5)
    try:
        warm = await core.scheduler.submit(ALICE, request())
        assert (await finished(core, warm.id, timeout_s=60)).state is JobState.SUCCEEDED
        # The idle child dies; its replacement never reports ready.
        await _kill_idle_child(worker)
        first = await core.scheduler.submit(ALICE, request("a fox"))
        second = await core.scheduler.submit(BOB, request("a cat"))
        # The first job waited for the hung start-up to time out: the worker's failure, not
        # the job's, so it went back to the queue and ran once the worker had started.
        for job in (first, second):
            done = await finished(core, job.id, timeout_s=90)
            assert done.state is JobState.SUCCEEDED, done.error
            assert done.attempts == 1
        assert int((tmp_path / "markers" / "spawns").read_text()) == 3
        await assert_consistent(core)
    finally:
        await core.close(2.0)


async def test_a_restart_whose_process_cannot_start_fails_no_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(tmp_path)
    core, worker = await open_process_core(config, worker_retry_s=0.5)
    refused: list[str] = []

    def fork_refused(path: str, args: object, passfds: object) -> int:
        # What the kernel answers when the process limit is reached.
        refused.append(path)
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    try:
        warm = await core.scheduler.submit(ALICE, request())
        assert (await finished(core, warm.id, timeout_s=60)).state is JobState.SUCCEEDED
        monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", fork_refused)
        # The idle child dies, and no process can be started in its place.
        await _kill_idle_child(worker)
        first = await core.scheduler.submit(ALICE, request("a fox"))
        second = await core.scheduler.submit(BOB, request("a cat"))
        # Restarts are refused again and again; the jobs wait, unharmed.
        async with asyncio.timeout(30):
            while True:
                if len(refused) >= 2 and await _states(core, first.id, second.id) == {"queued"}:
                    break
                await asyncio.sleep(0.05)
        assert core.scheduler.ready_workers == 0
        monkeypatch.undo()

        for job in (first, second):
            done = await finished(core, job.id, timeout_s=60)
            assert done.state is JobState.SUCCEEDED, done.error
            assert done.attempts == 1
        await assert_consistent(core)
    finally:
        monkeypatch.undo()
        await core.close(2.0)


async def _states(core: Core, *job_ids: int) -> set[str]:
    return {(await core.jobs.require(job_id)).state.value for job_id in job_ids}


async def _kill_idle_child(worker: ProcessWorker) -> None:
    """SIGKILL the idle child, and wait until the worker has noticed (a job sent before that
    would meet the dying child, a crash, not the restart this is about)."""
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(30):
        while True:
            if worker.pid is None:
                return
            await asyncio.sleep(0.01)


async def test_embeddings_and_a_taste_cross_the_process_boundary(tmp_path: Path) -> None:
    """--p's weights reach the engine in the child with the request, and every candidate's
    compact embedding comes back with the result and is stored with the job's end."""
    core, _worker = await open_process_core(make_config(tmp_path))
    try:
        taste = Personalization(
            weights=tuple(float(w) for w in fake_embedding(5 + 3)), space=FAKE_SPACE, strength=10.0
        )
        job = await core.scheduler.submit(
            ALICE, request(seed=5, num_candidates=6, num_kept=2, personalize=taste)
        )
        done = await finished(core, job.id, timeout_s=60)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.result is not None and done.result.personalized
        # Plain ranking keeps candidates 0 and 1; this taste is candidate 3's own direction.
        assert done.result.candidate_indices[0] == 3
        rows = await core.db.read(
            "SELECT candidate, space FROM candidate_embeddings WHERE job_id = ? ORDER BY candidate",
            (job.id,),
        )
        assert [(r["candidate"], r["space"]) for r in rows] == [(i, FAKE_SPACE) for i in range(6)]
    finally:
        await core.close()
