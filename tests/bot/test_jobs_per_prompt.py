"""Several jobs from one /imagine: the configured maximum, and the app's all-or-nothing submit."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path
from typing import Any

import pytest

from bot.app.actions import Actor, UserError
from bot.app.application import ImagineApp, open_core
from bot.config import Config, ConfigError, load_config, parse_config
from bot.console.shell import run_shell
from bot.core import InProcessWorker, JobState
from tests.bot.test_bad_input import ALLOWANCE, _available, _config
from tests.core.fakes import create_fake_engine

REPO = Path(__file__).resolve().parents[2]
ALICE = Actor(user_id=11, guild_id=1, channel_id=2)


def test_max_jobs_per_prompt_is_read_and_checked() -> None:
    assert load_config(REPO / "config.toml").scheduler.max_jobs_per_prompt == 40
    assert parse_config({}).scheduler.max_jobs_per_prompt == 40
    assert (
        parse_config({"scheduler": {"max_jobs_per_prompt": 1}}).scheduler.max_jobs_per_prompt == 1
    )
    for bad in (0, 41, -3, "8", True):
        with pytest.raises(ConfigError, match=r"scheduler\.max_jobs_per_prompt"):
            parse_config({"scheduler": {"max_jobs_per_prompt": bad}})


def _app_config(tmp_path: Path, **scheduler: Any) -> Config:
    config = _config(tmp_path)
    return dataclasses.replace(
        config,
        scheduler=dataclasses.replace(config.scheduler, **scheduler),
        discord=dataclasses.replace(config.discord, command_cooldown_s=3.0),
    )


@pytest.fixture
def now() -> list[float]:
    return [100.0]


async def _open_app(config: Config, now: list[float]) -> ImagineApp:
    worker = InProcessWorker(config.engine, config.data_dir, create_fake_engine)
    core = await open_core(config, lambda _c: False, workers=[worker])
    return ImagineApp(config, core, seed_source=lambda: 1234, monotonic=lambda: now[0])


async def test_a_permutation_prompt_queues_one_job_per_combination(
    tmp_path: Path, now: list[float]
) -> None:
    app = await _open_app(_app_config(tmp_path), now)
    try:
        batch = await app.imagine(ALICE, "a {red, blue} bird --ar {1:1, 2:3} --r 2")
        prompts = [
            (s.job.prompt, s.job.request_data["width"] < s.job.request_data["height"])
            for s in batch
        ]
        assert prompts == [
            ("a red bird", False),
            ("a red bird", False),
            ("a red bird", True),
            ("a red bird", True),
            ("a blue bird", False),
            ("a blue bird", False),
            ("a blue bird", True),
            ("a blue bird", True),
        ]
        # Repeats differ by seed; combinations share the first seed.
        assert [s.job.seed for s in batch[:2]] != [batch[0].job.seed] * 2
        assert batch[0].job.seed == batch[2].job.seed == 1234
        total = sum(s.job.cost for s in batch)
        ids = [s.job.id for s in batch]
        assert batch[0].notes[0] == (
            f"this prompt made 8 jobs (jobs {ids[0]}–{ids[-1]}), {total} credits in all; "
            "this is 1 of 8"
        )
        assert batch[5].notes[0] == f"job 6 of 8 from one prompt (the first is job {ids[0]})"
        assert any("--r 2 → 2 jobs" in note for note in batch[5].notes)
        assert await _available(app, ALICE) == ALLOWANCE - total
        for submitted in batch:
            async with app.core.scheduler.subscribe(submitted.job.id) as events:
                async for _event in events:
                    pass
        states = [(await app.core.jobs.require(job_id)).state for job_id in ids]
        assert states == [JobState.SUCCEEDED] * 8
        report = await app.core.credits.check_consistency()
        assert report.ok, str(report)
    finally:
        await app.core.close(drain_timeout_s=5.0)


async def test_a_refused_batch_charges_nothing_and_the_cooldown_counts_the_request_once(
    tmp_path: Path, now: list[float]
) -> None:
    app = await _open_app(_app_config(tmp_path, max_queued_per_user=3, max_jobs_per_prompt=6), now)
    try:
        with pytest.raises(UserError) as over_limit:
            await app.imagine(ALICE, "a {red, green, blue} bird --r 3")
        assert str(over_limit.value) == (
            "--r: this prompt makes 9 jobs (3 combinations × --r 3); at most 6 are allowed"
        )
        with pytest.raises(UserError) as over_queue:
            await app.imagine(ALICE, "a {red, green, blue, white} bird")
        assert str(over_queue.value) == "This prompt makes 4 jobs but you can queue 3 (limit 3)."
        assert await _available(app, ALICE) == ALLOWANCE
        assert await app.core.jobs.for_user(ALICE.user_id) == []

        # Refusals started no cooldown; three jobs from one command start it once.
        batch = await app.imagine(ALICE, "a {red, green, blue} bird")
        assert len(batch) == 3
        now[0] += 1.0
        with pytest.raises(UserError, match=r"try again in 2 s"):
            await app.imagine(ALICE, "a fox")
    finally:
        await app.core.close(drain_timeout_s=5.0)


async def test_every_combination_passes_the_prompt_filter(tmp_path: Path, now: list[float]) -> None:
    config = _app_config(tmp_path)
    config = dataclasses.replace(
        config, moderation=dataclasses.replace(config.moderation, banned_words=("gore",))
    )
    app = await _open_app(config, now)
    try:
        with pytest.raises(UserError) as refused:
            await app.imagine(ALICE, "a {calm, gore} meadow")
        assert "gore" in str(refused.value)
        assert [e.kind for e in await app.core.admin.audit(10)] == ["prompt_blocked"]
        assert await _available(app, ALICE) == ALLOWANCE
        assert await app.core.jobs.for_user(ALICE.user_id) == []
    finally:
        await app.core.close(drain_timeout_s=5.0)


async def test_the_console_queues_and_follows_every_job(tmp_path: Path) -> None:
    config = _app_config(tmp_path, max_queued_per_user=4)
    stdin = io.StringIO("/imagine a {red, blue} bird --r 2\n/imagine a {a, b, c, d, e} fox\n")
    out = io.StringIO()
    worker = InProcessWorker(config.engine, config.data_dir, create_fake_engine)
    code = await run_shell(config, stdin=stdin, out=out, core_options={"workers": [worker]})
    text = out.getvalue()
    assert code == 0
    assert text.count("⏳ Queued") == 4
    assert "this prompt made 4 jobs (jobs 1–4)" in text and "job 4 of 4 from one prompt" in text
    finished = re.findall(r"^\*\*Imagine — `(a \w+ bird)`\*\*\nseed (\d+)", text, re.MULTILINE)
    assert sorted(prompt for prompt, _seed in finished) == ["a blue bird"] * 2 + ["a red bird"] * 2
    assert len(set(finished)) == 4, "the repeats of one prompt have their own seeds"
    assert "✖ This prompt makes 5 jobs" in text
