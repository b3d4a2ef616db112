"""A wire-level fake of Discord's REST API and Gateway for end-to-end tests of a discord.py bot.

The bot under test is the real, unmodified discord.py client; only ``Route.BASE`` and
``DiscordWebSocket.DEFAULT_GATEWAY`` point here (see ``redirect.py``). The server runs on
127.0.0.1 in the test's own event loop, so tests drive users (``slash``, ``click``) and inspect
what the bot did (messages with their edit history, acks, every request) without threads.

Discord's behaviour that matters to a bot is modelled where the reference documents it: the
3-second ack deadline, 15-minute tokens, the upload limit, rate-limit headers, the ``attachments``
array semantics of edits, component limits. Anything the fake does not know answers 404 and is
recorded in ``errors``, which fails the test on exit (``strict``), so drift cannot pass silently.
"""

# Waits take a plain ``timeout=`` because that is the friendliest test API.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import secrets
import socket
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import discord
from aiohttp import web

from tests.fakediscord import commands as cmd
from tests.fakediscord.gateway import (
    INTENT_DIRECT_MESSAGES,
    INTENT_GUILD_MESSAGES,
    INTENT_GUILDS,
    INTENT_MESSAGE_CONTENT,
    Gateway,
    GatewaySession,
)
from tests.fakediscord.interactions import (
    APPLICATION_COMMAND,
    APPLICATION_COMMAND_AUTOCOMPLETE,
    AUTOCOMPLETE_RESULT,
    CHANNEL_MESSAGE,
    DEFAULT_TIMEOUT,
    DEFERRED_CHANNEL_MESSAGE,
    DEFERRED_UPDATE_MESSAGE,
    MESSAGE_COMPONENT,
    MODAL,
    MODAL_SUBMIT,
    UPDATE_MESSAGE,
    Ack,
    Changes,
    FakeInteraction,
    WaitTimeout,
)
from tests.fakediscord.model import (
    ADMINISTRATOR,
    ALL_PERMISSIONS,
    ATTACH_FILES,
    DEFAULT_BOT_PERMISSIONS,
    EMBED_LINKS,
    EVERYONE_PERMISSIONS,
    FLAG_COMPONENTS_V2,
    FLAG_EPHEMERAL,
    FLAG_LOADING,
    FLAG_SUPPRESS_EMBEDS,
    FLAG_SUPPRESS_NOTIFICATIONS,
    INTERACTION_IMPLICIT_PERMISSIONS,
    READ_MESSAGE_HISTORY,
    SEND_MESSAGES,
    SEND_MESSAGES_IN_THREADS,
    VIEW_CHANNEL,
    Attachment,
    Channel,
    FakeClock,
    Guild,
    Message,
    MessageState,
    Role,
    SnowflakeFactory,
    Upload,
    User,
    Via,
    guess_content_type,
    iso_now,
)
from tests.fakediscord.oauth import FakeOAuth
from tests.fakediscord.redirect import redirect_discord
from tests.fakediscord.wire import (
    API,
    FILES_KEY,
    INTERACTION_KEY,
    MAX_ATTACHMENTS,
    MAX_CONTENT,
    MAX_EMBEDS,
    ClientDisconnected,
    FakeHTTPError,
    Fault,
    MiB,
    RecordedRequest,
    UploadedFile,
    form_error,
    json_response,
    read_body,
    request_json,
    unknown,
    validate_components,
)

T = TypeVar("T")
ClientT = TypeVar("ClientT", bound=discord.Client)

# Discord's timing and size limits.
ACK_DEADLINE_S = 3.0
TOKEN_LIFETIME_S = 15 * 60
DEFAULT_ATTACHMENT_SIZE_LIMIT = 10 * MiB

# Flags a message may be created with through each route.
_INTERACTION_FLAGS = (
    FLAG_EPHEMERAL | FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_COMPONENTS_V2
)
# Discord checks an enforced nonce against the author's messages in the channel over "the past
# few minutes"; a nonce is an integer or a string of at most 25 characters.
NONCE_WINDOW_S = 5 * 60
NONCE_MAX_LENGTH = 25
_CHANNEL_FLAGS = FLAG_SUPPRESS_EMBEDS | FLAG_SUPPRESS_NOTIFICATIONS | FLAG_COMPONENTS_V2

# -- the fake ---------------------------------------------------------------------------------


