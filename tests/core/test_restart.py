"""Restart recovery for real: the core runs in a subprocess, is SIGKILLed mid-job (twice), is
started again, and every job still reaches a terminal state with the ledger consistent."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import time
from pathlib import Path

from bot.config import CreditsConfig
from bot.core.clock import system_clock
from bot.core.credits import CreditsService
from bot.core.db import Database
from tests.core.restart_driver import JOBS_PER_USER, USERS

REPO = Path(__file__).resolve().parents[2]


async def start_driver(root: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.core.restart_driver",
        str(root),
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )


async def read_until_started(process: asyncio.subprocess.Process, starts: int) -> dict:
    """Read the driver's lines until the `starts`-th job start; returns that line."""
    assert process.stdout is not None
    seen = 0
    async with asyncio.timeout(60):
        while True:
            line = await process.stdout.readline()
            assert line, "the driver exited before starting enough jobs"
            if line.startswith(b"{"):
                message = json.loads(line)
                if message["event"] == "Started":
                    seen += 1
                    if seen == starts:
                        return message


def process_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        if "\nState:\tZ" in status:
            return True
        time.sleep(0.05)
    return False


def job_states(database: Path) -> dict[int, tuple[str, int]]:
    conn = sqlite3.connect(database)
    try:
        rows = conn.execute("SELECT id, state, attempts FROM jobs").fetchall()
        return {int(r[0]): (str(r[1]), int(r[2])) for r in rows}
    finally:
        conn.close()


async def test_sigkill_mid_job_then_restart_finishes_every_job(tmp_path: Path) -> None:
    database = tmp_path / "data" / "imagine-bot.sqlite3"

    # Run 1: submit everything, kill the bot while its second job is generating.
    first = await start_driver(tmp_path, "--submit")
    started = await read_until_started(first, starts=2)
    first.send_signal(signal.SIGKILL)
    await first.wait()
    # The orphaned worker child notices its parent is gone and exits on its own.
    assert process_gone(started["worker_pid"], timeout_s=10)
    states = job_states(database)
    assert len(states) == len(USERS) * JOBS_PER_USER
    assert states[started["job"]] == ("running", 1)

    # Run 2: recovery re-queues the interrupted job first; kill again while it runs.
    second = await start_driver(tmp_path)
    again = await read_until_started(second, starts=1)
    assert again["job"] == started["job"]
    second.send_signal(signal.SIGKILL)
    await second.wait()
    assert job_states(database)[started["job"]] == ("running", 2)

    # Run 3: everything completes.
    third = await start_driver(tmp_path)
    assert third.stdout is not None
    output = await asyncio.wait_for(third.stdout.read(), 90)
    assert await third.wait() == 0
    assert output.endswith(b"idle\n")

    states = job_states(database)
    assert all(state == "succeeded" for state, _ in states.values()), states
    # Re-queued at most twice: the twice-interrupted job ran three times.
    assert states[started["job"]] == ("succeeded", 3)
    db = await Database.open(database)
    try:
        report = await CreditsService(db, CreditsConfig(), system_clock).check_consistency()
    finally:
        await db.close()
    assert report.ok, str(report)
    assert report.credits_held == 0
    assert report.totals_by_kind["settle"] == 0
    # Every driver job costs 1 credit: one hold each, however often it was interrupted.
    assert -report.totals_by_kind["hold"] == len(states)
    leftovers = list((tmp_path / "data" / "images").rglob(".tmp-*"))
    assert leftovers == []
    assert (tmp_path / "data" / "images" / str(started["job"]) / "grid.png").is_file()
