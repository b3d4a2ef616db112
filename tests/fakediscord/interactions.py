"""The test-side handle of one interaction, and the waiting machinery behind every ``wait_*``.

Tests never poll: each state change in the fake (a request handled, a message edited) wakes the
waiters, which re-check their predicate. A wait that times out raises an ``AssertionError`` that
lists the recent requests, because "the bot never answered" is the usual failure and the request
log says where it stopped.
"""

# Waits take a plain ``timeout=`` because that is the friendliest test API.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from tests.fakediscord.model import FLAG_EPHEMERAL, Channel, Message, User

if TYPE_CHECKING:
    from tests.fakediscord.server import FakeDiscord

T = TypeVar("T")

DEFAULT_TIMEOUT = 5.0
POLL_INTERVAL = 0.05

# Interaction types.
APPLICATION_COMMAND = 2
MESSAGE_COMPONENT = 3
APPLICATION_COMMAND_AUTOCOMPLETE = 4
MODAL_SUBMIT = 5

# Callback (response) types.
CHANNEL_MESSAGE = 4
DEFERRED_CHANNEL_MESSAGE = 5
DEFERRED_UPDATE_MESSAGE = 6
UPDATE_MESSAGE = 7
AUTOCOMPLETE_RESULT = 8
MODAL = 9


class WaitTimeout(AssertionError):
    pass


class Changes:
    """Wakes every waiter whenever the fake's state changes."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []
        # Set when the bot under test died: nothing will change any more, so waits fail at once.
        self.failure: BaseException | None = None

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_until(
        self, predicate: Callable[[], T], timeout: float, describe: Callable[[], str]
    ) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if self.failure is not None:
                raise WaitTimeout(f"the bot died: {self.failure!r}\n{describe()}") from self.failure
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise WaitTimeout(describe())
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            # Re-check now and then too: predicates may read state outside the fake (the bot's).
            # A timed-out wait leaves the future behind; notify() discards it.
            await asyncio.wait([waiter], timeout=min(remaining, POLL_INTERVAL))


@dataclass(frozen=True)
class Ack:
    type: int
    at: float
    data: dict[str, Any]


class FakeInteraction:
    """One INTERACTION_CREATE the fake sent, and everything the bot did with its token."""

    def __init__(
        self,
        fake: FakeDiscord,
        *,
        id: int,
        token: str,
        type: int,
        user: User,
        channel: Channel,
        payload: dict[str, Any],
        created_at: float,
        token_lifetime: float,
        message: Message | None = None,
    ) -> None:
        self._fake = fake
        self.id = id
        self.token = token
        self.type = type
        self.user = user
        self.channel = channel
        self.payload = payload
        self.created_at = created_at
        self.token_expires_at = created_at + token_lifetime
        # The message a component sat on; @original after a type 6 or 7 response.
        self.message = message
        self.ack: Ack | None = None
        self.original: Message | None = None
        self.followups: list[Message] = []
        self.modal: dict[str, Any] | None = None
        self.autocomplete_choices: list[dict[str, Any]] | None = None
        # The schema of the option being typed, for an autocomplete interaction.
        self.autocomplete_option: dict[str, Any] | None = None
        # (status, Discord error code) of every error answered on this interaction's routes.
        self.errors: list[tuple[int, int]] = []

    # -- state -------------------------------------------------------------------------------
    @property
    def acked(self) -> bool:
        return self.ack is not None

    @property
    def ack_type(self) -> int | None:
        return None if self.ack is None else self.ack.type

    @property
    def ack_latency(self) -> float | None:
        """Seconds (fake clock) from dispatch to the accepted callback."""
        return None if self.ack is None else self.ack.at - self.created_at

    @property
    def ephemeral(self) -> bool:
        """Whether the initial response (message or defer) was ephemeral."""
        if self.ack is None:
            return False
        return bool((self.ack.data.get("flags") or 0) & FLAG_EPHEMERAL)

    @property
    def token_expired(self) -> bool:
        return self._fake.clock.now() >= self.token_expires_at

    @property
    def messages(self) -> list[Message]:
        """The original response (when it is this interaction's own) and every follow-up."""
        own = [] if self.original is None or self.original is self.message else [self.original]
        return own + [m for m in self.followups if m is not self.original]

    @property
    def command(self) -> str | None:
        data = self.payload.get("data", {})
        return data.get("name")

    @property
    def custom_id(self) -> str | None:
        return self.payload.get("data", {}).get("custom_id")

    def expire_token(self) -> None:
        """Make this token (only) behave as if its 15 minutes were over."""
        self.token_expires_at = self._fake.clock.now()

    # -- waiting -----------------------------------------------------------------------------
    async def wait_for(
        self, predicate: Callable[[FakeInteraction], T], timeout: float = DEFAULT_TIMEOUT
    ) -> T:
        return await self._fake.changes.wait_until(
            lambda: predicate(self), timeout, lambda: self._describe("condition")
        )

    async def wait_acked(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the initial response; returns its callback type (4, 5, 6, 7 or 9)."""
        await self.wait_for(lambda i: i.acked, timeout)
        assert self.ack is not None
        return self.ack.type

    async def wait_original(
        self, predicate: Callable[[Message], Any] | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> Message:
        """Wait until @original exists (and satisfies ``predicate``, checked on every edit)."""

        def check(interaction: FakeInteraction) -> Message | None:
            message = interaction.original
            if message is None or message.deleted:
                return None
            return message if predicate is None or predicate(message) else None

        return await self.wait_for(check, timeout)

    async def wait_followup(
        self, predicate: Callable[[Message], Any] | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> Message:
        """Wait for the first follow-up that satisfies ``predicate``."""

        def check(interaction: FakeInteraction) -> Message | None:
            for message in interaction.followups:
                if not message.deleted and (predicate is None or predicate(message)):
                    return message
            return None

        return await self.wait_for(check, timeout)

    async def wait_message(
        self, predicate: Callable[[Message], Any], timeout: float = DEFAULT_TIMEOUT
    ) -> Message:
        """Wait until the original response or any follow-up satisfies ``predicate``."""

        def check(interaction: FakeInteraction) -> Message | None:
            return next((m for m in interaction.messages if predicate(m)), None)

        return await self.wait_for(check, timeout)

    async def wait_error(self, code: int, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int]:
        """Wait until the fake has answered one of this interaction's requests with ``code``."""
        return await self.wait_for(
            lambda i: next((e for e in i.errors if e[1] == code), None), timeout
        )

    def _describe(self, what: str) -> str:
        return (
            f"timed out waiting for {what} on {self!r}\n"
            f"original={self.original!r}\nfollowups={self.followups!r}\nerrors={self.errors}\n"
            + self._fake.describe_recent()
        )

    def __repr__(self) -> str:
        what = f"/{self.command}" if self.type == APPLICATION_COMMAND else self.custom_id
        return f"<FakeInteraction id={self.id} type={self.type} {what} ack={self.ack_type}>"
