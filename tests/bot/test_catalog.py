"""bot/app/catalog.py without Discord: what /models says, the autocomplete suggestions, the add-ons
line of a job and the control map thumbnail. Expected figures follow from the config below."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from bot.app import catalog
from bot.app.render import help_text
from bot.config import parse_config
from bot.console.shell import run_shell
from tests.bot.conftest import bot_config, in_process_workers

CONFIG = parse_config(
    {
        "generation": {
            "models": [
                {"name": "tiny", "source": "tiny", "base_resolution": 128},
                {
                    "name": "tiny-xl",
                    "source": "tiny-sdxl",
                    "base_resolution": 256,
                    "family": "sdxl",
                },
            ],
            "default_steps": 30,
            "candidates": 8,
            "loras": [
                {"name": "ink", "source": "a/ink", "default_weight": 0.8},
                {"name": "inkwash", "source": "a/wash", "description": "Ink wash"},
                {"name": "pink", "source": "a/pink"},
                {"name": "xl-film", "source": "a/film", "family": "sdxl"},
            ],
        },
        "credits": {"cost_imagine": 16},
    }
)


def values(choices: list[catalog.Choice]) -> list[str]:
    return [choice.value for choice in choices]


def test_cost_per_model_follows_the_credit_formula():
    # 16 credits at 512², 30 steps, 8 candidates: 128² is 1/16 of that area, 256² a quarter.
    assert catalog.model_cost(CONFIG, CONFIG.engine.model("tiny")) == 1
    assert catalog.model_cost(CONFIG, CONFIG.engine.model("tiny-xl")) == 4
    section = catalog.models_section(CONFIG)
    assert "`tiny` (default) — SD 1.x, 128px, 1 credit a job" in section
    assert "`tiny-xl` — SDXL, 256px, 4 credits a job" in section


def test_lora_suggestions_start_with_the_typed_prefix_then_contain_it():
    # "ink" and "inkwash" start with it; "pink" only contains it; xl-film is another family.
    assert values(catalog.lora_choices(CONFIG, "ink", None)) == ["ink", "inkwash", "pink"]
    assert values(catalog.lora_choices(CONFIG, "", "tiny-xl")) == ["xl-film"]
    shown = catalog.lora_choices(CONFIG, "inkw", "tiny")[0].name
    assert shown == "inkwash · weight 1 — Ink wash"


def test_lora_suggestions_complete_the_last_name_of_a_list():
    assert values(catalog.lora_choices(CONFIG, "ink:0.3, pi", None)) == ["ink:0.3, pink"]
    assert values(catalog.lora_choices(CONFIG, "pink inkw:1.5", None)) == ["pink inkwash:1.5"]
    # Too long for a Discord choice value: nothing rather than a cut list.
    assert catalog.lora_choices(CONFIG, "ink, " * 25 + "p", None) == []


def test_model_suggestions_say_family_size_and_cost():
    assert values(catalog.model_choices(CONFIG, "XL")) == ["tiny-xl"]
    assert catalog.model_choices(CONFIG, "")[1].name == "tiny-xl · SDXL, 256px, 4 cr"


def test_add_ons_text_lists_loras_and_the_controlnet_with_their_weights():
    data = {
        "loras": [{"name": "ink", "weight": 0.5}, {"name": "pink", "weight": 1.0}],
        "controlnet": "canny",
        "controlnet_weight": 1.25,
    }
    assert catalog.add_ons_text(data) == "LoRA ink 0.5, pink 1 · ControlNet canny 1.25"
    assert catalog.add_ons_text({"loras": [], "controlnet": None}) == ""


def test_controlnets_section_names_the_preprocessor_and_the_extra_cost():
    import dataclasses

    from generation.settings import ControlNetSpec, Preprocessor

    lines = ControlNetSpec("lines", "a/lines", preprocessor=Preprocessor.LINEART)
    engine = dataclasses.replace(CONFIG.engine, controlnets=(lines,))
    config = dataclasses.replace(CONFIG, engine=engine)
    text = catalog.controlnets_section(config)
    assert "• `lines` — for SD 1.x models (`tiny`), follows line art" in text
    assert "`--cn NAME https://…`" in text
    assert "A job with a ControlNet costs 50 % more" in text
    free = dataclasses.replace(
        config, credits=dataclasses.replace(config.credits, cost_controlnet_percent=0)
    )
    assert "more" not in catalog.controlnets_section(free)


def test_edit_notes_say_the_controlnet_was_left_out():
    from generation.contract import GenerationRequest, JobKind
    from generation.requests import zoom_request

    plain = GenerationRequest(kind=JobKind.IMAGINE, prompt="a cat")
    parent = {"controlnet": "canny", "controlnet_weight": 1.0}
    assert catalog.edit_notes(parent, plain) == ()  # not an edit
    edit = zoom_request(plain, Image.new("RGB", (64, 64)), factor=2.0, seed=1)
    (note,) = catalog.edit_notes(parent, edit)
    assert note.startswith("ControlNet canny left out: a zoom paints a changed canvas")
    assert catalog.edit_notes({"controlnet": None}, edit) == ()


def test_edit_notes_say_the_members_pictures_are_not_used_by_an_edit():
    from generation.contract import GenerationRequest, InputImage, InputRole, JobKind
    from generation.requests import pan_request, variation_request

    picture = Image.new("RGB", (64, 64))
    inputs = (
        InputImage(InputRole.IMAGE_PROMPT, picture, source="fox.png"),
        InputImage(InputRole.STYLE, picture, source="style.png"),
    )
    parent = GenerationRequest(kind=JobKind.IMAGINE, prompt="a cat", inputs=inputs)
    pan = pan_request(parent, picture, direction="left", seed=1, max_pixels=512 * 512)
    (note,) = catalog.edit_notes({}, pan)
    assert note.startswith("image prompt and style reference not used by a pan")
    # A variation uses them: nothing to say.
    assert catalog.edit_notes({}, variation_request(parent, picture, strength=0.7, seed=1)) == ()


def test_control_thumbnail_is_small_and_gone_with_its_file(tmp_path: Path):
    path = tmp_path / "control.png"
    Image.new("L", (1024, 512), 255).save(path)
    thumbnail = catalog.control_thumbnail(path)
    assert thumbnail is not None
    assert Image.open(io.BytesIO(thumbnail)).size == (256, 128)
    path.unlink()
    assert catalog.control_thumbnail(path) is None


def test_help_mentions_models_and_the_add_on_flags():
    text = help_text(CONFIG)
    assert "`/models`" in text and "`--lora NAME[:W]`" in text and "`--cn NAME [LINK]`" in text


async def test_the_console_lists_the_catalog_too(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    config = bot_config(tmp_path / "data", bot_engine_settings)
    out = io.StringIO()
    code = await run_shell(
        config,
        stdin=io.StringIO("/models\n"),
        out=out,
        core_options={"workers": in_process_workers(config, shared_engine)},
    )
    text = out.getvalue()
    assert code == 0
    assert "**Models**\n• `tiny` (default) — SD 1.x, 128px" in text
    assert "This server offers no LoRAs." in text and "This server offers no ControlNets." in text
