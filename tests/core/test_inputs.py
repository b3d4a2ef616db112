"""A member's own pictures (image prompts, references, masks, control images) are stored beside
their job as files, reach the worker, and leave with the job's images (real files, real SQLite)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from bot.core import JobState, ManualClock, Owner, Refused
from bot.core.execute import WorkItem, input_paths, load_request
from generation.contract import InputImage, InputRole
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)


def pictures() -> tuple[InputImage, InputImage]:
    photo = Image.new("RGB", (48, 32), (200, 30, 10))
    photo.putpixel((3, 4), (1, 2, 3))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    digest = hashlib.sha256(photo.tobytes()).hexdigest()
    return (
        InputImage(InputRole.IMAGE_PROMPT, photo, weight=1.5, source="photo.png", sha256=digest),
        InputImage(InputRole.MASK, mask, source="mask.png"),
    )


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and ImageChops.difference(a, b).getbbox() is None


async def test_pictures_reach_the_worker_and_read_back_unchanged(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = make_config(tmp_path)
    core = await open_core(config, clock)
    try:
        given = pictures()
        job = await core.scheduler.submit(ALICE, request(inputs=given))
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
        stored = (await core.jobs.require(job.id)).request_data
        paths = input_paths(stored)
        assert len(paths) == 2 and all((config.data_dir / p).is_file() for p in paths)

        item = WorkItem(job.id, 1, stored, None, f"images/{job.id}")
        for loaded in (await core.jobs.request(job.id), load_request(config.data_dir, item)):
            assert [i.role for i in loaded.inputs] == [InputRole.IMAGE_PROMPT, InputRole.MASK]
            assert loaded.inputs[0].weight == 1.5 and loaded.inputs[0].source == "photo.png"
            assert loaded.inputs[0].sha256 == given[0].sha256
            for back, original in zip(loaded.inputs, given, strict=True):
                assert same_pixels(back.image, original.image)
            assert loaded.inputs_for(InputRole.MASK)[0].image.mode == "L"

        clock.advance(days=40)
        assert core.retention is not None
        assert await core.retention.prune() == [job.id]
        assert not any((config.data_dir / p).exists() for p in paths)
        await assert_consistent(core)
    finally:
        await core.close()


async def test_a_refused_job_leaves_no_picture_behind(tmp_path: Path) -> None:
    config = make_config(tmp_path, credits={"daily_allowance": 0})
    core = await open_core(config)
    try:
        with pytest.raises(Refused):
            await core.scheduler.submit(ALICE, request(inputs=pictures()))
        inputs = config.data_dir / "images" / "inputs"
        assert not inputs.exists() or not any(inputs.iterdir())
    finally:
        await core.close()


def test_described_and_given_pictures_must_match() -> None:
    data = request(inputs=pictures()).to_json()
    with pytest.raises(ValueError, match="inputs: 2 described but 1 images given"):
        type(request()).from_json(data, input_images=[Image.new("RGB", (8, 8))])
