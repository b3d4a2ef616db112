"""Fault injection against the whole bot, counted: crashes, engine faults and Discord faults.

    python -m bench.fault_injection --rounds 6
    python -m bench.fault_injection --rounds 0 --engine-rounds 0 --ray-rounds 4   # Ray only

Three phases, each on its own data folder and fake Discord, then an audit of each:

1. kill: `python -m bot` in its own process with the tiny model. Each round users submit
   /imagine and press V/🔄/Cancel on grids, U to pick an image (free, no job) and, under a
   picked image, the buttons that run GPU jobs (Upscale (Subtle)/(Creative), Vary (Strong),
   Zoom Out 2x, ⬅️ pan); Discord faults are armed, and the bot is SIGKILLed at an
   aimed moment, in turn: a job running, a result being delivered (its delivery claimed in
   SQLite), a random moment once the worker is up, and right after the submissions (jobs
   queued, models still loading). Then it is started again. A last start with no faults lets
   everything finish.
2. engine: the bot in this process with the fake engine in its worker process (the config has
   no way to choose the engine factory, so `python -m bot` cannot run the fake engine). Prompts
   carry the fake engine's markers: an exception, a simulated CUDA out-of-memory error, an
   invalid request, a hang past `job_timeout_s` (3 s here), a worker that segfaults or is
   SIGKILLed (by the kernel's OOM killer, as far as the bot can tell), one that crashes once.
   Discord faults are armed here too.
3. ray (needs Ray; `--ray-rounds`, 0 by default): the bot in this process with `[workers]
   backend = "ray"` on a cluster of separate processes (tests/core/ray_processes.py): a head and
   a GPU node (the fake engine, one fake GPU) kept up by a supervisor loop that stands in for
   systemd (deploy/ray). Each round members submit /imagine and, with a job running, the GPU
   node's process group is SIGKILLed (even rounds) or the head is killed and started again on
   its port (odd rounds); the node rejoins by its supervisor. Discord faults are armed too.

Discord faults are the fake's: 429 and 5xx answers on uploads (interaction edits, channel posts,
channel message edits), on progress edits and channel messages, on interaction callbacks, and
expired interaction tokens. discord.py retries 500/502/504 by itself (after 1 s, 3 s, ...), so
502 is a transient fault and 503, which it does not retry, a hard one.

Afterwards, per phase: every job is terminal, the ledger is consistent (`check_consistency`),
credits in = credits out, no result was posted in more than one message, every finished job
was delivered, and a fresh /imagine is answered. Exits 1 if any of that fails, after printing
everything.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    Audit,
    BotProcess,
    DataView,
    audit_data_dir,
    ensure_tiny_models,
    merge,
    print_table,
    processes_gone,
    tiny_config_sections,
    wait_settled,
    wait_until,
    write_config,
)
from bot.config import load_config
from tests.fakediscord import FakeDiscord, FakeInteraction, Fault, Message, User, WaitTimeout

FACTORY = "tests.core.fakes:create_fake_engine"
_JOB_ID = re.compile(r"imagine:\w+:(\d+)")

# kind -> (method, path glob, status, uploads only / no uploads / either, responses in a row).
# Webhook routes (interaction callbacks and edits) retry every 5xx up to 5 times in discord.py;
# bot-token routes (/channels/...) retry 500/502/504 but not 503.
_ORIGINAL = "/webhooks/*/messages/@original"
DISCORD_FAULTS: dict[str, tuple[str, str, int, bool | None, int]] = {
    "429 result upload (interaction edit)": ("PATCH", _ORIGINAL, 429, True, 1),
    "502 result upload (interaction edit), retried": ("PATCH", _ORIGINAL, 502, True, 1),
    "503 result upload (interaction edit), 5 in a row": ("PATCH", _ORIGINAL, 503, True, 5),
    "429 result upload (channel post)": ("POST", "/channels/*/messages", 429, True, 1),
    "502 result upload (channel post), retried": ("POST", "/channels/*/messages", 502, True, 1),
    "503 result upload (channel post)": ("POST", "/channels/*/messages", 503, True, 1),
    "503 result upload (channel message edit)": ("PATCH", "/channels/*/messages/*", 503, True, 1),
    "429 progress edit": ("PATCH", _ORIGINAL, 429, False, 1),
    "502 progress edit, retried": ("PATCH", _ORIGINAL, 502, False, 1),
    "503 channel message without files": ("POST", "/channels/*/messages", 503, False, 1),
    "503 interaction callback, 3 in a row": ("POST", "/interactions/*/callback", 503, None, 3),
}
TOKEN_EXPIRED = "interaction token expired"

KILL_POINTS = ("running", "delivering", "random", "queued")

# Fake-engine prompt markers (tests/core/fakes.py) and what each stands for.
ENGINE_MARKERS: dict[str, str] = {
    "": "none (a normal job)",
    "[raise]": "engine exception",
    "[oom]": "simulated CUDA out of memory",
    "[invalid]": "engine refuses the request",
    "[hang]": "hang past job_timeout_s",
    "[crash]": "worker segfault (every attempt)",
    "[sigkill]": "worker SIGKILLed, as by the OOM killer (every attempt)",
    "[crash-once]": "worker segfault (first attempt only)",
}
ENGINE_WEIGHTS = {
    "": 5,
    "[raise]": 2,
    "[oom]": 2,
    "[invalid]": 1,
    "[hang]": 1,
    "[crash]": 1,
    "[sigkill]": 1,
    "[crash-once]": 1,
}
GRID_BUTTONS = ("U1", "U2", "V1", "V3", "🔄")
# Under an image picked with U1–U4 (U itself is free and runs no job): GPU jobs, inpainting
# ones (zoom, pan) among them.
IMAGE_BUTTONS = ("Upscale (Subtle)", "Upscale (Creative)", "Vary (Strong)", "Zoom Out 2x", "⬅️")


@dataclass
class FaultLog:
    """Every fault armed in a phase; Discord faults count only when they actually hit."""

    discord: dict[str, list[Fault]] = field(default_factory=lambda: collections.defaultdict(list))
    counts: collections.Counter[str] = field(default_factory=collections.Counter)

    def arm(self, fake: FakeDiscord, kind: str) -> None:
        method, path, status, with_files, times = DISCORD_FAULTS[kind]
        fault = fake.inject(
            method, path, status=status, with_files=with_files, times=times, retry_after=0.2
        )
        self.discord[kind].append(fault)

    def disarm(self) -> None:
        for faults in self.discord.values():
            for fault in faults:
                fault.times = fault.hits

    def totals(self) -> collections.Counter[str]:
        totals = collections.Counter(self.counts)
        for kind, faults in self.discord.items():
            totals[kind] += sum(f.hits for f in faults)
        return totals


@dataclass
class Users:
    """The simulated members and what they do: /imagine, grid buttons, Cancel."""

    fake: FakeDiscord
    view: DataView
    rng: random.Random
    people: list[User]
    actions: collections.Counter[str] = field(default_factory=collections.Counter)
    interactions: list[FakeInteraction] = field(default_factory=list)

    async def act(self, prompt: Callable[[], str], steps: Callable[[], int]) -> None:
        owners = self.view.owners()
        states = self.view.job_states()
        for user in self.people:
            choice = self.rng.random()
            grids = [m for m in self._owned(user, owners) if _is_grid(m)]
            images = [m for m in self._owned(user, owners) if _is_image(m)]
            cancels = [
                m
                for m in self._owned(user, owners)
                if _has_cancel(m) and states.get(_job_id(m) or 0) in ("queued", "running")
            ]
            if choice < 0.15 and cancels:
                await self._click(user, self.rng.choice(cancels), "Cancel", "cancel")
            elif choice < 0.45 and (grids or images):
                # Half the presses under picked images, once there are some.
                if images and (not grids or self.rng.random() < 0.5):
                    target, label = self.rng.choice(images), self.rng.choice(IMAGE_BUTTONS)
                else:
                    target, label = self.rng.choice(grids), self.rng.choice(GRID_BUTTONS)
                await self._click(user, target, label, f"button {label}")
            else:
                options: dict[str, Any] = {"prompt": prompt(), "steps": steps()}
                interaction = await self.fake.slash(user, "imagine", **options)
                self.actions["/imagine"] += 1
                await self._acked(interaction)

    async def _click(self, user: User, message: Message, label: str, action: str) -> None:
        try:
            interaction = await self.fake.click(user, message, label=label)
        except (LookupError, AssertionError):
            return  # the message changed under us (the job finished): nothing to press
        self.actions[action] += 1
        await self._acked(interaction)

    async def _acked(self, interaction: FakeInteraction) -> None:
        self.interactions.append(interaction)
        try:
            await interaction.wait_acked(timeout=10)
        except WaitTimeout:
            self.actions["not acknowledged within 10 s"] += 1

    def _owned(self, user: User, owners: dict[int, int]) -> list[Message]:
        return [
            m
            for m in self.fake.messages
            if not m.deleted and owners.get(_job_id(m) or 0) == user.id
        ]

    def live_interactions(self) -> list[FakeInteraction]:
        states = self.view.job_states()
        live = []
        for interaction in self.interactions:
            message = interaction.original
            job = _job_id(message) if message is not None else None
            if job and states.get(job) in ("queued", "running") and not interaction.token_expired:
                live.append(interaction)
        return live


def _job_id(message: Message) -> int | None:
    match = _JOB_ID.search(" ".join(message.custom_ids))
    return int(match[1]) if match else None


def _is_grid(message: Message) -> bool:
    return bool(message.attachments) and any(b.get("label") == "U1" for b in message.buttons)


def _kinds(view: DataView) -> str:
    rows = view.query("SELECT kind, COUNT(*) FROM jobs GROUP BY 1 ORDER BY 2 DESC")
    return ", ".join(f"{kind} {count}" for kind, count in rows)


def _is_image(message: Message) -> bool:
    """A picked image (U1–U4's reply) or an upscale: one image with the edit buttons."""
    return bool(message.attachments) and any(
        b.get("label") == "Vary (Strong)" for b in message.buttons
    )


def _has_cancel(message: Message) -> bool:
    return any(c.startswith("imagine:X:") for c in message.custom_ids)


def _arm_round(fake: FakeDiscord, faults: FaultLog, rng: random.Random, kinds: list[str]) -> None:
    for kind in rng.sample(kinds, k=min(len(kinds), rng.choice((0, 1, 2, 2)))):
        faults.arm(fake, kind)


def _expire_some(users: Users, faults: FaultLog, rng: random.Random) -> None:
    live = users.live_interactions()
    if live and rng.random() < 0.4:
        rng.choice(live).expire_token()
        faults.counts[TOKEN_EXPIRED] += 1


async def _fresh_imagine(fake: FakeDiscord, name: str, timeout_s: float) -> tuple[bool, str]:
    """Whether a member who never used the bot gets a grid for /imagine."""
    user = fake.add_user(name)
    started = time.monotonic()
    try:
        interaction = await fake.slash(user, "imagine", prompt="a lighthouse at dusk", steps=4)
        ack = await interaction.wait_acked(timeout=10)
        await interaction.wait_original(_is_grid, timeout=timeout_s)
    except (WaitTimeout, AssertionError) as exc:
        return False, f"no: {str(exc).splitlines()[0]}"
    took = time.monotonic() - started
    return True, f"yes: ack type {ack} in {interaction.ack_latency:.2f} s, grid in {took:.1f} s"


# ----- phase 1: SIGKILL the bot process --------------------------------------------------------


@dataclass
class PhaseResult:
    name: str
    audit: Audit | None
    faults: collections.Counter[str]
    actions: collections.Counter[str]
    notes: list[tuple[str, Any]]
    # Broken invariants of the bot: these decide the verdict.
    problems: list[str]
    # Faults of the measuring harness itself (the fake Discord): they make a run inconclusive,
    # never a verdict on the bot.
    harness: list[str]


async def kill_phase(args: argparse.Namespace, root: Path, rng: random.Random) -> PhaseResult:
    cache = args.cache_dir or root / "models"
    ensure_tiny_models(cache)
    faults = FaultLog()
    kills: collections.Counter[str] = collections.Counter()
    in_flight: collections.Counter[str] = collections.Counter()
    problems: list[str] = []
    kinds = [k for k in DISCORD_FAULTS if k in args.discord_faults]
    fake = FakeDiscord(redirect=False)
    await fake.start()
    bot: BotProcess | None = None
    try:
        folder = root / "kill"
        sections = tiny_config_sections(fake.guild_id, cache)
        config = load_config(write_config(folder, sections))
        view = DataView(config.database_path)
        bot = BotProcess(fake, folder)
        users = Users(fake, view, rng, [fake.add_user(f"member{i}") for i in range(args.users)])
        started = time.monotonic()
        for index in range(args.rounds):
            await bot.start()
            _arm_round(fake, faults, rng, kinds)
            await users.act(lambda i=index: f"a castle, round {i}", lambda: rng.randint(2, 8))
            _expire_some(users, faults, rng)
            point = KILL_POINTS[index % len(KILL_POINTS)]
            # A claim left by an earlier kill never completes; only new ones are in flight.
            stale = view.claimed()
            reached = await _aim(point, view, rng, stale)
            states = view.states()
            in_flight["queued"] += states["queued"]
            in_flight["running"] += states["running"]
            in_flight["result being delivered"] += len(view.claimed() - stale)
            children = await bot.kill()
            kills[point if reached else f"{point} (not reached; killed anyway)"] += 1
            alive = await processes_gone(children)
            if alive:
                problems.append(f"round {index}: worker pids {alive} outlived the SIGKILLed bot")
            print(
                f"  kill round {index + 1}/{args.rounds}: at {point!r}"
                f"{'' if reached else ' (not reached)'}; jobs {dict(states)}",
                flush=True,
            )
        kill_s = time.monotonic() - started

        # Recovery: no more faults; everything left must finish and be delivered once.
        faults.disarm()
        await bot.start()
        settled = await wait_settled(view, timeout_s=args.settle_s)
        answered, how = await _fresh_imagine(fake, "newcomer", timeout_s=args.settle_s)
        await wait_settled(view, timeout_s=60)
        code = await bot.stop()
        audit = await audit_data_dir(config)
        audit.check_messages(fake)
        problems += audit.problems()
        if not answered:
            problems.append(f"the bot did not answer a fresh /imagine after recovery: {how}")
        unacked = sum(1 for i in fake.interactions if (404, 10062) in i.errors)
        totals = faults.totals()
        totals.update({f"SIGKILL at {k}": n for k, n in kills.items()})
        notes = [
            ("bot starts", bot.starts),
            ("jobs by kind", _kinds(view)),
            ("in flight at the kills", dict(in_flight)),
            ("kill rounds took", f"{kill_s:.0f} s"),
            ("settled after recovery", settled),
            ("fresh /imagine answered", how),
            ("interactions refused as unknown (10062, acked too late)", unacked),
            ("requests cut short by a kill (dropped)", sum(r.dropped for r in fake.requests)),
            ("exit code on SIGTERM", code),
            ("bot log", bot.log_path),
        ]
    finally:
        if bot is not None and bot.process is not None and bot.process.returncode is None:
            await bot.kill()
        harness = await _stop_fake(fake)
    return PhaseResult("kill", audit, totals, users.actions, notes, problems, harness)


async def _aim(point: str, view: DataView, rng: random.Random, stale: set[int]) -> bool:
    """Wait for the moment to kill at; False if it never came (the kill happens anyway)."""
    if point == "queued":
        return view.states()["queued"] > 0 or view.active() > 0
    if point == "running":
        if not await wait_until(lambda: view.states()["running"] > 0, 120, 0.02):
            return False
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        return True
    if point == "delivering":
        return await wait_until(lambda: bool(view.claimed() - stale), 120, 0.003)
    # random: any moment once the worker is up (loading the models takes most of a round).
    started = await wait_until(lambda: view.states()["running"] > 0 or not view.active(), 120)
    await asyncio.sleep(rng.uniform(0.0, 8.0))
    return started


async def _stop_fake(fake: FakeDiscord) -> list[str]:
    await fake.stop()
    return [f"the fake Discord recorded: {error}" for error in fake.errors[:5]]


# ----- phase 2: engine faults (bot in this process, fake engine in its worker process) ---------


async def engine_phase(args: argparse.Namespace, root: Path, rng: random.Random) -> PhaseResult:
    from bot.discord.client import ImagineBot

    faults = FaultLog()
    problems: list[str] = []
    kinds = [k for k in DISCORD_FAULTS if k in args.discord_faults]
    folder = root / "engine"
    fake = FakeDiscord()
    await fake.start()
    try:
        sections = merge(
            tiny_config_sections(fake.guild_id, folder / "models", job_timeout_s=3.0),
            {"scheduler": {"cancel_grace_s": 2.0, "worker_startup_timeout_s": 60.0}},
        )
        config = load_config(write_config(folder, sections))
        extra = {"fake_step_s": "0.05", "fake_marker_dir": str(folder / "markers")}
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, extra=extra))
        view = DataView(config.database_path)
        bot = ImagineBot(config, core_options={"engine_factory": FACTORY}, guild_ready_timeout=0.05)
        users = Users(fake, view, rng, [fake.add_user(f"member{i}") for i in range(args.users)])
        # Every marker in each cycle of the schedule, in a shuffled order.
        schedule: list[str] = []

        def prompt() -> str:
            if not schedule:
                schedule.extend(m for m, weight in ENGINE_WEIGHTS.items() for _ in range(weight))
                rng.shuffle(schedule)
            return f"a red fox {schedule.pop()}".strip()

        started = time.monotonic()
        async with fake.run_bot(bot, timeout=60):
            for index in range(args.engine_rounds):
                _arm_round(fake, faults, rng, kinds)
                await users.act(prompt, lambda: rng.randint(3, 6))
                _expire_some(users, faults, rng)
                await wait_until(lambda: view.active() == 0, 120, 0.1)
                print(
                    f"  engine round {index + 1}/{args.engine_rounds}: jobs {dict(view.states())}",
                    flush=True,
                )
            faults.disarm()
            settled = await wait_settled(view, timeout_s=args.settle_s)
            answered, how = await _fresh_imagine(fake, "newcomer", timeout_s=60)
            await wait_settled(view, timeout_s=30)
        engine_s = time.monotonic() - started
        audit = await audit_data_dir(config)
        audit.check_messages(fake)
        problems += audit.problems()
        if not answered:
            problems.append(f"the bot did not answer a fresh /imagine: {how}")
        outcomes, fired = _marker_outcomes(view)
        totals = faults.totals()
        totals.update(fired)
        unacked = sum(1 for i in fake.interactions if (404, 10062) in i.errors)
        notes: list[tuple[str, Any]] = [
            (f"outcome: {ENGINE_MARKERS[m]}", ", ".join(f"{k} {n}" for k, n in c.items()))
            for m, c in outcomes.items()
        ]
        notes += [
            ("jobs by kind", _kinds(view)),
            ("phase took", f"{engine_s:.0f} s"),
            ("settled without a restart", settled),
            ("fresh /imagine answered", how),
            ("interactions refused as unknown (10062, acked too late)", unacked),
        ]
    finally:
        harness = await _stop_fake(fake)
    return PhaseResult("engine", audit, totals, users.actions, notes, problems, harness)


