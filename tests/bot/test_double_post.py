"""A result that Discord made but whose answer was lost (the connection dropped after the
message was created) is posted once: every try of a job's result post carries the same nonce
with enforce_nonce, so Discord answers a retry with the message it already made, and a retry
after Discord's nonce window looks for the posted message first. End to end through the fake
Discord, which keeps enforced nonces as Discord does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.core.models import JobState, Owner
from bot.discord.delivery import result_nonce
from tests.bot.helpers import JOB_TIMEOUT_S, delivery_state, eventually, make_bot
from tests.core.conftest import finished, request
from tests.fakediscord import FakeDiscord
from tests.fakediscord import server as fake_server
from tests.fakediscord.model import READ_MESSAGE_HISTORY

POSTS = "/channels/*/messages"


async def _deliver_with_a_lost_answer(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any, *, history: bool
) -> tuple[FakeDiscord, int]:
    fake = FakeDiscord()
    async with fake:
        alice = fake.add_user("alice")
        if not history:
            # Without it, Discord lists no messages: a look for the post finds nothing.
            fake.deny_bot(fake.general, READ_MESSAGE_HISTORY)
        lost = fake.lose_answer_next("POST", POSTS, with_files=True)
        bot = make_bot(fake, tmp_path / "data", bot_engine_settings, shared_engine)
        async with fake.run_bot(bot):
            owner = Owner(alice.id, fake.guild_id, fake.general.id)
            job = await bot.core.scheduler.submit(owner, request("a red fox"))
            done = await finished(bot.core, job.id, timeout_s=JOB_TIMEOUT_S)
            assert done.state is JobState.SUCCEEDED
            await bot.delivery.deliver(done)
            assert await eventually(lambda: delivery_state(bot, job.id), "done", timeout_s=30)
            assert lost.hits == 1
            stored = (await bot.core.jobs.deliveries(job.id))["result"]
        results = [m for m in fake.messages if m.attachments]
        assert len(results) == 1, [m.content for m in results]
        # What the bot recorded is the message that exists.
        assert str(results[0].id) in str(stored)
        return fake, job.id


async def test_a_result_whose_answer_was_lost_is_posted_once(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any
) -> None:
    fake, job_id = await _deliver_with_a_lost_answer(
        tmp_path, bot_engine_settings, shared_engine, history=False
    )
    uploads = [r for r in fake.requests if r.matches("POST", POSTS) and r.files]
    # The retry could not see the channel's history, so it sent the post again, with the same
    # nonce; the fake (as Discord) answered it with the message the first try made.
    assert len(uploads) == 2
    assert [r.json["nonce"] for r in uploads] == [result_nonce(job_id)] * 2
    assert all(r.json["enforce_nonce"] is True for r in uploads)
    assert uploads[0].dropped and uploads[1].status == 200


async def test_a_retry_after_the_nonce_window_finds_the_post_instead(
    tmp_path: Path, bot_engine_settings: Any, shared_engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Discord keeps a nonce for a few minutes only: with none kept, the retry must look first.
    monkeypatch.setattr(fake_server, "NONCE_WINDOW_S", -1.0)
    fake, _ = await _deliver_with_a_lost_answer(
        tmp_path, bot_engine_settings, shared_engine, history=True
    )
    uploads = [r for r in fake.requests if r.matches("POST", POSTS) and r.files]
    assert len(uploads) == 1 and uploads[0].dropped
    assert fake.count("GET", "/channels/*/messages") >= 1  # the history it looked in
