"""The data folder: retention of images (real files, real database) and the one-process lock
(real processes)."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bot.config import ConfigError, StorageConfig, parse_config
from bot.core import Core, ImageExpired, JobKind, JobState, ManualClock, Owner, Refused
from bot.core.storage import DataFolderInUse, Pruned, prune_images
from generation.requests import variation_request
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request
from tests.core.test_lifecycle import OUTCOME, GatedWorker

ALICE = Owner(user_id=101, guild_id=1, channel_id=2)
REPO = Path(__file__).resolve().parents[2]


async def variation_of(core: Core, parent_id: int, index: int) -> object:
    source = await core.jobs.image(parent_id, index)
    parent_request = await core.jobs.request(parent_id)
    return variation_request(parent_request, source, strength=0.7, seed=3)


async def test_old_images_expire_and_everything_else_stays(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = make_config(tmp_path)
    core = await open_core(config, clock)
    data_dir = config.data_dir
    try:
        parent = await core.scheduler.submit(ALICE, request())
        assert (await finished(core, parent.id)).state is JobState.SUCCEEDED
        variation = await variation_of(core, parent.id, 1)
        child = await core.scheduler.submit(
            ALICE,
            variation,  # type: ignore[arg-type]
            JobKind.VARIATION,
            parent=(parent.id, 1),
        )
        assert (await finished(core, child.id)).state is JobState.SUCCEEDED
        failed = await core.scheduler.submit(ALICE, request("[raise] a fox"))
        assert (await finished(core, failed.id)).state is JobState.FAILED
        clock.advance(days=20)
        recent = await core.scheduler.submit(ALICE, request(seed=9))
        assert (await finished(core, recent.id)).state is JobState.SUCCEEDED
        ledger_before = await core.credits.ledger(ALICE.user_id, limit=1000)

        clock.advance(days=11)  # the first three ended 31 days ago, `recent` 11 days ago
        assert core.retention is not None
        pruned = await core.retention.prune()
        assert sorted(pruned.images) == sorted([parent.id, child.id, failed.id])
        assert pruned.jobs == ()  # 31 days is under job_retention_days
        assert not (data_dir / "images" / str(parent.id)).exists()
        assert not (data_dir / "images" / str(child.id)).exists()
        assert (data_dir / "images" / str(recent.id) / "0.png").exists()
        assert await core.retention.prune() == Pruned()

        # Rows, results and the ledger stay; the images answer that they expired.
        expired = await core.jobs.require(parent.id)
        assert expired.state is JobState.SUCCEEDED and expired.result is not None
        assert expired.images_expired
        with pytest.raises(ImageExpired, match="expired"):
            await core.jobs.image(parent.id, 0)
        with pytest.raises(ImageExpired, match="expired"):
            await core.jobs.request(child.id)
        with pytest.raises(Refused, match="expired"):
            await core.scheduler.submit(
                ALICE,
                variation,  # type: ignore[arg-type]
                JobKind.VARIATION,
                parent=(parent.id, 0),
            )
        assert await core.credits.ledger(ALICE.user_id, limit=1000) == ledger_before
        await assert_consistent(core)
    finally:
        await core.close(1.0)


async def test_an_image_a_queued_job_still_needs_is_kept_until_it_ran(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = make_config(tmp_path)
    core = await open_core(config, clock)
    parent = await core.scheduler.submit(ALICE, request())
    assert (await finished(core, parent.id)).state is JobState.SUCCEEDED
    await core.close(1.0)

    # Reopened with retention off, so the test decides when to prune.
    config = dataclasses.replace(config, storage=StorageConfig(image_retention_days=0))
    worker = GatedWorker()
    core = await open_core(config, clock, workers=[worker])
    try:
        variation = await variation_of(core, parent.id, 2)
        child = await core.scheduler.submit(
            ALICE,
            variation,  # type: ignore[arg-type]
            JobKind.VARIATION,
            parent=(parent.id, 2),
        )
        async with asyncio.timeout(5):
            await worker.running.wait()
        clock.advance(days=31)
        assert await prune_images(core.db, config.data_dir, clock, 30) == []
        assert (config.data_dir / "images" / str(parent.id) / "2.png").exists()
        assert worker.end is not None
        worker.end.set_result(OUTCOME)
        assert (await finished(core, child.id)).state is JobState.SUCCEEDED
        clock.advance(days=31)
        assert parent.id in await prune_images(core.db, config.data_dir, clock, 30)
        assert not (config.data_dir / "images" / str(parent.id)).exists()
        await assert_consistent(core)
    finally:
        await core.close(1.0)


async def test_an_upload_two_jobs_share_goes_with_the_last_of_them(
    tmp_path: Path, clock: ManualClock
) -> None:
    config = make_config(tmp_path)
    core = await open_core(config, clock)
    try:
        parent = await core.scheduler.submit(ALICE, request())
        assert (await finished(core, parent.id)).state is JobState.SUCCEEDED
        source = await core.jobs.image(parent.id, 0)
        parent_request = await core.jobs.request(parent.id)
        varied = variation_request(parent_request, source, strength=0.7, seed=3)
        # Given without a parent job, its picture is stored as an upload of its own...
        first = await core.scheduler.submit(ALICE, varied, JobKind.VARIATION)
        assert (await finished(core, first.id)).state is JobState.SUCCEEDED
        upload = first.init_image_path
        assert upload is not None and upload.startswith("images/inputs/")
        clock.advance(days=20)
        # ...which its reroll refers to instead of copying.
        reroll = await core.scheduler.submit(
            ALICE, varied.with_changes(seed=4), JobKind.REROLL, parent=(first.id, None)
        )
        assert reroll.init_image_path == upload
        assert (await finished(core, reroll.id)).state is JobState.SUCCEEDED

        clock.advance(days=11)  # `first` ended 31 days ago, its reroll 11
        pruned = await prune_images(core.db, config.data_dir, clock, 30)
        assert first.id in pruned and reroll.id not in pruned
        assert (config.data_dir / upload).exists()
        again = await core.jobs.request(reroll.id)  # what 🔄 under the reroll needs
        assert again.init_image is not None

        clock.advance(days=20)
        assert reroll.id in await prune_images(core.db, config.data_dir, clock, 30)
        assert not (config.data_dir / upload).exists()
        await assert_consistent(core)
    finally:
        await core.close(1.0)


async def test_a_second_core_on_the_same_data_folder_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    core = await open_core(config)
    try:
        with pytest.raises(DataFolderInUse, match="in use by another imagine-bot process"):
            await open_core(config)
        # The first one is unaffected.
        job = await core.scheduler.submit(ALICE, request())
        assert (await finished(core, job.id)).state is JobState.SUCCEEDED
    finally:
        await core.close(1.0)
    reopened = await open_core(config)
    await reopened.close(1.0)


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from bot.core.storage import DataFolderLock
    held = DataFolderLock.acquire(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(60)
    """
)


