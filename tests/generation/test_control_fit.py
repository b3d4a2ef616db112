"""A control picture of another shape than the image is cropped or padded to it, never
squashed: a circle in the picture stays a circle in the control map, through the engine too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from generation.contract import InputImage, InputRole
from generation.engine import DiffusersEngine, create_engine
from generation.preprocess import Preprocessors, canny, fit_note, fit_picture
from generation.settings import ControlFit, ControlNetSpec, EngineSettings, Preprocessor
from generation.tiny import TINY_SD_DIR, build_tiny_controlnet
from tests.generation.helpers import imagine, pixels, tiny_settings


def circle_picture(size: tuple[int, int] = (120, 90)) -> Image.Image:
    """A white disc, as wide as tall, in the middle of a black picture; small enough to survive
    a crop to any of the shapes below."""
    image = Image.new("RGB", size, "black")
    radius = min(size) // 6
    centre = (size[0] // 2, size[1] // 2)
    ImageDraw.Draw(image).ellipse(
        (centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius),
        fill="white",
    )
    return image


def disc_aspect(image: Image.Image) -> float:
    """Width over height of the bright disc's bounding box."""
    bright = pixels(image).mean(axis=2) > 127
    rows, columns = np.nonzero(bright)
    return (columns.max() - columns.min() + 1) / (rows.max() - rows.min() + 1)


@pytest.mark.parametrize("fit", list(ControlFit))
@pytest.mark.parametrize("size", [(192, 64), (64, 128), (96, 64)])
def test_the_disc_stays_round_whatever_the_image_shape(fit: ControlFit, size) -> None:
    maps = Preprocessors("cpu", Path("unused"), True)
    spec = ControlNetSpec("map", "unused", preprocessor=Preprocessor.NONE)
    fitted = maps.control_map(circle_picture(), spec, size, fit)
    assert fitted.size == size
    assert disc_aspect(fitted) == pytest.approx(1.0, abs=0.1)
    # Squashing (the old resize) stretched it by the change of shape.
    squashed = circle_picture().resize(size)
    assert abs(disc_aspect(squashed) - 1.0) > 0.1


def test_crop_cuts_the_overhang_and_pad_adds_black_bars() -> None:
    picture = circle_picture((120, 90))  # 4:3 into 2:1
    cropped = fit_picture(picture, (128, 64), ControlFit.CROP)
    assert cropped.size == (128, 64)
    # Cropped to cover (scaled by 128/120): the disc (30 of 90 px tall) is 32 of 64 px tall.
    bright_rows = np.nonzero((pixels(cropped).mean(axis=2) > 127).any(axis=1))[0]
    assert bright_rows.max() - bright_rows.min() + 1 == pytest.approx(32, abs=2)
    maps = Preprocessors("cpu", Path("unused"), True)
    padded = maps.control_map(
        picture, ControlNetSpec("map", "u", preprocessor=Preprocessor.NONE), (128, 64), "pad"
    )
    # Fitted inside: 85 px wide in the middle, black bars of about 21 px each side.
    assert pixels(padded)[:, :20].max() == 0 and pixels(padded)[:, -20:].max() == 0
    # Padded after the preprocessor: canny finds the disc's edge, not the bars' borders.
    edges = maps.control_map(
        picture, ControlNetSpec("c", "u", preprocessor=Preprocessor.CANNY), (128, 64), "pad"
    )
    assert pixels(edges)[:, 18:24].max() == 0 and pixels(edges)[:, 104:110].max() == 0
    assert pixels(edges).max() == 255
    assert pixels(canny(picture)).max() == 255


def test_a_picture_of_the_same_shape_is_only_resized() -> None:
    picture = circle_picture((120, 90))
    for fit in ControlFit:
        resized = fit_picture(picture, (64, 48), fit)
        assert np.array_equal(pixels(resized), pixels(picture.resize((64, 48), Image.LANCZOS)))
        assert fit_note((120, 90), (64, 48), fit) == ""


def test_the_reply_says_how_it_was_fitted() -> None:
    assert fit_note((120, 90), (192, 64), ControlFit.CROP) == (
        "control picture (120x90) cropped to the image's shape (192x64): its top and bottom cut off"
    )
    assert "left and right sides cut off" in fit_note((300, 90), (64, 64), ControlFit.CROP)
    assert fit_note((120, 90), (192, 64), ControlFit.PAD) == (
        "control picture (120x90) fitted inside the image (192x64) with black bars left and "
        "right, which the ControlNet leaves free"
    )


@pytest.fixture(scope="module")
def control_engine(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> DiffusersEngine:
    controlnet = build_tiny_controlnet(
        tmp_path_factory.mktemp("cn") / "cn", tiny_cache / TINY_SD_DIR
    )
    settings: EngineSettings = tiny_settings(
        tiny_cache,
        controlnets=(ControlNetSpec("map", str(controlnet), preprocessor=Preprocessor.NONE),),
    )
    return create_engine(settings)


def test_the_engine_fits_the_map_it_steers_with(control_engine: DiffusersEngine) -> None:
    control = InputImage(InputRole.CONTROL, circle_picture(), source="disc.png")
    request = imagine(
        width=128,
        height=64,
        steps=2,
        num_candidates=1,
        num_kept=1,
        controlnet="map",
        inputs=(control,),
    )
    result = control_engine.generate(request)
    assert result.control_map is not None and result.control_map.size == (128, 64)
    assert disc_aspect(result.control_map) == pytest.approx(1.0, abs=0.1)
