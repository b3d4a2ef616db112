"""Pictures that steer a job, through the real engine with tiny models: the tiny IP-Adapter
(random weights, a tiny CLIP image encoder) is built in code, saved in h94/IP-Adapter's folder
layout and loaded with diffusers' `load_ip_adapter`; a model without an adapter makes image
prompts by img2img and refuses references."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generation.conditioning import (
    WEIGHT_HELP,
    blend_pictures,
    check_inputs,
    image_prompt_scale,
    image_prompt_strength,
    reference_scale,
    supported_roles,
)
from generation.contract import GenerationRequest, InputImage, InputRole, JobKind
from generation.images import a1111_parameters, parse_a1111_parameters
from generation.requests import variation_request
from generation.settings import EngineSettings
from tests.generation.helpers import imagine, max_diff, pixels

RED = Image.new("RGB", (80, 64), (220, 30, 30))
BLUE = Image.new("RGB", (64, 64), (20, 40, 220))


def picture(
    image: Image.Image, weight: float = 1.0, role: InputRole = InputRole.IMAGE_PROMPT
) -> InputImage:
    return InputImage(role, image, weight=weight, source="attachment:p.png", sha256="ab" * 32)


@pytest.fixture(scope="module")
def base(engine):
    return engine.generate(imagine())


@pytest.fixture(scope="module")
def red_prompt(engine):
    return engine.generate(imagine(inputs=(picture(RED),)))


@pytest.fixture(scope="module")
def plain_engine(settings: EngineSettings):
    """The same tiny model with no image adapter configured."""
    from generation.engine import create_engine

    return create_engine(dataclasses.replace(settings, ip_adapters=()))


# ----------------------------------------------------------------------------- with an adapter


def test_the_tiny_adapter_is_saved_in_the_ip_adapter_layout(engine, red_prompt) -> None:
    folder = Path(engine.settings.cache_dir) / "tiny-ip-adapter"
    assert (folder / "models" / "ip-adapter_tiny.safetensors").is_file()
    assert (folder / "models" / "image_encoder" / "config.json").is_file()
    text2img, _ = engine.pipelines()
    # Loaded by load_ip_adapter, which registers the CLIP image encoder on the pipeline.
    assert type(text2img.image_encoder).__name__ == "CLIPVisionModelWithProjection"


def test_an_image_prompt_changes_the_images(base, red_prompt) -> None:
    assert max_diff(base.images[0], red_prompt.images[0]) > 2
    assert red_prompt.seeds == base.seeds


def test_iw_changes_the_images(engine, red_prompt) -> None:
    stronger = engine.generate(imagine(inputs=(picture(RED, 2.5),)))
    assert max_diff(stronger.images[0], red_prompt.images[0]) > 2


def test_a_blend_of_two_differs_from_each_picture(engine, red_prompt) -> None:
    blue = engine.generate(imagine(prompt="", inputs=(picture(BLUE),)))
    red = engine.generate(imagine(prompt="", inputs=(picture(RED),)))
    blend = engine.generate(imagine(prompt="", inputs=(picture(RED), picture(BLUE))))
    assert max_diff(blend.images[0], red.images[0]) > 2
    assert max_diff(blend.images[0], blue.images[0]) > 2
    assert max_diff(red.images[0], blue.images[0]) > 2


def test_style_weight_zero_is_no_reference(engine, base) -> None:
    off = engine.generate(imagine(inputs=(picture(RED, 0.0, InputRole.STYLE),)))
    on = engine.generate(imagine(inputs=(picture(RED, 100.0, InputRole.STYLE),)))
    assert max_diff(off.images[0], base.images[0]) <= 1
    assert max_diff(on.images[0], base.images[0]) > 2


def test_object_reference_changes_the_images(engine, base) -> None:
    result = engine.generate(imagine(inputs=(picture(BLUE, 100.0, InputRole.OBJECT),)))
    assert max_diff(result.images[0], base.images[0]) > 2


def test_the_adapter_is_detached_after_a_job(engine, base, red_prompt) -> None:
    # The pipelines are shared: a plain job after a pictured one is exactly the plain job.
    again = engine.generate(imagine())
    assert max_diff(again.images[0], base.images[0]) == 0
    text2img, _ = engine.pipelines()
    assert text2img.unet.encoder_hid_proj is None
    names = {type(p).__name__ for p in text2img.unet.attn_processors.values()}
    assert not any("IPAdapter" in name for name in names)


def test_style_applies_only_in_the_style_layers(engine, red_prompt) -> None:
    from generation.conditioning import plan_conditioning
    from generation.ip_adapter import prepare

    text2img, _ = engine.pipelines()
    adapter = engine._loaded["tiny"].image_adapter
    request = imagine(inputs=(picture(RED, 100.0, InputRole.STYLE),))
    plan = plan_conditioning(request, engine.settings.ip_adapter_for("tiny"))
    conditioning = prepare(plan, adapter)
    with conditioning.applied(text2img):
        scales = {
            name: list(processor.scale)
            for name, processor in text2img.unet.attn_processors.items()
            if hasattr(processor, "scale")
        }
    styled = {name for name, (_, style, _) in scales.items() if style > 0}
    # Slot order: image prompt, style, object. Only up block 0's second attention has style.
    assert styled and all(name.startswith("up_blocks.0.attentions.1.") for name in styled)
    assert all(prompt == 0 and obj == 0 for prompt, _, obj in scales.values())
    assert len(scales) > len(styled)


# ----------------------------------------------------------------------------- without one


def test_without_an_adapter_an_image_prompt_is_img2img(plain_engine, base) -> None:
    light = plain_engine.generate(imagine(inputs=(picture(RED, 0.5),)))
    strong = plain_engine.generate(imagine(inputs=(picture(RED, 3.0),)))
    strong_blue = plain_engine.generate(imagine(inputs=(picture(BLUE, 3.0),)))
    assert max_diff(light.images[0], base.images[0]) > 2
    assert max_diff(light.images[0], strong.images[0]) > 2
    # The picture itself is the start (the tiny VAE's random weights don't keep its colour).
    assert max_diff(strong.images[0], strong_blue.images[0]) > 2
    assert plain_engine._loaded["tiny"].image_adapter is None


def test_without_an_adapter_references_are_refused(plain_engine) -> None:
    settings = plain_engine.settings
    assert supported_roles(settings, "tiny") == {InputRole.IMAGE_PROMPT}
    style = imagine(inputs=(picture(RED, 100.0, InputRole.STYLE),))
    with pytest.raises(ValueError, match=r"^sref: .*image adapter"):
        check_inputs(settings, style)
    with pytest.raises(ValueError, match=r"^sref: "):
        plain_engine.generate(style)
    with pytest.raises(ValueError, match=r"^oref: .*--cref"):
        check_inputs(settings, imagine(inputs=(picture(RED, 100.0, InputRole.OBJECT),)))


def test_with_an_adapter_every_role_is_supported(settings: EngineSettings) -> None:
    assert supported_roles(settings, "tiny") == {
        InputRole.IMAGE_PROMPT,
        InputRole.STYLE,
        InputRole.OBJECT,
    }
    check_inputs(settings, imagine(inputs=(picture(RED, 100.0, InputRole.STYLE),)))


def test_the_tiny_adapter_serves_only_tiny_models(settings: EngineSettings) -> None:
    from generation.settings import ModelSpec

    real = dataclasses.replace(
        settings, models=(*settings.models, ModelSpec("sd15", "some/hub-id")), clip_model="x"
    )
    assert real.ip_adapter_for("tiny") is not None
    assert real.ip_adapter_for("sd15") is None


def test_an_iw_that_leaves_no_step_is_refused(plain_engine) -> None:
    request = imagine(steps=2, inputs=(picture(RED, 3.0),))
    with pytest.raises(ValueError, match=r"^iw: "):
        check_inputs(plain_engine.settings, request)


def test_blend_pictures_crops_and_weights() -> None:
    mixed = blend_pictures([RED, BLUE], [3.0, 1.0], (64, 32))
    assert mixed.size == (64, 32)
    expected = 0.75 * np.array([220, 30, 30]) + 0.25 * np.array([20, 40, 220])
    assert np.abs(pixels(mixed)[0, 0] - expected).max() <= 1


# ----------------------------------------------------------------------------- the request


def test_a_blend_may_have_no_prompt_but_a_text_job_may_not() -> None:
    blend = imagine(prompt="", inputs=(picture(RED), picture(BLUE)))
    assert blend.prompt == ""
    with pytest.raises(ValueError, match=r"^prompt: "):
        imagine(prompt="")
    with pytest.raises(ValueError, match=r"^prompt: "):
        imagine(prompt="", inputs=(picture(RED, 100.0, InputRole.STYLE),))


@pytest.mark.parametrize(
    ("role", "weight"),
    [(InputRole.IMAGE_PROMPT, 9.0), (InputRole.STYLE, 1001.0), (InputRole.OBJECT, -1.0)],
)
def test_weights_outside_their_range_are_refused(role: InputRole, weight: float) -> None:
    with pytest.raises(ValueError, match=rf"^weight: a {role.value} image"):
        imagine(inputs=(picture(RED, weight, role),))


def test_six_pictures_are_refused() -> None:
    with pytest.raises(ValueError, match=r"^inputs: at most 5 image_prompt"):
        imagine(prompt="", inputs=tuple(picture(RED) for _ in range(6)))


def test_the_weight_mapping() -> None:
    assert image_prompt_strength(1.0) == 0.75
    assert image_prompt_strength(3.0) == 0.25
    assert image_prompt_scale(1.0) == 0.5
    assert reference_scale(0.0) == 0.0
    assert reference_scale(100.0) == 1.0
    assert 1.8 < reference_scale(1000.0) < 2.0
    for flag in ("--iw", "--sw", "--ow", "--cw"):
        assert flag in WEIGHT_HELP


def test_every_input_is_in_the_png_metadata() -> None:
    request = GenerationRequest(
        kind=JobKind.IMAGINE,
        prompt="a fox",
        width=64,
        height=64,
        inputs=(
            InputImage(InputRole.IMAGE_PROMPT, RED, 1.5, "https://cdn.discordapp.com/a.png", "aa"),
            InputImage(InputRole.IMAGE_PROMPT, BLUE, 1.5, "attachment:b.png", "bb"),
            InputImage(InputRole.STYLE, RED, 250.0, "https://cdn.discordapp.com/s.png", "cc"),
        ),
    )
    parsed = parse_a1111_parameters(a1111_parameters(request, 7, "tiny"))
    assert parsed["Seed"] == "7"
    assert parsed["Image prompt 1"] == (
        "Weight: 1.5, Hash: aa, Source: https://cdn.discordapp.com/a.png"
    )
    assert parsed["Image prompt 2"] == "Weight: 1.5, Hash: bb, Source: attachment:b.png"
    assert parsed["Style reference 1"].startswith("Weight: 250, Hash: cc, Source: https://")


def test_a_variation_keeps_its_pictures(engine, red_prompt) -> None:
    # The img2img list form: one row of picture embeddings per candidate.
    parent = imagine(inputs=(picture(RED, 2.0),))
    plain = variation_request(imagine(), red_prompt.images[0], strength=0.7, seed=5)
    pictured = variation_request(parent, red_prompt.images[0], strength=0.7, seed=5)
    assert max_diff(engine.generate(plain).images[0], engine.generate(pictured).images[0]) > 2


def test_sdxl_takes_image_prompts_and_styles(tiny_cache: Path) -> None:
    from generation.engine import create_engine
    from generation.settings import ModelSpec

    xl = create_engine(
        EngineSettings(
            models=(ModelSpec("xl", "tiny-sdxl", base_resolution=128, family="sdxl"),),
            default_model="xl",
            cache_dir=tiny_cache,
            device="cpu",
            local_files_only=True,
        )
    )
    base = xl.generate(imagine(model="xl"))
    prompted = xl.generate(imagine(model="xl", inputs=(picture(RED),)))
    styled = xl.generate(imagine(model="xl", inputs=(picture(RED, 100.0, InputRole.STYLE),)))
    assert max_diff(base.images[0], prompted.images[0]) > 2
    assert max_diff(base.images[0], styled.images[0]) > 2
    assert max_diff(prompted.images[0], styled.images[0]) > 2
