"""Pictures in, end to end: the real bot over the fake Discord, whose CDN serves attachments and
the links members paste. The bot's fetch policy here allows the fake's host (http on 127.0.0.1),
which the configured policy never does."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

from PIL import Image

from bot.app.fetch import FetchPolicy
from bot.core.models import Job, JobKind, JobState
from bot.discord.client import ImagineBot
from tests.bot.conftest import bot_config, in_process_workers
from tests.bot.helpers import (
    ALLOWANCE,
    JOB_TIMEOUT_S,
    assert_ledger_consistent,
    available,
    job_id_of,
)
from tests.bot.test_moderation import mosaic
from tests.fakediscord import FakeDiscord, Upload
from tests.fakediscord.model import Message

FAKE_CDN = FetchPolicy(
    allowed_hosts=frozenset({"127.0.0.1"}),
    allowed_schemes=frozenset({"http"}),
    allow_private_addresses=True,
)


def make_bot(fake: FakeDiscord, data_dir: Path, settings: Any, engine: Any) -> ImagineBot:
    config = bot_config(data_dir, settings, fake.guild_id)
    return ImagineBot(
        config,
        core_options={"workers": in_process_workers(config, engine)},
        fetch_policy=FAKE_CDN,
        guild_ready_timeout=0.05,
    )


def png(colour: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def is_result(message: Message) -> bool:
    """The finished grid: images with buttons, no longer a progress preview with Cancel."""
    cancel = any(c.startswith("imagine:X:") for c in message.custom_ids)
    return bool(message.attachments) and bool(message.buttons) and not cancel


def is_describe_result(message: Message) -> bool:
    return any(c.startswith("describe:R:") for c in message.custom_ids)


async def succeeded(bot: ImagineBot, message: Message) -> Job:
    """The job whose result `message` is, checked to have succeeded."""
    if is_describe_result(message):
        job_id = int(message.custom_ids[-1].split(":")[2])
    else:
        job_id = job_id_of(message)
    stored = await bot.core.jobs.require(job_id)
    assert stored.state is JobState.SUCCEEDED, stored.error
    return stored


def pictures_shown(message: Message) -> Image.Image:
    """The strip of the member's pictures posted beside a result."""
    (strip,) = [a for a in message.attachments if a.filename.endswith("-pictures.png")]
    return Image.open(io.BytesIO(strip.data)).convert("RGB")


