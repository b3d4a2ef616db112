"""Relax, Fast and Turbo in the application both front ends share: the mode a job runs in,
what the reply says (mode, cost, expected wait), /relax-server's rights, /help, and the console's
/relax, /balance and --relax."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from pathlib import Path

import pytest

from bot.app import render
from bot.app.actions import Action, Actor, UserError
from bot.app.application import ImagineApp, open_core
from bot.app.modes import speed_mode, wait_words
from bot.config import Config, ModesConfig
from bot.console.shell import run_shell
from bot.core import InProcessWorker, Mode
from tests.bot.test_bad_input import ALLOWANCE, _config
from tests.core.conftest import finished
from tests.core.fakes import create_fake_engine

ALICE = Actor(user_id=11, guild_id=1, channel_id=2)
BOB = Actor(user_id=12, guild_id=1, channel_id=2)
ADMIN = Actor(user_id=13, guild_id=1, channel_id=2, is_admin=True)


class HeldWorker(InProcessWorker):
    """A real worker that becomes ready only when the test says, so jobs wait in the queue."""

    def __init__(self, config: Config, gate: asyncio.Event) -> None:
        super().__init__(config.engine, config.data_dir, create_fake_engine)
        self.gate = gate

    async def start(self) -> None:
        await self.gate.wait()
        await super().start()


async def _app(config: Config, gate: asyncio.Event | None = None) -> ImagineApp:
    if gate is None:
        worker = InProcessWorker(config.engine, config.data_dir, create_fake_engine)
    else:
        worker = HeldWorker(config, gate)
    core = await open_core(config, lambda _c: False, workers=[worker])
    return ImagineApp(config, core, seed_source=lambda: 1234)


def _with_modes(tmp_path: Path, **modes: object) -> Config:
    return dataclasses.replace(_config(tmp_path), modes=ModesConfig(**modes))  # type: ignore[arg-type]


async def test_the_reply_says_the_mode_its_cost_and_the_expected_wait(tmp_path: Path) -> None:
    gate = asyncio.Event()
    app = await _app(_with_modes(tmp_path, wait_estimate_run_s=90.0), gate)
    try:
        fast = await app.imagine(BOB, "a fox")
        (relax,) = await app.imagine(ALICE, "a fox --relax")
        (turbo,) = await app.imagine(ALICE, "an owl --turbo")
        assert relax.job.mode is Mode.RELAX and relax.job.cost == 0
        assert turbo.job.mode is Mode.TURBO and turbo.job.cost == 2 * fast[0].job.cost
        assert "⚡ Fast mode: expected to start within a minute" in fast[0].notes
        # Behind the fast job when it was queued: one 90 s run.
        assert (
            "🐢 Relax mode (free): expected to start in about 2 min, later if fast jobs arrive"
            in (relax.notes)
        )
        assert any(n.startswith("🚀 Turbo mode (200 % of the fast cost") for n in turbo.notes)
        shown = render.queued_text(relax.job, relax.position, relax.notes)
        assert "🐢 Relax mode (free)" in shown
        # The turbo job went ahead of both; the relax one is last.
        assert app.core.scheduler.queue_position(turbo.job.id) == 1
        assert app.core.scheduler.queue_position(relax.job.id) == 3
        gate.set()
        for submitted in (*fast, relax, turbo):
            await _finished(app, submitted.job.id)
    finally:
        await app.core.close(drain_timeout_s=5.0)


async def _finished(app: ImagineApp, job_id: int) -> None:
    await finished(app.core, job_id)


async def test_the_members_mode_applies_to_buttons_and_a_flag_wins_for_one_job(
    tmp_path: Path,
) -> None:
    app = await _app(_with_modes(tmp_path, relax_max_queued_per_user=5))
    try:
        text = await app.modes.choose(ALICE, Mode.RELAX)
        assert "Relax mode on" in text and "0 of 30 relax jobs used" in text
        (plain,) = await app.imagine(ALICE, "a fox")
        assert plain.job.mode is Mode.RELAX
        (flagged,) = await app.imagine(ALICE, "a fox --fast")
        assert flagged.job.mode is Mode.FAST and flagged.job.cost > 0
        await _finished(app, plain.job.id)
        # A button under a relax member's image queues in relax too.
        reroll = await app.press(ALICE, plain.job.id, Action.REROLL)
        assert reroll.job.mode is Mode.RELAX
        assert any(note.startswith("🐢 Relax mode (free)") for note in reroll.notes)
        await _finished(app, reroll.job.id)
        assert (await app.core.credits.balance(ALICE.user_id)).available == (
            ALLOWANCE - flagged.job.cost
        )
    finally:
        await app.core.close(drain_timeout_s=5.0)


async def test_relax_refusals_are_specific_and_charge_nothing(tmp_path: Path) -> None:
    app = await _app(_with_modes(tmp_path))
    try:
        with pytest.raises(UserError, match="one speed mode per prompt"):
            await app.imagine(ALICE, "a {fox --relax, owl --fast}")
        with pytest.raises(UserError, match="choose one speed mode"):
            await app.imagine(ALICE, "a fox --relax --turbo")
        with pytest.raises(UserError, match="Only this server's managers"):
            await app.modes.set_server_relax(ALICE, False)
        with pytest.raises(UserError, match="per server"):
            await app.modes.set_server_relax(Actor(user_id=13, is_admin=True), False)
        assert "off in this server" in await app.modes.set_server_relax(ADMIN, False)
        with pytest.raises(UserError, match="switched off in this server"):
            await app.modes.choose(ALICE, Mode.RELAX)
        with pytest.raises(UserError, match="switched off in this server"):
            await app.imagine(ALICE, "a fox --relax")
        assert await app.core.jobs.for_user(ALICE.user_id) == []
        assert (await app.core.credits.balance(ALICE.user_id)).available == ALLOWANCE
        lines = await app.modes.balance_lines(ALICE)
        assert "relax is switched off here" in lines[1]
    finally:
        await app.core.close(drain_timeout_s=5.0)


def test_help_names_the_modes_and_their_costs(tmp_path: Path) -> None:
    config = _with_modes(tmp_path, relax_cost_percent=25, turbo_cost_percent=300)
    text = render.help_text(config)
    assert "`/fast`, `/relax`, `/turbo`" in text
    assert "Relax: 25 % of the fast cost, rounded down" in text
    assert "Turbo: 300 % of the fast cost, rounded up" in text
    assert "(a Remix prompt too)" in text and "a job free in fast mode runs as fast" in text
    assert "`--relax` relax mode" in text  # the honoured flags list
    assert "Relax: free" in render.help_text(_with_modes(tmp_path))


def test_small_words() -> None:
    assert speed_mode([None, None]) is None
    assert speed_mode(["relax", None, "relax"]) is Mode.RELAX
    assert [wait_words(s) for s in (0, 59, 60, 61, 3599, 3600, 7201)] == [
        "within a minute",
        "within a minute",
        "in about 1 min",
        "in about 2 min",
        "in about 60 min",
        "in about 1 h",
        "in about 3 h",
    ]


async def test_the_console_has_the_same_commands(tmp_path: Path) -> None:
    config = _with_modes(tmp_path)
    worker = InProcessWorker(config.engine, config.data_dir, create_fake_engine)
    stdin = io.StringIO("/relax\n/imagine a red fox\n/imagine a blue fox --fast\n/balance\n")
    out = io.StringIO()
    code = await run_shell(config, stdin=stdin, out=out, core_options={"workers": [worker]})
    text = out.getvalue()
    assert code == 0, text
    assert "Relax mode on" in text
    assert "🐢 Relax mode (free)" in text and "⚡ Fast mode" in text
    assert "Mode: 🐢 relax" in text and "1 of 30 relax jobs used today" in text
    assert text.count("✖") == 0
