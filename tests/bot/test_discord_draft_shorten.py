"""--draft, ✨ Enhance and /shorten end to end: the real bot over the fake Discord, the tiny models
in this process, real SQLite. Costs are raised so that a draft's share and a full render's price
are different whole numbers at the tiny sizes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bot.app.actions import Action, Actor, UserError
from bot.core.credits import job_cost
from bot.core.models import Job, JobKind, JobState
from bot.discord.client import ImagineBot
from generation.contract import GenerationRequest
from tests.bot.helpers import (
    JOB_TIMEOUT_S,
    assert_ledger_consistent,
    available,
    job_id_of,
    make_bot,
)
from tests.bot.test_discord_post_grid import separated
from tests.fakediscord import FakeDiscord
from tests.fakediscord.model import Message

CREDITS = {"daily_allowance": 1000, "cost_imagine": 10000}


def draft_bot(fake: FakeDiscord, data_dir: Path, settings: Any, engine: Any) -> ImagineBot:
    # The tiny settings run 4 steps by default: a 2-step draft is visibly shorter.
    drafting = dataclasses.replace(settings, draft_steps=2)
    return make_bot(fake, data_dir, drafting, engine, credits=CREDITS)


def is_draft_grid(message: Message) -> bool:
    return bool(message.attachments) and any(c.startswith("imagine:E:") for c in message.custom_ids)


def is_single_image(message: Message) -> bool:
    cancel = any(c.startswith("imagine:X:") for c in message.custom_ids)
    return bool(message.attachments) and bool(message.buttons) and not cancel


def is_shorten_result(message: Message) -> bool:
    return any(c.startswith("shorten:I:") for c in message.custom_ids)


def labels(message: Message) -> list[str]:
    return [str(b.get("label")) for b in message.buttons]


async def stored(bot: ImagineBot, job_id: int) -> Job:
    job = await bot.core.jobs.require(job_id)
    assert job.state is JobState.SUCCEEDED, job.error
    return job


async def test_a_draft_costs_its_share_and_enhance_renders_one_image_at_full_price(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        first = draft_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(first):
            start = await available(first, alice.id)
            command = await fake.slash(alice, "imagine", prompt="a red barn --draft --seed 900")
            queued = await command.wait_original(lambda m: "Draft" in m.content)
            grid = await command.wait_original(is_draft_grid, timeout=JOB_TIMEOUT_S)
            draft = await stored(first, job_id_of(grid))
            request = GenerationRequest.from_json(dict(draft.request_data))
            assert request.draft is not None and (request.steps, request.draft.steps) == (2, 4)
            full = job_cost(
                dataclasses.replace(request, steps=4, sampler=request.draft.sampler, draft=None),
                first.config.credits,
            )
            # The reply says it is a draft and what it costs beside the full render.
            assert f"Draft: {draft.cost} credits instead of {full} credits at full quality" in (
                queued.content
            )
            assert "(💨 draft)" in grid.content
            assert draft.cost == -(-full * 25 // 100) and draft.cost < full
            assert await available(first, alice.id) == start - draft.cost
            assert labels(grid)[-4:] == ["✨ 1", "✨ 2", "✨ 3", "✨ 4"]

        # The Enhance buttons name their job and image: they work after a restart.
        bot = draft_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            # ✨ 2: image 2 at full quality from its seed, an ordinary job at full price.
            before = await available(bot, alice.id)
            press = await fake.click(alice, grid, label="✨ 2")
            assert await press.wait_acked() == 6
            message = await fake.wait_for_message(
                lambda m: m.referenced is grid and is_single_image(m), timeout=JOB_TIMEOUT_S
            )
            enhanced = await stored(bot, job_id_of(message))
            assert enhanced.kind is JobKind.ENHANCE and enhanced.parent_job_id == draft.id
            data = enhanced.request_data
            assert data["draft"] is None and data["steps"] == 4
            assert draft.result is not None and data["seed"] == draft.result.seeds[1]
            assert (data["num_candidates"], data["prompt"]) == (1, "a red barn")
            price = job_cost(GenerationRequest.from_json(dict(data)), bot.config.credits)
            assert enhanced.cost == price > 0
            assert await available(bot, alice.id) == before - price
            # The enhanced image is a full-quality one: it upscales like any other.
            assert "Upscale (Subtle)" in labels(message) and "Enhance" not in labels(message)

            # U1 on the draft: its image is for choosing (Enhance, Vary), not for finishing.
            separate = await fake.click(alice, grid, label="U1")
            await separate.wait_acked()
            single = await fake.wait_for_message(
                lambda m: m.referenced is grid and "Image #1" in m.content, timeout=JOB_TIMEOUT_S
            )
            shown = labels(single)
            assert "Enhance" in shown and "Vary (Subtle)" in shown
            assert not {"Upscale (Subtle)", "Zoom Out 2x", "Vary (Region)", "Custom Zoom"} & set(
                shown
            )
            await assert_ledger_consistent(bot)


async def test_draft_refusals_cost_nothing(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = draft_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            draft_grid = await (
                await fake.slash(alice, "imagine", prompt="a barn --draft")
            ).wait_original(is_draft_grid, timeout=JOB_TIMEOUT_S)
            plain = await (await fake.slash(alice, "imagine", prompt="a barn")).wait_original(
                lambda m: bool(m.attachments) and "V1" in labels(m), timeout=JOB_TIMEOUT_S
            )
            # Through Discord: --draft in Custom Zoom's form is a private refusal.
            image = await separated(fake, alice, plain, 1)
            before = await available(bot, alice.id)
            form = await fake.click(alice, image, label="Custom Zoom")
            assert await form.wait_acked() == 9
            submitted = await fake.submit_modal(form, {"prompt": "a barn --draft", "factor": "1.5"})
            note = await submitted.wait_followup(lambda m: m.ephemeral)
            assert "--draft: a zoom paints into a finished picture" in note.content, note.content
            assert await available(bot, alice.id) == before

            actor = Actor(alice.id, fake.guild_id, fake.general.id)
            draft_id, plain_id = job_id_of(draft_grid), job_id_of(plain)
            balance = await available(bot, alice.id)
            refusals = [
                (bot.app.press(actor, draft_id, Action.UPSCALE_SUBTLE, 1), "is a draft"),
                (bot.app.press(actor, draft_id, Action.ZOOM_OUT_2, 1), "is a draft"),
                (
                    bot.app.custom_zoom(actor, plain_id, 1, prompt="a barn --draft", factor=1.5),
                    "--draft: a zoom paints into a finished picture",
                ),
                (
                    bot.app.vary_region(
                        actor, plain_id, 1, prompt="a barn --draft", regions=["left"]
                    ),
                    "--draft: Vary (Region) paints into a finished picture",
                ),
                (bot.app.press(actor, plain_id, Action.ENHANCE, 1), "is not a draft"),
            ]
            for call, expected in refusals:
                try:
                    await call
                except UserError as exc:
                    assert expected in str(exc), str(exc)
                else:
                    raise AssertionError(f"not refused: {expected}")
            assert await available(bot, alice.id) == balance
            assert not await bot.core.scheduler.user_jobs(alice.id)
            await assert_ledger_consistent(bot)


async def test_shorten_weighs_the_words_and_its_buttons_imagine_after_a_restart(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        data_dir = tmp_path / "data"
        first = make_bot(fake, data_dir, bot_engine_settings, shared_engine)
        async with fake.run_bot(first):
            start = await available(first, alice.id)
            prompt = "a very beautiful red cat, sitting on a mat --ar 3:2"
            command = await fake.slash(alice, "shorten", prompt=prompt)
            result = await command.wait_followup(is_shorten_result, timeout=JOB_TIMEOUT_S)
            job = await stored(first, int(result.custom_ids[0].split(":")[2]))
            assert job.kind is JobKind.SHORTEN and job.cost == 0
            assert job.result is not None
            prompts = job.result.texts
            assert 1 <= len(prompts) <= 5 and all(p.endswith(" --ar 3:2") for p in prompts)
            # One weight per word and per phrase, and a similarity per shorter prompt.
            assert len(job.result.clip_scores) == 9 + 2 + len(prompts)
            assert "What CLIP notices" in result.content and "**" in result.content
            assert labels(result) == [str(n) for n in range(1, len(prompts) + 1)]
            for n, shorter in enumerate(prompts, 1):
                assert f"**{n}.** `{shorter}`" in result.content
            assert await available(first, alice.id) == start  # /shorten is free

        # The buttons name their job: the shorter prompt is read from SQLite after a restart.
        bot = make_bot(fake, data_dir, bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            press = await fake.click(alice, result, label="1")
            assert await press.wait_acked() == 6
            grid = await fake.wait_for_message(
                lambda m: m.referenced is result and bool(m.attachments) and "V1" in labels(m),
                timeout=JOB_TIMEOUT_S,
            )
            imagined = await stored(bot, job_id_of(grid))
            assert imagined.kind is JobKind.IMAGINE
            assert imagined.request_data["prompt"] == prompts[0].removesuffix(" --ar 3:2")
            assert imagined.request_data["width"] > imagined.request_data["height"]
            assert imagined.cost > 0
            assert await available(bot, alice.id) == start - imagined.cost
            await assert_ledger_consistent(bot)


async def test_shorten_refuses_privately_what_it_cant_weigh(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            start = await available(bot, alice.id)
            cases = [
                ("--ar 3:2 --seed 4", "no words to weigh"),
                ("cat --ar 3:2", "single word"),
                ("a {red, blue} cat", "weighs one prompt"),
                ("a cat::2 a dog", "take the :: weights out"),
                ("a cat --ar 3:x", "--ar: expected W:H"),
            ]
            for prompt, expected in cases:
                command = await fake.slash(alice, "shorten", prompt=prompt)
                refusal = await command.wait_message(lambda m: m.ephemeral and bool(m.content))
                assert expected in refusal.content, (prompt, refusal.content)
            assert not [m for m in fake.messages if not m.ephemeral]
            assert await available(bot, alice.id) == start
            assert not await bot.core.scheduler.user_jobs(alice.id)


async def test_a_shorter_prompt_the_filter_refuses_is_shown_hidden(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    # Taking words out can make a phrase the filter refuses out of a prompt it let through. This
    # server refuses any prompt of fewer than seven words: the typed prompt passes, every shorter
    # prompt (each lacks a word) is refused.
    whole = r"^(?!(\S+\s+){6}\S+)"
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(
            fake,
            tmp_path / "data",
            bot_engine_settings,
            shared_engine,
            moderation={"banned_patterns": [whole]},
        )
        async with fake.run_bot(bot):
            command = await fake.slash(alice, "shorten", prompt="a red cat, sitting on a mat")
            result = await command.wait_followup(is_shorten_result, timeout=JOB_TIMEOUT_S)
            job = await stored(bot, int(result.custom_ids[0].split(":")[2]))
            assert job.result is not None and job.result.texts
            for n, shorter in enumerate(job.result.texts, 1):
                assert f"`{shorter}` —" not in result.content
                assert f"**{n}.** *(hidden: the server's prompt filter refuses it)*" in (
                    result.content
                )
            # Its button runs the filter like any /imagine: refused privately, nothing charged.
            start = await available(bot, alice.id)
            press = await fake.click(alice, result, label="1")
            refusal = await press.wait_followup(lambda m: m.ephemeral, timeout=JOB_TIMEOUT_S)
            assert "match" in refusal.content.lower() or "filter" in refusal.content.lower()
            assert await available(bot, alice.id) == start
