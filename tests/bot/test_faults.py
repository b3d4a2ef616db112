"""Faults, CI-sized: the invariants of `bench/fault_injection.py` on one case of each kind.

1. `python -m bot` in its own process (tiny model) is SIGKILLed while a job runs, and started
   again: the job runs again and its grid is posted once.
2. The bot in this process with the fake engine in its worker process: a simulated CUDA
   out-of-memory error and a hang past `job_timeout_s` fail and refund their jobs, and a 5xx
   on a result upload is retried so the grid still arrives, once.

After each: every job terminal, the ledger consistent, credits in = credits out, every finished
job delivered, no result in more than one message, and a fresh /imagine still answered.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bench._common import (
    Audit,
    BotProcess,
    DataView,
    audit_data_dir,
    merge,
    processes_gone,
    tiny_config_sections,
    wait_settled,
    wait_until,
    write_config,
)
from bot.config import load_config
from bot.discord.client import ImagineBot
from tests.core.fakes import FACTORY
from tests.fakediscord import FakeDiscord, Message
from tests.fakediscord.interactions import FakeInteraction

JOB_TIMEOUT_S = 2.0


def is_grid(message: Message) -> bool:
    return bool(message.attachments) and any(b.get("label") == "U1" for b in message.buttons)


def assert_invariants(audit: Audit, fake: FakeDiscord) -> None:
    audit.check_messages(fake)
    assert audit.problems() == [], "\n".join(audit.problems())
    assert audit.report.credits_held == 0


async def answers_imagine(fake: FakeDiscord, timeout_s: float) -> Message:
    newcomer = fake.add_user("newcomer")
    job = await fake.slash(newcomer, "imagine", prompt="a lighthouse at dusk", steps=2)
    assert await job.wait_acked(timeout=10) == 5
    return await job.wait_original(is_grid, timeout=timeout_s)


async def test_sigkill_during_a_running_job_then_restart(
    tmp_path: Path, bot_engine_settings: Any
) -> None:
    async with FakeDiscord(redirect=False) as fake:
        alice = fake.add_user("alice")
        sections = tiny_config_sections(
            fake.guild_id, bot_engine_settings.cache_dir, candidates=2, kept=2
        )
        config = load_config(write_config(tmp_path, sections))
        view = DataView(config.database_path)
        bot = BotProcess(fake, tmp_path)
        try:
            await bot.start()
            job = await fake.slash(alice, "imagine", prompt="a castle", steps=6)
            assert await job.wait_acked(timeout=10) == 5
            assert await wait_until(lambda: view.states()["running"] == 1, 90, 0.02)
            workers = await bot.kill()
            assert workers, "the bot had a worker process"
            assert await processes_gone(workers) == [], "the worker outlived its bot"
            assert view.query("SELECT state, attempts FROM jobs") == [("running", 1)]

            await bot.start()
            assert await wait_settled(view, timeout_s=120), bot.log_tail()
            assert view.query("SELECT state, attempts FROM jobs") == [("succeeded", 2)]
            await answers_imagine(fake, timeout_s=90)
            assert await wait_settled(view, timeout_s=30)
        finally:
            await bot.stop()
        audit = await audit_data_dir(config)
        assert_invariants(audit, fake)
        assert audit.result_messages == {1: 1, 2: 1}
        # The first start's interaction can't be used after the restart: its message is edited
        # with the bot token from "Queued" to the result, and a new message pings the owner.
        grid = await job.wait_original(is_grid)
        assert grid.state.via == "bot" and not any("imagine:X:" in c for c in grid.custom_ids)
        ping = await fake.wait_for_message(lambda m: m.referenced is grid)
        assert ping.pings.users == {alice.id}


async def test_engine_faults_and_a_5xx_on_an_upload(tmp_path: Path) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        sections = merge(
            tiny_config_sections(fake.guild_id, tmp_path / "models", job_timeout_s=JOB_TIMEOUT_S),
            {"scheduler": {"worker_startup_timeout_s": 60.0}},
        )
        config = load_config(write_config(tmp_path, sections))
        extra = {"fake_step_s": "0.02"}
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, extra=extra))
        bot = ImagineBot(config, core_options={"engine_factory": FACTORY}, guild_ready_timeout=0.05)
        async with fake.run_bot(bot, timeout=30):
            before = (await bot.core.credits.balance(alice.id)).available

            async def imagine(prompt: str) -> FakeInteraction:
                job = await fake.slash(alice, "imagine", prompt=prompt)
                assert await job.wait_acked(timeout=10) == 5
                return job

            oom = await imagine("a red fox [oom]")
            failed = await oom.wait_original(lambda m: "ran out of memory" in m.content, 30)
            assert not failed.attachments

            hang = await imagine("a red fox [hang]")
            timed_out = await hang.wait_original(lambda m: "timed out" in m.content, 30)
            assert not timed_out.attachments

            # Discord answers the result upload with a 503 once; discord.py retries it.
            fault = fake.fail_next(
                "PATCH", "/webhooks/*/messages/@original", status=503, with_files=True
            )
            ok = await imagine("a red fox")
            await ok.wait_original(is_grid, timeout=30)
            assert fault.hits == 1

            await answers_imagine(fake, timeout_s=30)
            view = DataView(config.database_path)
            assert await wait_settled(view, timeout_s=30)
            # Both failures were refunded: only the good job cost anything.
            spent = sum(j.cost for j in await bot.core.jobs.for_user(alice.id) if j.result)
            assert (await bot.core.credits.balance(alice.id)).available == before - spent
        audit = await audit_data_dir(config)
        assert_invariants(audit, fake)
        assert audit.jobs_by_state == {"failed": 2, "succeeded": 2}
        assert sorted(audit.result_messages.values()) == [1, 1]
