"""The reply of a ControlNet job says how a control picture of another shape was fitted (the
engine crops or pads it, never squashes it), as [generation] controlnet_fit says."""

import pytest
from PIL import Image

from bot.app.catalog import control_notes
from bot.config import ConfigError, parse_config
from generation.contract import GenerationRequest, InputImage, InputRole, JobKind
from generation.settings import ControlFit


def _request(picture_size: tuple[int, int], controlnet: str | None = "canny") -> GenerationRequest:
    inputs = ()
    if controlnet is not None:
        picture = Image.new("RGB", picture_size)
        inputs = (InputImage(InputRole.CONTROL, picture, source="pose.png"),)
    return GenerationRequest(
        kind=JobKind.IMAGINE,
        prompt="a dancer",
        width=1024,
        height=576,
        controlnet=controlnet,
        inputs=inputs,
    )


def test_a_control_picture_of_another_shape_is_named_in_the_notes() -> None:
    (note,) = control_notes(_request((800, 800)), ControlFit.CROP)
    assert note == (
        "ControlNet canny: control picture (800x800) cropped to the image's shape (1024x576): "
        "its top and bottom cut off"
    )
    (padded,) = control_notes(_request((800, 800)), ControlFit.PAD)
    assert "black bars left and right" in padded
    assert control_notes(_request((1920, 1080)), ControlFit.CROP) == ()
    assert control_notes(_request((800, 800), controlnet=None), ControlFit.CROP) == ()


def test_controlnet_fit_is_configured_by_name() -> None:
    assert parse_config({}).engine.controlnet_fit is ControlFit.CROP
    assert parse_config({"generation": {"controlnet_fit": "pad"}}).engine.controlnet_fit == "pad"
    with pytest.raises(ConfigError, match=r"^generation\.controlnet_fit: must be one of crop, pad"):
        parse_config({"generation": {"controlnet_fit": "squash"}})
