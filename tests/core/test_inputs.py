"""A member's own pictures (image prompts, references, masks, control images) are stored beside
their job as files, reach the worker, and leave with the job's images (real files, real SQLite)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from bot.core import JobKind, JobState, ManualClock, Owner, Refused
from bot.core.execute import WorkItem, input_paths, load_request
from generation.contract import InputImage, InputRole
from generation.requests import region_request
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)


def photo_prompt() -> InputImage:
    photo = Image.new("RGB", (48, 32), (200, 30, 10))
    photo.putpixel((3, 4), (1, 2, 3))
    digest = hashlib.sha256(photo.tobytes()).hexdigest()
    return InputImage(InputRole.IMAGE_PROMPT, photo, weight=1.5, source="photo.png", sha256=digest)


def left_half_mask() -> InputImage:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    return InputImage(InputRole.MASK, mask, source="mask.png")


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and ImageChops.difference(a, b).getbbox() is None


async def test_pictures_reach_the_worker_and_read_back_unchanged(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = make_config(tmp_path)
    core = await open_core(config, clock)
    try:
        photo, mask = photo_prompt(), left_half_mask()
        parent = await core.scheduler.submit(ALICE, request(inputs=(photo,)))
        assert (await finished(core, parent.id)).state is JobState.SUCCEEDED
        edit = region_request(
            await core.jobs.request(parent.id),
            await core.jobs.image(parent.id, 0),
            seed=5,
            mask=mask,
        )
        child = await core.scheduler.submit(ALICE, edit, JobKind.REGION, parent=(parent.id, 0))
        assert (await finished(core, child.id)).state is JobState.SUCCEEDED

        child_job = await core.jobs.require(child.id)
        stored = child_job.request_data
        paths = input_paths(stored) + input_paths((await core.jobs.require(parent.id)).request_data)
        assert len(paths) == 3 and all((config.data_dir / p).is_file() for p in paths)
        assert len(set(paths)) == 3  # each job owns its own copies

        item = WorkItem(child.id, 1, stored, child_job.init_image_path, f"images/{child.id}")
        for loaded in (await core.jobs.request(child.id), load_request(config.data_dir, item)):
            assert [i.role for i in loaded.inputs] == [InputRole.IMAGE_PROMPT, InputRole.MASK]
            assert loaded.inputs[0].weight == 1.5 and loaded.inputs[0].source == "photo.png"
            assert loaded.inputs[0].sha256 == photo.sha256
            assert same_pixels(loaded.inputs[0].image, photo.image)
            assert same_pixels(loaded.inputs[1].image, mask.image)  # a mask stays one channel

        clock.advance(days=40)
        assert core.retention is not None
        assert sorted((await core.retention.prune()).images) == [parent.id, child.id]
        assert not any((config.data_dir / p).exists() for p in paths)
        await assert_consistent(core)
    finally:
        await core.close()


async def test_a_refused_job_leaves_no_picture_behind(tmp_path: Path) -> None:
    config = make_config(tmp_path, credits={"daily_allowance": 0})
    core = await open_core(config)
    try:
        with pytest.raises(Refused):
            await core.scheduler.submit(ALICE, request(inputs=(photo_prompt(),)))
        inputs = config.data_dir / "images" / "inputs"
        assert not inputs.exists() or not any(inputs.iterdir())
    finally:
        await core.close()


def test_described_and_given_pictures_must_match() -> None:
    data = request(inputs=(photo_prompt(),)).to_json()
    with pytest.raises(ValueError, match="inputs: 1 described but 2 images given"):
        type(request()).from_json(data, input_images=[Image.new("RGB", (8, 8))] * 2)
