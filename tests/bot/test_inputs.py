"""Members' pictures around a job (bot/app/inputs.py): the safety screen shares the output check's
classifier session, and the strip of pictures shown beside a result."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from bot.app.actions import UserError
from bot.app.application import ImagineApp
from bot.app.fetch import FetchedImage
from bot.app.inputs import THUMBNAIL_HEIGHT, InputScreen, pictures_thumbnail
from bot.app.moderation import make_output_check, shared_image_safety
from bot.config import ModerationConfig
from bot.core.jobs import save_input_image
from tests.bot.test_bad_input import ALICE, ALLOWANCE, app

__all__ = ["app"]  # the fixture: an app over a real core with a fake engine


def test_the_input_screen_and_the_output_check_share_one_classifier(tmp_path: Path) -> None:
    config = ModerationConfig()
    screen = InputScreen(config, lambda _channel: False)
    check = make_output_check(config, tmp_path, lambda _channel: False)
    assert screen.safety is check.safety is shared_image_safety()


def test_the_pictures_strip_shows_image_prompts_and_references_in_order(tmp_path: Path) -> None:
    red = save_input_image(Image.new("RGB", (200, 100), (220, 0, 0)), tmp_path)
    blue = save_input_image(Image.new("RGB", (50, 100), (0, 0, 220)), tmp_path)
    mask = save_input_image(Image.new("RGB", (64, 64), (0, 255, 0)), tmp_path)
    inputs = [
        {"role": "image_prompt", "source": "attachment:a.png", "path": red},
        {"role": "mask", "source": "mask", "path": mask},
        {"role": "style", "source": "https://cdn.discordapp.com/b.png", "path": blue},
    ]
    data = pictures_thumbnail(tmp_path, {"inputs": inputs})
    assert data is not None
    strip = Image.open(io.BytesIO(data)).convert("RGB")
    # 2:1 then 1:2 at the strip's height, with a gap; the mask is not a member's picture.
    assert strip.height == THUMBNAIL_HEIGHT
    assert strip.width == 2 * THUMBNAIL_HEIGHT + 8 + THUMBNAIL_HEIGHT // 2
    assert strip.getpixel((10, 64)) == (220, 0, 0)
    assert strip.getpixel((strip.width - 10, 64)) == (0, 0, 220)
    assert strip.getpixel((2 * THUMBNAIL_HEIGHT + 4, 64)) == (255, 255, 255)
    colours = {strip.getpixel((x, 64)) for x in range(strip.width)}
    assert colours == {(220, 0, 0), (255, 255, 255), (0, 0, 220)}


def test_no_strip_without_pictures_or_once_they_are_deleted(tmp_path: Path) -> None:
    assert pictures_thumbnail(tmp_path, {"inputs": []}) is None
    assert pictures_thumbnail(tmp_path, {}) is None
    path = save_input_image(Image.new("RGB", (8, 8)), tmp_path)
    (tmp_path / path).unlink()
    gone = [{"role": "image_prompt", "source": "attachment:a.png", "path": path}]
    assert pictures_thumbnail(tmp_path, {"inputs": gone}) is None


@pytest.mark.parametrize("count", [1, 6])
async def test_a_blend_of_one_or_six_pictures_is_refused_free(app: ImagineApp, count: int) -> None:
    """Discord's /blend offers five picture options; the app refuses other counts itself."""
    pictures = [
        FetchedImage(Image.new("RGB", (32, 32), (n, 0, 0)), f"attachment:{n}.png", "ab" * 32, "PNG")
        for n in range(count)
    ]
    with pytest.raises(UserError, match=rf"^images: /blend takes 2 to 5 images, got {count}$"):
        await app.blend(ALICE, pictures)
    assert (await app.core.credits.balance(ALICE.user_id)).available == ALLOWANCE
    assert not await app.core.scheduler.user_jobs(ALICE.user_id)
