"""Features used together, end to end through the fake Discord with the real discord.py client
and the tiny engine (with its built-in image adapter, a random-weight LoRA and ControlNet):
/describe of a link, the PNG metadata of a job with pictures and a LoRA, /info's queue
positions, a member's settings, suffix and shortcut through image prompts, U2, a remixed zoom,
Vary (Region) with a mask and V1 of the zoom, `--cnw` alone in a remix, and what happens when
someone else presses or submits on the new kinds of message."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from bot.app.fetch import FetchPolicy
from bot.core.models import JobKind, JobState, LedgerKind
from bot.discord.client import ImagineBot
from generation.images import parse_a1111_parameters
from generation.settings import ControlNetSpec, EngineSettings, LoraSpec, Preprocessor
from tests.bot.conftest import GatedEngine, bot_config, in_process_workers
from tests.bot.helpers import (
    ALLOWANCE,
    JOB_TIMEOUT_S,
    assert_ledger_consistent,
    available,
    eventually,
    job_id_of,
)
from tests.fakediscord import FakeDiscord, Upload
from tests.fakediscord.commands import SchemaViolation
from tests.fakediscord.model import Message, User

# The fake's CDN is plain http on 127.0.0.1, which the configured policy refuses.
FAKE_CDN = FetchPolicy(
    allowed_hosts=frozenset({"127.0.0.1"}),
    allowed_schemes=frozenset({"http"}),
    allow_private_addresses=True,
)
NOT_YOURS = "isn't your job"


@pytest.fixture(scope="module")
def together_settings(
    bot_engine_settings: EngineSettings, tmp_path_factory: pytest.TempPathFactory
) -> EngineSettings:
    from generation.tiny import TINY_SD_DIR, build_tiny_controlnet, build_tiny_lora

    model = bot_engine_settings.cache_dir / TINY_SD_DIR
    root = tmp_path_factory.mktemp("together-add-ons")
    return dataclasses.replace(
        bot_engine_settings,
        # A preview at every step: the progress edits (at most one per 0.2 s) have one to carry.
        preview_interval_s=0.0,
        loras=(
            LoraSpec(
                name="ink",
                source=str(build_tiny_lora(root / "ink.safetensors", model)),
                default_weight=0.8,
                trigger_words=("inkstyle",),
            ),
        ),
        controlnets=(
            ControlNetSpec(
                name="canny",
                source=str(build_tiny_controlnet(root / "canny", model)),
                preprocessor=Preprocessor.CANNY,
            ),
        ),
    )


@pytest.fixture(scope="module")
def together_engine(together_settings: EngineSettings) -> Any:
    from generation.engine import create_engine

    return create_engine(together_settings)


@contextlib.asynccontextmanager
async def serving(
    data_dir: Path, settings: EngineSettings, engine: Any, **sections: Any
) -> AsyncIterator[tuple[FakeDiscord, User, ImagineBot]]:
    """The fake Discord with member alice, and the bot (config `sections`) running against it."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        config = bot_config(data_dir, settings, fake.guild_id, **sections)
        bot = ImagineBot(
            config,
            core_options={"workers": in_process_workers(config, engine)},
            fetch_policy=FAKE_CDN,
            guild_ready_timeout=0.05,
        )
        async with fake.run_bot(bot):
            yield fake, alice, bot


