"""Models, LoRAs and ControlNets through the fake Discord: /models, the autocomplete of /imagine's
`model` and `lora` options, `--lora` and `--cn` with a control_image on the real tiny engine
(a random-weight LoRA file and ControlNet folder built here and loaded through the real code),
and every bad add-on refused privately with nothing charged."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from bot.app.fetch import FetchPolicy
from bot.core.credits import job_cost
from bot.core.models import JobState
from bot.discord.client import ImagineBot
from generation.settings import ControlNetSpec, EngineSettings, LoraSpec, ModelSpec, Preprocessor
from tests.bot.conftest import bot_config, in_process_workers
from tests.bot.helpers import assert_ledger_consistent, available, job_id_of
from tests.fakediscord import FakeDiscord, Upload
from tests.fakediscord.interactions import FakeInteraction
from tests.fakediscord.model import Message, User

JOB_TIMEOUT_S = 90.0
ALLOWANCE = 100


@pytest.fixture(scope="module")
def addon_settings(
    bot_engine_settings: EngineSettings, tmp_path_factory: pytest.TempPathFactory
) -> EngineSettings:
    from generation.tiny import TINY_SD_DIR, build_tiny_controlnet, build_tiny_lora

    model = bot_engine_settings.cache_dir / TINY_SD_DIR
    root = tmp_path_factory.mktemp("add-ons")
    lora = build_tiny_lora(root / "ink.safetensors", model)
    controlnet = build_tiny_controlnet(root / "canny", model)
    return dataclasses.replace(
        bot_engine_settings,
        models=(
            dataclasses.replace(bot_engine_settings.models[0], description="the tiny one"),
            # Never loaded: it is there so that a LoRA of another family has a model to fit.
            ModelSpec(name="tiny-xl", source="tiny-sdxl", base_resolution=128, family="sdxl"),
        ),
        loras=(
            LoraSpec(
                name="ink",
                source=str(lora),
                default_weight=0.8,
                trigger_words=("inkstyle",),
                description="Black ink line art",
            ),
            LoraSpec(name="xl-film", source="someone/xl-film", family="sdxl"),
        ),
        controlnets=(
            ControlNetSpec(
                name="canny",
                source=str(controlnet),
                preprocessor=Preprocessor.CANNY,
                description="Follows the edges of your picture",
            ),
        ),
    )


@pytest.fixture(scope="module")
def addon_engine(addon_settings: EngineSettings) -> Any:
    from generation.engine import create_engine

    return create_engine(addon_settings)


def make_bot(
    fake: FakeDiscord, data_dir: Path, settings: EngineSettings, engine: Any, **sections: Any
) -> ImagineBot:
    config = bot_config(data_dir, settings, fake.guild_id, **sections)
    # The fake's CDN is plain http on 127.0.0.1, which the configured policy refuses.
    policy = FetchPolicy(
        allowed_hosts=frozenset({"127.0.0.1"}),
        allowed_schemes=frozenset({"http"}),
        allow_private_addresses=True,
    )
    return ImagineBot(
        config,
        core_options={"workers": in_process_workers(config, engine)},
        fetch_policy=policy,
        guild_ready_timeout=0.05,
    )


def shapes_png() -> bytes:
    image = Image.new("RGB", (128, 128), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((16, 16, 70, 90), fill="black")
    draw.ellipse((60, 50, 120, 110), fill=(200, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def is_grid(message: Message) -> bool:
    """The finished grid (progress edits may carry preview images, but no V buttons)."""
    labels = [button.get("label") for button in message.buttons]
    return not message.ephemeral and bool(message.attachments) and "V1" in labels


def names(interaction: FakeInteraction) -> list[str]:
    assert interaction.autocomplete_choices is not None
    return [choice["value"] for choice in interaction.autocomplete_choices]


async def private_text(interaction: FakeInteraction) -> str:
    """The private message a refused command ends with (a reply, or a follow-up after a
    private "thinking…")."""
    message = await interaction.wait_message(lambda m: m.ephemeral and bool(m.content))
    return message.content


@contextlib.asynccontextmanager
async def serving(
    data_dir: Path, settings: EngineSettings, engine: Any, **sections: Any
) -> AsyncIterator[tuple[FakeDiscord, User, ImagineBot]]:
    """The fake Discord with member alice, and the bot (config `sections`) running against it."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, data_dir, settings, engine, **sections)
        async with fake.run_bot(bot):
            yield fake, alice, bot


