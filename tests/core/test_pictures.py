"""Jobs made from members' pictures through the core and the real engine (tiny models, CPU):
a /describe answers in words (no images) in the worker process and in the bot's process, is
charged cost_describe and keeps its suggestions in the finished job; a /blend without words
reaches the engine with its pictures and records them in the PNG metadata."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.config import Config
from bot.core import InProcessWorker, JobKind, JobState, Owner, ProcessWorker
from generation.contract import InputImage, InputRole
from generation.images import parse_a1111_parameters, read_parameters
from generation.requests import describe_request
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request

OWNER = Owner(user_id=7, guild_id=1, channel_id=2)
PICTURE = Image.new("RGB", (96, 64), (200, 120, 40))


def real_engine_config(tmp_path: Path) -> Config:
    config = make_config(tmp_path, credits={"daily_allowance": 20, "cost_describe": 2})
    return dataclasses.replace(
        config, engine=dataclasses.replace(config.engine, device="cpu", extra={})
    )


def picture(image: Image.Image = PICTURE, source: str = "attachment:photo.png") -> InputImage:
    return InputImage(InputRole.IMAGE_PROMPT, image, source=source, sha256="12" * 32)


def worker_for(kind: str, config: Config) -> Any:
    if kind == "process":
        return ProcessWorker(config.engine, config.data_dir, startup_timeout_s=300)
    return InProcessWorker(config.engine, config.data_dir)


@pytest.mark.parametrize("kind", ["in-process", "process"])
async def test_a_describe_answers_in_words(tmp_path: Path, kind: str) -> None:
    config = real_engine_config(tmp_path)
    core = await open_core(config, workers=[worker_for(kind, config)])
    try:
        job = await core.scheduler.submit(
            OWNER, describe_request(picture(), seed=9), JobKind.DESCRIBE
        )
        assert job.cost == 2
        done = await finished(core, job.id, timeout_s=300)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.result is not None
        assert done.result.image_paths == () and done.result.grid_path is None
        assert len(done.result.texts) == 4
        assert all(text.endswith(" --ar 3:2") for text in done.result.texts)
        # Read back from SQLite, as the bot does for buttons after a restart.
        stored = await core.jobs.require(job.id)
        assert stored.result is not None and stored.result.texts == done.result.texts
        balance = await core.credits.balance(OWNER.user_id)
        assert balance.allowance_left == 18
        await assert_consistent(core)
    finally:
        await core.close(5.0)


async def test_a_blend_without_words_reaches_the_engine(tmp_path: Path) -> None:
    config = real_engine_config(tmp_path)
    core = await open_core(config, workers=[worker_for("in-process", config)])
    try:
        blue = Image.new("RGB", (64, 64), (20, 40, 220))
        blend = request(
            "",
            steps=3,
            num_candidates=2,
            num_kept=2,
            inputs=(picture(), picture(blue, "https://cdn.discordapp.com/attachments/1/2/b.png")),
        )
        job = await core.scheduler.submit(OWNER, blend)
        done = await finished(core, job.id, timeout_s=300)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.result is not None and len(done.result.image_paths) == 2
        with Image.open(done.image_path(config.data_dir, 0)) as image:
            parameters = parse_a1111_parameters(read_parameters(image) or "")
        assert parameters["Prompt"] == ""
        assert parameters["Image prompt 1"].endswith("Source: attachment:photo.png")
        assert parameters["Image prompt 2"] == (
            f"Weight: 1, Hash: {'12' * 32}, "
            "Source: https://cdn.discordapp.com/attachments/1/2/b.png"
        )
        await assert_consistent(core)
    finally:
        await core.close(5.0)
