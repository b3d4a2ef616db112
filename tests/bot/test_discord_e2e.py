"""The real discord.py bot against the wire-level fake Discord, with the real tiny-model engine.

Each test drives users through the bot as Discord would (slash commands, button clicks, restarts,
expired tokens, rate limits) and checks what users see, and what the ledger says.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

from PIL import Image

from bot.core.models import JobState
from bot.discord.client import ImagineBot
from tests.bot.conftest import GatedEngine
from tests.bot.helpers import (
    ALLOWANCE,
    JOB_TIMEOUT_S,
    assert_ledger_consistent,
    available,
    decode,
    delivery_state,
    eventually,
    has_cancel,
    has_variations,
    imagined_grid,
    is_grid,
    job_id_of,
    make_bot,
)
from tests.fakediscord import FakeDiscord


async def test_imagine_with_options_and_flags_fills_one_message(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            job = await fake.slash(
                alice,
                "imagine",
                prompt="a lighthouse at dusk @everyone --ar 3:2 --no fog",
                seed=7,
                sampler="euler_a",
            )
            assert await job.wait_acked() == 5
            assert job.ack_latency < 1.0
            grid = await job.wait_original(has_variations, timeout=JOB_TIMEOUT_S)

            stored = await bot.core.jobs.require(job_id_of(grid))
            assert stored.state is JobState.SUCCEEDED
            width, height = stored.request_data["width"], stored.request_data["height"]
            assert width > height, "--ar 3:2 makes a landscape image"
            assert decode(grid).size == (2 * width, 2 * height)
            assert decode(grid).format == "PNG"
            assert stored.request_data["seed"] == 7
            assert stored.request_data["sampler"] == "euler_a"
            assert "fog" in stored.request_data["negative_prompt"]
            # U1–U4 only separate an image (no GPU job), so they are there even when a 2x
            # upscale of these images could never fit the server's max_pixels (256²).
            assert 4 * width * height > bot.config.engine.max_pixels
            labels = [b.get("label") or b["emoji"]["name"] for b in grid.buttons]
            assert labels == ["U1", "U2", "U3", "U4", "V1", "V2", "V3", "V4", "🔄"]

            # One message edited in place: queued, then the result with seed and cost.
            assert any("Queued" in content for content in grid.contents[:-1])
            # Progress edits respect Discord's rate limits: never closer than the configured
            # interval (the result itself is not held back).
            edits = [r.at for r in fake.requests_matching("PATCH", "/webhooks/*/@original")]
            gaps = [b - a for a, b in itertools.pairwise(edits[:-1])]
            assert all(gap >= 0.2 * 0.9 for gap in gaps), gaps
            assert "seed 7" in grid.content and f"cost {stored.cost} credit" in grid.content
            # The prompt's @everyone is shown but pings nobody.
            assert not any(m.pings.everyone for m in fake.messages)
            # Edits notify nobody, so a new message mentions the owner.
            ping = await fake.wait_for_message(lambda m: m.pings.users == {alice.id})
            assert ping.referenced is grid
            await assert_ledger_consistent(bot)


async def test_buttons_upscale_vary_reroll_and_ownership(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bob = fake.add_user("bob")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            job = await fake.slash(alice, "imagine", prompt="a red fox", seed=3)
            grid = await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            cell_width = decode(grid).size[0] // 2

            # Anyone may look; only the owner may press. The press is acknowledged at once
            # (the grid stays as it is) and refused in a private follow-up.
            intruder = await fake.click(bob, grid, label="U2")
            assert await intruder.wait_acked() == 6
            refusal = await intruder.wait_followup(lambda m: m.ephemeral)
            assert "isn't your job" in refusal.content
            assert await available(bot, bob.id) == ALLOWANCE

            upscale = await fake.click(alice, grid, label="U2")
            assert await upscale.wait_acked() == 6
            upscaled = await fake.wait_for_message(
                lambda m: m.referenced is grid and len(m.attachments) == 1 and not is_grid(m),
                timeout=JOB_TIMEOUT_S,
            )
            # U2 separates the image (already full size): no job, nothing charged.
            assert decode(upscaled).size[0] == cell_width
            labels = [b.get("label") for b in upscaled.buttons]
            assert {"Vary (Subtle)", "Vary (Strong)", "Vary (Region)"} <= set(labels)
            assert len(await bot.core.jobs.for_user(alice.id)) == 1

            vary = await fake.click(alice, grid, label="V3")
            await vary.wait_acked()
            varied = await fake.wait_for_message(
                lambda m: m.referenced is grid and is_grid(m), timeout=JOB_TIMEOUT_S
            )
            assert decode(varied).size == decode(grid).size
            variation = await bot.core.jobs.require(job_id_of(varied))
            assert variation.kind.value == "variation" and variation.parent_index == 2

            reroll = await fake.click(alice, grid, label="🔄")
            await reroll.wait_acked()
            rerolled = await fake.wait_for_message(
                lambda m: m.referenced is grid and is_grid(m) and m is not varied,
                timeout=JOB_TIMEOUT_S,
            )
            first = await bot.core.jobs.require(job_id_of(grid))
            again = await bot.core.jobs.require(job_id_of(rerolled))
            assert again.parent_job_id == first.id and again.kind.value == "reroll"
            assert again.seed != first.seed
            assert again.request_data["prompt"] == first.request_data["prompt"]
            await assert_ledger_consistent(bot)


async def test_cancel_refunds_a_waiting_job(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bob = fake.add_user("bob")
        engine = GatedEngine(shared_engine)
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, engine)
        async with fake.run_bot(bot):
            busy = await fake.slash(alice, "imagine", prompt="a busy one")
            await busy.wait_acked()
            await asyncio.to_thread(engine.entered.wait, 10)
            waiting = await fake.slash(bob, "imagine", prompt="a waiting one")
            queued = await waiting.wait_original(has_cancel)
            job_id = job_id_of(queued)
            held = await bot.core.credits.balance(bob.id)
            assert held.available < ALLOWANCE

            cancel = await fake.click(bob, queued, label="Cancel")
            assert await cancel.wait_acked() == 6
            notice = await cancel.wait_followup(lambda m: m.ephemeral)
            assert "Cancelling" in notice.content
            final = await waiting.wait_original(lambda m: "Cancelled" in m.content)
            assert not final.attachments and not final.custom_ids
            assert await available(bot, bob.id) == ALLOWANCE
            cancelled = await bot.core.jobs.require(job_id)
            assert cancelled.state is JobState.CANCELLED

            engine.gate.set()
            await busy.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            await assert_ledger_consistent(bot)


async def test_insufficient_credits_then_admin_grant(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        fake.enforce_default_permissions = False
        alice = fake.add_user("alice")
        bot = make_bot(
            fake,
            tmp_path / "data",
            bot_engine_settings,
            shared_engine,
            credits={"daily_allowance": 0},
        )
        async with fake.run_bot(bot):
            refused = await fake.slash(alice, "imagine", prompt="a red fox")
            assert await refused.wait_acked() == 4
            assert refused.ephemeral and "Not enough credits" in refused.original.content
            assert await bot.core.jobs.for_user(alice.id) == []

            # A member who is not an admin sees /admin (permissions overridden) but is refused.
            sneaky = await fake.slash(alice, "admin credits grant", user=alice, amount=50)
            await sneaky.wait_acked()
            assert sneaky.ephemeral and "Manage Server" in sneaky.original.content
            assert (await bot.core.credits.balance(alice.id)).granted == 0

            grant = await fake.slash(fake.owner, "admin credits grant", user=alice, amount=50)
            await grant.wait_acked()
            assert "Granted 50" in grant.original.content

            accepted = await fake.slash(alice, "imagine", prompt="a red fox")
            assert await accepted.wait_acked() == 5
            await accepted.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            balance = await bot.core.credits.balance(alice.id)
            job = await bot.core.jobs.require(job_id_of(accepted.original))
            assert balance.granted == 50 - job.cost
            await assert_ledger_consistent(bot)


async def test_buttons_work_after_a_restart(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        data_dir = tmp_path / "data"
        first_bot = make_bot(fake, data_dir, bot_engine_settings, shared_engine)
        async with fake.run_bot(first_bot):
            grid = await imagined_grid(fake, alice, "a castle", seed=11)

        second_bot = make_bot(fake, data_dir, bot_engine_settings, shared_engine)
        async with fake.run_bot(second_bot):
            upscale = await fake.click(alice, grid, label="U1")
            assert await upscale.wait_acked() == 6
            await fake.wait_for_message(
                lambda m: m.referenced is grid and len(m.attachments) == 1,
                timeout=JOB_TIMEOUT_S,
            )
            await assert_ledger_consistent(second_bot)


async def test_after_token_expiry_the_status_message_is_edited_with_the_bot_token(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """A job that outlives its 15-minute token still ends in its own message: the "Queued"
    message with its Cancel button becomes the result, edited through the channel route."""
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        engine = GatedEngine(shared_engine)
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, engine)
        async with fake.run_bot(bot):
            job = await fake.slash(alice, "imagine", prompt="a slow sunrise")
            queued = await job.wait_original(has_cancel)
            await asyncio.to_thread(engine.entered.wait, 10)
            fake.clock.advance(16 * 60)
            engine.gate.set()

            grid = await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            assert grid is queued and not has_cancel(grid)
            assert grid.state.via == "bot", "edited with the bot token"
            assert (401, 50027) in job.errors
            # The token is given up at its first refusal: no edit tries it again.
            refused_at = min(r.at for r in fake.requests if r.code == 50027)
            later = [r for r in fake.requests_matching("PATCH", "/webhooks/*") if r.at > refused_at]
            assert later == []
            ping = await fake.wait_for_message(lambda m: m.pings.users == {alice.id})
            assert ping.referenced is grid
            job_id = job_id_of(grid)
            assert await eventually(lambda: delivery_state(bot, job_id), "done")
        assert [m for m in fake.messages if m.attachments] == [grid]


async def test_upload_rate_limited_is_retried(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        fake.rate_limit_next("PATCH", "/webhooks/*/messages/@original", with_files=True)
        async with fake.run_bot(bot):
            grid = await imagined_grid(fake, alice, "a red fox")
            assert decode(grid).format == "PNG"
        assert fake.count("PATCH", "/webhooks/*/messages/@original", status=429) == 1


async def test_help_balance_and_jobs_are_ephemeral(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            help_ = await fake.slash(alice, "help")
            await help_.wait_acked()
            text = " ".join(e.get("description", "") for e in help_.original.embeds)
            assert help_.ephemeral and "--ar" in text and "--stylize" in text

            balance = await fake.slash(alice, "balance")
            await balance.wait_acked()
            assert balance.ephemeral
            assert f"{ALLOWANCE} credits available" in balance.original.content

            jobs = await fake.slash(alice, "jobs")
            await jobs.wait_acked()
            assert "no queued or running jobs" in jobs.original.content

            bad = await fake.slash(alice, "imagine", prompt="a fox --ar 0:1")
            await bad.wait_acked()
            assert bad.ephemeral and "--ar" in bad.original.content
            assert await available(bot, alice.id) == ALLOWANCE


async def test_hostile_prompts_through_discord_get_ephemeral_errors(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    hostile = [
        "a fox --ar 0:1",
        "a fox --seed -1",
        "a fox --steps 0",
        "a fox --cfg nan",
        "a fox --seeed 3",
        "--ar 3:2",
        "\u200b\u200b",
        "a fox --sampler '; DROP TABLE jobs; --",
        "a fox --ar 2:3 --ar 9:16",
        "x" * 5000,
    ]
    async with FakeDiscord() as fake:
        mallory = fake.add_user("mallory")
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            for prompt in hostile:
                bad = await fake.slash(mallory, "imagine", prompt=prompt)
                assert await bad.wait_acked() == 4, prompt
                assert bad.ephemeral and 0 < len(bad.original.content) <= 400, prompt
            assert await available(bot, mallory.id) == ALLOWANCE
            assert await bot.core.jobs.for_user(mallory.id) == []
            # Everyone else is still served.
            fine = await fake.slash(alice, "imagine", prompt="a quiet harbour")
            await fine.wait_original(is_grid, timeout=JOB_TIMEOUT_S)


async def test_grid_over_the_upload_limit_is_reencoded_not_failed(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    limit_bytes = 40 * 1024
    async with FakeDiscord(attachment_size_limit=limit_bytes) as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            grid = await imagined_grid(fake, alice, "a noisy texture", seed=1)
            stored = await bot.core.jobs.require(job_id_of(grid))
            on_disk = stored.grid_file(bot.config.data_dir)
            assert on_disk is not None and on_disk.stat().st_size > limit_bytes
            attachment = grid.attachments[0]
            assert len(attachment.data) <= limit_bytes
            assert attachment.filename.endswith((".webp", ".jpg"))
            assert decode(grid).size == Image.open(on_disk).size
        assert fake.count("*", "*", status=413) == 0


class FlaggedImageEngine:
    """The real engine, whose pixels are swapped for an image the real safety classifier
    flags (an abstract mosaic): stands in for a model that drew something it shouldn't."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def generate(self, request: Any, progress: Any = None, cancel: Any = None) -> Any:
        import dataclasses

        from tests.bot.test_moderation import mosaic

        result = self.engine.generate(request, progress, cancel)
        flagged = mosaic(request.width).resize((request.width, request.height))
        return dataclasses.replace(result, images=tuple(flagged for _ in result.images))


