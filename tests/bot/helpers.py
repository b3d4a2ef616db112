"""What the end-to-end tests share: the bot as `python -m bot` builds it, run against the fake
Discord, and the small questions they ask of its messages, its ledger and its deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from bot.app.application import ImagineApp, open_core
from bot.app.logs import setup_logging
from bot.config import Config
from bot.core import InProcessWorker
from bot.discord.client import ImagineBot
from tests.bot.conftest import bot_config, in_process_workers
from tests.fakediscord import FakeDiscord, FakeInteraction
from tests.fakediscord.model import Message, User

JOB_TIMEOUT_S = 60.0
ALLOWANCE = 100


def make_bot(
    fake: FakeDiscord, data_dir: Path, settings: Any, engine: Any, **sections: Any
) -> ImagineBot:
    """The bot as `python -m bot` builds it, with the engine in a thread of this process."""
    config = bot_config(data_dir, settings, fake.guild_id, **sections)
    return ImagineBot(
        config,
        core_options={"workers": in_process_workers(config, engine)},
        guild_ready_timeout=0.05,
    )


@contextlib.asynccontextmanager
async def app_over(config: Config, engine: Any) -> AsyncIterator[ImagineApp]:
    """The app with no front end over a real core whose one worker runs `engine` in this
    process; seeds 100, 101, … in the order jobs ask."""
    worker = InProcessWorker(config.engine, config.data_dir, lambda _settings: engine)
    core = await open_core(config, lambda _c: False, workers=[worker])
    seeds = iter(range(100, 10_000))
    try:
        yield ImagineApp(config, core, seed_source=lambda: next(seeds))
    finally:
        await core.close()


async def private_answer(interaction: FakeInteraction) -> str:
    """The text of the answer to `interaction`, which must be private (ephemeral)."""
    await interaction.wait_acked()
    message = await interaction.wait_message(lambda m: bool(m.content))
    assert message.ephemeral
    return message.content


def is_grid(message: Message) -> bool:
    return bool(message.attachments) and len(message.buttons) == 9


def has_variations(message: Message) -> bool:
    return bool(message.attachments) and "V1" in [b.get("label") for b in message.buttons]


def has_cancel(message: Message) -> bool:
    return any(c.startswith("imagine:X:") for c in message.custom_ids)


def decode(message: Message) -> Image.Image:
    image = Image.open(io.BytesIO(message.attachments[0].data))
    image.load()
    return image


def job_id_of(message: Message) -> int:
    match = re.search(r"imagine:\w+:(\d+)", " ".join(message.custom_ids))
    assert match, message.custom_ids
    return int(match[1])


async def eventually(read: Any, expected: Any, timeout_s: float = 10.0) -> bool:
    """Whether the awaited `read()` returns `expected` within the timeout (the bot records
    some things just after the message a test waits for)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await read() == expected:
            return True
        await asyncio.sleep(0.05)
    return False


async def delivery_state(bot: ImagineBot, job_id: int) -> str | None:
    record = (await bot.core.jobs.deliveries(job_id)).get("result")
    return record.state if record else None


async def assert_ledger_consistent(bot: ImagineBot) -> None:
    report = await bot.core.credits.check_consistency()
    assert report.ok, str(report)


async def available(bot: ImagineBot, user_id: int) -> int:
    return (await bot.core.credits.balance(user_id)).available


async def imagined_grid(fake: FakeDiscord, user: User, prompt: str, **options: Any) -> Message:
    """/imagine `prompt` as `user`; the job's message once it shows the finished grid."""
    job = await fake.slash(user, "imagine", prompt=prompt, **options)
    return await job.wait_original(is_grid, timeout=JOB_TIMEOUT_S)


def log_to_stream(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, secrets: list[str]
) -> io.StringIO:
    """The bot's logging set up (`setup_logging`) with its output going to the returned string.
    setup_logging configures the process's root logger: it is put back for the tests after
    (setLevel, not the attribute, so the loggers' cached levels are cleared too)."""
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    root, discord_logger = logging.getLogger(), logging.getLogger("discord")
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    for logger in (root, discord_logger):
        request.addfinalizer(functools.partial(logger.setLevel, logger.level))
    setup_logging("INFO", secrets=secrets)
    return stream
