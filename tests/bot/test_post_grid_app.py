"""The post-grid API the Discord layer calls (no Discord): Zoom Out, Custom Zoom, Pan, Make
Square, Vary (Region), Upscale Subtle/Creative, Remix and the free U1–U4, through a real core,
real SQLite and the real tiny engine. Costs are held and settled like other jobs; bad input is
refused with a message naming what was wrong, and nothing is charged for it."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bot.app.actions import Action, Actor, UserError
from bot.app.application import ImagineApp
from bot.config import Config, parse_config
from bot.core import Job, JobKind, JobState
from bot.core.credits import job_cost
from generation.contract import PanDirection, Region, UpscaleMode
from generation.images import parse_a1111_parameters, read_parameters
from generation.outpaint import seam_feather_px
from generation.requests import upscale_request
from generation.settings import EngineSettings
from tests.bot.helpers import app_over

ALICE = Actor(user_id=21, guild_id=1, channel_id=2)
BOB = Actor(user_id=22, guild_id=1, channel_id=2)
# /imagine makes 64x64 here; a pan to 96x64 fits, a second one sideways (144x64) does not.
MAX_PIXELS = 128 * 64


@pytest.fixture(scope="module")
def engine_settings(tiny_models: Path) -> EngineSettings:
    from generation.tiny import tiny_engine_settings

    return tiny_engine_settings(
        tiny_models,  # the run's tiny models, built once
        64,
        default_steps=2,
        num_candidates=2,
        num_kept=2,
        max_pixels=MAX_PIXELS,
        preview_interval_s=0.0,
    )


@pytest.fixture(scope="module")
def engine(engine_settings: EngineSettings) -> Any:
    from generation.engine import create_engine

    return create_engine(engine_settings)


def _config(tmp_path: Path, engine: EngineSettings) -> Config:
    config = parse_config(
        {
            "credits": {"daily_allowance": 1000},
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
    return await app.core.jobs.require(job_id)


async def _grid(app: ImagineApp) -> Job:
    (submitted,) = await app.imagine(ALICE, "a lighthouse on a cliff")
    job = await _finished(app, submitted.job.id)
    assert job.state is JobState.SUCCEEDED and job.result is not None
    assert (job.result.width, job.result.height) == (64, 64)
    return job


async def _available(app: ImagineApp, actor: Actor = ALICE) -> int:
    return (await app.core.credits.balance(actor.user_id)).available


def _image(app: ImagineApp, job: Job, index: int = 0) -> Image.Image:
    with Image.open(job.image_path(app.config.data_dir, index)) as image:
        return image.convert("RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_zoom_and_pan_make_new_grids_that_keep_the_image(app: ImagineApp) -> None:
    grid = await _grid(app)
    parent_image = _image(app, grid, 1)
    before = await _available(app)

    zoom = (await app.press(ALICE, grid.id, Action.ZOOM_OUT_2, 2)).job
    assert (zoom.kind, zoom.parent_job_id, zoom.parent_index) == (JobKind.ZOOM, grid.id, 1)
    assert zoom.cost == job_cost(await app.core.jobs.request(zoom), app.config.credits)
    zoomed = await _finished(app, zoom.id)
    assert zoomed.state is JobState.SUCCEEDED and zoomed.result is not None
    assert len(zoomed.result.image_paths) == 2
    image = _image(app, zoomed)
    assert image.size == (64, 64)
    # The kept image, less the few pixels the seam's feather blends into it.
    f = seam_feather_px(image.size)
    middle = np.asarray(image, dtype=np.int16)[16 + f : 48 - f, 16 + f : 48 - f]
    shrunk = np.asarray(parent_image.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.int16)
    assert np.abs(middle - shrunk[f:-f, f:-f]).max() <= 1
    params = parse_a1111_parameters(read_parameters(zoomed.image_path(app.config.data_dir, 0)))
    assert params["Zoom out"] == "2"

    assert app.can_pan(grid, 2, PanDirection.LEFT)
    pan = (await app.press(ALICE, grid.id, Action.PAN_LEFT, 2)).job
    panned = await _finished(app, pan.id)
    assert panned.result is not None and (panned.result.width, panned.result.height) == (96, 64)
    f = seam_feather_px((96, 64))  # kept exactly beyond the seam's feather
    kept = np.asarray(_image(app, panned), dtype=np.int16)[:, 32 + f :]
    assert np.array_equal(kept, np.asarray(parent_image, dtype=np.int16)[:, f:])
    spent = zoom.cost + pan.cost
    assert await _available(app) == before - spent
    # A 96x64 image can't pan sideways again here, and the press says so, charging nothing.
    assert not app.can_pan(panned, 1, PanDirection.RIGHT)
    assert app.can_make_square(panned, 1)
    with pytest.raises(UserError, match=r"^direction: panning right"):
        await app.press(ALICE, panned.id, Action.PAN_RIGHT, 1)
    assert await _available(app) == before - spent


async def test_custom_zoom_vary_region_and_remix(app: ImagineApp) -> None:
    grid = await _grid(app)
    before = await _available(app)
    for factor in ("2.5", "0.5", "two", "nan"):
        with pytest.raises(UserError, match=r"^factor: expected a number from 1.0 to 2"):
            await app.custom_zoom(ALICE, grid.id, 1, prompt="a lighthouse", factor=factor)
    with pytest.raises(UserError, match=r"--ar"):
        await app.custom_zoom(ALICE, grid.id, 1, prompt="a lighthouse --ar 3:x", factor="1.5")
    not_a_picture = b"GIF89a? no, just text"
    with pytest.raises(UserError, match=r"^mask: it is not a picture"):
        await app.vary_region(ALICE, grid.id, 1, mask=not_a_picture)
    for mask in (Image.new("L", (64, 64), 255), Image.new("L", (64, 64), 0)):
        with pytest.raises(UserError, match=r"^mask: it is all"):
            await app.vary_region(ALICE, grid.id, 1, mask=_png(mask))
    with pytest.raises(UserError, match=r"^mask: it is 64x32"):
        await app.vary_region(ALICE, grid.id, 1, mask=Image.new("L", (64, 32), 255))
    with pytest.raises(UserError, match=r"^regions: unknown region 'middle'"):
        await app.vary_region(ALICE, grid.id, 1, regions=["middle"])
    with pytest.raises(UserError, match=r"^regions: choose at least one"):
        await app.vary_region(ALICE, grid.id, 1)
    with pytest.raises(UserError, match=r"^prompt: this button"):
        await app.press(ALICE, grid.id, Action.UPSCALE_SUBTLE, 1, prompt="sharper")
    with pytest.raises(UserError, match=r"isn't your job"):
        await app.custom_zoom(BOB, grid.id, 1, prompt="mine now", factor=2)
    assert await _available(app) == before
    assert len(await app.core.jobs.for_user(ALICE.user_id)) == 1

    wide = (await app.custom_zoom(ALICE, grid.id, 1, prompt="a harbour --ar 2:1", factor="1,5")).job
    request = await app.core.jobs.request(wide)
    assert (wide.kind, request.prompt, request.zoom_factor) == (JobKind.ZOOM, "a harbour", 1.5)
    assert request.width > request.height

    drawn = Image.new("L", (128, 128), 0)  # twice the image's size: resized to it
    drawn.paste(255, (0, 0, 40, 128))
    region = (
        await app.vary_region(
            ALICE, grid.id, 1, prompt="a red door", mask=_png(drawn), mask_name="m.png"
        )
    ).job
    presets = (
        await app.vary_region(ALICE, grid.id, 2, regions=[Region.TOP.value, Region.CENTRE])
    ).job
    remixed = (await app.press(ALICE, grid.id, Action.VARY, 1, prompt="a blue lighthouse")).job
    assert (await app.core.jobs.request(remixed)).prompt == "a blue lighthouse"
    assert (await app.core.jobs.request(presets)).regions == (Region.TOP, Region.CENTRE)
    done = await _finished(app, region.id)
    assert done.state is JobState.SUCCEEDED and done.kind is JobKind.REGION
    out = np.asarray(_image(app, done), dtype=np.int16)
    original = np.asarray(_image(app, grid, 0), dtype=np.int16)
    f = seam_feather_px((64, 64))  # kept exactly beyond the seam's feather
    assert np.array_equal(out[:, 20 + f :], original[:, 20 + f :])
    assert not np.array_equal(out[:, :20], original[:, :20])
    for job in (wide, presets, remixed):
        assert (await _finished(app, job.id)).state is JobState.SUCCEEDED
    report = await app.core.credits.check_consistency()
    assert report.ok, str(report)


async def test_separate_is_free_and_upscales_have_modes(app: ImagineApp) -> None:
    grid = await _grid(app)
    before = await _available(app)
    path = await app.separate(ALICE, grid.id, 2)
    assert path == grid.image_path(app.config.data_dir, 1) and path.is_file()
    with pytest.raises(UserError, match=r"^Image 5 doesn't exist"):
        await app.separate(ALICE, grid.id, 5)
    with pytest.raises(UserError, match=r"isn't your job"):
        await app.separate(BOB, grid.id, 1)
    assert await _available(app) == before
    assert len(await app.core.jobs.for_user(ALICE.user_id)) == 1

    # 64x64 x 4 is over this server's budget: both upscales are hidden and refused.
    assert not app.can_upscale(grid) and not app.can_upscale(grid, UpscaleMode.CREATIVE)
    with pytest.raises(UserError, match=r"already as large"):
        await app.press(ALICE, grid.id, Action.UPSCALE_CREATIVE, 1)
    assert await _available(app) == before
    # A creative upscale costs its own base (a 2x upscale to 1024² costs cost_upscale_creative).
    request = (await app.core.jobs.request(grid)).with_changes(width=512, height=512)
    subtle = upscale_request(request, Image.new("RGB", (512, 512)), strength=0.3, seed=1)
    creative = upscale_request(
        request, Image.new("RGB", (512, 512)), strength=0.6, seed=1, mode=UpscaleMode.CREATIVE
    )
    credits = app.config.credits
    assert job_cost(subtle, credits) == credits.cost_upscale
    assert job_cost(creative, credits) == credits.cost_upscale_creative


def test_a_model_names_its_inpainting_checkpoint_and_preview_decoder(tmp_path: Path) -> None:
    raw = {
        "generation": {
            "models": [
                {
                    "name": "sd15",
                    "source": "tiny",
                    "inpaint_source": "./models/inpainting",
                    "preview_decoder": "madebyollin/taesd",
                },
                {"name": "plain", "source": "tiny"},
            ]
        }
    }
    sd15, plain = parse_config(raw, base_dir=tmp_path).engine.models
    # A ./folder is the config file's neighbour; a hub id is left as written.
    assert sd15.inpaint_source == str(tmp_path / "models" / "inpainting")
    assert sd15.preview_decoder == "madebyollin/taesd"
    assert (plain.inpaint_source, plain.preview_decoder) == ("", "")


def test_a_settings_menu_holds_at_most_25_options_and_the_current_choice() -> None:
    from bot.discord.views.settings import MAX_SELECT_OPTIONS, _options

    models = [(f"model {n}", f"m{n}") for n in range(30)]
    options = _options("m29", models, "Model: server default")
    assert len(options) == MAX_SELECT_OPTIONS
    assert [o.value for o in options if o.default] == ["m29"]
    assert [o.value for o in _options(None, models[:3], "Model: default")] == [
        "default",
        "m0",
        "m1",
        "m2",
    ]