async def test_flagged_images_are_spoilered_or_withheld_by_channel_policy(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    engine = FlaggedImageEngine(shared_engine)
    async with FakeDiscord() as fake:
        fake.enforce_default_permissions = False
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "spoiler", bot_engine_settings, engine)
        async with fake.run_bot(bot):
            grid = await imagined_grid(fake, alice, "an abstract mosaic")
            assert grid.attachments[0].spoiler

            private = await fake.slash(
                alice, "imagine", prompt="an abstract mosaic", channel=fake.nsfw_channel
            )
            allowed = await private.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            assert not allowed.attachments[0].spoiler

            audit = await fake.slash(fake.owner, "admin audit")
            await audit.wait_acked()
            assert "nsfw_flag" in audit.original.content

        strict = make_bot(
            fake,
            tmp_path / "withhold",
            bot_engine_settings,
            engine,
            moderation={"nsfw_policy": "withhold"},
        )
        async with fake.run_bot(strict):
            withheld = await fake.slash(alice, "imagine", prompt="an abstract mosaic")
            final = await withheld.wait_original(
                lambda m: "refunded" in m.content, timeout=JOB_TIMEOUT_S
            )
            assert not final.attachments and not final.custom_ids
            assert await available(strict, alice.id) == ALLOWANCE
            await assert_ledger_consistent(strict)