def png(colour: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def shapes_png() -> bytes:
    image = Image.new("RGB", (128, 128), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((16, 16, 70, 90), fill="black")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def labels(message: Message) -> list[str]:
    return [b.get("label") or b["emoji"]["name"] for b in message.buttons]


def is_result(message: Message) -> bool:
    """A finished grid: images under V1 (progress edits carry previews, but no V buttons)."""
    return bool(message.attachments) and "V1" in labels(message)


def is_describe_result(message: Message) -> bool:
    return any(c.startswith("describe:R:") for c in message.custom_ids)


def preview_states(message: Message) -> list[Any]:
    """The progress edits of a status message that carried a live preview."""
    return [
        state
        for state in message.states[:-1]
        if any(a.filename == "preview.png" for a in state.attachments)
    ]


async def separated(fake: FakeDiscord, user: User, grid: Message, index: int) -> Message:
    press = await fake.click(user, grid, label=f"U{index}")
    assert await press.wait_acked() == 6
    return await fake.wait_for_message(
        lambda m: (
            m.referenced is grid and len(m.attachments) == 1 and f"Image #{index}" in m.content
        )
    )


async def finished_reply(fake: FakeDiscord, source: Message, seen: set[int]) -> Message:
    """The next status message replying to `source`, once it shows its result grid."""
    reply = await fake.wait_for_message(
        lambda m: m.referenced is source and m.id not in seen and m.custom_ids != []
    )
    seen.add(reply.id)
    await fake.wait_for(lambda: is_result(reply) or None, timeout=JOB_TIMEOUT_S)
    return reply


async def private_note(interaction: Any) -> str:
    """The private message an interaction was answered with (a reply or a follow-up)."""
    message = await interaction.wait_for(
        lambda i: next((m for m in i.messages if m.ephemeral and m.content.strip()), None),
        timeout=JOB_TIMEOUT_S,
    )
    return str(message.content)


async def held_and_settled(bot: ImagineBot, user_id: int, job_id: int) -> int:
    """The job's cost, checked to have been held once and settled once in the ledger."""
    job = await bot.core.jobs.require(job_id)
    entries = [e for e in await bot.core.credits.ledger(user_id, 200) if e.job_id == job_id]
    assert sorted(e.kind for e in entries) == sorted([LedgerKind.HOLD, LedgerKind.SETTLE])
    (hold,) = [e for e in entries if e.kind is LedgerKind.HOLD]
    assert job.cost > 0 and hold.amount == -job.cost
    return job.cost


# ----- 1. /describe of a link ----------------------------------------------------------------


async def test_describe_a_link_and_a_link_from_elsewhere_is_refused_free(
    tmp_path: Path, together_settings: EngineSettings, together_engine: Any
) -> None:
    async with serving(tmp_path / "data", together_settings, together_engine) as (
        fake,
        alice,
        bot,
    ):
        served = png((30, 160, 90), (64, 96))
        link = fake.host_file("tall.png", served)
        asked = await fake.slash(alice, "describe", link=f"<{link}>")
        assert await asked.wait_acked() == 5 and asked.ephemeral
        result = await asked.wait_followup(is_describe_result, timeout=JOB_TIMEOUT_S)
        described = await bot.core.jobs.require(int(result.custom_ids[-1].split(":")[2]))
        assert described.kind is JobKind.DESCRIBE and described.state is JobState.SUCCEEDED
        assert described.result is not None and len(described.result.texts) == 4
        assert all(text.endswith("--ar 2:3") for text in described.result.texts)
        (picture,) = described.request_data["inputs"]
        assert (picture["source"], picture["sha256"]) == (link, hashlib.sha256(served).hexdigest())
        assert f"described <{link}>" in result.content
        assert [label for label in labels(result)] == ["1", "2", "3", "4", "🔄"]
        assert await available(bot, alice.id) == ALLOWANCE - described.cost

        before = await available(bot, alice.id)
        refused = await fake.slash(alice, "describe", link="http://example.com/cat.png")
        note = await private_note(refused)
        assert "images are only fetched from 127.0.0.1, not example.com" in note
        assert await available(bot, alice.id) == before
        assert len(await bot.core.jobs.for_user(alice.id)) == 1
        await assert_ledger_consistent(bot)


# ----- 2. the PNG metadata of a job's pictures -----------------------------------------------


async def test_posted_images_carry_each_picture_and_the_lora_in_their_metadata(
    tmp_path: Path, together_settings: EngineSettings, together_engine: Any
) -> None:
    async with serving(tmp_path / "data", together_settings, together_engine) as (
        fake,
        alice,
        bot,
    ):
        subject, style = png((200, 40, 20)), png((20, 40, 200), (64, 64))
        subject_link = fake.host_file("subject.png", subject)
        style_link = fake.host_file("style.png", style)
        job = await fake.slash(
            alice,
            "imagine",
            prompt=f"{subject_link} a lighthouse --iw 1.5 --sref {style_link} --sw 300 "
            "--lora ink:0.7 --seed 9",
        )
        grid = await job.wait_followup(is_result, timeout=JOB_TIMEOUT_S)
        stored = await bot.core.jobs.require(job_id_of(grid))
        assert stored.state is JobState.SUCCEEDED, stored.error
        image = await separated(fake, alice, grid, 1)

        # What a member downloads: the grid and the image posted on its own.
        for posted in (grid.attachments[0], image.attachments[0]):
            with Image.open(io.BytesIO(posted.data)) as opened:
                fields = parse_a1111_parameters(opened.info["parameters"])
            assert "a lighthouse" in fields["Prompt"] and "inkstyle" in fields["Prompt"]
            assert "<lora:ink:0.7>" in fields["Prompt"]
            assert fields["Image prompt 1"] == (
                f"Weight: 1.5, Hash: {hashlib.sha256(subject).hexdigest()}, Source: {subject_link}"
            )
            assert fields["Style reference 1"] == (
                f"Weight: 300, Hash: {hashlib.sha256(style).hexdigest()}, Source: {style_link}"
            )
            assert fields["Seed"] == str(stored.result.seeds[0] if stored.result else None)


# ----- 3. /info while jobs wait ---------------------------------------------------------------


async def test_info_shows_running_and_queued_jobs_at_the_schedulers_positions(
    tmp_path: Path, together_settings: EngineSettings, together_engine: Any
) -> None:
    engine = GatedEngine(together_engine)
    async with serving(
        tmp_path / "data", together_settings, engine, scheduler={"max_queued_per_user": 5}
    ) as (fake, alice, bot):
        bob = fake.add_user("bob")
        mine = []
        for prompt in ("a red fox", "a grey wolf", "a brown bear"):
            job = await fake.slash(alice, "imagine", prompt=prompt)
            mine.append(job_id_of(await job.wait_original(lambda m: bool(m.custom_ids))))
        theirs = await fake.slash(bob, "imagine", prompt="a white owl")
        await theirs.wait_original(lambda m: bool(m.custom_ids))
        await fake.wait_for(lambda: engine.entered.is_set() or None)

        async def running() -> JobState:
            return (await bot.core.jobs.require(mine[0])).state

        assert await eventually(running, JobState.RUNNING)
        scheduler = bot.core.scheduler
        positions = {job_id: scheduler.queue_position(job_id) for job_id in mine}
        assert positions[mine[0]] is None
        # Alice's two waiting jobs in her order, bob's one among them by fair share.
        waiting = [positions[j] for j in mine[1:]]
        bobs = scheduler.queue_position(job_id_of(theirs.original))
        assert None not in waiting and bobs is not None
        assert sorted([*waiting, bobs]) == [1, 2, 3] and waiting[0] < waiting[1]  # type: ignore[operator]

        info = await fake.slash(alice, "info")
        text = (await info.wait_original()).content
        assert f"• Job {mine[0]} (imagine, running): `a red fox`" in text
        for job_id, prompt in zip(mine[1:], ("a grey wolf", "a brown bear"), strict=True):
            line = f"• Job {job_id} (imagine, queued, position {positions[job_id]}): `{prompt}`"
            assert line in text, text
        assert "white owl" not in text  # bob's job is his own business
        held = sum([(await bot.core.jobs.require(j)).cost for j in mine])
        assert await available(bot, alice.id) == ALLOWANCE - held

        engine.gate.set()
        for job_id in mine:

            async def state(job_id: int = job_id) -> JobState:
                return (await bot.core.jobs.require(job_id)).state

            assert await eventually(state, JobState.SUCCEEDED, JOB_TIMEOUT_S)
        info = await fake.slash(alice, "info")
        assert "no queued or running jobs" in (await info.wait_original()).content
        await assert_ledger_consistent(bot)


# ----- 4. settings, suffix, shortcut, image prompt and LoRA through U2, zoom, region, V1 -----


def mask_png(size: tuple[int, int]) -> bytes:
    """White (repaint) on the left half."""
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    return buffer.getvalue()


async def test_a_members_settings_and_pictures_carry_through_edits_and_variations(
    tmp_path: Path, together_settings: EngineSettings, together_engine: Any
) -> None:
    async with serving(
        tmp_path / "data", together_settings, together_engine, scheduler={"max_queued_per_user": 5}
    ) as (fake, alice, bot):
        opened = await fake.slash(alice, "settings")
        panel = await opened.wait_original()
        remix_on = await fake.click(alice, panel, "settings:remix")
        assert await remix_on.wait_acked() == 7
        assert "Previews while a job runs: **on**" in panel.content
        prefs = await bot.app.preferences.get(alice.id)
        assert prefs.remix and prefs.previews
        await (await fake.slash(alice, "prefer suffix", text="soft light")).wait_original()
        shortcut = await fake.slash(
            alice, "prefer option set", name="mystyle", value="watercolour --no people"
        )
        await shortcut.wait_original()

        fox = png((200, 90, 20))
        link = fake.host_file("fox.png", fox)
        job = await fake.slash(
            alice, "imagine", prompt=f"{link} a red fox --mystyle --lora ink:0.7 --steps 8"
        )
        grid = await job.wait_followup(is_result, timeout=JOB_TIMEOUT_S)
        imagined = await bot.core.jobs.require(job_id_of(grid))
        data = imagined.request_data
        assert imagined.state is JobState.SUCCEEDED, imagined.error
        for words in ("a red fox", "watercolour", "soft light", "inkstyle"):
            assert words in data["prompt"], data["prompt"]
        assert "people" in data["negative_prompt"]
        assert data["loras"] == [{"name": "ink", "weight": 0.7}]
        assert [(i["role"], i["source"]) for i in data["inputs"]] == [("image_prompt", link)]
        assert data["preview"] is True
        assert preview_states(grid), [s.content for s in grid.states]
        costs = [await held_and_settled(bot, alice.id, imagined.id)]

        # U2 is free and makes no job.
        image = await separated(fake, alice, grid, 2)
        assert await available(bot, alice.id) == ALLOWANCE - sum(costs)
        seen: set[int] = set()

        # Zoom Out 2x opens the Remix form (the stored prompt in it); the edited prompt may use
        # the member's shortcut.
        form = await fake.click(alice, image, label="Zoom Out 2x")
        assert await form.wait_acked() == 9 and form.modal is not None
        assert form.modal["title"] == "Remix: edit the prompt"
        await fake.submit_modal(form, {"prompt": "a red fox in deep snow --mystyle"})
        zoomed_message = await finished_reply(fake, image, seen)
        zoom = await bot.core.jobs.require(job_id_of(zoomed_message))
        zoom_data = zoom.request_data
        assert zoom.kind is JobKind.ZOOM and zoom.state is JobState.SUCCEEDED, zoom.error
        assert (zoom.parent_job_id, zoom.parent_index) == (imagined.id, 1)
        assert zoom_data["zoom_factor"] == 2.0
        for words in ("deep snow", "watercolour", "inkstyle"):
            assert words in zoom_data["prompt"], zoom_data["prompt"]
        assert zoom_data["loras"] == [{"name": "ink", "weight": 0.7}]
        # The image prompt stays with the job (variations of its images use it again) but a
        # zoom repaints around an image it already shaped; the reply says so.
        assert [i["source"] for i in zoom_data["inputs"]] == [link]
        assert "image prompt not used by a zoom" in zoomed_message.content
        assert zoom_data["preview"] is True
        costs.append(await held_and_settled(bot, alice.id, zoom.id))

        # Vary (Region) with an uploaded mask (always a form).
        form = await fake.click(alice, image, label="Vary (Region)")
        assert await form.wait_acked() == 9
        size = Image.open(io.BytesIO(image.attachments[0].data)).size
        await fake.submit_modal(
            form, {"mask": Upload("mask.png", mask_png(size)), "prompt": "a red fox with a hat"}
        )
        region_message = await finished_reply(fake, image, seen)
        region = await bot.core.jobs.require(job_id_of(region_message))
        assert region.kind is JobKind.REGION and region.state is JobState.SUCCEEDED, region.error
        region_data = region.request_data
        assert [i["role"] for i in region_data["inputs"]] == ["image_prompt", "mask"]
        assert region_data["loras"] == [{"name": "ink", "weight": 0.7}]
        assert "a red fox with a hat" in region_data["prompt"]
        assert "inkstyle" in region_data["prompt"]
        assert "image prompt not used by a region" in region_message.content
        costs.append(await held_and_settled(bot, alice.id, region.id))

        # V1 of the zoom's grid: Remix again; the variation uses the image prompt once more.
        form = await fake.click(alice, zoomed_message, label="V1")
        assert await form.wait_acked() == 9
        await fake.submit_modal(form, {"prompt": "a red fox in deep snow at dusk"})
        varied_message = await finished_reply(fake, zoomed_message, seen)
        varied = await bot.core.jobs.require(job_id_of(varied_message))
        assert varied.kind is JobKind.VARIATION and varied.state is JobState.SUCCEEDED
        assert (varied.parent_job_id, varied.parent_index) == (zoom.id, 0)
        varied_data = varied.request_data
        assert varied_data["zoom_factor"] == 1.0 and varied_data["prompt"].startswith(
            "a red fox in deep snow at dusk"
        )
        assert varied_data["loras"] == [{"name": "ink", "weight": 0.7}]
        assert [(i["role"], i["source"]) for i in varied_data["inputs"]] == [("image_prompt", link)]
        assert "not used" not in varied_message.content
        assert f"<{link}> (--iw 1)" in varied_message.content
        costs.append(await held_and_settled(bot, alice.id, varied.id))

        # Every job showed previews while it ran (the member's setting), and paid its cost.
        for message in (zoomed_message, region_message, varied_message):
            assert preview_states(message), [s.content for s in message.states]
        assert await available(bot, alice.id) == ALLOWANCE - sum(costs)
        await assert_ledger_consistent(bot)


# ----- 5. --cnw alone in a remix ---------------------------------------------------------------


async def test_cnw_alone_in_a_remix_reweighs_the_parents_controlnet(
    tmp_path: Path, together_settings: EngineSettings, together_engine: Any
) -> None:
    async with serving(tmp_path / "data", together_settings, together_engine) as (
        fake,
        alice,
        bot,
    ):
        link = fake.host_file("edges.png", shapes_png())
        job = await fake.slash(
            alice, "imagine", prompt=f"a house --cn canny {link} --cnw 1.5 --lora ink:0.6"
        )
        grid = await job.wait_message(is_result, timeout=JOB_TIMEOUT_S)
        parent = await bot.core.jobs.require(job_id_of(grid))
        assert parent.request_data["controlnet_weight"] == 1.5

        await bot.app.preferences.update(alice.id, remix=True)
        form = await fake.click(alice, grid, label="V1")
        assert await form.wait_acked() == 9
        await fake.submit_modal(form, {"prompt": "a barn --cnw 0.5"})
        varied_message = await finished_reply(fake, grid, set())
        varied = await bot.core.jobs.require(job_id_of(varied_message))
        data = varied.request_data
        assert varied.kind is JobKind.VARIATION and varied.state is JobState.SUCCEEDED
        assert (data["controlnet"], data["controlnet_weight"]) == ("canny", 0.5)
        (control,) = [i for i in data["inputs"] if i["role"] == "control"]
        (parent_control,) = [i for i in parent.request_data["inputs"] if i["role"] == "control"]
        assert (control["source"], control["sha256"]) == (link, parent_control["sha256"])
        assert data["loras"] == [{"name": "ink", "weight": 0.6}]
        assert data["prompt"] == "a barn, inkstyle"
        assert "ControlNet canny 0.5" in varied_message.content
        assert any(a.filename.endswith("-control.png") for a in varied_message.attachments)
        spent = [await held_and_settled(bot, alice.id, j) for j in (parent.id, varied.id)]
        assert await available(bot, alice.id) == ALLOWANCE - sum(spent)
        await assert_ledger_consistent(bot)


# ----- 6. someone else's presses and forms ----------------------------------------------------


def retarget(form: Any, job_id: int) -> None:
    """Point a form bob opened on his own image at another job, as a crafted client could."""
    assert form.modal is not None
    what, _job, index = form.modal["custom_id"].rsplit(":", 2)
    form.modal["custom_id"] = f"{what}:{job_id}:{index}"


async def test_others_presses_and_forms_on_new_messages_are_refused_and_change_nothing(
    tmp_path: Path, together_settings: EngineSettings, together_engine: Any
) -> None:
    # Bob is refused far more often than the refusal limit allows (tests/bot/test_refusals.py
    # covers that limit): here every refusal must be the one about whose job it is.
    async with serving(
        tmp_path / "data",
        together_settings,
        together_engine,
        scheduler={"max_queued_per_user": 5},
        discord={"refusal_limit": 1000},
    ) as (fake, alice, bot):
        bob = fake.add_user("bob")
        asked = await fake.slash(alice, "describe", image=Upload("sky.png", png((20, 40, 200))))
        described = await asked.wait_followup(is_describe_result, timeout=JOB_TIMEOUT_S)
        grid = await (await fake.slash(alice, "imagine", prompt="a red fox")).wait_original(
            is_result, timeout=JOB_TIMEOUT_S
        )
        image = await separated(fake, alice, grid, 1)
        bobs_grid = await (await fake.slash(bob, "imagine", prompt="a owl")).wait_original(
            is_result, timeout=JOB_TIMEOUT_S
        )
        bobs_image = await separated(fake, bob, bobs_grid, 1)
        alices_jobs = len(await bot.core.jobs.for_user(alice.id))
        balances = (await available(bot, alice.id), await available(bot, bob.id))
        messages = len(fake.messages)

        # Every button under a /describe and under a separated image, Remix off then on.
        presses = [(described, label) for label in labels(described)]
        presses += [(image, label) for label in labels(image)]
        assert {"Upscale (Subtle)", "Zoom Out 2x", "Vary (Region)", "Custom Zoom", "⬅️"} <= set(
            label for _, label in presses
        )
        for remix in (False, True):
            await bot.app.preferences.update(bob.id, remix=remix)
            for message, label in presses:
                press = await fake.click(bob, message, label=label)
                assert NOT_YOURS in await private_note(press), (label, remix)
                assert press.modal is None, label

        # Forms bob opened on his own image, submitted for alice's job.
        zoom_form = await fake.click(bob, bobs_image, label="Custom Zoom")
        region_form = await fake.click(bob, bobs_image, label="Vary (Region)")
        remix_form = await fake.click(bob, bobs_image, label="Zoom Out 2x")  # Remix is on
        for form in (zoom_form, region_form, remix_form):
            assert await form.wait_acked() == 9
        retarget(zoom_form, job_id_of(image))
        retarget(region_form, job_id_of(image))
        retarget(remix_form, job_id_of(image))
        submits = [
            await fake.submit_modal(zoom_form, {"prompt": "a fox", "factor": "1.5"}),
            await fake.submit_modal(region_form, {"regions": ["left"], "prompt": "a fox"}),
            await fake.submit_modal(remix_form, {"prompt": "a fox in snow"}),
        ]
        for submitted in submits:
            assert NOT_YOURS in await private_note(submitted)

        # The settings panel is private to its member: Discord delivers no one else's press, and
        # a press on bob's own panel changes bob's settings only.
        opened = await fake.slash(alice, "settings")
        panel = await opened.wait_original()
        assert panel.ephemeral
        with pytest.raises(SchemaViolation):
            await fake.click(bob, panel, "settings:previews")
        own = await (await fake.slash(bob, "settings")).wait_original()
        await (await fake.click(bob, own, "settings:previews")).wait_acked()
        assert not (await bot.app.preferences.get(bob.id)).previews
        alices = await bot.app.preferences.get(alice.id)
        assert alices.previews and not alices.remix

        # Nothing was queued, charged or posted for any of it.
        assert len(await bot.core.jobs.for_user(alice.id)) == alices_jobs
        assert len(await bot.core.jobs.for_user(bob.id)) == 1
        assert (await available(bot, alice.id), await available(bot, bob.id)) == balances
        assert not [m for m in fake.messages[messages:] if not m.ephemeral]
        assert not described.deleted and not image.deleted
        await assert_ledger_consistent(bot)
