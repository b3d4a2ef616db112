"""Shared pieces of the reliability benchmarks and the CI fault test.

Figures (percentiles, Jain's index, an event-loop lag probe), a `config.toml` for a bot started
as `python -m bot` in its own process, a handle on that process (start, SIGKILL, SIGTERM), and
the end-of-run audit: job states, the ledger, deliveries in SQLite, and result messages as the
fake Discord received them.

Nothing here imports torch: the tiny models are built by a child process, so the harness stays
light and only the bot's worker pays for the engine.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from bot.config import Config, load_config
from bot.core.clock import system_clock
from bot.core.credits import CreditsService
from bot.core.db import Database
from bot.core.models import ConsistencyReport
from generation.contract import GenerationRequest, JobKind

if TYPE_CHECKING:
    from tests.fakediscord import FakeDiscord, Message

REPO = Path(__file__).resolve().parents[1]
TERMINAL = ("succeeded", "failed", "cancelled", "refused")
# How an uploaded result is named by the bot (`job-<id>.png`, `SPOILER_` for flagged images,
# another suffix when re-encoded to fit the upload limit).
_RESULT_FILE = re.compile(r"(?:^|_)job-(\d+)\.\w+$")


# ----- figures ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: 1.0 when everyone got the same, 1/n when one got everything."""
    total = sum(values)
    squares = sum(v * v for v in values)
    return (total * total) / (len(values) * squares) if squares else math.nan


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def spread(values: Sequence[float]) -> str:
    """p50 / p99 / max of durations in seconds, as milliseconds."""
    if not values:
        return "n/a (no samples)"
    return (
        f"p50 {ms(percentile(values, 50))} · p99 {ms(percentile(values, 99))} · "
        f"max {ms(max(values))} (n={len(values)})"
    )


def print_table(title: str, rows: Iterable[tuple[str, Any]]) -> None:
    rows = list(rows)
    width = max((len(name) for name, _ in rows), default=0)
    print(f"\n== {title}")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")


def small_request(seed: int = 0, candidates: int = 4) -> GenerationRequest:
    """A job small enough that the scheduler, not the generator, is what gets measured."""
    return GenerationRequest(
        kind=JobKind.IMAGINE,
        prompt="a red fox",
        width=64,
        height=64,
        steps=4,
        num_candidates=candidates,
        num_kept=candidates,
        seed=seed,
    )


class LagProbe:
    """Event-loop lag: a task that sleeps 10 ms at a time and records how late it wakes up.
    Anything that blocks the loop (sync I/O, heavy CPU) shows up here as lag."""

    def __init__(self, interval_s: float = 0.010) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lag-probe")

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.samples

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval_s)
            self.samples.append(max(0.0, loop.time() - before - self.interval_s))


# ----- a bot in its own process ----------------------------------------------------------------


