"""Load: many users at once, through the scheduler and through Discord. Figures only.

    python -m bench.load                          # both parts at their default sizes
    python -m bench.load scheduler --users 1000 --duration 60
    python -m bench.load discord --discord-users 50

scheduler: N simulated users (default 1,000) submit bursts straight into `Core.scheduler`
  (real SQLite ledger, real fair queue, the fake engine in a worker thread with fast steps).
  Each user submits a burst, waits for what was accepted, thinks, and goes again; a user
  refused outright backs off for a few seconds, as a person told "try again in a minute"
  would. Every user has the same demand. Printed: the queue bound (most jobs ever queued vs
  `max_queue`), submit latency of refusals and acceptances, refusals by reason, event-loop lag
  from a 10 ms sleeper, throughput, and Jain's index over jobs completed per user in a window
  (from the end of a warm-up to the end of the run).

discord: M members (default 50) fire /imagine at the bot in this process through the fake
  Discord, three times each in quick succession (the second is inside the per-user cooldown),
  with a global queue smaller than the crowd. Printed: interaction acknowledgement latency
  (from dispatch to the bot's first callback), event-loop lag, replies by kind (accepted,
  cooldown, queue full, ...), and after everything finished: job states, the ledger check, and
  result messages per job.

Nothing is asserted beyond the run completing; compare the figures with the targets in the
README (ack p99 < 1 s, loop lag p99 < 50 ms, Jain >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._common import (
    DataView,
    LagProbe,
    audit_data_dir,
    jain,
    merge,
    percentile,
    print_table,
    small_request,
    spread,
    tiny_config_sections,
    wait_settled,
    write_config,
)
from bot.config import Config, CreditsConfig, SchedulerConfig, load_config
from bot.core import Core, Finished, InProcessWorker, JobEvent, Owner, Refused
from generation.settings import EngineSettings
from tests.core.fakes import create_fake_engine

# ----- part 1: the scheduler alone -------------------------------------------------------------


@dataclasses.dataclass
class SchedulerFigures:
    rows: list[tuple[str, Any]]


async def scheduler_load(args: argparse.Namespace, root: Path) -> SchedulerFigures:
    rng = random.Random(args.seed)
    config = Config(
        data_dir=root / "scheduler",
        engine=EngineSettings(cache_dir=root / "models", extra={"fake_step_s": str(args.step_s)}),
        scheduler=SchedulerConfig(
            max_queue=args.max_queue,
            max_queued_per_user=3,
            max_running_per_user=1,
            job_timeout_s=60.0,
        ),
        credits=CreditsConfig(daily_allowance=1_000_000),
    )
    workers = [
        InProcessWorker(
            config.engine, config.data_dir, create_fake_engine, capacity=args.slots, name="gpu"
        )
    ]
    core = await Core.open(config, workers=workers)
    scheduler = core.scheduler
    waiting: dict[int, asyncio.Future[None]] = {}
    completions: list[tuple[float, int]] = []
    most_queued = 0
    refused_latency: list[float] = []
    accepted_latency: list[float] = []
    refusals: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()

    def on_event(event: JobEvent) -> None:
        nonlocal most_queued
        most_queued = max(most_queued, scheduler.queued_count)
        if isinstance(event, Finished):
            completions.append((time.perf_counter(), event.job.owner.user_id))
            future = waiting.pop(event.job_id, None)
            if future is not None and not future.done():
                future.set_result(None)

    scheduler.add_listener(on_event)

    async def pause(seconds: float) -> None:
        # Users stop between submits, never inside one, so no transaction is cut short.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def user(user_id: int) -> None:
        nonlocal most_queued
        owner = Owner(user_id)
        # Start spread over a second, as a crowd does, not in one instant.
        await pause(rng.uniform(0.0, 1.0))
        while not stop.is_set():
            accepted = []
            for _ in range(args.burst):
                request = small_request(rng.randrange(1_000_000), candidates=1)
                started = time.perf_counter()
                try:
                    job = await scheduler.submit(owner, request)
                except Refused as refusal:
                    refused_latency.append(time.perf_counter() - started)
                    refusals[refusal.code.value] += 1
                    # Told "wait" or "full", a person stops clicking for now.
                    break
                accepted_latency.append(time.perf_counter() - started)
                most_queued = max(most_queued, scheduler.queued_count)
                future = asyncio.get_running_loop().create_future()
                waiting[job.id] = future
                accepted.append(future)
            if accepted:
                await asyncio.gather(*accepted)
                await pause(rng.uniform(0.0, args.think_s))
            else:
                await pause(rng.uniform(args.backoff_s / 2, args.backoff_s * 1.5))

    most_queued_in_db = 0

    async def sample_database() -> None:
        # The bound as the database sees it, independent of the scheduler's in-memory queue.
        nonlocal most_queued_in_db
        while True:
            row = await core.db.read_one("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
            most_queued_in_db = max(most_queued_in_db, int(row[0]) if row else 0)
            await asyncio.sleep(0.2)

    probe = LagProbe()
    probe.start()
    sampler = asyncio.create_task(sample_database())
    started = time.perf_counter()
    tasks = [asyncio.create_task(user(1000 + i)) for i in range(args.users)]
    await asyncio.sleep(args.duration)
    stop.set()
    ended = time.perf_counter()
    lag = await probe.stop()
    sampler.cancel()
    for future in waiting.values():
        if not future.done():
            future.set_result(None)
    await asyncio.gather(*tasks, sampler, return_exceptions=True)
    report = await core.credits.check_consistency()
    await core.close(drain_timeout_s=5.0)

    window_start = started + args.warmup
    per_user = collections.Counter(u for at, u in completions if window_start <= at <= ended)
    counts = [per_user.get(1000 + i, 0) for i in range(args.users)]
    done_in_window = sum(counts)
    mean = done_in_window / args.users
    window = ended - window_start
    rows: list[tuple[str, Any]] = [
        ("users x burst", f"{args.users} x {args.burst} (max 3 queued per user)"),
        ("run", f"{args.duration:g} s, fairness window the last {window:.0f} s"),
        (
            "most jobs queued (scheduler / database)",
            f"{most_queued} / {most_queued_in_db} (max_queue {args.max_queue})",
        ),
        ("jobs completed", f"{len(completions)} ({len(completions) / (ended - started):.0f}/s)"),
        ("submit latency, refused", spread(refused_latency)),
        ("submit latency, accepted", spread(accepted_latency)),
        ("refusals by reason", dict(sorted(refusals.items()))),
        ("event-loop lag (10 ms probe)", spread(lag)),
        (
            "jobs completed per user in window",
            f"mean {mean:.1f}, min {min(counts)}, "
            f"p50 {percentile(counts, 50):.0f}, max {max(counts)}",
        ),
        (
            "Jain index (completed per user, window)",
            f"{jain(counts):.3f} (a fair lottery with this mean scores about "
            f"{mean / (mean + 1):.2f}: Poisson counts)",
        ),
        ("ledger", str(report).splitlines()[0]),
    ]
    return SchedulerFigures(rows)


# ----- part 2: through the fake Discord --------------------------------------------------------

REPLY_KINDS = {
    "Slow down a little": "per-user cooldown",
    "The queue is full": "queue full",
    "You already have": "own queue full",
    "Not enough credits": "not enough credits",
    "restarting": "bot restarting",
}


async def discord_load(args: argparse.Namespace, root: Path) -> list[tuple[str, Any]]:
    from bot.discord.client import ImagineBot
    from tests.fakediscord import FakeDiscord, FakeInteraction, WaitTimeout

    folder = root / "discord"
    async with FakeDiscord() as fake:
        sections = merge(
            tiny_config_sections(fake.guild_id, folder / "models"),
            {
                "scheduler": {"max_queue": args.discord_queue, "max_queued_per_user": 2},
                "discord": {"command_cooldown_s": 2.0, "progress_edit_interval_s": 1.0},
            },
        )
        config = load_config(write_config(folder, sections))
        config = dataclasses.replace(
            config,
            engine=dataclasses.replace(config.engine, extra={"fake_step_s": str(args.step_s)}),
        )
        worker = InProcessWorker(config.engine, config.data_dir, create_fake_engine)
        bot = ImagineBot(config, core_options={"workers": [worker]}, guild_ready_timeout=0.05)
        members = [fake.add_user(f"member{i}") for i in range(args.discord_users)]
        view = DataView(config.database_path)
        interactions: list[FakeInteraction] = []
        async with fake.run_bot(bot, timeout=60):
            probe = LagProbe()
            probe.start()
            started = time.perf_counter()

            async def fire(member: Any, wave: int) -> FakeInteraction:
                return await fake.slash(member, "imagine", prompt=f"a red fox, wave {wave}")

            async def wave(number: int, crowd: list[Any]) -> list[FakeInteraction]:
                fired = await asyncio.gather(*(fire(m, number) for m in crowd))
                for interaction in fired:
                    with contextlib.suppress(WaitTimeout):
                        await interaction.wait_acked(timeout=15)
                return list(fired)

            # Wave 2 comes as soon as wave 1 is answered (inside the 2 s cooldown), wave 3
            # after the cooldown.
            interactions += await wave(1, members)
            interactions += await wave(2, members)
            await asyncio.sleep(2.5)
            interactions += await wave(3, members)
            acked_s = time.perf_counter() - started
            settled = await wait_settled(view, timeout_s=args.settle_s)
            finished_s = time.perf_counter() - started
            lag = await probe.stop()

            # Double submits: each of these members sends two /imagine at the same moment
            # (two clients, or a script), on an empty queue.
            doubles = [fake.add_user(f"double{i}") for i in range(args.double_users)]
            pairs = await asyncio.gather(*(wave(9, [m, m]) for m in doubles))
            both_accepted = sum(
                1 for pair in pairs if all(_reply_kind(i).startswith("accepted") for i in pair)
            )
            await wait_settled(view, timeout_s=args.settle_s)
        audit = await audit_data_dir(config)
        audit.check_messages(fake)

    latencies = [i.ack_latency for i in interactions if i.ack_latency is not None]
    replies: collections.Counter[str] = collections.Counter()
    for interaction in interactions:
        replies[_reply_kind(interaction)] += 1
    rows: list[tuple[str, Any]] = [
        (
            "members x /imagine",
            f"{args.discord_users} x 3 (wave 2 right after wave 1 is answered, 3 after 2.5 s)",
        ),
        ("limits", f"cooldown 2 s, max_queue {args.discord_queue}, 2 queued per member"),
        ("ack latency", spread(latencies)),
        ("not acknowledged within 15 s", len(interactions) - len(latencies)),
        ("event-loop lag (10 ms probe)", spread(lag)),
        ("replies by kind", dict(sorted(replies.items()))),
        ("all acked after / all settled after", f"{acked_s:.1f} s / {finished_s:.1f} s"),
        ("settled (terminal and delivered)", settled),
        (
            "two /imagine at once from one member",
            f"both accepted for {both_accepted} of {len(pairs)} members (cooldown 2 s)",
        ),
        *audit.rows(),
    ]
    problems = audit.problems()
    rows.append(("invariant problems", "; ".join(problems) if problems else "none"))
    return rows


def _reply_kind(interaction: Any) -> str:
    if interaction.ack is None:
        return "no answer"
    if not interaction.ephemeral:
        return "accepted (deferred, job queued)"
    content = interaction.original.content if interaction.original else ""
    return next((kind for text, kind in REPLY_KINDS.items() if text in content), content[:40])


# ----- main ------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="load-"))
    try:
        if "scheduler" in args.parts:
            figures = await scheduler_load(args, root)
            print_table("scheduler load (fake engine, no Discord)", figures.rows)
        if "discord" in args.parts:
            rows = await discord_load(args, root)
            print_table("Discord load (bot in this process, fake Discord, fake engine)", rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ncommand: python -m bench.load {' '.join(sys.argv[1:])}".rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("parts", nargs="*", help="scheduler and/or discord (default: both)")
    parser.add_argument("--users", type=int, default=1000, help="scheduler part: users")
    parser.add_argument("--burst", type=int, default=4, help="jobs per burst")
    parser.add_argument("--duration", type=float, default=120.0, help="scheduler part: seconds")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before the window")
    parser.add_argument("--max-queue", type=int, default=300, help="scheduler part: max_queue")
    parser.add_argument("--slots", type=int, default=4, help="jobs the fake GPU runs at once")
    parser.add_argument("--step-s", type=float, default=0.002, help="fake engine s per step")
    parser.add_argument("--think-s", type=float, default=1.0, help="pause after a burst, max")
    parser.add_argument("--backoff-s", type=float, default=5.0, help="pause after a refusal")
    parser.add_argument("--discord-users", type=int, default=50, help="Discord part: members")
    parser.add_argument("--discord-queue", type=int, default=40, help="Discord part: max_queue")
    parser.add_argument(
        "--double-users", type=int, default=10, help="Discord part: members double-submitting"
    )
    parser.add_argument("--settle-s", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    args.parts = args.parts or ["scheduler", "discord"]
    if set(args.parts) - {"scheduler", "discord"}:
        parser.error("parts: choose from scheduler, discord")
    # The bot logs every job; at this volume that is noise on the terminal, not a figure.
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