async def test_models_lists_what_is_offered_and_options_autocomplete(
    tmp_path: Path, addon_settings: EngineSettings, addon_engine: Any
) -> None:
    async with serving(tmp_path / "data", addon_settings, addon_engine) as (fake, alice, _):
        listing = await fake.slash(alice, "models")
        reply = await listing.wait_original()
        assert reply.ephemeral
        sections = {embed["title"]: embed["description"] for embed in reply.embeds}
        assert set(sections) == {"Models", "LoRAs", "ControlNets"}
        # 128² at 4 steps with 8 candidates: 4 x (128²/512²) x (4/30) x 1 → at least 1.
        assert (
            "`tiny` (default) — SD 1.x, 128px, 1 credit a job: the tiny one" in (sections["Models"])
        )
        assert "`tiny-xl` — SDXL, 128px" in sections["Models"]
        assert (
            "`ink` — for SD 1.x models (`tiny`), weight 0.8, adds “inkstyle”: Black ink"
            in (sections["LoRAs"])
        )
        assert "`xl-film` — for SDXL models (`tiny-xl`)" in sections["LoRAs"]
        assert (
            "`canny` — for SD 1.x models (`tiny`), follows edges (Canny)"
            in (sections["ControlNets"])
        )

        # The model option has no fixed choices any more: it is suggested as typed.
        model_option = next(o for o in fake.command("imagine")["options"] if o["name"] == "model")
        assert model_option.get("autocomplete") and not model_option.get("choices")
        typing = await fake.autocomplete(alice, "imagine", focused="model", model="xl", prompt="a")
        assert await typing.wait_acked() == 8
        assert names(typing) == ["tiny-xl"]
        everything = await fake.autocomplete(alice, "imagine", focused="model", model="")
        await everything.wait_acked()
        assert names(everything) == ["tiny", "tiny-xl"]
        assert everything.autocomplete_choices[0]["name"].startswith("tiny · SD 1.x, 128px")

        # LoRAs fitting the model chosen in the same command (the server default if none).
        loras = await fake.autocomplete(alice, "imagine", focused="lora", lora="i")
        await loras.wait_acked()
        assert names(loras) == ["ink"]
        on_xl = await fake.autocomplete(alice, "imagine", focused="lora", lora="", model="tiny-xl")
        await on_xl.wait_acked()
        assert names(on_xl) == ["xl-film"]
        # The last name of a list is completed, keeping what came before; a weight typed
        # after the colon is kept too, and a LoRA already in the list is not offered again.
        listed = await fake.autocomplete(alice, "imagine", focused="lora", lora="xl-film, in")
        await listed.wait_acked()
        assert names(listed) == ["xl-film, ink"]
        weighted = await fake.autocomplete(alice, "imagine", focused="lora", lora="in:0.5")
        await weighted.wait_acked()
        assert names(weighted) == ["ink:0.5"]
        again = await fake.autocomplete(alice, "imagine", focused="lora", lora="ink, i")
        await again.wait_acked()
        assert names(again) == []


