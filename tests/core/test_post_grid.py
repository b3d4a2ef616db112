"""The core's side of the post-grid edits: their costs, and live previews carried from the
real engine in a real worker process through the pipe to the core's progress events."""

from __future__ import annotations

import asyncio
import dataclasses
import io
from pathlib import Path

import pytest
from PIL import Image

from bot.app import edits
from bot.config import CreditsConfig
from bot.core import ProcessWorker, ProgressUpdate
from bot.core.credits import job_cost
from bot.core.events import with_last_preview
from bot.core.models import JobState, Owner, Queued
from generation.contract import JobKind, PanDirection, Region, UpscaleMode
from generation.settings import EngineSettings
from tests.core.conftest import finished, make_config, open_core, request

ALICE = Owner(user_id=31)
REAL_ENGINE = "generation.engine:create_engine"


def test_edit_costs_have_their_own_base_and_scale_with_the_canvas() -> None:
    """The requests the app makes for each button (bot.edits), priced by the core."""
    credits = CreditsConfig(
        cost_zoom=5, cost_pan=6, cost_square=7, cost_region=3, cost_upscale_creative=9
    )
    settings = EngineSettings(max_pixels=2**20)  # 8 candidates, 4 kept, like the grid
    grid = request(width=512, height=512, steps=30, num_candidates=8, num_kept=4)
    image = Image.new("RGB", (512, 512))
    wide_image = Image.new("RGB", (1024, 512))
    built = {
        "zoom": edits.zoom(grid, image, factor=2, seed=1, settings=settings),
        "pan": edits.pan(grid, image, direction=PanDirection.UP, seed=1, settings=settings),
        "square": edits.square(grid, wide_image, seed=1, settings=settings),
        "region": edits.region(
            grid, image, seed=1, settings=settings, regions=frozenset({Region.LEFT})
        ),
        "creative": edits.upscale(
            grid, image, mode=UpscaleMode.CREATIVE, seed=1, settings=settings
        ),
    }
    costs = {name: job_cost(edit, credits) for name, edit in built.items()}
    # A pan's canvas is 1.5x the pixels, the square of a 1024x512 image 4x, an upscale to
    # 1024² 1x.
    assert costs == {"zoom": 5, "pan": 9, "square": 28, "region": 3, "creative": 9}
    # Fewer steps and candidates cost less, like /imagine.
    fewer = EngineSettings(max_pixels=2**20, num_candidates=4)
    cheap = edits.zoom(grid.with_changes(steps=15), image, factor=2, seed=1, settings=fewer)
    assert job_cost(cheap, credits) == 2  # 5 x 1/2 x 1/2, rounded up
    free = dataclasses.replace(credits, cost_zoom=0)
    assert job_cost(built["zoom"], free) == 0


def test_a_coalesced_progress_update_keeps_the_last_preview() -> None:
    shown = ProgressUpdate(1, 2, 10, b"png")
    later = ProgressUpdate(1, 3, 10)
    assert with_last_preview(later, shown) == ProgressUpdate(1, 3, 10)
    assert with_last_preview(later, shown).preview_png == b"png"
    assert with_last_preview(ProgressUpdate(1, 4, 10, b"new"), shown).preview_png == b"new"
    assert with_last_preview(Queued(1, 2), shown) == Queued(1, 2)


@pytest.fixture(scope="module")
def tiny_engine(tiny_models: Path) -> EngineSettings:
    from generation.tiny import tiny_engine_settings

    # The run's tiny models, not built again here.
    return tiny_engine_settings(tiny_models, 64, preview_interval_s=0.0)


async def test_previews_cross_a_process_worker_into_the_progress_events(
    tmp_path: Path, tiny_engine: EngineSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One torch thread in the worker process, as each test worker has (tests/conftest.py): on
    # cores the other test workers keep busy, a second thread mostly spins.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = dataclasses.replace(make_config(tmp_path), engine=tiny_engine)
    worker = ProcessWorker(config.engine, config.data_dir, REAL_ENGINE, startup_timeout_s=300)
    core = await open_core(config, workers=[worker])
    try:
        previews: dict[bool, list[bytes | None]] = {}
        for wanted in (True, False):
            job = await core.scheduler.submit(
                ALICE, request(steps=4, num_candidates=2, num_kept=2, preview=wanted)
            )
            seen: list[bytes | None] = []
            async with asyncio.timeout(300):
                async with core.scheduler.subscribe(job.id) as events:
                    async for event in events:
                        if isinstance(event, ProgressUpdate):
                            seen.append(event.preview_png)
            assert (await finished(core, job.id)).state is JobState.SUCCEEDED
            previews[wanted] = seen
        shown = [p for p in previews[True] if p is not None]
        assert shown, previews[True]
        grid = Image.open(io.BytesIO(shown[-1]))
        # Two 64x64 candidates: two 8x8 latents, doubled, side by side.
        assert (grid.format, grid.size) == ("PNG", (32, 16))
        assert previews[False] and all(p is None for p in previews[False])
    finally:
        await core.close(5.0)


def test_every_edit_kind_has_a_core_kind() -> None:
    from bot.core.models import JobKind as CoreKind

    for kind in (JobKind.ZOOM, JobKind.PAN, JobKind.SQUARE, JobKind.REGION):
        assert CoreKind(kind.value).value == kind.value