def ensure_tiny_models(cache_dir: Path) -> None:
    """Build the tiny random-weight models once, in a child process (torch stays out of here)."""
    if (cache_dir / "tiny-sd").is_dir() and (cache_dir / "tiny-clip").is_dir():
        return
    subprocess.run(
        [sys.executable, "-m", "generation", "build-tiny", "--cache-dir", str(cache_dir)],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def tiny_config_sections(
    guild_id: int,
    cache_dir: Path,
    *,
    base_resolution: int = 64,
    candidates: int = 4,
    kept: int = 4,
    job_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Config sections for a small, fast bot on the tiny model, ready for `write_config`."""
    return {
        "data_dir": "data",
        "log_level": "INFO",
        "generation": {
            "cache_dir": str(cache_dir.resolve()),
            "device": "cpu",
            "default_steps": 4,
            "candidates": candidates,
            "kept": kept,
            "max_pixels": (base_resolution * 4) ** 2,
            "local_files_only": True,
            "models": [{"name": "tiny", "source": "tiny", "base_resolution": base_resolution}],
        },
        "scheduler": {
            "job_timeout_s": job_timeout_s,
            "max_attempts": 2,
            "max_queued_per_user": 3,
            "drain_timeout_s": 2.0,
            "cancel_grace_s": 5.0,
            "worker_startup_timeout_s": 300.0,
        },
        "credits": {"daily_allowance": 100_000},
        "discord": {
            "guild_ids": [guild_id],
            "command_cooldown_s": 0.0,
            "progress_edit_interval_s": 0.3,
        },
    }


def merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in, table by table."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_config(root: Path, sections: Mapping[str, Any]) -> Path:
    """Write `sections` as `root/config.toml` and return its path (parsed once to fail early)."""
    root.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in sections.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml(value)}")
    for name, table in tables:
        arrays = {k: v for k, v in table.items() if _is_table_array(v)}
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in table.items() if k not in arrays]
        for key, items in arrays.items():
            for item in items:
                lines.append(f"\n[[{name}.{key}]]")
                lines += [f"{k} = {_toml(v)}" for k, v in item.items()]
    path = root / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    load_config(path)
    return path


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are valid TOML basic-string escapes for what we write.
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"config value of type {type(value).__name__} is not supported")


class BotProcess:
    """`python -m bot` in its own process, pointed at the fake Discord, for SIGKILL tests.

    The bot finds `config.toml` in its working folder by the default name: the fake's launcher
    (tests/fakediscord/launch.py) rejects options given after the module name, so
    `--config PATH` cannot be passed through it.
    """

    def __init__(self, fake: FakeDiscord, root: Path, env: Mapping[str, str] | None = None):
        self.fake = fake
        self.root = root
        self.log_path = root / "bot.log"
        self.env = fake.subprocess_env()
        # One torch thread per worker: the machine is shared, and a second thread only adds
        # contention on two cores.
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.update(env or {})
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self, ready_timeout_s: float = 120.0) -> None:
        """Start the bot and wait until it is on the gateway (commands synced, core open; the
        worker may still be loading its models)."""
        if self.fake.connected:
            # A previous bot's socket may not be noticed closed yet; wait, or wait_ready
            # would answer for the dead one.
            await self.fake.wait_for(lambda: not self.fake.connected, timeout=30)
        sessions = len(self.fake.sessions)
        self._log = self.log_path.open("ab")
        self._log.write(f"\n----- start {self.starts + 1} -----\n".encode())
        self._log.flush()
        self.process = await asyncio.create_subprocess_exec(
            *self.fake.subprocess_argv("bot"),
            cwd=self.root,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.starts += 1
        process = self.process
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ready_timeout_s
        while not (len(self.fake.sessions) > sessions and self.fake.connected):
            if process.returncode is not None:
                raise RuntimeError(
                    f"the bot exited with {process.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            if loop.time() > deadline:
                raise TimeoutError(f"bot not ready after {ready_timeout_s} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def descendants(self) -> list[int]:
        """Pids of the bot's child processes (its engine worker), read from /proc."""
        if self.process is None:
            return []
        found: list[int] = []
        pending = [self.process.pid]
        while pending:
            pid = pending.pop()
            for task in Path(f"/proc/{pid}/task").glob("*"):
                with contextlib.suppress(OSError):
                    children = [int(c) for c in (task / "children").read_text().split()]
                    found += children
                    pending += children
        return found

    async def kill(self) -> list[int]:
        """SIGKILL the bot (not its worker: that must notice and exit by itself); returns the
        worker pids that were alive, for `processes_gone`."""
        assert self.process is not None
        children = self.descendants()
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        self._close_log()
        return children

    async def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (a drained shutdown, as `docker stop` does); SIGKILL if it hangs."""
        if self.process is None or self.process.returncode is not None:
            self._close_log()
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
        self._close_log()
        return self.process.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


async def processes_gone(pids: Iterable[int], timeout_s: float = 15.0) -> list[int]:
    """Wait for `pids` to exit (zombies count as gone); returns those still alive."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    alive = list(pids)
    while alive and loop.time() < deadline:
        alive = [pid for pid in alive if _alive(pid)]
        if alive:
            await asyncio.sleep(0.1)
    return alive


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


# ----- reading the database while a bot runs ---------------------------------------------------


class DataView:
    """Read-only peeks at a running bot's SQLite file (WAL lets readers in beside the writer);
    used to aim kills at a moment (a job running, a result being delivered)."""

    def __init__(self, database: Path) -> None:
        self.database = database

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if not self.database.exists():
            return []
        conn = sqlite3.connect(self.database, timeout=5.0)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:
            return []  # the schema is not there yet (first start still migrating)
        finally:
            conn.close()

    def states(self) -> collections.Counter[str]:
        return collections.Counter(
            {str(s): int(n) for s, n in self.query("SELECT state, COUNT(*) FROM jobs GROUP BY 1")}
        )

    def active(self) -> int:
        counts = self.states()
        return counts["queued"] + counts["running"]

    def claimed(self) -> set[int]:
        """Jobs whose result delivery is claimed (being sent) but not recorded as done."""
        rows = self.query("SELECT job_id FROM deliveries WHERE state = 'claimed'")
        return {int(r[0]) for r in rows}

    def undelivered(self) -> int:
        """Finished jobs whose result delivery is not recorded as done."""
        rows = self.query(
            "SELECT COUNT(*) FROM jobs j WHERE j.state NOT IN ('queued', 'running') AND NOT "
            "EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id = j.id AND d.key = 'result' "
            "AND d.state = 'done')"
        )
        return int(rows[0][0]) if rows else 0

    def owners(self) -> dict[int, int]:
        return {int(j): int(u) for j, u in self.query("SELECT id, user_id FROM jobs")}

    def job_states(self) -> dict[int, str]:
        return {int(j): str(s) for j, s in self.query("SELECT id, state FROM jobs")}


async def wait_until(
    predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05
) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(interval_s)
    return True


async def wait_settled(view: DataView, timeout_s: float, quiet_s: float = 5.0) -> bool:
    """Wait until no job is queued or running and every finished job is delivered; True if
    that happened. Gives up early once nothing changed for `quiet_s` with everything terminal
    (a result whose delivery was claimed and never completed will never complete)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last: tuple[int, int] | None = None
    since = loop.time()
    while loop.time() < deadline:
        snapshot = (view.active(), view.undelivered())
        if snapshot == (0, 0):
            return True
        if snapshot != last:
            last, since = snapshot, loop.time()
        elif snapshot[0] == 0 and loop.time() - since > quiet_s:
            return False
        await asyncio.sleep(0.2)
    return False


# ----- the end-of-run audit --------------------------------------------------------------------


@dataclass
class Audit:
    """What a data folder says after a run, plus what the fake Discord received."""

    jobs_by_state: collections.Counter[str]
    nonterminal: list[int]
    report: ConsistencyReport
    # Credits flow: every hold is settled (spent), refunded, lost to an expired allowance,
    # or still held by a live job.
    held_total: int
    spent: int
    refunded: int
    expired: int
    still_held: int
    deliveries: collections.Counter[str]
    undelivered: list[int]
    errors: collections.Counter[str]
    attempts: collections.Counter[int]
    # Filled in by `check_messages`.
    result_messages: dict[int, int] = field(default_factory=dict)
    duplicates: dict[int, int] = field(default_factory=dict)
    lost_results: list[int] = field(default_factory=list)
    succeeded_ids: list[int] = field(default_factory=list)

    @property
    def credits_balance(self) -> bool:
        return self.held_total == self.spent + self.refunded + self.expired + self.still_held

    def check_messages(self, fake: FakeDiscord) -> None:
        """Count result messages per job in what Discord received: distinct messages that
        carried the job's image in any version. More than one is a double delivery; none for a
        succeeded job is a lost result."""
        per_job = result_messages(fake.messages)
        self.result_messages = {job: len(msgs) for job, msgs in per_job.items()}
        self.duplicates = {job: n for job, n in self.result_messages.items() if n > 1}
        self.lost_results = [j for j in self.succeeded_ids if j not in self.result_messages]

    def problems(self, *, require_delivered: bool = True) -> list[str]:
        found = []
        if self.nonterminal:
            found.append(f"jobs not in a terminal state: {self.nonterminal[:20]}")
        if not self.report.ok:
            found.append(str(self.report))
        if not self.credits_balance:
            found.append(
                f"credits in != out: held {self.held_total}, spent {self.spent} + refunded "
                f"{self.refunded} + expired {self.expired} + still held {self.still_held}"
            )
        if self.duplicates:
            found.append(f"results delivered more than once (job: messages): {self.duplicates}")
        if require_delivered and self.undelivered:
            found.append(f"finished jobs never delivered (job ids): {self.undelivered[:20]}")
        if require_delivered and self.lost_results:
            found.append(f"succeeded jobs with no result message: {self.lost_results[:20]}")
        return found

    def rows(self) -> list[tuple[str, Any]]:
        states = ", ".join(f"{s} {n}" for s, n in sorted(self.jobs_by_state.items()))
        deliveries = ", ".join(f"{s} {n}" for s, n in sorted(self.deliveries.items()))
        attempts = ", ".join(f"{a}x: {n}" for a, n in sorted(self.attempts.items()))
        most = max(self.result_messages.values(), default=0)
        return [
            ("jobs", f"{sum(self.jobs_by_state.values())} ({states})"),
            ("non-terminal jobs", len(self.nonterminal)),
            ("runs per job", attempts or "-"),
            ("ledger", str(self.report).splitlines()[0]),
            (
                "credits in = out",
                f"held {self.held_total} = spent {self.spent} + refunded {self.refunded}"
                f" + expired {self.expired} + still held {self.still_held}"
                f"  [{'ok' if self.credits_balance else 'MISMATCH'}]",
            ),
            ("ledger totals by kind", dict(sorted(self.report.totals_by_kind.items()))),
            ("result deliveries (finished jobs)", deliveries or "-"),
            ("result messages per job", f"max {most}; jobs with >1: {len(self.duplicates)}"),
            ("succeeded without a result message", len(self.lost_results)),
        ]


def result_messages(messages: Iterable[Message]) -> dict[int, list[Message]]:
    """Job id -> the distinct messages that carried that job's result image in any version."""
    found: dict[int, list[Message]] = collections.defaultdict(list)
    for message in messages:
        jobs = {
            int(match[1])
            for state in message.states
            for attachment in state.attachments
            if (match := _RESULT_FILE.search(attachment.filename))
        }
        for job in jobs:
            found[job].append(message)
    return dict(found)


async def audit_data_dir(config: Config) -> Audit:
    """Audit a data folder whose bot has stopped (opens the database itself)."""
    db = await Database.open(config.database_path)
    try:
        report = await CreditsService(db, config.credits, system_clock).check_consistency()
        jobs = await db.read(
            "SELECT j.id, j.state, j.cost, j.attempts, j.error, j.hold_allowance, "
            "  j.hold_granted, (SELECT SUM(amount) FROM ledger l WHERE l.job_id = j.id AND "
            "  l.kind = 'refund') AS refunded, "
            "  (SELECT state FROM deliveries d WHERE d.job_id = j.id AND d.key = 'result') "
            "  AS delivery "
            "FROM jobs j ORDER BY j.id"
        )
    finally:
        await db.close()
    states: collections.Counter[str] = collections.Counter()
    deliveries: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    attempts: collections.Counter[int] = collections.Counter()
    nonterminal, undelivered, succeeded = [], [], []
    held_total = spent = refunded = expired = still_held = 0
    for row in jobs:
        job_id, state, cost = int(row["id"]), str(row["state"]), int(row["cost"])
        states[state] += 1
        attempts[int(row["attempts"])] += 1
        held_total += cost
        if state not in TERMINAL:
            nonterminal.append(job_id)
            still_held += cost
            continue
        delivery = row["delivery"] or "none"
        deliveries[delivery] += 1
        # "undelivered" is a settled outcome: Discord refused the post for good (a missing
        # permission) and the job was refunded; only an unfinished delivery is a lost one.
        if delivery not in ("done", "undelivered"):
            undelivered.append(job_id)
        if state == "succeeded" and delivery != "undelivered":
            succeeded.append(job_id)
            spent += cost
        else:
            back = int(row["refunded"] or 0)
            refunded += back
            expired += cost - back
            errors[_error_kind(row["error"])] += 1
    return Audit(
        jobs_by_state=states,
        nonterminal=nonterminal,
        report=report,
        held_total=held_total,
        spent=spent,
        refunded=refunded,
        expired=expired,
        still_held=still_held,
        deliveries=deliveries,
        undelivered=undelivered,
        errors=errors,
        attempts=attempts,
        succeeded_ids=succeeded,
    )


def _error_kind(error: str | None) -> str:
    """A job error without its numbers, to count errors by kind."""
    text = re.sub(r"\d+(\.\d+)?", "N", error or "none")
    return text[:90]
