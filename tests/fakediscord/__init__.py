"""A wire-level fake Discord for end-to-end tests of the bot with the real discord.py client.

    async with FakeDiscord() as fake:
        alice = fake.add_user("alice")
        async with fake.run_bot(make_bot()):
            job = await fake.slash(alice, "imagine", prompt="a red fox")
            grid = await job.wait_followup(lambda m: m.attachments)
            await fake.click(alice, grid, label="U2")

To use the ``fake_discord`` fixture elsewhere, import it into a conftest.py:
``from tests.fakediscord import fake_discord  # noqa: F401``.
"""

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.fakediscord.commands import CommandNotPermitted, SchemaViolation
from tests.fakediscord.gateway import GatewaySession
from tests.fakediscord.interactions import Ack, FakeInteraction, WaitTimeout
from tests.fakediscord.model import (
    ADMINISTRATOR,
    ALL_PERMISSIONS,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    Attachment,
    Channel,
    FakeClock,
    Guild,
    Message,
    MessageState,
    Pings,
    Role,
    Upload,
    User,
    Via,
)
from tests.fakediscord.redirect import redirect_discord
from tests.fakediscord.server import FakeDiscord, FakeHTTPError, Fault, RecordedRequest

MANAGE_GUILD = 1 << 5


@pytest_asyncio.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    """A started FakeDiscord with discord.py redirected to it (function-scoped)."""
    async with FakeDiscord() as fake:
        yield fake


__all__ = [
    "ADMINISTRATOR",
    "ALL_PERMISSIONS",
    "FLAG_EPHEMERAL",
    "FLAG_LOADING",
    "MANAGE_GUILD",
    "Ack",
    "Attachment",
    "Channel",
    "CommandNotPermitted",
    "FakeClock",
    "FakeDiscord",
    "FakeHTTPError",
    "FakeInteraction",
    "Fault",
    "GatewaySession",
    "Guild",
    "Message",
    "MessageState",
    "Pings",
    "RecordedRequest",
    "Role",
    "SchemaViolation",
    "Upload",
    "User",
    "Via",
    "WaitTimeout",
    "fake_discord",
    "redirect_discord",
]
