"""`--lora`, `--cn`, `--cnw` and the /imagine `lora` and `control_image` options: checked against
the LoRAs and ControlNets the server configured and the chosen model's family, before anything is
queued. Expected values follow from the settings below."""

from __future__ import annotations

import re

import pytest
from PIL import Image

from generation.contract import InputImage, InputRole, LoraWeight
from generation.prompt import (
    ImagineOptions,
    PromptError,
    control_link,
    parse_jobs,
    parse_prompt,
)
from generation.settings import ControlNetSpec, EngineSettings, LoraSpec, ModelSpec, Preprocessor

SETTINGS = EngineSettings(
    models=(
        ModelSpec(name="sd15", source="a/sd15", base_resolution=512),
        ModelSpec(name="xl", source="a/xl", base_resolution=1024, family="sdxl"),
    ),
    default_model="sd15",
    loras=(
        LoraSpec(name="ink", source="a/ink", default_weight=0.7, trigger_words=("inkstyle",)),
        LoraSpec(name="Pixel-Art", source="a/pixel"),
        LoraSpec(name="xl-film", source="a/film", family="sdxl"),
    ),
    controlnets=(
        ControlNetSpec(name="canny", source="a/canny", preprocessor=Preprocessor.CANNY),
        ControlNetSpec(name="depth", source="a/depth", preprocessor=Preprocessor.DEPTH),
        ControlNetSpec(name="xl-canny", source="a/xlc", family="sdxl"),
    ),
)


def control(colour: str = "white") -> InputImage:
    return InputImage(InputRole.CONTROL, Image.new("RGB", (64, 64), colour), source="edges.png")


def parse(text: str, **options: object) -> object:
    return parse_prompt(text, SETTINGS, options=ImagineOptions(**options), seed_source=lambda: 1)


def error(text: str, model: str | None = None, **options: object) -> PromptError:
    with pytest.raises(PromptError) as caught:
        parse_prompt(text, SETTINGS, model=model, options=ImagineOptions(**options))
    return caught.value


def test_lora_takes_its_default_weight_or_the_one_given():
    request = parse_prompt("a cat --lora ink --lora pixel-art:1.5", SETTINGS).request
    # The configured default (0.7) when no weight is typed; names match in any case and are
    # stored as configured.
    assert request.loras == (LoraWeight("ink", 0.7), LoraWeight("Pixel-Art", 1.5))
    # The stored prompt carries the trigger words (reply, PNG metadata), once.
    assert request.prompt == "a cat, inkstyle"
    again = parse_prompt("a cat, inkstyle --lora ink", SETTINGS).request
    assert again.prompt == "a cat, inkstyle"


def test_several_loras_in_one_flag_and_in_the_option():
    listed = parse_prompt("a cat --lora ink:0.2, pixel-art", SETTINGS).request.loras
    spaced = parse_prompt("a cat --lora ink:0.2 pixel-art", SETTINGS).request.loras
    assert listed == spaced == (LoraWeight("ink", 0.2), LoraWeight("Pixel-Art", 1.0))
    merged = parse("a cat --lora ink", lora="pixel-art:0").request.loras  # type: ignore[attr-defined]
    # The option's come first; weight 0 is allowed (the LoRA is loaded but has no effect).
    assert merged == (LoraWeight("Pixel-Art", 0.0), LoraWeight("ink", 0.7))


def test_the_same_lora_twice_is_harmless_unless_the_weights_differ():
    again = parse_prompt("a cat --lora ink:0.5 --LORA INK:0.5", SETTINGS).request.loras
    assert again == (LoraWeight("ink", 0.5),)
    message = str(error("a cat --lora ink:0.5", lora="ink:0.9"))
    assert message.startswith("--lora ink: given twice with different weights")
    assert "lora ink:0.9" in message and "--lora ink:0.5" in message


@pytest.mark.parametrize(
    ("text", "flag", "expected"),
    [
        ("a cat --lora ink:2.5", "--lora", "--lora ink:2.5: the weight after ':' must be a number"),
        ("a cat --lora ink:-1", "--lora", "between 0 and 2, got '-1'"),
        ("a cat --lora ink:lots", "--lora", "got 'lots'"),
        ("a cat --lora :0.5", "--lora", "--lora: expected NAME or NAME:WEIGHT, got ':0.5'"),
        ("a cat --lora", "--lora", "--lora: expected a LoRA name"),
        (
            "a cat --lora watercolour",
            "--lora",
            "--lora watercolour: no such LoRA here (LoRAs for model sd15: ink, Pixel-Art)",
        ),
        (
            "a cat --lora xl-film",
            "--lora",
            "--lora xl-film: made for SDXL models, but model sd15 is SD 1.x "
            "(LoRAs for model sd15: ink, Pixel-Art)",
        ),
        (
            "a cat --model xl --lora ink",
            "--lora",
            "--lora ink: made for SD 1.x models, but model xl is SDXL "
            "(LoRAs for model xl: xl-film)",
        ),
        ("a cat --cn sketch", "--cn", "--cn sketch: no such ControlNet here (ControlNets for"),
        ("a cat --cn xl-canny", "--cn", "--cn xl-canny: made for SDXL models"),
        ("a cat --cn canny", "--cn", "--cn canny: attach the picture to follow with the "),
        ("a cat --cnw 0.5", "--cnw", "--cnw 0.5: only with --cn NAME and a control_image"),
        ("a cat --cn canny --cnw 3", "--cnw", "--cnw: expected a number between 0 and 2"),
        ("a cat --cn canny --cn depth", "--cn", "--cn: given twice with different values"),
    ],
)
def test_bad_add_ons_are_refused_naming_the_flag(text, flag, expected):
    caught = error(text)
    assert caught.flag == flag
    assert expected in str(caught), str(caught)