class FakeDiscord:
    """A fake Discord on 127.0.0.1: ``async with FakeDiscord() as fake: ...``.

    One guild with ``general`` and an age-restricted ``nsfw`` channel, an ``owner`` (admin) and
    the bot. Add people with :meth:`add_user`, start the bot with :meth:`run_bot`, act as users
    with :meth:`slash` and :meth:`click`, inspect ``messages``, ``interactions`` and ``requests``.
    """

    def __init__(
        self,
        *,
        bot_token: str = "fake-bot-token",
        bot_name: str = "imagine-bot",
        ack_deadline: float = ACK_DEADLINE_S,
        token_lifetime: float = TOKEN_LIFETIME_S,
        attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT,
        bot_permissions: int = DEFAULT_BOT_PERMISSIONS,
        enforce_default_permissions: bool = True,
        followup_replaces_deferred: bool = False,
        privileged_intents: int = 0,
        rate_limit: tuple[int, float] | None = None,
        clock: FakeClock | None = None,
        redirect: bool = True,
        strict: bool = True,
    ) -> None:
        """
        ack_deadline: seconds (``clock``) the bot has for its first callback; later gets 10062.
        token_lifetime: seconds an interaction token works for follow-ups/edits; then 50027.
        attachment_size_limit: per-file upload limit (413, code 40005 above it); also sent to the
            bot as ``attachment_size_limit`` (discord.py's ``interaction.filesize_limit``).
        enforce_default_permissions: refuse (raise in the test) slash commands whose
            ``default_member_permissions`` the user lacks, as Discord hides them. Turn it off to
            model a server admin who overrode the command's permissions in the integration.
        followup_replaces_deferred: the first follow-up after a type-5 defer fills the loading
            message instead of creating one (Discord's behaviour here is not certain).
        privileged_intents: the intents enabled in the "developer portal"; asking for others
            closes the gateway with 4014.
        rate_limit: ``(limit, window_s)`` per route bucket to really enforce (429 when exceeded);
            ``None`` sends complete but generous headers and never limits.
        strict: on a clean exit, fail if anything was recorded in ``errors``.
        """
        self.bot_token = bot_token
        self.ack_deadline = ack_deadline
        self.token_lifetime = token_lifetime
        self.attachment_size_limit = attachment_size_limit
        self.bot_permissions = bot_permissions
        self.enforce_default_permissions = enforce_default_permissions
        self.followup_replaces_deferred = followup_replaces_deferred
        self.privileged_intents = privileged_intents
        self.rate_limit = rate_limit
        self.clock = clock or FakeClock()
        self.strict = strict
        self._redirect = redirect

        self.snowflake = SnowflakeFactory()
        self.changes = Changes()
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []
        self.faults: list[Fault] = []
        self.messages: list[Message] = []
        self.interactions: list[FakeInteraction] = []
        self.synced_global: list[dict[str, Any]] = []
        # Guild commands by guild id (``synced_guild`` is the main guild's).
        self.synced_guilds: dict[int, list[dict[str, Any]]] = {}
        self._interactions_by_id: dict[int, FakeInteraction] = {}
        self._interactions_by_token: dict[str, FakeInteraction] = {}
        self._messages_by_id: dict[int, Message] = {}
        self._attachments: dict[int, Attachment] = {}
        self._windows: dict[str, tuple[float, int]] = {}
        # (channel, author, nonce) of messages sent with enforce_nonce -> (when, message id).
        self._nonces: dict[tuple[int, int, str], tuple[float, int]] = {}
        self._runner: web.AppRunner | None = None
        self._exit_stack = ExitStack()
        self.port = 0
        self.gateway = Gateway(self)
        # Discord's OAuth2 pages and endpoints (the web home's sign-in): tests/fakediscord/oauth.py.
        self.oauth = FakeOAuth(self)

        self.application_id = self.snowflake()
        self.guild_id = self.snowflake()
        self.guild_name = "Fake Guild"
        self.everyone = Role(id=self.guild_id, name="@everyone", permissions=EVERYONE_PERMISSIONS)
        self.roles: list[Role] = [self.everyone]
        # Guilds besides the main one, by id (``add_guild``); the bot is a member of each.
        self.guilds: dict[int, Guild] = {}
        # The bot user's id is the application id, as for every application created since 2019.
        self.bot_user = User(id=self.application_id, name=bot_name, bot=True)
        self._bot_role = self.add_role(bot_name, permissions=bot_permissions, managed=True)
        self.bot_user.roles.append(self._bot_role)
        self.users: dict[int, User] = {self.bot_user.id: self.bot_user}
        self.owner = self.add_user("owner", admin=True)
        self.channels: list[Channel] = []
        self.general = self.add_channel("general")
        self.nsfw_channel = self.add_channel("nsfw", nsfw=True)

    @property
    def synced_guild(self) -> list[dict[str, Any]]:
        """The commands synced to the main guild."""
        return self.synced_guilds.get(self.guild_id, [])

    @synced_guild.setter
    def synced_guild(self, commands: list[dict[str, Any]]) -> None:
        self.synced_guilds[self.guild_id] = commands

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
        if exc_type is None and self.strict and self.errors:
            raise AssertionError("fake Discord recorded errors:\n" + "\n".join(self.errors))

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=256 * MiB)
        self._add_routes(app.router)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        if self._redirect:
            self._exit_stack.enter_context(redirect_discord(self.url))

    async def stop(self) -> None:
        self._exit_stack.close()
        await self.gateway.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    @asynccontextmanager
    async def run_bot(self, client: ClientT, *, timeout: float = 10.0) -> AsyncIterator[ClientT]:
        """Start ``client`` (a discord.Client) against the fake, yield once it is ready, close it.

        If ``client.start()`` dies meanwhile (a payload discord.py cannot parse, say), every
        ``wait_*`` fails at once with that exception instead of timing out.
        """
        self.changes.failure = None
        sessions_before = len(self.sessions)
        task = asyncio.create_task(client.start(self.bot_token), name="bot.start")
        task.add_done_callback(self._bot_stopped)
        try:
            # wait_until_ready() raises until start() has run its first step; the gateway
            # session existing proves it has.
            await self._race(task, lambda: len(self.sessions) > sessions_before, timeout)
            ready = asyncio.ensure_future(client.wait_until_ready())
            done, _ = await asyncio.wait(
                {task, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if ready not in done:
                ready.cancel()
                if task in done:
                    task.result()
                    raise AssertionError("the bot stopped before it was ready")
                raise WaitTimeout(f"bot not ready after {timeout}s\n{self.describe_recent()}")
            yield client
        except BaseException:
            await client.close()
            await asyncio.wait({task}, timeout=5)
            raise
        finally:
            task.remove_done_callback(self._bot_stopped)
        await client.close()
        await asyncio.wait_for(task, timeout=5)

    def _bot_stopped(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.changes.failure = task.exception()
            self.changes.notify()

    @property
    def bot_failure(self) -> BaseException | None:
        return self.changes.failure

    async def _race(
        self, task: asyncio.Task[Any], predicate: Callable[[], Any], timeout: float
    ) -> None:
        waiter = asyncio.ensure_future(self.wait_for(predicate, timeout))
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            waiter.result()
            return
        waiter.cancel()
        task.result()
        raise AssertionError("the bot stopped before it reached the gateway")

    def subprocess_argv(self, module: str, *args: str) -> list[str]:
        """argv for ``python -m module args`` in another process, with discord.py redirected
        here (see ``launch.py``); run it with :meth:`subprocess_env`."""
        launcher = ["-m", "tests.fakediscord.launch", "--url", self.url]
        return [sys.executable, *launcher, "-m", module, *args]

    def subprocess_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) plus the bot token and an import
        path that finds this package."""
        env = dict(os.environ if base is None else base)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["DISCORD_TOKEN"] = self.bot_token
        return env

    # -- world building ------------------------------------------------------------------------
    def add_role(
        self,
        name: str,
        permissions: int = 0,
        *,
        managed: bool = False,
        guild: Guild | None = None,
    ) -> Role:
        roles = self.roles if guild is None else guild.roles
        role = Role(
            id=self.snowflake(),
            name=name,
            permissions=permissions,
            position=len(roles),
            managed=managed,
        )
        roles.append(role)
        self._announce("GUILD_ROLE_CREATE", {"role": role.payload()}, guild)
        return role

    def _announce(self, event: str, data: dict[str, Any], guild: Guild | None = None) -> None:
        # World changes made mid-test reach a connected bot, as on Discord.
        if self.gateway.wants(INTENT_GUILDS):
            guild_id = self.guild_id if guild is None else guild.id
            self.gateway.dispatch_soon(event, {"guild_id": str(guild_id), **data})

    def add_guild(self, name: str) -> Guild:
        """Another guild with the bot in it (as if someone invited the bot): its own
        @everyone, a ``general`` channel and an ``owner`` (an admin there, and nowhere else).
        A connected bot gets its GUILD_CREATE, as when it is added to a server."""
        guild_id = self.snowflake()
        everyone = Role(id=guild_id, name="@everyone", permissions=EVERYONE_PERMISSIONS)
        guild = Guild(id=guild_id, name=name, everyone=everyone, roles=[everyone])
        bot_role = Role(
            id=self.snowflake(),
            name=self.bot_user.name,
            permissions=self.bot_permissions,
            position=1,
            managed=True,
        )
        guild.roles.append(bot_role)
        self.guilds[guild_id] = guild
        guild.owner = self.add_user(f"{name} owner", admin=True, guild=guild)
        channel = Channel(
            id=self.snowflake(), name="general", guild_id=guild_id, bot_id=self.bot_user.id
        )
        self.channels.append(channel)
        guild.general = channel
        if self.gateway.wants(INTENT_GUILDS):
            # A join's GUILD_CREATE has no "unavailable" (one that has it is an outage ending).
            payload = self.guild_payload(full=True, guild=guild)
            del payload["unavailable"]
            self.gateway.dispatch_soon("GUILD_CREATE", payload)
        return guild

    def guild_of(self, guild_id: int | None) -> Guild | None:
        """Another guild by id; None for the main guild (and DMs)."""
        return self.guilds.get(guild_id) if guild_id is not None else None

    def is_member(self, user: User, guild_id: int | None) -> bool:
        """Whether ``user`` is a member of the guild (the bot is a member of every guild)."""
        if user is self.bot_user:
            return True
        home = self.guild_id if user.guild_id is None else user.guild_id
        return guild_id == home

    def update_role(self, role: Role, *, permissions: int) -> None:
        """Change a role's permissions; a connected bot's role cache hears about it."""
        role.permissions = permissions
        self._announce("GUILD_ROLE_UPDATE", {"role": role.payload()})

    def role(self, name: str) -> Role:
        return next(r for r in self.roles if r.name == name)

    def add_user(
        self,
        name: str,
        roles: Iterable[Role | str] = (),
        permissions: int = 0,
        admin: bool = False,
        *,
        locale: str = "en-US",
        guild: Guild | None = None,
    ) -> User:
        """A member of the main guild, or of ``guild`` only. Roles given by name are created
        (without permissions) in that guild if missing."""
        known = self.roles if guild is None else guild.roles
        resolved = []
        for role in roles:
            if isinstance(role, str):
                role = next((r for r in known if r.name == role), None) or self.add_role(
                    role, guild=guild
                )
            resolved.append(role)
        user = User(
            id=self.snowflake(),
            name=name,
            roles=resolved,
            permissions=permissions,
            admin=admin,
            locale=locale,
            guild_id=None if guild is None else guild.id,
        )
        self.users[user.id] = user
        return user

    def add_channel(self, name: str, *, nsfw: bool = False, guild: Guild | None = None) -> Channel:
        channel = Channel(
            id=self.snowflake(),
            name=name,
            guild_id=self.guild_id if guild is None else guild.id,
            nsfw=nsfw,
            position=len(self.channels),
            bot_id=self.bot_user.id,
        )
        self.channels.append(channel)
        self._announce("CHANNEL_CREATE", channel.payload(), guild)
        return channel

    def add_thread(self, name: str, *, parent: Channel | None = None) -> Channel:
        """A public thread in ``parent`` (``general`` by default); the bot's permissions in it
        are its parent's, with Send Messages in Threads in place of Send Messages."""
        parent = parent or self.general
        thread = Channel(
            id=self.snowflake(),
            name=name,
            guild_id=parent.guild_id,
            nsfw=parent.nsfw,
            kind="thread",
            parent=parent,
            bot_id=self.bot_user.id,
        )
        self.channels.append(thread)
        self._announce(
            "THREAD_CREATE",
            {**thread.payload(), "newly_created": True},
            self.guild_of(parent.guild_id),
        )
        return thread

    def deny_bot(self, channel: Channel, permissions: int) -> None:
        """Take ``permissions`` away from the bot in ``channel`` (a member overwrite; threads
        inherit it from their parent). ``0`` gives everything back. A connected bot hears of
        it, as on Discord, and so do the ``app_permissions`` of later interactions."""
        if channel.kind != "text":
            raise ValueError(f"overwrites live on text channels, not on a {channel.kind}")
        channel.bot_deny = permissions
        self._announce("CHANNEL_UPDATE", channel.payload(), self.guild_of(channel.guild_id))

    def bot_permissions_in(self, channel: Channel) -> int:
        """What the bot may do with its own token in ``channel``: @everyone's and its role's
        permissions, less the channel's overwrite for it (Discord's computation, which
        discord.py's ``channel.permissions_for(guild.me)`` repeats from its cache)."""
        if channel.kind == "dm":
            return VIEW_CHANNEL | SEND_MESSAGES | ATTACH_FILES | EMBED_LINKS | READ_MESSAGE_HISTORY
        guild = self.guild_of(channel.guild_id)
        everyone = self.everyone if guild is None else guild.everyone
        base = everyone.permissions | self.bot_permissions
        if base & ADMINISTRATOR:
            return ALL_PERMISSIONS
        source = channel.parent if channel.parent is not None else channel
        value = base & ~source.bot_deny
        if not value & VIEW_CHANNEL:
            return 0
        if channel.kind == "thread" and not value & SEND_MESSAGES_IN_THREADS:
            # Without it a thread takes no message at all, so nothing attached to one either.
            value &= ~(ATTACH_FILES | EMBED_LINKS)
        return value

    def _require_bot_permissions(self, channel: Channel, needed: int) -> None:
        """Bot-token routes obey the bot's channel permissions (webhook routes don't)."""
        granted = self.bot_permissions_in(channel)
        if not granted & VIEW_CHANNEL:
            raise FakeHTTPError(403, 50001, "Missing Access")
        if granted & needed != needed:
            raise FakeHTTPError(403, 50013, "Missing Permissions")

    def channel(self, channel_id: int | str) -> Channel | None:
        return next((c for c in self.channels if c.id == int(channel_id)), None)

    def permissions_of(self, user: User) -> int:
        """Guild-level permissions (no channel overwrites are modelled)."""
        if user.admin:
            return ALL_PERMISSIONS
        guild = self.guild_of(user.guild_id)
        everyone = self.everyone if guild is None else guild.everyone
        value = everyone.permissions | user.permissions
        for role in user.roles:
            value |= role.permissions
        return ALL_PERMISSIONS if value & ADMINISTRATOR else value

    # -- inspecting ----------------------------------------------------------------------------
    def message(self, message_id: int | str) -> Message | None:
        return self._messages_by_id.get(int(message_id))

    def messages_in(self, channel: Channel, *, include_ephemeral: bool = False) -> list[Message]:
        return [
            m
            for m in self.messages
            if m.channel_id == channel.id
            and not m.deleted
            and (include_ephemeral or not m.ephemeral)
        ]

    def command(self, name: str) -> dict[str, Any]:
        """The synced schema of ``/name`` (guild commands first, as Discord's client shows)."""
        for commands in (self.synced_guild, self.synced_global):
            for command in commands:
                if command["name"] == name and command.get("type", 1) == 1:
                    return command
        raise LookupError(f"/{name} was not synced")

    def requests_matching(
        self, method: str = "*", path: str = "*", status: int | None = None
    ) -> list[RecordedRequest]:
        """Requests by method and a glob on the path, e.g. ``("PATCH", "/webhooks/*")``."""
        return [r for r in self.requests if r.matches(method, path, status)]

    def count(self, method: str = "*", path: str = "*", status: int | None = None) -> int:
        return len(self.requests_matching(method, path, status))

    def describe_recent(self, limit: int = 20) -> str:
        lines = [f"last {min(limit, len(self.requests))} of {len(self.requests)} requests:"]
        lines += [f"  {r!r}" for r in self.requests[-limit:]]
        if self.errors:
            lines.append("fake errors:")
            lines += [f"  {e}" for e in self.errors]
        return "\n".join(lines)

    @property
    def connected(self) -> bool:
        """Whether a bot is on the gateway right now."""
        return self.gateway.connected

    @property
    def sessions(self) -> list[GatewaySession]:
        """Every gateway session, oldest first (a restarted bot identifies a new one)."""
        return self.gateway.sessions

    # -- waiting -------------------------------------------------------------------------------
    async def wait_for(self, predicate: Callable[[], T], timeout: float = DEFAULT_TIMEOUT) -> T:
        """Wait until ``predicate()`` is truthy (re-checked after every change); return it."""
        return await self.changes.wait_until(
            predicate,
            timeout,
            lambda: "timed out waiting for a condition\n" + self.describe_recent(),
        )

    async def wait_for_message(
        self, predicate: Callable[[Message], Any], timeout: float = DEFAULT_TIMEOUT
    ) -> Message:
        """The oldest live message (any channel, ephemeral too) satisfying ``predicate``.

        The predicate is re-checked after every edit, so "the job message once it has an
        attachment" works.
        """

        def check() -> Message | None:
            return next((m for m in self.messages if not m.deleted and predicate(m)), None)

        return await self.changes.wait_until(
            check, timeout, lambda: "timed out waiting for a message\n" + self.describe_recent()
        )

    async def wait_ready(self, timeout: float = 10.0) -> GatewaySession:
        """Wait until a bot has identified (or resumed) and is connected."""
        return await self.gateway.wait_ready(timeout)

    # -- fault injection -----------------------------------------------------------------------
    def inject(
        self,
        method: str,
        path: str,
        *,
        status: int = 429,
        times: int = 1,
        retry_after: float = 0.05,
        is_global: bool = False,
        with_files: bool | None = None,
    ) -> Fault:
        """Answer the next ``times`` requests matching ``method`` and the ``path`` glob with
        ``status`` (429 with ``retry_after``, or a 5xx). ``with_files=True`` matches uploads only.

        Paths have no ``/api/v10``: ``"/webhooks/*"`` (follow-ups and their edits),
        ``"/webhooks/*/messages/@original"``, ``"/interactions/*/callback"``,
        ``"/channels/*/messages"``.
        """
        fault = Fault(method, path, status, times, retry_after, is_global, with_files)
        self.faults.append(fault)
        return fault

    def rate_limit_next(
        self, method: str, path: str, *, times: int = 1, retry_after: float = 0.05, **kw: Any
    ) -> Fault:
        return self.inject(method, path, status=429, times=times, retry_after=retry_after, **kw)

    def fail_next(
        self, method: str, path: str, *, status: int = 502, times: int = 1, **kw: Any
    ) -> Fault:
        if status < 500:
            raise ValueError("fail_next is for 5xx; use rate_limit_next for 429")
        return self.inject(method, path, status=status, times=times, **kw)

    def lose_answer_next(
        self, method: str, path: str, *, times: int = 1, with_files: bool | None = None
    ) -> Fault:
        """Handle the next ``times`` matching requests as usual (a message is created) and then
        close the connection without answering: a reply lost on the way back."""
        fault = Fault(method, path, 200, times, 0.0, False, with_files, lose_answer=True)
        self.faults.append(fault)
        return fault

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT; discord.py reconnects to resume_gateway_url and RESUMEs."""
        await self.gateway.request_reconnect()

    async def drop_gateway(self, code: int = 4000) -> None:
        """Close the bot's gateway connection from the server side (4000: it may resume)."""
        await self.gateway.drop(code)

    # -- acting as users -----------------------------------------------------------------------
    async def slash(
        self,
        user: User,
        command: str,
        /,
        *,
        channel: Channel | None = None,
        options: dict[str, Any] | None = None,
        **values: Any,
    ) -> FakeInteraction:
        """``user`` runs ``/command`` (``"admin credits grant"`` for subcommands) with options.

        Options are checked against the schema the bot synced; anything Discord's client
        would not send raises :class:`SchemaViolation` here. Use ``options={...}`` for option
        names that clash with ``channel``/``options``. Users, roles and channels are passed as
        the fake's objects, attachments as ``Upload(filename, data)``.
        """
        channel = channel or self.general
        merged = {**(options or {}), **values}
        path = command.strip().lstrip("/").split()
        if not path:
            raise cmd.SchemaViolation("empty command")
        top, chain, leaf = cmd.find_command(self._visible_commands(channel), path)
        permissions = self.permissions_of(user)
        if self.enforce_default_permissions and channel.kind != "dm":
            cmd.check_permissions(top, permissions, " ".join(path))
        if top.get("nsfw") and not channel.nsfw:
            raise cmd.SchemaViolation(f"/{path[0]} is age-restricted; #{channel.name} is not")
        resolver = cmd.Resolver(
            member_permissions=self._member_permissions_in(channel),
            channel_permissions=lambda _: permissions,
            new_attachment_id=self.snowflake,
        )
        invocation = cmd.build_invocation(top, chain, leaf, merged, " ".join(path), resolver)
        for attachment_id, upload in invocation.uploads:
            attachment = self._store_attachment(
                channel, upload.filename, upload.data, upload.content_type, int(attachment_id)
            )
            resolved = invocation.data.setdefault("resolved", {})
            resolved.setdefault("attachments", {})[attachment_id] = attachment.payload()
        return await self._dispatch_interaction(user, channel, APPLICATION_COMMAND, invocation.data)

    async def autocomplete(
        self,
        user: User,
        command: str,
        /,
        *,
        focused: str,
        channel: Channel | None = None,
        options: dict[str, Any] | None = None,
        **values: Any,
    ) -> FakeInteraction:
        """``user`` is typing option ``focused`` of ``/command``; ``values[focused]`` is the
        text so far, the other values are options already filled in. The bot's answer (type 8)
        lands in ``interaction.autocomplete_choices`` once ``wait_acked()`` returns."""
        channel = channel or self.general
        merged = {**(options or {}), **values}
        path = command.strip().lstrip("/").split()
        top, chain, leaf = cmd.find_command(self._visible_commands(channel), path)
        if self.enforce_default_permissions and channel.kind != "dm":
            cmd.check_permissions(top, self.permissions_of(user), " ".join(path))
        resolver = cmd.Resolver(
            member_permissions=self._member_permissions_in(channel),
            channel_permissions=lambda _: self.permissions_of(user),
            new_attachment_id=self.snowflake,
        )
        invocation = cmd.build_autocomplete(
            top, chain, leaf, merged, focused, " ".join(path), resolver
        )
        if invocation.uploads:
            raise cmd.SchemaViolation("Discord sends no attachments while a member types")
        option = next(o for o in leaf.get("options") or [] if o["name"] == focused)
        return await self._dispatch_interaction(
            user,
            channel,
            APPLICATION_COMMAND_AUTOCOMPLETE,
            invocation.data,
            autocomplete_option=option,
        )

    async def click(
        self,
        user: User,
        message: Message | int,
        custom_id: str | None = None,
        /,
        *,
        label: str | None = None,
    ) -> FakeInteraction:
        """``user`` presses a button, by ``custom_id`` or by ``label`` (label or emoji name).

        Refuses (SchemaViolation) what a real client could not press: unknown or disabled
        components, deleted messages, someone else's ephemeral message.
        """
        target = self._component_message(user, message)
        if custom_id is None:
            if label is None:
                raise TypeError("click() needs a custom_id or a label")
            custom_id = target.button(label).get("custom_id")
        component = self._pressable(target, custom_id)
        if component.get("type") != 2:
            raise cmd.SchemaViolation(f"{custom_id!r} is not a button; use select()")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": 2}
        if "id" in component:
            data["id"] = component["id"]
        return await self._dispatch_interaction(
            user, self._channel_of(target), MESSAGE_COMPONENT, data, message=target
        )

    async def forge_click(self, user: User, message: Message, custom_id: str, /) -> FakeInteraction:
        """``user`` sends a button press for ``custom_id`` on ``message`` although the
        message has no such button: what a modified client would try (say, the Cancel
        button of a job in another server, on a message of the bot in this one). Whether
        Discord lets it through is not documented, so a bot must not count on it."""
        target = self._component_message(user, message)
        if target.author is not self.bot_user:
            raise cmd.SchemaViolation("a button press needs a message of the bot")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": 2}
        return await self._dispatch_interaction(
            user, self._channel_of(target), MESSAGE_COMPONENT, data, message=target
        )

    async def select(
        self, user: User, message: Message | int, custom_id: str, values: list[str], /
    ) -> FakeInteraction:
        """``user`` picks ``values`` in a string select menu."""
        target = self._component_message(user, message)
        component = self._pressable(target, custom_id)
        if component.get("type") != 3:
            raise cmd.SchemaViolation(f"{custom_id!r} is not a string select")
        allowed = [o["value"] for o in component.get("options", [])]
        low, high = component.get("min_values", 1), component.get("max_values", 1)
        if not low <= len(values) <= high or any(v not in allowed for v in values):
            raise cmd.SchemaViolation(f"{values} not allowed: {low}..{high} of {allowed}")
        data = {"custom_id": custom_id, "component_type": 3, "values": values}
        return await self._dispatch_interaction(
            user, self._channel_of(target), MESSAGE_COMPONENT, data, message=target
        )

    async def submit_modal(
        self,
        interaction: FakeInteraction,
        values: dict[str, str | list[str] | Upload | list[Upload]],
    ) -> FakeInteraction:
        """The user who got ``interaction``'s modal fills it in and submits it: text inputs
        take a string, string selects a list of option values, file uploads (type 19) an
        ``Upload`` or a list of them (stored like attachments and resolved in the payload)."""
        modal = interaction.modal
        if modal is None:
            raise cmd.SchemaViolation(f"{interaction!r} did not answer with a modal")
        resolved: dict[str, Any] = {}

        def fill(component: dict[str, Any]) -> dict[str, Any]:
            if component["type"] == 1:
                return {"type": 1, "components": [fill(c) for c in component["components"]]}
            if component["type"] == 18:
                return {"type": 18, "component": fill(component["component"])}
            custom_id = component.get("custom_id")
            given = values.get(custom_id) if custom_id else None
            if component["type"] == 3:
                return pick(component, custom_id, given)
            if component["type"] == 19:
                return upload(component, custom_id, given)
            value = given if isinstance(given, str) else ""
            if component.get("required", True) and component["type"] == 4 and not value:
                raise cmd.SchemaViolation(f"modal input {custom_id!r} is required")
            return {"type": component["type"], "custom_id": custom_id, "value": value}

        def pick(component: dict[str, Any], custom_id: str | None, given: Any) -> dict[str, Any]:
            chosen = [given] if isinstance(given, str) else list(given or [])
            allowed = [o["value"] for o in component.get("options", [])]
            low = component.get("min_values", 1) if component.get("required", True) else 0
            high = component.get("max_values", 1)
            if not low <= len(chosen) <= high or any(v not in allowed for v in chosen):
                raise cmd.SchemaViolation(f"{chosen} not allowed: {low}..{high} of {allowed}")
            return {"type": 3, "custom_id": custom_id, "values": chosen}

        def upload(component: dict[str, Any], custom_id: str | None, given: Any) -> dict[str, Any]:
            files = [given] if isinstance(given, Upload) else list(given or [])
            low = component.get("min_values", 1) if component.get("required", True) else 0
            high = component.get("max_values", 1)
            if not low <= len(files) <= high:
                raise cmd.SchemaViolation(f"{len(files)} files for {custom_id!r}: {low}..{high}")
            ids = []
            for file in files:
                attachment = self._store_attachment(
                    interaction.channel, file.filename, file.data, file.content_type
                )
                resolved[str(attachment.id)] = attachment.payload()
                ids.append(str(attachment.id))
            return {"type": 19, "custom_id": custom_id, "values": ids}

        data: dict[str, Any] = {
            "custom_id": modal["custom_id"],
            "components": [fill(c) for c in modal["components"]],
        }
        if resolved:
            data["resolved"] = {"attachments": resolved}
        return await self._dispatch_interaction(
            interaction.user, interaction.channel, MODAL_SUBMIT, data, message=interaction.message
        )

    async def message_command(self, user: User, message: Message, name: str) -> FakeInteraction:
        """``user`` picks ``name`` under Apps in ``message``'s context menu (a message
        command, type 3): the interaction carries the target message in ``data.resolved``."""
        channel = self._channel_of(self._component_message(user, message))
        sources = [self.synced_global]
        if channel.kind != "dm":
            sources.append(self.synced_guilds.get(channel.guild_id or 0, []))
        found = [c for commands in sources for c in commands if c.get("type") == 3]
        command = next((c for c in reversed(found) if c["name"] == name), None)
        if command is None:
            synced = ", ".join(sorted(c["name"] for c in found)) or "-"
            raise cmd.SchemaViolation(f"{name!r} is not a synced message command ({synced})")
        if self.enforce_default_permissions and channel.kind != "dm":
            cmd.check_permissions(command, self.permissions_of(user), name)
        data: dict[str, Any] = {
            "id": command["id"],
            "name": command["name"],
            "type": 3,
            "target_id": str(message.id),
            "resolved": {"messages": {str(message.id): message.payload(self.users)}},
        }
        if command.get("guild_id") is not None:
            data["guild_id"] = command["guild_id"]
        return await self._dispatch_interaction(user, channel, APPLICATION_COMMAND, data)

    async def say(self, user: User, content: str, *, channel: Channel | None = None) -> Message:
        """``user`` posts a plain message (MESSAGE_CREATE reaches bots with the intent)."""
        channel = channel or self.general
        state = MessageState(content, (), (), (), 0, self.clock.now(), "user")
        message = Message(
            id=self.snowflake(),
            channel_id=channel.id,
            guild_id=channel.guild_id,
            author=user,
            via="user",
            type=0,
            states=[state],
        )
        self._remember(message)
        await self._emit_message("MESSAGE_CREATE", message)
        self.changes.notify()
        return message

    # -- internals: interactions ---------------------------------------------------------------
    def _member_permissions_in(self, channel: Channel) -> Callable[[User], int | None]:
        """A resolved user's permissions in ``channel``'s guild, None if not a member there."""

        def permissions(user: User) -> int | None:
            if channel.kind == "dm" or not self.is_member(user, channel.guild_id):
                return None
            return self.permissions_of(user)

        return permissions

    def _visible_commands(self, channel: Channel) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        sources = (
            [self.synced_global]
            if channel.kind == "dm"
            else [self.synced_global, self.synced_guilds.get(channel.guild_id or 0, [])]
        )
        for commands in sources:  # guild commands override global ones of the same name
            for command in commands:
                if command.get("type", 1) == 1:
                    found[command["name"]] = command
        return found

    def _component_message(self, user: User, message: Message | int) -> Message:
        target = message if isinstance(message, Message) else self.message(message)
        if target is None or target.deleted:
            raise cmd.SchemaViolation(f"message {message!r} does not exist (or was deleted)")
        owner = target.interaction.user if target.interaction else None
        if target.ephemeral and owner is not user:
            raise cmd.SchemaViolation("an ephemeral message is only visible to its own user")
        return target

    def _pressable(self, message: Message, custom_id: str | None) -> dict[str, Any]:
        component = message.component(custom_id) if custom_id else None
        if component is None:
            raise cmd.SchemaViolation(
                f"no component {custom_id!r} on {message!r}; it has {message.custom_ids}"
            )
        if component.get("disabled"):
            raise cmd.SchemaViolation(f"component {custom_id!r} is disabled")
        return component

    def _channel_of(self, message: Message) -> Channel:
        channel = self.channel(message.channel_id)
        assert channel is not None
        return channel

    async def _dispatch_interaction(
        self,
        user: User,
        channel: Channel,
        kind: int,
        data: dict[str, Any],
        message: Message | None = None,
        *,
        autocomplete_option: dict[str, Any] | None = None,
    ) -> FakeInteraction:
        await self.wait_ready()
        interaction_id = self.snowflake()
        token = f"itok_{secrets.token_urlsafe(48)}"
        permissions = self.permissions_of(user)
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(self.application_id),
            "type": kind,
            "token": token,
            "version": 1,
            "channel_id": str(channel.id),
            "channel": channel.payload(),
            "app_permissions": str(
                self.bot_permissions_in(channel) | INTERACTION_IMPLICIT_PERMISSIONS
            ),
            "locale": user.locale,
            "entitlements": [],
            "attachment_size_limit": self.attachment_size_limit,
            "data": data,
        }
        if channel.kind == "dm":
            payload["user"] = user.payload()
            payload["context"] = 1
            payload["authorizing_integration_owners"] = {"0": str(self.guild_id)}
        else:
            guild_id = channel.guild_id
            if not self.is_member(user, guild_id):
                raise cmd.SchemaViolation(f"{user.name} is not a member of #{channel.name}'s guild")
            payload.update(
                guild_id=str(guild_id),
                guild={"id": str(guild_id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                member=user.member_payload(permissions),
                context=0,
                authorizing_integration_owners={"0": str(guild_id)},
            )
        if message is not None:
            payload["message"] = message.payload(self.users)
        interaction = FakeInteraction(
            self,
            id=interaction_id,
            token=token,
            type=kind,
            user=user,
            channel=channel,
            payload=payload,
            created_at=self.clock.now(),
            token_lifetime=self.token_lifetime,
            message=message,
        )
        interaction.autocomplete_option = autocomplete_option
        self.interactions.append(interaction)
        self._interactions_by_id[interaction_id] = interaction
        self._interactions_by_token[token] = interaction
        await self.gateway.dispatch("INTERACTION_CREATE", payload)
        return interaction

    def _interaction_metadata(
        self, interaction: FakeInteraction, original: Message | None
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "id": str(interaction.id),
            "type": interaction.type,
            "user": interaction.user.payload(),
            "authorizing_integration_owners": {
                "0": str(interaction.channel.guild_id or self.guild_id)
            },
        }
        if original is not None:
            metadata["original_response_message_id"] = str(original.id)
        if interaction.message is not None:
            metadata["interacted_message_id"] = str(interaction.message.id)
        if interaction.type == APPLICATION_COMMAND:
            metadata["name"] = interaction.command
        return metadata

    def _interaction_message(
        self,
        interaction: FakeInteraction,
        body: dict[str, Any],
        files: list[UploadedFile],
        *,
        flags: int,
        followup: bool,
    ) -> Message:
        message_type = 20 if interaction.type == APPLICATION_COMMAND else 0
        original = interaction.original if followup else None
        return self._create_message(
            interaction.channel,
            body,
            files,
            via="interaction",
            message_type=message_type,
            flags=flags,
            interaction=interaction,
            metadata=self._interaction_metadata(interaction, original),
        )

    def host_file(self, filename: str, data: bytes, channel: Channel | None = None) -> str:
        """Put a file on the fake's CDN, as if posted earlier in ``channel`` (``general``), and
        return its URL: what a member copies into a prompt as an image link."""
        return self._store_attachment(channel or self.general, filename, data, None).url

    # -- internals: messages -------------------------------------------------------------------
    def _store_attachment(
        self,
        channel: Channel,
        filename: str,
        data: bytes,
        content_type: str | None,
        attachment_id: int | None = None,
        description: str | None = None,
    ) -> Attachment:
        attachment_id = attachment_id or self.snowflake()
        url = f"{self.url}/cdn/attachments/{channel.id}/{attachment_id}/{quote(filename)}"
        attachment = Attachment(
            id=attachment_id,
            filename=filename,
            data=data,
            url=url,
            content_type=content_type or guess_content_type(filename),
            description=description,
        )
        self._attachments[attachment_id] = attachment
        return attachment

    def _attachments_after(
        self,
        channel: Channel,
        body: dict[str, Any],
        files: list[UploadedFile],
        previous: tuple[Attachment, ...],
    ) -> tuple[Attachment, ...]:
        """The ``attachments`` array semantics: ``{"id": n}`` uploads ``files[n]``, an existing
        attachment's id keeps it, anything unlisted goes, no key at all changes nothing."""
        for upload in files:
            if upload.index >= 0 and len(upload.data) > self.attachment_size_limit:
                raise FakeHTTPError(413, 40005, "Request entity too large")
        by_index = {f.index: f for f in files}
        kept = {a.id: a for a in previous}
        if "attachments" not in body:
            new = [self._upload(channel, f, None) for f in files]
            return (*previous, *new)
        result: list[Attachment] = []
        used: set[int] = set()
        for position, entry in enumerate(body.get("attachments") or []):
            raw_id = entry.get("id")
            try:
                entry_id = int(raw_id)
            except (TypeError, ValueError):
                raise form_error(
                    ["attachments", position, "id"], "BASE_TYPE_REQUIRED", "Invalid id."
                ) from None
            if entry_id in kept:
                result.append(kept[entry_id])
            elif entry_id in by_index:
                used.add(entry_id)
                result.append(self._upload(channel, by_index[entry_id], entry))
            else:
                raise form_error(
                    ["attachments", position],
                    "ATTACHMENT_NOT_FOUND",
                    f"Unknown attachment {raw_id}.",
                )
        # Files sent without an entry are still attached, as Discord does.
        result += [self._upload(channel, f, None) for f in files if f.index not in used]
        return tuple(result)

    def _upload(
        self, channel: Channel, upload: UploadedFile, entry: dict[str, Any] | None
    ) -> Attachment:
        filename = (entry or {}).get("filename") or upload.filename
        content_type = upload.content_type
        if content_type in (None, "application/octet-stream"):
            content_type = guess_content_type(filename)
        return self._store_attachment(
            channel,
            filename,
            upload.data,
            content_type,
            description=(entry or {}).get("description"),
        )

    def _new_state(
        self,
        channel: Channel,
        body: dict[str, Any],
        files: list[UploadedFile],
        *,
        previous: MessageState | None,
        via: Via,
        flags: int,
    ) -> MessageState:
        def pick(key: str, default: Any) -> Any:
            if key in body:
                return body[key] if body[key] is not None else default
            return getattr(previous, key) if previous is not None else default

        attachments = self._attachments_after(
            channel, body, files, previous.attachments if previous else ()
        )
        state = MessageState(
            content=pick("content", ""),
            embeds=tuple(pick("embeds", ())),
            components=tuple(pick("components", ())),
            attachments=attachments,
            flags=flags,
            at=self.clock.now(),
            via=via,
        )
        self._validate(state, body)
        return state

    def _validate(self, state: MessageState, body: dict[str, Any]) -> None:
        if not isinstance(state.content, str):
            raise form_error(["content"], "BASE_TYPE_STRING", "Must be a string.")
        if len(state.content) > MAX_CONTENT:
            raise form_error(
                ["content"], "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT} or fewer in length."
            )
        if len(state.embeds) > MAX_EMBEDS:
            raise form_error(
                ["embeds"], "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBEDS} or fewer in length."
            )
        if len(state.attachments) > MAX_ATTACHMENTS:
            raise form_error(
                ["attachments"],
                "BASE_TYPE_MAX_LENGTH",
                f"Must be {MAX_ATTACHMENTS} or fewer in length.",
            )
        if not state.flags & FLAG_COMPONENTS_V2:
            validate_components(list(state.components))
        mentions = body.get("allowed_mentions") or {}
        for kind in ("users", "roles"):
            if kind in (mentions.get("parse") or ()) and mentions.get(kind):
                raise form_error(
                    ["allowed_mentions", "parse"],
                    "MESSAGE_ALLOWED_MENTIONS_PARSE_EXCLUSIVE",
                    f'parse:["{kind}"] and {kind}: [ids] are mutually exclusive.',
                )
        empty = not (state.content.strip() or state.embeds or state.attachments or state.components)
        if empty and not state.flags & FLAG_LOADING:
            raise FakeHTTPError(400, 50006, "Cannot send an empty message")

    def _create_message(
        self,
        channel: Channel,
        body: dict[str, Any],
        files: list[UploadedFile],
        *,
        via: Via,
        message_type: int,
        flags: int,
        interaction: FakeInteraction | None = None,
        metadata: dict[str, Any] | None = None,
        reference: dict[str, Any] | None = None,
        referenced: Message | None = None,
    ) -> Message:
        state = self._new_state(channel, body, files, previous=None, via=via, flags=flags)
        message = Message(
            id=self.snowflake(),
            channel_id=channel.id,
            guild_id=channel.guild_id,
            author=self.bot_user,
            via=via,
            type=message_type,
            states=[state],
            allowed_mentions=body.get("allowed_mentions"),
            message_reference=reference,
            referenced=referenced,
            interaction=interaction,
            interaction_metadata=metadata,
            webhook_id=self.application_id if via == "interaction" else None,
            application_id=self.application_id if via == "interaction" else None,
            tts=bool(body.get("tts", False)),
        )
        self._remember(message)
        return message

    def _remember(self, message: Message) -> None:
        self.messages.append(message)
        self._messages_by_id[message.id] = message

    def _edit(
        self,
        message: Message,
        body: dict[str, Any],
        files: list[UploadedFile],
        via: Via,
    ) -> None:
        flags = message.flags & ~FLAG_LOADING
        if "flags" in body and body["flags"] is not None:
            # Only embed suppression can change on an edit; components v2 can be switched on.
            flags = (flags & ~FLAG_SUPPRESS_EMBEDS) | (
                body["flags"] & (FLAG_SUPPRESS_EMBEDS | FLAG_COMPONENTS_V2)
            )
        channel = self._channel_of(message)
        state = self._new_state(channel, body, files, previous=message.state, via=via, flags=flags)
        message.states.append(state)
        message.edited_timestamp = iso_now()

    async def _emit_message(self, event: str, message: Message) -> None:
        if message.ephemeral:
            return  # ephemeral messages never reach the gateway
        needed = INTENT_GUILD_MESSAGES if message.guild_id is not None else INTENT_DIRECT_MESSAGES
        if not self.gateway.wants(needed):
            return
        if event == "MESSAGE_DELETE":
            data: dict[str, Any] = {"id": str(message.id), "channel_id": str(message.channel_id)}
            if message.guild_id is not None:
                data["guild_id"] = str(message.guild_id)
        else:
            data = message.payload(self.users)
            if message.guild_id is not None:
                data["member"] = message.author.member_payload(with_user=False)
                if self._content_hidden(message):
                    data.update(content="", embeds=[], attachments=[], components=[])
        await self.gateway.dispatch(event, data)

    def _content_hidden(self, message: Message) -> bool:
        # Without the privileged message-content intent, Discord blanks other people's guild
        # messages unless they mention the bot.
        return (
            message.author is not self.bot_user
            and not self.gateway.wants(INTENT_MESSAGE_CONTENT)
            and self.bot_user.id not in message.pings.users
        )

    # -- payloads ------------------------------------------------------------------------------
    def guild_payload(self, *, full: bool, guild: Guild | None = None) -> dict[str, Any]:
        """The main guild's payload, or ``guild``'s."""
        guild_id = self.guild_id if guild is None else guild.id
        owner = self.owner if guild is None else guild.owner
        roles = self.roles if guild is None else guild.roles
        data: dict[str, Any] = {
            "id": str(guild_id),
            "name": self.guild_name if guild is None else guild.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": str(owner.id if owner is not None else self.bot_user.id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 1,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "vanity_url_code": None,
            "max_members": 500000,
            "features": [],
            "roles": [r.payload() for r in roles],
            "emojis": [],
            "stickers": [],
        }
        if full:
            members = [u for u in self.users.values() if self.is_member(u, guild_id)]
            channels = [c for c in self.channels if c.guild_id == guild_id]
            data.update(
                joined_at="2024-01-01T00:00:00+00:00",
                large=False,
                unavailable=False,
                member_count=len(members),
                members=[self._member_payload_in(u, guild) for u in members],
                channels=[c.payload() for c in channels if c.kind == "text"],
                threads=[c.payload() for c in channels if c.kind == "thread"],
                presences=[],
                voice_states=[],
                stage_instances=[],
                guild_scheduled_events=[],
                soundboard_sounds=[],
            )
        return data

    def _member_payload_in(self, user: User, guild: Guild | None) -> dict[str, Any]:
        # The bot's own roles differ per guild: in another guild it has that guild's bot role.
        if guild is not None and user is self.bot_user:
            data = user.member_payload()
            data["roles"] = [str(r.id) for r in guild.roles if r.managed]
            return data
        return user.member_payload()

    def live_guilds(self) -> list[Guild | None]:
        """Every guild the bot is in: None for the main guild, then the others not left."""
        return [None, *(g for g in self.guilds.values() if not g.left)]

    # -- internals: HTTP -----------------------------------------------------------------------
    def _add_routes(self, router: web.UrlDispatcher) -> None:
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
            ("GET", "/gateway", self.gateway.handle),
            ("GET", "/cdn/attachments/{channel_id}/{attachment_id}/{filename}", self._cdn),
            ("GET", f"{API}/users/@me", self._get_me),
            ("POST", f"{API}/users/@me/channels", self._create_dm),
            ("DELETE", f"{API}/users/@me/guilds/{{guild_id}}", self._leave_guild),
            ("GET", f"{API}/users/{{user_id}}", self._get_user),
            ("GET", f"{API}/oauth2/applications/@me", self._get_application),
            ("GET", f"{API}/gateway", self._get_gateway),
            ("GET", f"{API}/gateway/bot", self._get_gateway_bot),
            ("GET", f"{API}/applications/{{app_id}}/commands", self._get_global_commands),
            ("PUT", f"{API}/applications/{{app_id}}/commands", self._put_global_commands),
            (
                "GET",
                f"{API}/applications/{{app_id}}/guilds/{{guild_id}}/commands",
                self._get_guild_commands,
            ),
            (
                "PUT",
                f"{API}/applications/{{app_id}}/guilds/{{guild_id}}/commands",
                self._put_guild_commands,
            ),
            ("POST", f"{API}/interactions/{{interaction_id}}/{{token}}/callback", self._callback),
            ("POST", f"{API}/webhooks/{{app_id}}/{{token}}", self._followup),
            (
                "GET",
                f"{API}/webhooks/{{app_id}}/{{token}}/messages/{{message_id}}",
                self._get_webhook_message,
            ),
            (
                "PATCH",
                f"{API}/webhooks/{{app_id}}/{{token}}/messages/{{message_id}}",
                self._edit_webhook_message,
            ),
            (
                "DELETE",
                f"{API}/webhooks/{{app_id}}/{{token}}/messages/{{message_id}}",
                self._delete_webhook_message,
            ),
            ("GET", f"{API}/channels/{{channel_id}}", self._get_channel),
            ("POST", f"{API}/channels/{{channel_id}}/typing", self._typing),
            ("GET", f"{API}/channels/{{channel_id}}/messages", self._channel_history),
            ("POST", f"{API}/channels/{{channel_id}}/messages", self._channel_send),
            (
                "GET",
                f"{API}/channels/{{channel_id}}/messages/{{message_id}}",
                self._channel_get_message,
            ),
            (
                "PATCH",
                f"{API}/channels/{{channel_id}}/messages/{{message_id}}",
                self._channel_edit_message,
            ),
            (
                "DELETE",
                f"{API}/channels/{{channel_id}}/messages/{{message_id}}",
                self._channel_delete_message,
            ),
            ("GET", f"{API}/guilds/{{guild_id}}", self._get_guild),
            ("GET", f"{API}/guilds/{{guild_id}}/channels", self._get_guild_channels),
            ("GET", f"{API}/guilds/{{guild_id}}/roles", self._get_guild_roles),
            ("GET", f"{API}/guilds/{{guild_id}}/members/{{user_id}}", self._get_member),
        ]
        for method, path, handler in [*routes, *self.oauth.routes()]:
            router.add_route(method, path, handler)
        # Registered last, so it only sees what nothing above matched.
        router.add_route("*", "/{tail:.*}", self._unknown_route)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path == "/gateway" and request.headers.get("Upgrade", "").lower() == "websocket":
            return await handler(request)
        path = request.path.removeprefix(API)
        record = RecordedRequest(request.method, path, dict(request.query), self.clock.now())
        resource = request.match_info.route.resource
        record.route = resource.canonical.removeprefix(API) if resource is not None else path
        self.requests.append(record)
        response: web.StreamResponse
        lost: Fault | None = None
        try:
            record.json, record.files = await read_body(request)
            fault = next((f for f in self.faults if f.matches(record)), None)
            if fault is not None and not fault.lose_answer:
                fault.hits += 1
                record.injected = True
                response = self._fault_response(fault, request, record)
            else:
                limited = self._enforce_rate_limit(request, record)
                response = limited if limited is not None else await handler(request)
                if fault is not None and limited is None:
                    lost = fault
        except ClientDisconnected:
            # Nobody is left to read an answer, so none is recorded; aiohttp drops the transport.
            record.dropped = True
            self.changes.notify()
            return web.Response(status=499)
        except FakeHTTPError as error:
            response = json_response(error.body(), error.status, error.headers)
            record.code = error.code
            interaction = request.get(INTERACTION_KEY)
            if interaction is not None:
                interaction.errors.append((error.status, error.code))
        except Exception:
            # A bug in the fake must fail the test, not look like a Discord answer.
            self.errors.append(
                f"fake Discord crashed on {request.method} {path}:\n{traceback.format_exc()}"
            )
            response = json_response({"message": "fake Discord internal error", "code": 50035}, 400)
            record.code = 50035
        record.status = response.status
        record.interaction = request.get(INTERACTION_KEY)
        if request.path.startswith(API) and "X-RateLimit-Limit" not in response.headers:
            response.headers.update(self._rate_limit_headers(request, record))
        if lost is not None and response.status < 300:
            # Done, but the client never hears it: the connection closes unanswered.
            lost.hits += 1
            record.injected = record.dropped = True
            self.changes.notify()
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("the answer was lost on the way back (injected)")
        self.changes.notify()
        return response

    def _bucket(self, request: web.Request, record: RecordedRequest) -> tuple[str, str]:
        """(bucket hash, limiter key): one bucket per route, keyed by its major parameter."""
        info = request.match_info
        major = info.get("channel_id") or info.get("guild_id") or info.get("token") or ""
        bucket = hashlib.md5(f"{record.method} {record.route}".encode()).hexdigest()[:16]
        return bucket, f"{bucket}:{major}"

    def _rate_limit_headers(self, request: web.Request, record: RecordedRequest) -> dict[str, str]:
        # All five or none: discord.py reads X-RateLimit-Reset when Reset-After is missing.
        bucket, key = self._bucket(request, record)
        if self.rate_limit is None:
            limit, remaining, reset_after = 50, 49, 1.0
        else:
            limit, window = self.rate_limit
            started, used = self._windows.get(key, (time.monotonic(), 0))
            remaining = max(0, limit - used)
            reset_after = max(0.0, started + window - time.monotonic())
        return {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(remaining),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": bucket,
        }

    def _enforce_rate_limit(
        self, request: web.Request, record: RecordedRequest
    ) -> web.Response | None:
        if self.rate_limit is None or not request.path.startswith(API):
            return None
        limit, window = self.rate_limit
        _, key = self._bucket(request, record)
        now = time.monotonic()
        started, used = self._windows.get(key, (now, 0))
        if now >= started + window:
            started, used = now, 0
        if used >= limit:
            return self._too_many(
                started + window - now, is_global=False, request=request, record=record
            )
        self._windows[key] = (started, used + 1)
        return None

    def _too_many(
        self, retry_after: float, *, is_global: bool, request: web.Request, record: RecordedRequest
    ) -> web.Response:
        bucket, _ = self._bucket(request, record)
        headers = {
            # discord.py treats a 429 without Via as a Cloudflare ban and gives up.
            "Via": "1.1 google",
            "Retry-After": str(math.ceil(retry_after)),
            "X-RateLimit-Limit": "1",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Bucket": bucket,
            "X-RateLimit-Scope": "global" if is_global else "user",
        }
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        body = {
            "message": "You are being rate limited.",
            "retry_after": retry_after,
            "global": is_global,
            "code": 0,
        }
        return json_response(body, 429, headers)

    def _fault_response(
        self, fault: Fault, request: web.Request, record: RecordedRequest
    ) -> web.Response:
        if fault.status == 429:
            return self._too_many(
                fault.retry_after, is_global=fault.is_global, request=request, record=record
            )
        reason = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}
        message = f"{fault.status}: {reason.get(fault.status, 'Server Error')}"
        return json_response({"message": message, "code": 0}, fault.status)

    def _require_bot(self, request: web.Request) -> None:
        if request.headers.get("Authorization") != f"Bot {self.bot_token}":
            raise FakeHTTPError(401, 0, "401: Unauthorized")

    def _require_app(self, request: web.Request) -> None:
        self._require_bot(request)
        if int(request.match_info["app_id"]) != self.application_id:
            raise FakeHTTPError(403, 50001, "Missing Access")

    def _require_guild(self, request: web.Request) -> Guild | None:
        """The guild of the route: None for the main one, else the other guild."""
        guild_id = int(request.match_info["guild_id"])
        if guild_id == self.guild_id:
            return None
        guild = self.guilds.get(guild_id)
        if guild is None or guild.left:
            raise unknown("Guild", 10004)
        return guild

    # -- handlers: login, gateway, users, guild --------------------------------------------------
    async def _unknown_route(self, request: web.Request) -> web.Response:
        self.errors.append(f"no such route in the fake: {request.method} {request.path}")
        return json_response({"message": "404: Not Found", "code": 0}, 404)

    async def _get_me(self, request: web.Request) -> web.StreamResponse:
        if self.oauth.is_bearer(request):
            return await self.oauth.bearer_me(request)
        self._require_bot(request)
        return json_response(
            {**self.bot_user.payload(), "verified": True, "mfa_enabled": False, "flags": 0}
        )

    async def _get_application(self, request: web.Request) -> web.Response:
        self._require_bot(request)
        return json_response(
            {
                "id": str(self.application_id),
                "name": self.bot_user.name,
                "icon": None,
                "description": "",
                "summary": "",
                "rpc_origins": [],
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": self.owner.payload(),
                "verify_key": "0" * 64,
                "team": None,
                "flags": 0,
                "interactions_endpoint_url": None,
                "bot": self.bot_user.payload(),
            }
        )

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return json_response({"url": self.gateway_url})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        self._require_bot(request)
        limit = {"total": 1000, "remaining": 1000, "reset_after": 0, "max_concurrency": 1}
        return json_response({"url": self.gateway_url, "shards": 1, "session_start_limit": limit})

    async def _get_user(self, request: web.Request) -> web.Response:
        self._require_bot(request)
        user = self.users.get(int(request.match_info["user_id"]))
        if user is None:
            raise unknown("User", 10013)
        return json_response(user.payload())

    async def _create_dm(self, request: web.Request) -> web.Response:
        self._require_bot(request)
        body = request_json(request)
        user = self.users.get(int(body.get("recipient_id", 0)))
        if user is None:
            raise unknown("User", 10013)
        channel = next((c for c in self.channels if c.kind == "dm" and c.recipient is user), None)
        if channel is None:
            channel = Channel(
                id=self.snowflake(), name=user.name, guild_id=None, kind="dm", recipient=user
            )
            self.channels.append(channel)
        return json_response(channel.payload())

    async def _get_guild(self, request: web.Request) -> web.Response:
        self._require_bot(request)
        guild = self._require_guild(request)
        data = self.guild_payload(full=False, guild=guild)
        guild_id = self.guild_id if guild is None else guild.id
        members = sum(self.is_member(u, guild_id) for u in self.users.values())
        data.update(approximate_member_count=members, approximate_presence_count=0)
        return json_response(data)

    async def _get_guild_channels(self, request: web.Request) -> web.Response:
        self._require_bot(request)
        guild = self._require_guild(request)
        guild_id = self.guild_id if guild is None else guild.id
        return json_response(
            [c.payload() for c in self.channels if c.kind == "text" and c.guild_id == guild_id]
        )

    async def _get_guild_roles(self, request: web.Request) -> web.Response:
        self._require_bot(request)
        guild = self._require_guild(request)
        return json_response([r.payload() for r in (self.roles if guild is None else guild.roles)])

    async def _get_member(self, request: web.Request) -> web.Response:
        self._require_bot(request)
        guild = self._require_guild(request)
        user = self.users.get(int(request.match_info["user_id"]))
        guild_id = self.guild_id if guild is None else guild.id
        if user is None or not self.is_member(user, guild_id):
            raise unknown("Member", 10007)
        return json_response(self._member_payload_in(user, guild))

    async def _leave_guild(self, request: web.Request) -> web.Response:
        """The bot leaves a guild (``Guild.leave()``); the main guild can't be left here."""
        self._require_bot(request)
        guild = self._require_guild(request)
        if guild is None:
            raise FakeHTTPError(400, 50055, "Invalid guild: the fake's main guild is not left")
        guild.left = True
        await self.gateway.dispatch("GUILD_DELETE", {"id": str(guild.id)})
        self.changes.notify()
        return web.Response(status=204)

    async def _cdn(self, request: web.Request) -> web.Response:
        attachment = self._attachments.get(int(request.match_info["attachment_id"]))
        if attachment is None:
            self.errors.append(f"CDN asked for an unknown attachment: {request.path}")
            return web.Response(status=404, text="Not Found")
        return web.Response(
            body=attachment.data, content_type=attachment.content_type or "application/octet-stream"
        )

    # -- handlers: commands --------------------------------------------------------------------
    async def _get_global_commands(self, request: web.Request) -> web.Response:
        self._require_app(request)
        return json_response(self.synced_global)

    async def _get_guild_commands(self, request: web.Request) -> web.Response:
        self._require_app(request)
        self._require_guild(request)
        return json_response(self.synced_guilds.get(int(request.match_info["guild_id"]), []))

    async def _put_global_commands(self, request: web.Request) -> web.Response:
        self._require_app(request)
        self.synced_global = self._overwrite(request_json(request), self.synced_global, None)
        return json_response(self.synced_global)

    async def _put_guild_commands(self, request: web.Request) -> web.Response:
        self._require_app(request)
        self._require_guild(request)
        guild_id = int(request.match_info["guild_id"])
        commands = self._overwrite(
            request_json(request), self.synced_guilds.get(guild_id, []), guild_id
        )
        self.synced_guilds[guild_id] = commands
        return json_response(commands)

    def _overwrite(
        self, body: Any, previous: list[dict[str, Any]], guild_id: int | None
    ) -> list[dict[str, Any]]:
        errors = cmd.sync_errors(body)
        if errors:
            raise FakeHTTPError(400, 50035, "Invalid Form Body", errors)
        # A bulk overwrite keeps the id of a command that keeps its name, as Discord does.
        old_ids = {(c.get("type", 1), c["name"]): c["id"] for c in previous}
        result = []
        for command in body:
            key = (command.get("type", 1), command["name"])
            stored = {
                **command,
                "type": command.get("type", 1),
                "id": old_ids.get(key) or str(self.snowflake()),
                "application_id": str(self.application_id),
                "version": str(self.snowflake()),
                "default_member_permissions": command.get("default_member_permissions"),
                # User and message commands (types 2, 3) have no description; Discord
                # answers with an empty one, which discord.py reads.
                "description": command.get("description", ""),
            }
            if guild_id is not None:
                stored["guild_id"] = str(guild_id)
            result.append(stored)
        return result

    # -- handlers: interaction callback, follow-ups --------------------------------------------
    async def _callback(self, request: web.Request) -> web.Response:
        interaction = self._interactions_by_id.get(int(request.match_info["interaction_id"]))
        if interaction is None or interaction.token != request.match_info["token"]:
            raise unknown("interaction", 10062)
        request[INTERACTION_KEY] = interaction
        if interaction.acked:
            raise FakeHTTPError(400, 40060, "Interaction has already been acknowledged.")
        now = self.clock.now()
        if now - interaction.created_at > self.ack_deadline:
            # Discord invalidates the token when the 3 seconds are up.
            raise unknown("interaction", 10062)
        body = request_json(request)
        files = request[FILES_KEY]
        response_type = body.get("type")
        data = body.get("data") or {}
        message: Message | None = None
        is_component = interaction.message is not None
        if response_type == CHANNEL_MESSAGE:
            flags = (data.get("flags") or 0) & _INTERACTION_FLAGS
            message = self._interaction_message(
                interaction, data, files, flags=flags, followup=False
            )
        elif response_type == DEFERRED_CHANNEL_MESSAGE:
            flags = FLAG_LOADING | ((data.get("flags") or 0) & FLAG_EPHEMERAL)
            message = self._interaction_message(interaction, {}, [], flags=flags, followup=False)
        elif response_type in (DEFERRED_UPDATE_MESSAGE, UPDATE_MESSAGE) and is_component:
            message = interaction.message
            assert message is not None
            if message.deleted:
                raise unknown("Message", 10008)
            if response_type == UPDATE_MESSAGE:
                self._edit(message, data, files, "interaction")
        elif response_type == MODAL and interaction.type != MODAL_SUBMIT:
            if not data.get("custom_id") or not data.get("title") or not data.get("components"):
                raise form_error(
                    ["data"], "BASE_TYPE_REQUIRED", "A modal needs custom_id, title and components."
                )
            interaction.modal = data
        elif (
            response_type == AUTOCOMPLETE_RESULT
            and interaction.type == APPLICATION_COMMAND_AUTOCOMPLETE
        ):
            problem = (
                cmd.autocomplete_errors(interaction.autocomplete_option, data.get("choices"))
                if interaction.autocomplete_option is not None
                else None
            )
            if problem is not None:
                raise form_error(["data", "choices"], "BASE_TYPE_INVALID", problem)
            interaction.autocomplete_choices = data.get("choices", [])
        else:
            raise form_error(
                ["type"],
                "INTERACTION_CALLBACK_TYPE_INVALID",
                f"Invalid callback type {response_type} here.",
            )

        interaction.ack = Ack(type=response_type, at=now, data=data)
        interaction.original = message
        result: dict[str, Any] = {
            "interaction": {
                "id": str(interaction.id),
                "type": interaction.type,
                "response_message_loading": response_type == DEFERRED_CHANNEL_MESSAGE,
                "response_message_ephemeral": bool(message is not None and message.ephemeral),
            },
            "resource": {"type": response_type},
        }
        if message is not None:
            result["interaction"]["response_message_id"] = str(message.id)
            if response_type in (CHANNEL_MESSAGE, UPDATE_MESSAGE):
                result["resource"]["message"] = message.payload(self.users)
            event = "MESSAGE_UPDATE" if response_type == UPDATE_MESSAGE else "MESSAGE_CREATE"
            if response_type != DEFERRED_UPDATE_MESSAGE:
                await self._emit_message(event, message)
        return json_response(result)

    def _webhook_interaction(self, request: web.Request) -> FakeInteraction:
        if int(request.match_info["app_id"]) != self.application_id:
            raise unknown("Webhook", 10015)
        interaction = self._interactions_by_token.get(request.match_info["token"])
        if interaction is None:
            raise unknown("Webhook", 10015)
        request[INTERACTION_KEY] = interaction
        if interaction.token_expired:
            raise FakeHTTPError(401, 50027, "Invalid Webhook Token")
        return interaction

    async def _followup(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        if not interaction.acked:
            raise unknown("Webhook", 10015)
        body = request_json(request)
        files = request[FILES_KEY]
        original = interaction.original
        fills_loading = (
            self.followup_replaces_deferred
            and original is not None
            and original.loading
            and interaction.ack_type == DEFERRED_CHANNEL_MESSAGE
        )
        if fills_loading:
            assert original is not None
            self._edit(original, body, files, "interaction")
            message = original
            await self._emit_message("MESSAGE_UPDATE", message)
        else:
            flags = (body.get("flags") or 0) & _INTERACTION_FLAGS
            message = self._interaction_message(
                interaction, body, files, flags=flags, followup=True
            )
            await self._emit_message("MESSAGE_CREATE", message)
        interaction.followups.append(message)
        if request.query.get("wait") in ("1", "true", "True"):
            return json_response(message.payload(self.users))
        return web.Response(status=204)

    def _webhook_message(self, request: web.Request, interaction: FakeInteraction) -> Message:
        message_id = request.match_info["message_id"]
        if message_id == "@original":
            message = interaction.original
        else:
            own = [m for m in (interaction.original, *interaction.followups) if m is not None]
            message = next((m for m in own if str(m.id) == message_id), None)
        if message is None or message.deleted:
            raise unknown("Message", 10008)
        return message

    async def _get_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        return json_response(self._webhook_message(request, interaction).payload(self.users))

    async def _edit_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        message = self._webhook_message(request, interaction)
        self._edit(message, request_json(request), request[FILES_KEY], "interaction")
        await self._emit_message("MESSAGE_UPDATE", message)
        return json_response(message.payload(self.users))

    async def _delete_webhook_message(self, request: web.Request) -> web.Response:
        interaction = self._webhook_interaction(request)
        message = self._webhook_message(request, interaction)
        message.deleted = True
        await self._emit_message("MESSAGE_DELETE", message)
        return web.Response(status=204)

    # -- handlers: channels --------------------------------------------------------------------
    def _request_channel(self, request: web.Request) -> Channel:
        self._require_bot(request)
        channel = self.channel(request.match_info["channel_id"])
        if channel is None:
            raise unknown("Channel", 10003)
        return channel

    def _channel_message(self, request: web.Request, channel: Channel) -> Message:
        message = self.message(request.match_info["message_id"])
        if (
            message is None
            or message.deleted
            or message.ephemeral
            or message.channel_id != channel.id
        ):
            raise unknown("Message", 10008)
        return message

    async def _get_channel(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        self._require_bot_permissions(channel, VIEW_CHANNEL)
        return json_response(channel.payload())

    async def _typing(self, request: web.Request) -> web.Response:
        self._request_channel(request)
        return web.Response(status=204)

    async def _channel_history(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        self._require_bot_permissions(channel, VIEW_CHANNEL)
        if not self.bot_permissions_in(channel) & READ_MESSAGE_HISTORY:
            return json_response([])  # Discord returns no messages rather than an error
        query = request.query
        limit = min(int(query.get("limit", 50)), 100)
        visible = self.messages_in(channel)
        if "before" in query:
            visible = [m for m in visible if m.id < int(query["before"])]
        if "after" in query:
            visible = [m for m in visible if m.id > int(query["after"])]
        if "around" in query:
            around = int(query["around"])
            visible.sort(key=lambda m: abs(m.id - around))
            visible = sorted(visible[:limit], key=lambda m: m.id)
        newest_first = sorted(visible, key=lambda m: m.id, reverse=True)[:limit]
        return json_response([m.payload(self.users) for m in newest_first])

    async def _channel_send(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        body = request_json(request)
        files = request[FILES_KEY]
        needed = SEND_MESSAGES_IN_THREADS if channel.kind == "thread" else SEND_MESSAGES
        if files:
            needed |= ATTACH_FILES
        if body.get("message_reference"):
            needed |= READ_MESSAGE_HISTORY  # a reply needs it
        self._require_bot_permissions(channel, needed)
        nonce_key = self._nonce_key(channel, body)
        repeated = self._nonced_message(nonce_key)
        if repeated is not None:
            # What Discord does with enforce_nonce: the message this nonce already made, and
            # nothing new (a client that lost the first answer can safely send again).
            return json_response(repeated.payload(self.users))
        reference, referenced = self._reference(body.get("message_reference"), channel)
        message = self._create_message(
            channel,
            body,
            files,
            via="bot",
            message_type=19 if referenced is not None else 0,
            flags=(body.get("flags") or 0) & _CHANNEL_FLAGS,
            reference=reference,
            referenced=referenced,
        )
        if nonce_key is not None:
            self._nonces[nonce_key] = (time.monotonic(), message.id)
        await self._emit_message("MESSAGE_CREATE", message)
        return json_response(message.payload(self.users))

    def _nonce_key(self, channel: Channel, body: dict[str, Any]) -> tuple[int, int, str] | None:
        nonce = body.get("nonce")
        if nonce is None:
            return None
        if isinstance(nonce, str) and len(nonce) > NONCE_MAX_LENGTH:
            raise form_error(
                ["nonce"],
                "BASE_TYPE_MAX_LENGTH",
                f"Must be {NONCE_MAX_LENGTH} or fewer in length.",
            )
        if not body.get("enforce_nonce"):
            return None
        return channel.id, self.bot_user.id, str(nonce)

    def _nonced_message(self, key: tuple[int, int, str] | None) -> Message | None:
        """The message an enforced nonce made within the window, if it still exists."""
        if key is None or key not in self._nonces:
            return None
        when, message_id = self._nonces[key]
        message = self._messages_by_id.get(message_id)
        if time.monotonic() - when > NONCE_WINDOW_S or message is None or message.deleted:
            del self._nonces[key]
            return None
        return message

    def _reference(
        self, reference: dict[str, Any] | None, channel: Channel
    ) -> tuple[dict[str, Any] | None, Message | None]:
        if not reference or reference.get("message_id") is None:
            return None, None
        target = self.message(reference["message_id"])
        usable = target is not None and not target.deleted and not target.ephemeral
        if not usable:
            if reference.get("fail_if_not_exists", True):
                raise form_error(
                    ["message_reference"], "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message"
                )
            return None, None
        assert target is not None
        stored = {
            "type": 0,
            "message_id": str(target.id),
            "channel_id": str(target.channel_id),
        }
        if target.guild_id is not None:
            stored["guild_id"] = str(target.guild_id)
        return stored, target

    async def _channel_get_message(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        return json_response(self._channel_message(request, channel).payload(self.users))

    async def _channel_edit_message(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        message = self._channel_message(request, channel)
        if message.author is not self.bot_user:
            raise FakeHTTPError(403, 50005, "Cannot edit a message authored by another user")
        self._require_bot_permissions(channel, ATTACH_FILES if request[FILES_KEY] else 0)
        self._edit(message, request_json(request), request[FILES_KEY], "bot")
        await self._emit_message("MESSAGE_UPDATE", message)
        return json_response(message.payload(self.users))

    async def _channel_delete_message(self, request: web.Request) -> web.Response:
        channel = self._request_channel(request)
        message = self._channel_message(request, channel)
        message.deleted = True
        await self._emit_message("MESSAGE_DELETE", message)
        return web.Response(status=204)
