"""Remix (and the prompts of Custom Zoom / Vary (Region)) on a job with LoRAs and a ControlNet:
the parent's are kept, `--lora` replaces the LoRAs, `--cn NAME` follows the parent's control
picture, and what a remix cannot do is refused naming `--cn`. The parent's pictures are kept
too: `--iw`/`--sw`/`--ow`/`--cw` reweigh them (refused by an edit, which doesn't use them), and the
parser's notes come back for the reply."""

from __future__ import annotations

import pytest
from PIL import Image

from bot.app import edits
from generation.contract import InputImage, InputRole, LoraWeight
from generation.requests import variation_request
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
        # Dropped silently, a code naming no profile would pass, and --p would do nothing.
        ("a barn --p", PARENT, "--p: a remix keeps the ranking"),
        ("a barn --p nosuchcode", PARENT, "--p: a remix keeps the ranking"),
    ],
)
def test_what_a_remix_cannot_do_is_refused_naming_the_flag(text, parent, expected):
    with pytest.raises(ValueError) as caught:
        edits.parse_remix(text, parent, (64, 64), SETTINGS)
    assert expected in str(caught.value), str(caught.value)


def test_an_edit_leaves_the_controlnet_out_but_keeps_the_loras():
    from generation.requests import zoom_request

    remix = edits.parse_remix("a barn, wide", PARENT, (64, 64), SETTINGS)
    zoomed = zoom_request(remix.apply(PARENT), Image.new("RGB", (64, 64)), factor=2.0, seed=1)
    assert zoomed.controlnet is None and not zoomed.inputs_for(InputRole.CONTROL)
    assert zoomed.loras == (LoraWeight("ink", 0.6),)


def _picture(role: InputRole, weight: float, colour: str) -> InputImage:
    return InputImage(role, Image.new("RGB", (64, 64), colour), weight=weight, source=colour)


WITH_PICTURES = imagine(
    prompt="a house",
    inputs=(
        _picture(InputRole.IMAGE_PROMPT, 1.0, "red"),
        _picture(InputRole.IMAGE_PROMPT, 0.5, "green"),
        _picture(InputRole.STYLE, 100.0, "blue"),
        _picture(InputRole.OBJECT, 100.0, "black"),
    ),
)


def _weights(request) -> dict[tuple[InputRole, str], float]:
    return {(i.role, i.source): i.weight for i in request.inputs}


@pytest.mark.parametrize(
    ("flags", "changed"),
    [
        ("--iw 2", {"red": 2.0, "green": 2.0}),
        ("--sw 300", {"blue": 300.0}),
        ("--ow 250", {"black": 250.0}),
        ("--cw 40", {"black": 40.0}),
        ("--iw 0 --sw 0", {"red": 0.0, "green": 0.0, "blue": 0.0}),
        # The same weight twice for the role --oref and --cref pictures share is no conflict.
        ("--ow 50 --cw 50", {"black": 50.0}),
    ],
)
def test_picture_weights_in_a_remix_reweigh_the_kept_pictures_of_their_role(flags, changed):
    remix = edits.parse_remix(f"a barn {flags}", WITH_PICTURES, (64, 64), SETTINGS)
    request = variation_request(
        remix.apply(WITH_PICTURES), Image.new("RGB", (64, 64)), strength=0.7, seed=1
    )
    before = _weights(WITH_PICTURES)
    expected = {key: changed.get(key[1], weight) for key, weight in before.items()}
    assert _weights(request) == expected
    # The same pictures, in the same order; only weights changed.
    assert [i.image for i in request.inputs] == [i.image for i in WITH_PICTURES.inputs]
    # Applied, so not noted as ignored.
    assert not any("ignored" in note for note in remix.notes), remix.notes
    assert request.prompt == "a barn"


def test_a_remix_passes_the_parsers_notes_on_and_notes_weights_with_no_pictures():
    remix = edits.parse_remix("a barn --v 6 --iw 2 --sw 300", PARENT, (64, 64), SETTINGS)
    assert "--v 6 ignored (Midjourney model version)" in remix.notes
    # PARENT has a control picture but no image prompt or style reference: as in /imagine.
    assert "--iw 2 ignored (no image prompt)" in remix.notes
    assert "--sw 300 ignored (no --sref image link)" in remix.notes
    assert remix.apply(PARENT).inputs == PARENT.inputs
    assert edits.parse_remix("a barn", WITH_PICTURES, (64, 64), SETTINGS).notes == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a barn --ow 200 --cw 50", "--cw: --ow and --cw both weigh the object and character"),
        ("a barn --iw 4", "--iw: expected a number between 0 and 3"),
    ],
)
def test_picture_weights_a_remix_cannot_use_are_refused_naming_the_flag(text, expected):
    with pytest.raises(ValueError) as caught:
        edits.parse_remix(text, WITH_PICTURES, (64, 64), SETTINGS)
    assert expected in str(caught.value), str(caught.value)


def test_an_edit_refuses_picture_weights_it_would_not_use():
    from generation.contract import PanDirection, Region

    remix = edits.parse_remix("a barn, wide --sw 300", WITH_PICTURES, (64, 64), SETTINGS)
    image = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match=r"^--sw: a zoom repaints without the job's pictures"):
        edits.zoom(WITH_PICTURES, image, factor=2.0, seed=1, settings=SETTINGS, remix=remix)
    with pytest.raises(ValueError, match=r"^--sw: a pan repaints"):
        edits.pan(
            WITH_PICTURES,
            image,
            direction=PanDirection.LEFT,
            seed=1,
            settings=SETTINGS,
            remix=remix,
        )
    with pytest.raises(ValueError, match=r"^--sw: Vary \(Region\) repaints"):
        edits.region(
            WITH_PICTURES,
            image,
            seed=1,
            settings=SETTINGS,
            regions=frozenset({Region.LEFT}),
            remix=remix,
        )
    # Without a weight the edit goes ahead, keeping the pictures for later variations.
    plain = edits.parse_remix("a barn, wide", WITH_PICTURES, (64, 64), SETTINGS)
    zoomed = edits.zoom(WITH_PICTURES, image, factor=2.0, seed=1, settings=SETTINGS, remix=plain)
    assert _weights(zoomed) == _weights(WITH_PICTURES)
