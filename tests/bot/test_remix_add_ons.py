"""Remix (and the prompts of Custom Zoom / Vary (Region)) on a job with LoRAs and a ControlNet:
the parent's are kept, `--lora` replaces the LoRAs, `--cn NAME` follows the parent's control
picture, and what a remix cannot do is refused naming `--cn`."""

from __future__ import annotations

import pytest
from PIL import Image

from bot import edits
from generation.contract import InputImage, InputRole, LoraWeight, variation_request
from generation.settings import ControlNetSpec, EngineSettings, LoraSpec, ModelSpec, Preprocessor
from tests.generation.helpers import imagine

SETTINGS = EngineSettings(
    models=(ModelSpec(name="tiny", source="tiny", base_resolution=128),),
    loras=(
        LoraSpec(name="ink", source="a/ink", trigger_words=("inkstyle",)),
        LoraSpec(name="paper", source="a/paper"),
    ),
    controlnets=(
        ControlNetSpec(name="canny", source="a/canny", preprocessor=Preprocessor.CANNY),
        ControlNetSpec(name="depth", source="a/depth", preprocessor=Preprocessor.DEPTH),
    ),
)
PICTURE = InputImage(InputRole.CONTROL, Image.new("RGB", (64, 64), "white"), source="edges.png")
PARENT = imagine(
    prompt="a house, inkstyle",
    loras=(LoraWeight("ink", 0.6),),
    controlnet="canny",
    controlnet_weight=1.5,
    inputs=(PICTURE,),
)


def remixed(text: str, parent=PARENT):
    remix = edits.parse_remix(text, parent, (64, 64), SETTINGS)
    image = Image.new("RGB", (64, 64))
    return variation_request(remix.apply(parent), image, strength=0.7, seed=1)


def test_a_remix_keeps_the_parents_loras_and_controlnet_with_its_picture():
    request = remixed("a barn")
    assert request.loras == (LoraWeight("ink", 0.6),)
    assert (request.controlnet, request.controlnet_weight) == ("canny", 1.5)
    assert request.inputs_for(InputRole.CONTROL) == (PICTURE,)
    # The kept LoRA's trigger word comes back into the stored prompt.
    assert request.prompt == "a barn, inkstyle"


def test_lora_in_a_remix_replaces_the_loras_and_cn_follows_the_same_picture():
    request = remixed("a barn --lora paper:1.2")
    assert request.loras == (LoraWeight("paper", 1.2),)
    assert request.prompt == "a barn"
    switched = remixed("a barn --cn depth --cnw 0.4")
    assert (switched.controlnet, switched.controlnet_weight) == ("depth", 0.4)
    assert switched.inputs_for(InputRole.CONTROL) == (PICTURE,)
    assert switched.loras == (LoraWeight("ink", 0.6),)


def test_cnw_alone_in_a_remix_reweighs_the_parents_controlnet():
    request = remixed("a barn --cnw 0.5")
    assert (request.controlnet, request.controlnet_weight) == ("canny", 0.5)
    assert request.inputs_for(InputRole.CONTROL) == (PICTURE,)
    assert request.loras == (LoraWeight("ink", 0.6),) and request.prompt == "a barn, inkstyle"


@pytest.mark.parametrize(
    ("text", "parent", "expected"),
    [
        ("a barn --cnw 0.5", imagine(prompt="a house"), "--cnw: the job this comes from follows"),
        ("a barn --cnw 3", PARENT, "--cnw: expected a number between 0 and 2"),
        (
            "https://cdn.example/a.png https://cdn.example/b.png",
            PARENT,
            "an image link: a remix keeps the pictures of the job it comes from",
        ),
        ("a barn --sref https://cdn.example/s.png", PARENT, "--sref: a remix keeps the pictures"),
        ("a barn --cn canny", imagine(prompt="a house"), "--cn: a remix can only follow"),
        ("a barn --cn canny https://cdn.example/new.png", PARENT, "(not a new one)"),
        ("a barn --lora ink:3", PARENT, "--lora ink:3: the weight after ':' must be"),
        ("a barn --lora watercolour", PARENT, "--lora watercolour: no such LoRA here"),
    ],
)
def test_what_a_remix_cannot_do_is_refused_naming_the_flag(text, parent, expected):
    with pytest.raises(ValueError) as caught:
        edits.parse_remix(text, parent, (64, 64), SETTINGS)
    assert expected in str(caught.value), str(caught.value)


def test_an_edit_leaves_the_controlnet_out_but_keeps_the_loras():
    from generation.contract import zoom_request

    remix = edits.parse_remix("a barn, wide", PARENT, (64, 64), SETTINGS)
    zoomed = zoom_request(remix.apply(PARENT), Image.new("RGB", (64, 64)), factor=2.0, seed=1)
    assert zoomed.controlnet is None and not zoomed.inputs_for(InputRole.CONTROL)
    assert zoomed.loras == (LoraWeight("ink", 0.6),)