async def test_a_result_whose_post_fails_is_retried_and_posted_once(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    engine = GatedEngine(shared_engine)
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, engine)
        async with fake.run_bot(bot):
            job = await fake.slash(alice, "imagine", prompt="an unlucky delivery")
            await job.wait_original(has_cancel)
            await asyncio.to_thread(engine.entered.wait, 10)
            # The token expires, and the bot-token edit that replaces it fails once
            # (discord.py does not retry a 503 on bot-token routes).
            fake.clock.advance(16 * 60)
            fake.fail_next("PATCH", "/channels/*/messages/*", status=503, with_files=True)
            engine.gate.set()
            delivered = await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)
            job_id = job_id_of(delivered)
            assert fake.count("PATCH", "/channels/*/messages/*", status=503) == 1
            assert await eventually(lambda: delivery_state(bot, job_id), "done")
        grids = [m for m in fake.messages if is_grid(m) and job_id_of(m) == job_id]
        assert len(grids) == 1


async def test_an_unacknowledged_imagine_is_cancelled_and_refunded(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    engine = GatedEngine(shared_engine)
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, engine)
        async with fake.run_bot(bot):
            # The acknowledgement fails once; by discord.py's retry a second later the
            # 3-second window has passed, so Discord no longer takes it.
            fake.fail_next("POST", "/interactions/*/callback", status=503)
            lost = await fake.slash(alice, "imagine", prompt="too late")
            await fake.wait_for(lambda: fake.count("POST", "/interactions/*/callback", 503) == 1)
            fake.clock.advance(10)
            await lost.wait_error(10062)
            jobs = await bot.core.jobs.for_user(alice.id)
            assert len(jobs) == 1

            async def state() -> JobState:
                return (await bot.core.jobs.require(jobs[0].id)).state

            assert await eventually(state, JobState.CANCELLED)
            assert await available(bot, alice.id) == ALLOWANCE
            await assert_ledger_consistent(bot)


