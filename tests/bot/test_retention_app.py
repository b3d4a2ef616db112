"""A job erased by the retention policy answers its buttons with "expired", like one whose images
went, instead of failing on its missing request."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.app.actions import Action, Actor, UserError
from bot.app.application import ImagineApp, open_core
from bot.config import StorageConfig
from bot.core import InProcessWorker, JobState, ManualClock
from bot.core.models import EXPIRED_MESSAGE
from tests.bot.test_bad_input import _config
from tests.core.fakes import create_fake_engine


async def test_buttons_of_an_erased_job_say_it_expired(tmp_path: Path) -> None:
    clock = ManualClock(datetime(2025, 3, 1, 12, 0, tzinfo=UTC))
    config = dataclasses.replace(
        _config(tmp_path), storage=StorageConfig(image_retention_days=0, job_retention_days=30)
    )
    worker = InProcessWorker(config.engine, config.data_dir, create_fake_engine)
    core = await open_core(config, lambda _c: False, workers=[worker], clock=clock)
    try:
        app = ImagineApp(config, core, seed_source=lambda: 1234)
        alice = Actor(user_id=11, guild_id=1, channel_id=2)
        (submitted,) = await app.imagine(alice, "a lighthouse")
        job_id = submitted.job.id
        for _ in range(200):
            if (await core.jobs.require(job_id)).state is JobState.SUCCEEDED:
                break
            await asyncio.sleep(0.05)
        clock.advance(days=31)
        assert core.retention is not None
        assert (await core.retention.prune()).jobs == (job_id,)
        for press in (
            app.press(alice, job_id, Action.VARY, 1),
            app.press(alice, job_id, Action.REROLL),
            app.separate(alice, job_id, 1),
            app.job(alice, job_id),
        ):
            with pytest.raises(UserError, match=EXPIRED_MESSAGE.split(":")[0]):
                await press
    finally:
        await core.close(drain_timeout_s=5.0)
