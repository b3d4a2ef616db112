"""Runs the core in a process of its own, for the restart test to SIGKILL.

    python -m tests.core.restart_driver DATA_ROOT [--submit]

Prints one JSON line per job start/finish (with the worker child's pid), and "idle" once no job
is queued or running, then shuts down cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from bot.core import Core, Finished, JobEvent, Owner, ProcessWorker, Started
from tests.core.conftest import make_config, request
from tests.core.fakes import FACTORY

USERS = (1, 2, 3)
JOBS_PER_USER = 3


async def main(root: Path, submit: bool) -> None:
    config = make_config(
        root, step_s=0.03, scheduler={"max_queued_per_user": JOBS_PER_USER, "max_attempts": 2}
    )
    worker = ProcessWorker(config.engine, config.data_dir, FACTORY, startup_timeout_s=60)
    core = await Core.open(config, workers=[worker])

    def report(event: JobEvent) -> None:
        if isinstance(event, Started | Finished):
            line = {"event": type(event).__name__, "job": event.job_id, "worker_pid": worker.pid}
            print(json.dumps(line), flush=True)

    idle = asyncio.Event()

    def check_idle(event: JobEvent) -> None:
        if not (core.scheduler.queued_count or core.scheduler.running_count):
            idle.set()

    core.scheduler.add_listener(report)
    core.scheduler.add_listener(check_idle)
    if submit:
        for index in range(JOBS_PER_USER):
            for user in USERS:
                await core.scheduler.submit(
                    Owner(user), request(f"job {user}-{index}", steps=10, seed=index)
                )
        print(json.dumps({"event": "submitted"}), flush=True)
    if not (core.scheduler.queued_count or core.scheduler.running_count):
        idle.set()
    await idle.wait()
    await core.close()
    print("idle", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--submit", action="store_true")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.root, arguments.submit))