async def test_lora_and_controlnet_with_an_attached_picture(
    tmp_path: Path, addon_settings: EngineSettings, addon_engine: Any
) -> None:
    async with serving(tmp_path / "data", addon_settings, addon_engine) as (fake, alice, bot):
        job = await fake.slash(
            alice,
            "imagine",
            prompt="a house --cn canny --cnw 1.5 --seed 11",
            lora="ink:0.6",
            control_image=Upload("edges.png", shapes_png()),
        )
        status = await job.wait_message(is_grid, timeout=JOB_TIMEOUT_S)
        job_id = int(status.custom_ids[0].split(":")[2])
        stored = await bot.core.jobs.require(job_id)
        assert stored.state is JobState.SUCCEEDED
        data = stored.request_data
        assert data["loras"] == [{"name": "ink", "weight": 0.6}]
        assert (data["controlnet"], data["controlnet_weight"]) == ("canny", 1.5)
        control = [i for i in data["inputs"] if i["role"] == "control"]
        assert len(control) == 1 and control[0]["source"] == "attachment:edges.png"
        # The reply names the LoRA and the ControlNet with the weights used, and shows the
        # control map beside the grid: Canny's edges, white lines on black.
        assert "LoRA ink 0.6 · ControlNet canny 1.5" in status.content
        control_map = status.attachments[1]
        assert len(status.attachments) == 2
        assert control_map.filename == f"job-{job_id}-control.png"
        edges = Image.open(io.BytesIO(control_map.data)).convert("L")
        assert max(edges.size) <= 256
        histogram = edges.histogram()
        dark, bright = sum(histogram[:32]), sum(histogram[224:])
        assert dark > 0.8 * edges.width * edges.height and bright > 0
        # The engine ran with the LoRA: A1111's tag is in the image's metadata.
        assert stored.result is not None
        with Image.open(bot.config.data_dir / stored.result.image_paths[0]) as image:
            parameters = image.info["parameters"]
        assert "<lora:ink:0.6>" in parameters and "attachment:edges.png" in parameters
        report = await bot.core.credits.check_consistency()
        assert report.ok, str(report)


async def finished_reply(fake: FakeDiscord, source: Message, seen: set[int]) -> Message:
    """The next status message replying to `source`, once it shows its result grid."""
    reply = await fake.wait_for_message(
        lambda m: m.referenced is source and m.id not in seen and m.custom_ids != []
    )
    seen.add(reply.id)
    await fake.wait_for(lambda: is_grid(reply) or None, timeout=JOB_TIMEOUT_S)
    return reply


