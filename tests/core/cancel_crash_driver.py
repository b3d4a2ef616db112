"""Runs the core in a process of its own for the cancel-then-crash test to SIGKILL.

    python -m tests.core.cancel_crash_driver DATA_ROOT

Submits one job to a worker whose engine never reaches its next step, cancels it once it runs,
prints {"job": id, "accepted": bool} and waits to be killed: the cancel is acknowledged but the
run's end is never written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from bot.core import Core, Owner, WorkItem, WorkOutcome
from tests.core.conftest import make_config, request

OWNER = Owner(user_id=101, guild_id=1, channel_id=2)


class StuckWorker:
    """A worker at the edge whose run never ends and which ignores its cancel."""

    name = "stuck"
    capacity = 1

    def __init__(self) -> None:
        self.running = asyncio.Event()

    async def start(self) -> None:
        pass

    async def run(self, item: WorkItem, on_progress: object, timeout_s: float) -> WorkOutcome:
        self.running.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def cancel(self, job_id: int) -> None:
        pass

    async def close(self) -> None:
        pass


async def main(root: Path) -> None:
    worker = StuckWorker()
    core = await Core.open(make_config(root), workers=[worker], cancel_grace_s=60.0)
    job = await core.scheduler.submit(OWNER, request())
    async with asyncio.timeout(20):
        await worker.running.wait()
    accepted = await core.scheduler.cancel(job.id, actor_id=OWNER.user_id)
    print(json.dumps({"job": job.id, "accepted": accepted}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    asyncio.run(main(parser.parse_args().root))