def _marker_outcomes(
    view: DataView,
) -> tuple[dict[str, collections.Counter[str]], collections.Counter[str]]:
    """Final state (and error) of jobs per engine marker, and how often each fault fired."""
    outcomes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    fired: collections.Counter[str] = collections.Counter()
    rows = view.query("SELECT request, state, attempts, error FROM jobs")
    for request, state, attempts, error in rows:
        prompt = json.loads(request).get("prompt", "")
        marker = next((m for m in ENGINE_MARKERS if m and m in prompt), "")
        label = state if not error else f"{state} ({_short(error)})"
        outcomes[marker][label] += 1
        if marker:
            # The crash markers fire on every run of the job, crash-once on the first run of
            # the phase only; the others end the job at once.
            if marker in ("[crash]", "[sigkill]"):
                fired[f"engine: {ENGINE_MARKERS[marker]}"] += int(attempts)
            else:
                hit = marker != "[crash-once]" or int(attempts) > 1
                fired[f"engine: {ENGINE_MARKERS[marker]}"] += int(hit)
    return dict(sorted(outcomes.items())), fired


def _short(error: str) -> str:
    return error if len(error) <= 60 else error[:57] + "..."


# ----- phase 3: a Ray cluster that loses its GPU node and its head ------------------------------


async def ray_phase(args: argparse.Namespace, root: Path, rng: random.Random) -> PhaseResult:
    from bot.discord.client import ImagineBot
    from tests.core.ray_processes import FAKE_GPU, Head, SupervisedNode
    from tests.core.ray_temp import private_ray_temp

    faults = FaultLog()
    problems: list[str] = []
    kinds = [k for k in DISCORD_FAULTS if k in args.discord_faults]
    folder = root / "ray"
    with private_ray_temp() as temp_dir:
        head = Head(temp_dir)
        node = SupervisedNode(head, temp_dir.parent / "n")
        fake = FakeDiscord()
        await fake.start()
        try:
            head.start()
            node.start()
            sections = merge(
                tiny_config_sections(fake.guild_id, folder / "models", job_timeout_s=60.0),
                {
                    # A job may be cut short by two faults in a row (a node and then a head).
                    "scheduler": {"max_attempts": 3, "worker_startup_timeout_s": 120.0},
                    "workers": {
                        "backend": "ray",
                        "ray_address": head.address,
                        "ray_gpu_resource": FAKE_GPU,
                        "ray_watch_interval_s": 0.5,
                        "ray_outage_grace_s": 2.0,
                    },
                },
            )
            config = load_config(write_config(folder, sections))
            extra = {"fake_step_s": "0.1", "fake_marker_dir": str(folder / "markers")}
            engine = dataclasses.replace(config.engine, extra=extra)
            config = dataclasses.replace(config, engine=engine)
            view = DataView(config.database_path)
            bot = ImagineBot(
                config, core_options={"engine_factory": FACTORY}, guild_ready_timeout=0.05
            )
            users = Users(fake, view, rng, [fake.add_user(f"member{i}") for i in range(args.users)])
            broken: collections.Counter[str] = collections.Counter()
            started = time.monotonic()
            async with fake.run_bot(bot, timeout=60):
                for index in range(args.ray_rounds):
                    _arm_round(fake, faults, rng, kinds)
                    await users.act(lambda i=index: f"a harbour, round {i}", lambda: 20)
                    _expire_some(users, faults, rng)
                    running = await wait_until(lambda: view.states()["running"] > 0, 180, 0.05)
                    await asyncio.sleep(rng.uniform(0.0, 1.0))
                    if index % 2 == 0:
                        what = "SIGKILL the GPU node's process group"
                        await asyncio.to_thread(node.kill_node)
                    else:
                        what = "kill the head, start it again on its port"
                        await asyncio.to_thread(head.kill)
                        await asyncio.to_thread(head.start)
                    broken[what if running else f"{what} (no job was running)"] += 1
                    await wait_until(lambda: view.active() == 0, 240, 0.2)
                    print(
                        f"  ray round {index + 1}/{args.ray_rounds}: {what}; jobs "
                        f"{dict(view.states())}; node started {node.starts} time(s)",
                        flush=True,
                    )
                faults.disarm()
                settled = await wait_settled(view, timeout_s=args.settle_s)
                answered, how = await _fresh_imagine(fake, "newcomer", timeout_s=180)
                await wait_settled(view, timeout_s=60)
            ray_s = time.monotonic() - started
            audit = await audit_data_dir(config)
            audit.check_messages(fake)
            problems += audit.problems()
            if not answered:
                problems.append(f"the bot did not answer a fresh /imagine: {how}")
            totals = faults.totals()
            totals.update(broken)
            attempts = view.query("SELECT attempts, COUNT(*) FROM jobs GROUP BY 1 ORDER BY 1")
            notes: list[tuple[str, Any]] = [
                ("jobs by kind", _kinds(view)),
                ("jobs by attempts", ", ".join(f"{a}: {n}" for a, n in attempts)),
                ("GPU node started (by its supervisor)", f"{node.starts} time(s)"),
                ("phase took", f"{ray_s:.0f} s"),
                ("settled", settled),
                ("fresh /imagine answered", how),
            ]
        finally:
            harness = await _stop_fake(fake)
            await asyncio.to_thread(node.stop)
            await asyncio.to_thread(head.kill)
    return PhaseResult("ray", audit, totals, users.actions, notes, problems, harness)


