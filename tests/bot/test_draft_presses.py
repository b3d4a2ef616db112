"""The buttons under a draft (--draft) that a member may press, through the app (no Discord):
a real core, real SQLite and the tiny engine. A draft of a job with very few steps still
varies (V1–V4, 🔄), and an upscale of it is refused for being a draft, not with the request's
own validation message."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.app.actions import Action, Actor, UserError
from bot.app.application import ImagineApp
from bot.config import Config, parse_config
from bot.core import Job, JobKind, JobState
from bot.core.credits import job_cost, mode_cost
from generation.settings import EngineSettings
from tests.bot.helpers import app_over

ALICE = Actor(user_id=31, guild_id=1, channel_id=2)


@pytest.fixture(scope="module")
def engine_settings(tiny_models: Path) -> EngineSettings:
    from generation.tiny import tiny_engine_settings

    return tiny_engine_settings(
        tiny_models,  # the run's tiny models, built once
        64,
        default_steps=4,
        num_candidates=2,
        num_kept=2,
        preview_interval_s=0.0,
    )


@pytest.fixture(scope="module")
def engine(engine_settings: EngineSettings) -> Any:
    from generation.engine import create_engine

    return create_engine(engine_settings)


def _config(tmp_path: Path, engine: EngineSettings) -> Config:
    config = parse_config(
        {
            "credits": {"daily_allowance": 100_000, "cost_imagine": 1000},
            "discord": {"command_cooldown_s": 0.0},
            "scheduler": {"max_queued_per_user": 10},
        }
    )
    return dataclasses.replace(config, data_dir=tmp_path / "data", engine=engine)


@pytest.fixture
async def app(
    tmp_path: Path, engine_settings: EngineSettings, engine: Any
) -> AsyncIterator[ImagineApp]:
    async with app_over(_config(tmp_path, engine_settings), engine) as opened:
        yield opened


async def _finished(app: ImagineApp, job_id: int) -> Job:
    async with app.core.scheduler.subscribe(job_id) as events:
        async for _event in events:
            pass
    job = await app.core.jobs.require(job_id)
    assert job.state is JobState.SUCCEEDED, job.error
    return job


async def _draft(app: ImagineApp, prompt: str) -> Job:
    (submitted,) = await app.imagine(ALICE, prompt)
    return await _finished(app, submitted.job.id)


@pytest.mark.parametrize("action", [Action.VARY, Action.VARY_STRONG, Action.VARY_SUBTLE])
async def test_a_draft_of_a_few_steps_still_varies_as_a_draft(
    app: ImagineApp, action: Action
) -> None:
    # Three steps: fewer than a variation's weakest strength needs (1 / 0.3 → 4), which the
    # variation raises; the draft's full render must be raised with it, or the request is
    # invalid (a draft running more steps than its full render) and the member is refused.
    draft = await _draft(app, "a red barn --steps 3 --draft")
    varied = (await app.press(ALICE, draft.id, action, 1)).job
    assert varied.kind is JobKind.VARIATION
    request = await app.core.jobs.request(varied)
    assert request.draft is not None and request.steps <= request.draft.steps
    assert varied.cost == job_cost(request, app.config.credits)
    await _finished(app, varied.id)


async def test_an_upscale_of_a_few_step_draft_is_refused_for_being_a_draft(
    app: ImagineApp,
) -> None:
    draft = await _draft(app, "a red barn --steps 3 --draft")
    before = (await app.core.credits.balance(ALICE.user_id)).available
    with pytest.raises(UserError, match="Enhance"):
        await app.press(ALICE, draft.id, Action.UPSCALE, 1)
    assert (await app.core.credits.balance(ALICE.user_id)).available == before


@pytest.mark.parametrize("speed", ["--turbo", "--relax", "--fast"])
async def test_a_drafts_reply_compares_prices_in_the_mode_it_runs_in(
    app: ImagineApp, speed: str
) -> None:
    # The draft's price is the mode's share of the draft's fast price; the full render it is
    # compared with must be priced in the same mode, or a turbo member is told a full render
    # costs half what it would, and a free relax draft is set beside a fast price.
    (submitted,) = await app.imagine(ALICE, f"a red barn --draft {speed}")
    job = submitted.job
    request = await app.core.jobs.request(job)
    assert request.draft is not None
    full = dataclasses.replace(
        request, steps=request.draft.steps, sampler=request.draft.sampler, draft=None
    )
    full_cost = mode_cost(job_cost(full, app.config.credits), job.mode, app.config.modes)
    assert job.cost == mode_cost(job_cost(request, app.config.credits), job.mode, app.config.modes)
    words = "credit" if full_cost == 1 else "credits"
    (note,) = [n for n in submitted.notes if "Draft:" in n]
    assert f"instead of {full_cost} {words} at full quality" in note, note
    await _finished(app, job.id)


async def test_a_draft_of_a_sampler_that_adds_noise_is_refused_free_also_in_remix(
    app: ImagineApp,
) -> None:
    before = (await app.core.credits.balance(ALICE.user_id)).available
    with pytest.raises(UserError, match="euler_a adds fresh noise"):
        await app.imagine(ALICE, "a red barn --draft --sampler euler_a")
    (submitted,) = await app.imagine(ALICE, "a red barn --sampler euler_a")
    grid = await _finished(app, submitted.job.id)
    charged = (await app.core.credits.balance(ALICE.user_id)).available
    assert charged == before - grid.cost
    # 🔄 Remix and V Remix keep the job's sampler; --draft typed there is refused the same way.
    for action, index in ((Action.REROLL, 0), (Action.VARY_STRONG, 1)):
        with pytest.raises(UserError, match="euler_a adds fresh noise"):
            await app.press(ALICE, grid.id, action, index, prompt="a red barn --draft")
    assert (await app.core.credits.balance(ALICE.user_id)).available == charged