def colours_of(strip: Image.Image) -> set[tuple[int, int, int]]:
    return {strip.getpixel((x, strip.height // 2)) for x in range(strip.width)}


async def test_image_options_and_a_link_in_the_prompt_are_image_prompts(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        linked = png((20, 40, 200))
        link = fake.host_file("sky.png", linked)
        attached = png((200, 40, 20))
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            job = await fake.slash(
                alice,
                "imagine",
                prompt=f"{link} a red fox --iw 2",
                image=Upload("fox.png", attached),
            )
            assert await job.wait_acked() == 5 and job.ephemeral
            queued = await job.wait_original(lambda m: "Queued: job" in m.content)
            assert queued.ephemeral
            grid = await job.wait_followup(is_result, timeout=JOB_TIMEOUT_S)
            stored = await succeeded(bot, grid)
            inputs = stored.request_data["inputs"]
            assert [(i["role"], i["source"], i["weight"]) for i in inputs] == [
                ("image_prompt", "attachment:fox.png", 2.0),
                ("image_prompt", link, 2.0),
            ]
            assert inputs[0]["sha256"] == hashlib.sha256(attached).hexdigest()
            assert inputs[1]["sha256"] == hashlib.sha256(linked).hexdigest()
            assert stored.request_data["prompt"] == "a red fox"
            # The reply shows where the pictures came from and their weight, and the pictures
            # themselves, in that order, beside the grid.
            assert "`fox.png` (--iw 2)" in grid.content and f"<{link}> (--iw 2)" in grid.content
            strip = pictures_shown(grid)
            assert strip.getpixel((4, 4)) == (200, 40, 20)
            assert strip.getpixel((strip.width - 4, 4)) == (20, 40, 200)
            assert fake.count("GET", "/cdn/attachments/*", status=200) == 2
            await assert_ledger_consistent(bot)


async def test_blend_two_pictures_landscape_and_one_is_refused(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            lonely = await fake.slash(alice, "blend", image1=Upload("a.png", png((1, 2, 3))))
            refusal = await lonely.wait_message(lambda m: m.ephemeral)
            assert "at least 2 pictures" in refusal.content

            job = await fake.slash(
                alice,
                "blend",
                image1=Upload("a.png", png((250, 0, 0))),
                image2=Upload("b.png", png((0, 0, 250))),
                shape="landscape",
            )
            grid = await job.wait_followup(is_result, timeout=JOB_TIMEOUT_S)
            stored = await succeeded(bot, grid)
            assert stored.kind is JobKind.IMAGINE and stored.request_data["prompt"] == ""
            assert stored.request_data["width"] > stored.request_data["height"]
            assert [i["source"] for i in stored.request_data["inputs"]] == [
                "attachment:a.png",
                "attachment:b.png",
            ]
            assert "2 picture(s)" in grid.content
            assert colours_of(pictures_shown(grid)) >= {(250, 0, 0), (0, 0, 250)}
            charged = ALLOWANCE - stored.cost
            assert await available(bot, alice.id) == charged
            await assert_ledger_consistent(bot)


async def test_image_links_without_words_blend_and_one_link_needs_words(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """As in Midjourney: two or more image links alone are a blend; one needs words."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        red = fake.host_file("red.png", png((250, 0, 0)))
        blue = fake.host_file("blue.png", png((0, 0, 250)))
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            alone = await fake.slash(alice, "imagine", prompt=f"{red} --ar 3:2")
            refusal = await alone.wait_message(lambda m: m.ephemeral and "prompt" in m.content)
            assert "one image prompt needs words beside it" in refusal.content
            assert await available(bot, alice.id) == ALLOWANCE

            job = await fake.slash(alice, "imagine", prompt=f"{red} <{blue}> --ar 3:2")
            grid = await job.wait_followup(is_result, timeout=JOB_TIMEOUT_S)
            stored = await succeeded(bot, grid)
            assert stored.request_data["prompt"] == ""
            assert stored.request_data["width"] > stored.request_data["height"]
            assert [i["source"] for i in stored.request_data["inputs"]] == [red, blue]
            assert "2 picture(s)" in grid.content and f"<{red}> (--iw 1)" in grid.content
            assert colours_of(pictures_shown(grid)) >= {(250, 0, 0), (0, 0, 250)}
            assert await available(bot, alice.id) == ALLOWANCE - stored.cost
            await assert_ledger_consistent(bot)


async def test_describe_shows_the_picture_and_its_buttons_work_after_a_restart(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        data_dir = tmp_path / "data"
        first_bot = make_bot(fake, data_dir, bot_engine_settings, shared_engine)
        async with fake.run_bot(first_bot):
            job = await fake.slash(alice, "describe", image=Upload("wide.png", png((9, 99, 9))))
            result = await job.wait_followup(is_describe_result, timeout=JOB_TIMEOUT_S)
            described = await succeeded(first_bot, result)
            assert described.kind is JobKind.DESCRIBE and described.result is not None
            suggestions = described.result.texts
            assert len(suggestions) == 4
            assert all(text.endswith("--ar 3:2") for text in suggestions), suggestions
            assert [b.get("label") for b in result.buttons[:4]] == ["1", "2", "3", "4"]
            # The described picture is shown with its suggestions.
            assert "described `wide.png`" in result.content
            assert colours_of(pictures_shown(result)) == {(9, 99, 9)}

        # The buttons name their job: they work after a restart (resolved from SQLite).
        bot = make_bot(fake, data_dir, bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            press = await fake.click(alice, result, label="2")
            assert await press.wait_acked() == 6
            grid = await fake.wait_for_message(
                lambda m: m.referenced is result and is_result(m), timeout=JOB_TIMEOUT_S
            )
            imagined = await succeeded(bot, grid)
            assert imagined.kind is JobKind.IMAGINE
            assert imagined.request_data["prompt"] == suggestions[1].rsplit(" --ar", 1)[0]
            assert imagined.request_data["width"] > imagined.request_data["height"]

            again = await fake.click(alice, result, label="🔄")
            await again.wait_acked()
            second = await fake.wait_for_message(
                lambda m: m.referenced is result and is_describe_result(m),
                timeout=JOB_TIMEOUT_S,
            )
            redo = await succeeded(bot, second)
            assert redo.kind is JobKind.DESCRIBE and redo.parent_job_id == described.id
            assert redo.seed != described.seed
            assert colours_of(pictures_shown(second)) == {(9, 99, 9)}
            await assert_ledger_consistent(bot)


async def test_bad_pictures_are_refused_privately_and_cost_nothing(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        flagged = io.BytesIO()
        mosaic(256).save(flagged, "PNG")
        async with fake.run_bot(bot):
            cases: list[tuple[dict[str, Any], str]] = [
                (
                    {"prompt": "a fox", "image": Upload("notes.txt", b"just some words\n" * 9)},
                    "notes.txt: that is not an image (PNG, JPEG, WebP or GIF are taken)",
                ),
                ({"prompt": "a fox --iw 9"}, "--iw: expected a number between 0 and 3"),
                ({"prompt": "a fox --sref"}, "--sref: expected an image link"),
                (
                    {"prompt": "http://example.com/cat.png a fox"},
                    "images are only fetched from 127.0.0.1, not example.com",
                ),
                (
                    {"prompt": "a fox", "image": Upload("art.png", flagged.getvalue())},
                    "art.png: the safety filter flagged this picture",
                ),
            ]
            for options, expected in cases:
                job = await fake.slash(alice, "imagine", options=options)
                refusal = await job.wait_message(lambda m: m.ephemeral and bool(m.content.strip()))
                assert expected in refusal.content, (options, refusal.content)
            assert not [m for m in fake.messages if not m.ephemeral]
            assert await available(bot, alice.id) == ALLOWANCE
            assert not await bot.core.scheduler.user_jobs(alice.id)

            # In an age-restricted channel the same picture is taken.
            job = await fake.slash(
                alice,
                "imagine",
                channel=fake.nsfw_channel,
                prompt="a fox",
                image=Upload("art.png", flagged.getvalue()),
            )
            await job.wait_original(lambda m: "Queued: job" in m.content, timeout=JOB_TIMEOUT_S)


async def test_a_control_image_is_fetched_only_after_the_command_is_acknowledged(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """A slow link must not miss Discord's 3 s: the command with a ControlNet's picture is
    acknowledged privately first; a command refused (here: no --cn to follow it) fetches
    nothing at all."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            job = await fake.slash(
                alice,
                "imagine",
                prompt="a house",
                control_image=Upload("edges.png", png((0, 0, 0))),
            )
            assert await job.wait_acked() == 5 and job.ephemeral
            refusal = await job.wait_message(lambda m: m.ephemeral and "control_image" in m.content)
            assert "--cn" in refusal.content
            order = [
                (r.method, r.path.split("/")[1])
                for r in fake.requests
                if r.path.startswith(("/cdn/", "/interactions/"))
            ]
            assert ("POST", "interactions") in order and ("GET", "cdn") not in order, order
            assert await available(bot, alice.id) == ALLOWANCE