# ----- main ------------------------------------------------------------------------------------


def _print_phase(result: PhaseResult) -> None:
    hit = sorted((kind, n) for kind, n in result.faults.items() if n)
    missed = sorted(kind for kind, n in result.faults.items() if not n)
    if missed:
        hit.append(("(armed, never matched)", "; ".join(missed)))
    # Discord faults count injected responses: "3 in a row" is one fault of 3 responses.
    print_table(f"{result.name}: faults injected (by kind)", hit or [("-", 0)])
    print_table(f"{result.name}: user actions", sorted(result.actions.items()))
    if result.audit is not None:
        print_table(f"{result.name}: final state", result.audit.rows())
        errors = sorted(result.audit.errors.items(), key=lambda kv: -kv[1])
        print_table(f"{result.name}: errors of failed/cancelled/refused jobs", errors or [("-", 0)])
    print_table(f"{result.name}: notes", result.notes)
    print(f"\n{result.name}: invariants {_verdict(result)}")
    for problem in result.problems:
        print(f"  - {problem}")
    for problem in result.harness:
        print(f"  - harness: {problem}")


def _verdict(result: PhaseResult) -> str:
    if result.problems:
        return "FAILED"
    return "INCONCLUSIVE (the fake Discord failed)" if result.harness else "OK"


