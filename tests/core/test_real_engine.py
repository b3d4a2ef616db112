"""One trip through the real generation engine (tiny random-weight models, CPU) in the real
worker child process: submit -> hold -> generate -> PNGs with metadata -> settle."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from PIL import Image

from bot.core import JobKind, JobState, Owner, ProcessWorker
from generation.images import parse_a1111_parameters, read_parameters
from generation.requests import variation_request
from tests.core.conftest import assert_consistent, finished, make_config, open_core, request


async def test_real_tiny_engine_in_the_worker_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One torch thread in the worker process, as each test worker has (tests/conftest.py): on
    # cores the other test workers keep busy, a second thread mostly spins.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = make_config(tmp_path)
    config = dataclasses.replace(
        config, engine=dataclasses.replace(config.engine, device="cpu", extra={})
    )
    worker = ProcessWorker(config.engine, config.data_dir, startup_timeout_s=300)
    core = await open_core(config, workers=[worker])
    owner = Owner(user_id=7, guild_id=1, channel_id=2)
    try:
        job = await core.scheduler.submit(
            owner, request("a lighthouse at dusk", steps=3, num_candidates=2, num_kept=2, seed=5)
        )
        done = await finished(core, job.id, timeout_s=300)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.result is not None
        assert len(done.result.image_paths) == 2
        assert sorted(done.result.seeds) == [5, 6]
        assert len(done.result.clip_scores) == 2
        assert list(done.result.clip_scores) == sorted(done.result.clip_scores, reverse=True)
        assert done.result.timings_s["generate_s"] > 0
        with Image.open(done.image_path(config.data_dir, 0)) as image:
            assert image.size == (64, 64)
            parameters = parse_a1111_parameters(read_parameters(image) or "")
        assert parameters["Prompt"] == "a lighthouse at dusk"
        assert parameters["Seed"] == str(done.result.seeds[0])
        assert parameters["Model"] == "tiny"

        # A variation reads its source image from the data folder inside the child.
        source = await core.jobs.image(job.id, 0)
        variation = variation_request(
            await core.jobs.request(job.id), source, strength=0.7, seed=11
        )
        child = await core.scheduler.submit(owner, variation, JobKind.VARIATION, parent=(job.id, 0))
        varied = await finished(core, child.id, timeout_s=120)
        assert varied.state is JobState.SUCCEEDED, varied.error
        assert varied.result is not None and len(varied.result.image_paths) == 2
        await assert_consistent(core)
    finally:
        await core.close(5.0)