async def test_a_linked_control_picture_is_kept_by_variations_and_remix_not_by_edits(
    tmp_path: Path, addon_settings: EngineSettings, addon_engine: Any
) -> None:
    # Costs high enough that the tiny jobs' ControlNet share shows after rounding.
    credits = {"cost_imagine": 1000, "cost_variation": 100}
    data = tmp_path / "data"
    async with serving(data, addon_settings, addon_engine, credits=credits) as (fake, alice, bot):
        link = fake.host_file("edges.png", shapes_png())
        job = await fake.slash(
            alice, "imagine", prompt=f"a house --cn canny {link} --lora ink:0.6 --seed 11"
        )
        grid = await job.wait_message(is_grid, timeout=JOB_TIMEOUT_S)
        parent = await bot.core.jobs.require(job_id_of(grid))
        assert parent.state is JobState.SUCCEEDED
        control = [i for i in parent.request_data["inputs"] if i["role"] == "control"]
        assert [i["source"] for i in control] == [link]
        assert len(grid.attachments) == 2  # the grid and the control map
        # Charged with the ControlNet's share: more than the same job without it.
        credits = bot.config.credits
        request = await bot.core.jobs.request(parent)
        plain = request.with_changes(controlnet=None, inputs=())
        assert parent.cost == job_cost(request, credits) > job_cost(plain, credits)
        assert await available(bot, alice.id) == ALLOWANCE - parent.cost
        seen: set[int] = set()

        # A variation keeps the ControlNet and its picture (img2img with the map).
        vary = await fake.click(alice, grid, label="V1")
        await vary.wait_acked()
        varied_message = await finished_reply(fake, grid, seen)
        varied = await bot.core.jobs.require(job_id_of(varied_message))
        assert varied.kind.value == "variation" and varied.request_data["controlnet"] == "canny"
        assert [i["source"] for i in varied.request_data["inputs"]] == [link]
        assert varied.request_data["loras"] == [{"name": "ink", "weight": 0.6}]
        assert len(varied_message.attachments) == 2
        assert "ControlNet canny 1" in varied_message.content

        # Remix: the edited prompt's --lora replaces the LoRA; the ControlNet stays.
        await bot.app.preferences.update(alice.id, remix=True)
        form = await fake.click(alice, grid, label="V2")
        assert await form.wait_acked() == 9
        await fake.submit_modal(form, {"prompt": "a barn --lora ink:1.2"})
        remixed = await bot.core.jobs.require(job_id_of(await finished_reply(fake, grid, seen)))
        assert remixed.request_data["loras"] == [{"name": "ink", "weight": 1.2}]
        assert remixed.request_data["controlnet"] == "canny"
        assert remixed.request_data["prompt"] == "a barn, inkstyle"
        await bot.app.preferences.update(alice.id, remix=False)

        # An edit leaves the ControlNet out and says so; the LoRA stays.
        separate = await fake.click(alice, grid, label="U1")
        assert await separate.wait_acked() == 6
        image = await fake.wait_for_message(
            lambda m: m.referenced is grid and len(m.attachments) == 1 and "Image #1" in m.content
        )
        zoom = await fake.click(alice, image, label="Zoom Out 2x")
        await zoom.wait_acked()
        zoomed_message = await finished_reply(fake, image, seen)
        zoomed = await bot.core.jobs.require(job_id_of(zoomed_message))
        assert zoomed.kind.value == "zoom" and zoomed.request_data["controlnet"] is None
        assert zoomed.request_data["loras"] == [{"name": "ink", "weight": 0.6}]
        assert "ControlNet canny left out: a zoom paints a changed canvas" in zoomed_message.content
        assert len(zoomed_message.attachments) == 1
        await assert_ledger_consistent(bot)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"prompt": "a cat --lora watercolour"}, "--lora watercolour: no such LoRA here"),
        ({"prompt": "a cat", "lora": "ink:3"}, "lora ink:3: the weight after ':' must be"),
        (
            {"prompt": "a cat --lora xl-film"},
            "--lora xl-film: made for SDXL models, but model tiny is SD 1.x",
        ),
        (
            {"prompt": "a cat --lora ink", "model": "tiny-xl"},
            "--lora ink: made for SD 1.x models, but model tiny-xl is SDXL",
        ),
        ({"prompt": "a cat", "model": "tiny-3"}, "model: expected a configured model"),
        ({"prompt": "a cat --cn canny"}, "--cn canny: attach the picture to follow"),
        ({"prompt": "a cat --cn sketch"}, "--cn sketch: no such ControlNet here"),
        ({"prompt": "a cat --cnw 2"}, "--cnw 2: only with --cn NAME"),
        (
            {"prompt": "a cat", "control_image": Upload("edges.png", shapes_png())},
            "control_image: name the ControlNet to follow it with --cn NAME",
        ),
        (
            {"prompt": "a cat --cn canny", "control_image": Upload("notes.png", b"not a picture")},
            "control_image notes.png: that is not an image",
        ),
    ],
)
async def test_bad_add_ons_are_refused_privately_and_cost_nothing(
    tmp_path: Path,
    addon_settings: EngineSettings,
    addon_engine: Any,
    options: dict[str, Any],
    expected: str,
) -> None:
    async with serving(tmp_path / "data", addon_settings, addon_engine) as (fake, alice, bot):
        refused = await fake.slash(alice, "imagine", options=options)
        text = await private_text(refused)
        assert expected in text, text
        assert (await bot.core.credits.balance(alice.id)).available == ALLOWANCE
        assert await bot.core.jobs.for_user(alice.id) == []