async def test_another_process_holding_the_folder_stops_the_bot_with_one_line(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        str(config.data_dir),
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"locked\n"
        toml = tmp_path / "config.toml"
        toml.write_text(
            f'data_dir = "{config.data_dir}"\n[moderation]\nnsfw_check = false\n'
            '[generation]\n[[generation.models]]\nname = "tiny"\nsource = "tiny"\n'
        )
        bot = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bot", "--shell", "--config", str(toml)],
            cwd=REPO,
            input="",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bot.returncode == 2, bot.stderr
        lines = bot.stderr.strip().splitlines()
        assert len(lines) == 1 and "is in use by another imagine-bot process" in lines[0]
        assert f"pid {holder.pid}" in lines[0]
        with pytest.raises(DataFolderInUse):
            await open_core(config)
        # The kernel drops the lock with its holder: a crash leaves nothing stale behind.
        holder.kill()
        await holder.wait()
        core = await open_core(config)
        await core.close(1.0)
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()


def test_storage_settings_are_read_and_checked() -> None:
    assert parse_config({}).storage == StorageConfig(image_retention_days=30)
    storage = parse_config({"storage": {"image_retention_days": 7, "prune_interval_s": 60}})
    assert storage.storage == StorageConfig(image_retention_days=7, prune_interval_s=60.0)
    with pytest.raises(ConfigError, match=r"^storage\.image_retention_days: must be >= 0"):
        parse_config({"storage": {"image_retention_days": -1}})
    with pytest.raises(ConfigError, match=r"^storage\.keep_days: unknown setting"):
        parse_config({"storage": {"keep_days": 3}})