async def main_async(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fault-injection-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        if args.rounds:
            print(f"phase 1 (SIGKILL, tiny model, bot in its own process): {args.rounds} rounds")
            results.append(await kill_phase(args, root, rng))
        if args.engine_rounds:
            print(f"phase 2 (engine faults, fake engine): {args.engine_rounds} rounds")
            results.append(await engine_phase(args, root, rng))
        if args.ray_rounds:
            print(f"phase 3 (Ray: GPU node and head killed, fake engine): {args.ray_rounds} rounds")
            results.append(await ray_phase(args, root, rng))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    for result in results:
        _print_phase(result)
    failed = [r.name for r in results if r.problems]
    inconclusive = [r.name for r in results if r.harness and not r.problems]
    print(f"\ncommand: python -m bench.fault_injection {' '.join(sys.argv[1:])}".rstrip())
    if failed:
        print(f"result: FAILED ({', '.join(failed)})")
    elif inconclusive:
        print(f"result: INCONCLUSIVE (harness faults in {', '.join(inconclusive)})")
    else:
        print("result: OK")
    return 1 if failed or inconclusive else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fault_injection", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=6, help="SIGKILL rounds (phase 1)")
    parser.add_argument(
        "--engine-rounds", type=int, default=None, help="engine-fault rounds (default: --rounds)"
    )
    parser.add_argument("--ray-rounds", type=int, default=0, help="Ray rounds (phase 3; needs Ray)")
    parser.add_argument("--users", type=int, default=4, help="members acting each round")
    parser.add_argument("--seed", type=int, default=1, help="random seed (faults, timing)")
    parser.add_argument(
        "--discord-faults",
        nargs="*",
        default=list(DISCORD_FAULTS),
        metavar="KIND",
        help="Discord fault kinds to arm (default: all)",
    )
    parser.add_argument("--settle-s", type=float, default=300.0, help="recovery time limit")
    parser.add_argument("--cache-dir", type=Path, help="tiny model cache to reuse")
    parser.add_argument("--keep", help="keep data folders and logs in this folder")
    args = parser.parse_args()
    if args.engine_rounds is None:
        args.engine_rounds = args.rounds
    unknown = set(args.discord_faults) - set(DISCORD_FAULTS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {list(DISCORD_FAULTS)}")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