def test_the_lora_option_is_named_in_its_errors():
    caught = error("a cat", lora="ink:9")
    assert caught.flag == "lora" and str(caught).startswith("lora ink:9: the weight")


def test_unknown_names_list_what_fits_the_model_or_say_there_is_none():
    bare = EngineSettings(models=SETTINGS.models, default_model="sd15")
    with pytest.raises(PromptError, match=re.escape("(this server has no LoRAs)")):
        parse_prompt("a cat --lora ink", bare)
    with pytest.raises(PromptError, match=re.escape("(this server has no ControlNets)")):
        parse_prompt("a cat --cn canny", bare, options=ImagineOptions(control_image=control()))


def test_controlnet_with_its_picture_and_weight():
    picture = control()
    request = parse("a house --controlnet Canny --cnw 1.5", control_image=picture).request  # type: ignore[attr-defined]
    assert (request.controlnet, request.controlnet_weight) == ("canny", 1.5)
    assert request.inputs_for(InputRole.CONTROL) == (picture,)
    default_weight = parse("a house --cn depth", control_image=picture).request  # type: ignore[attr-defined]
    assert (default_weight.controlnet, default_weight.controlnet_weight) == ("depth", 1.0)


def test_a_linked_control_picture_after_the_name():
    link = "https://cdn.example/edges.png"
    text = f"a house --cn canny <{link}> on a hill --cnw 0.5"
    # The bot finds the link before parsing and fetches it …
    assert control_link(text) == link
    assert control_link("a house --cn canny on a hill") is None
    assert control_link(f"{link} a house --sref {link}") is None
    # A flag only the bot knows yet (a /prefer option) doesn't make finding the link fail.
    assert control_link(f"a house --mystyle --cn canny <{link}>") == link
    assert control_link("a house --mystyle --cn canny") is None
    # … and the parser takes it as the picture to follow (not an image prompt, not text).
    fetched = InputImage(InputRole.CONTROL, Image.new("RGB", (64, 64)), source=link)
    parsed = parse(text, control_image=fetched)
    request = parsed.request  # type: ignore[attr-defined]
    assert (request.controlnet, request.controlnet_weight) == ("canny", 0.5)
    assert request.inputs == (fetched,) and parsed.image_refs == ()  # type: ignore[attr-defined]
    assert request.prompt == "a house, on a hill"
    # Not fetched (a front end that can't), or a second picture in the option: refused.
    missing = error(text)
    assert missing.flag == "--cn" and "the linked picture can't be fetched here" in str(missing)
    both = error(text, control_image=control())
    assert both.flag == "--cn" and "the control_image option gives a picture" in str(both)


def test_a_control_image_without_a_controlnet_is_refused():
    caught = error("a house", control_image=control())
    assert caught.flag == "control_image"
    assert "--cn NAME (ControlNets for model sd15: canny, depth)" in str(caught)
    on_xl = error("a house", model="xl", control_image=control())
    assert "(ControlNets for model xl: xl-canny)" in str(on_xl)


def test_every_job_of_a_permutation_carries_the_add_ons():
    jobs = parse_jobs(
        "a {cat, dog} --lora ink --cn canny",
        SETTINGS,
        options=ImagineOptions(control_image=control()),
        seed_source=lambda: 5,
    )
    assert [job.request.prompt for job in jobs] == ["a cat, inkstyle", "a dog, inkstyle"]
    assert all(job.request.loras == (LoraWeight("ink", 0.7),) for job in jobs)
    assert all(job.request.controlnet == "canny" for job in jobs)
    assert all(len(job.request.inputs_for(InputRole.CONTROL)) == 1 for job in jobs)


def test_a_lora_for_another_family_in_one_combination_names_it():
    with pytest.raises(PromptError, match=r"combination 2 of 2 .*--lora ink: made for SD 1\.x"):
        parse_jobs("a cat --model {sd15, xl} --lora ink", SETTINGS, seed_source=lambda: 5)


def test_requests_with_add_ons_survive_the_jobs_table():
    from generation.contract import GenerationRequest

    request = parse_prompt("a cat --lora ink:0.4 --lora pixel-art", SETTINGS).request
    restored = GenerationRequest.from_json(request.to_json())
    assert restored.loras == request.loras