async def test_a_restart_settles_interrupted_deliveries_without_posting_twice(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    """A bot that died between claiming a result and recording it as sent: after a restart,
    a result already in the channel is recognised, and one that never got there is posted."""
    data_dir = tmp_path / "data"
    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        first = make_bot(fake, data_dir, bot_engine_settings, shared_engine)
        async with fake.run_bot(first):
            grid = await imagined_grid(fake, alice, "posted before the crash")
            posted_id = job_id_of(grid)
            assert await eventually(lambda: delivery_state(first, posted_id), "done")
            # A second job that finishes while its delivery can't happen: its claim stays.
            lost = await fake.slash(alice, "imagine", prompt="never posted")
            await lost.wait_acked()
            lost_id = (await first.core.jobs.for_user(alice.id))[0].id
            first.delivery._delivering.add(lost_id)  # as if a send were under way
            await eventually(
                lambda: _state_of(first, lost_id), JobState.SUCCEEDED, timeout_s=JOB_TIMEOUT_S
            )
            await first.core.jobs.claim_delivery(lost_id)

            async def forget(txn: Any) -> None:
                await txn.execute(
                    "UPDATE deliveries SET state = 'claimed' WHERE job_id = ?", (posted_id,)
                )

            await first.core.db.transaction(forget)

        second = make_bot(fake, data_dir, bot_engine_settings, shared_engine)
        async with fake.run_bot(second):
            assert await eventually(lambda: delivery_state(second, posted_id), "done")
            assert await eventually(lambda: delivery_state(second, lost_id), "done")
            # The result fills the job's own message, edited with the bot token (the first
            # start's interaction can't be used by the second); a new message pings the owner.
            recovered = await lost.wait_original(is_grid)
            assert job_id_of(recovered) == lost_id and recovered.state.via == "bot"
            ping = await fake.wait_for_message(lambda m: m.referenced is recovered)
            assert ping.pings.users == {alice.id}
        for job_id in (posted_id, lost_id):
            assert len([m for m in fake.messages if is_grid(m) and job_id_of(m) == job_id]) == 1


async def _state_of(bot: ImagineBot, job_id: int) -> JobState:
    return (await bot.core.jobs.require(job_id)).state
