"""The fake's world: users, roles, channels, messages and attachments, plus their wire payloads.

Everything here is plain data that the tests read directly. Payload builders live next to the
objects they describe so a missing field is easy to spot against the field table in the wire
reference (a field discord.py indexes with ``data['x']`` and that is missing here kills
``bot.start()``).
"""

from __future__ import annotations

import mimetypes
import re
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tests.fakediscord.interactions import FakeInteraction

DISCORD_EPOCH_MS = 1_420_070_400_000

# Permission bits used by the fake itself (values from Discord's permission table).
ADMINISTRATOR = 1 << 3
ADD_REACTIONS = 1 << 6
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
MENTION_EVERYONE = 1 << 17
USE_EXTERNAL_EMOJIS = 1 << 18
USE_APPLICATION_COMMANDS = 1 << 31
SEND_MESSAGES_IN_THREADS = 1 << 38
# Every bit Discord defines today; an administrator has all of them.
ALL_PERMISSIONS = (1 << 53) - 1
# What @everyone gets on a fresh server: members can talk and use commands, nothing more.
EVERYONE_PERMISSIONS = (
    VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | ADD_REACTIONS
    | USE_EXTERNAL_EMOJIS
    | USE_APPLICATION_COMMANDS
    | SEND_MESSAGES_IN_THREADS
)
# The invite URL grants the bot's role these (on top of @everyone's); tests take permissions
# away per channel with FakeDiscord.deny_bot.
DEFAULT_BOT_PERMISSIONS = EVERYONE_PERMISSIONS
# Interaction responses and follow-ups (webhook routes) may always attach files and embed links,
# so Discord sets these bits in `app_permissions` whatever the channel allows the bot.
INTERACTION_IMPLICIT_PERMISSIONS = ATTACH_FILES | EMBED_LINKS

# Message flags.
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7
FLAG_SUPPRESS_NOTIFICATIONS = 1 << 12
FLAG_COMPONENTS_V2 = 1 << 15

_JOINED_AT = "2024-01-01T00:00:00+00:00"


class FakeClock:
    """Monotonic time plus an offset that tests move forward.

    Only the fake's own decisions read it (the 3-second ack deadline, the 15-minute token
    lifetime), so real elapsed time still counts: a bot that blocks its event loop misses the
    deadline just as it would on Discord. Snowflakes and timestamps use real wall time so that
    discord.py's view of ``created_at`` stays consistent.
    """

    def __init__(self) -> None:
        self._offset = 0.0

    def now(self) -> float:
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._offset += seconds


class SnowflakeFactory:
    """Real-shaped snowflakes, so ``discord.utils.snowflake_time`` gives sensible answers."""

    def __init__(self) -> None:
        self._last = 0

    def __call__(self) -> int:
        candidate = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last = max(candidate, self._last + 1)
        return self._last


def iso_now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass(eq=False)
class Role:
    id: int
    name: str
    permissions: int = 0
    position: int = 0
    managed: bool = False

    @property
    def mention(self) -> str:
        return f"<@&{self.id}>"

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "position": self.position,
            "permissions": str(self.permissions),
            "managed": self.managed,
            "mentionable": False,
            "flags": 0,
        }


@dataclass(eq=False)
class User:
    """A guild member as the tests see it. ``permissions`` are granted on top of the roles."""

    id: int
    name: str
    roles: list[Role] = field(default_factory=list)
    permissions: int = 0
    admin: bool = False
    bot: bool = False
    locale: str = "en-US"
    # The guild the user is a member of (``None``: the fake's main guild).
    guild_id: int | None = None

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"

    def payload(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "username": self.name,
            "discriminator": "0",
            "global_name": self.name,
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }

    def member_payload(
        self, permissions: int | None = None, *, with_user: bool = True
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "roles": [str(role.id) for role in self.roles],
            "joined_at": _JOINED_AT,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "nick": None,
            "avatar": None,
            "premium_since": None,
            "communication_disabled_until": None,
        }
        if with_user:
            data["user"] = self.payload()
        if permissions is not None:
            data["permissions"] = str(permissions)
        return data


@dataclass(eq=False)
class Guild:
    """A guild besides the fake's main one (``fake.add_guild``): its own @everyone, roles,
    ``general`` channel and ``owner``; users added with ``guild=`` are its members only.
    ``left`` is set once the bot leaves it."""

    id: int
    name: str
    everyone: Role
    roles: list[Role] = field(default_factory=list)
    owner: User | None = None
    general: Channel | None = None
    left: bool = False


ChannelKind = Literal["text", "dm", "thread"]
_CHANNEL_TYPES = {"text": 0, "dm": 1, "thread": 11}


@dataclass(eq=False)
class Channel:
    """A guild text channel, a public thread (``parent`` is its channel) or a DM.

    ``bot_deny`` is a member overwrite for the bot: the permissions it loses in this channel
    (threads inherit their parent's).
    """

    id: int
    name: str
    guild_id: int | None
    nsfw: bool = False
    position: int = 0
    kind: ChannelKind = "text"
    recipient: User | None = None
    parent: Channel | None = None
    bot_id: int | None = None
    bot_deny: int = 0

    @property
    def type(self) -> int:
        return _CHANNEL_TYPES[self.kind]

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"

    def payload(self) -> dict[str, Any]:
        if self.kind == "dm":
            assert self.recipient is not None
            return {
                "id": str(self.id),
                "type": 1,
                "last_message_id": None,
                "recipients": [self.recipient.payload()],
            }
        if self.kind == "thread":
            assert self.parent is not None
            return {
                "id": str(self.id),
                "type": self.type,
                "guild_id": str(self.guild_id),
                "name": self.name,
                "parent_id": str(self.parent.id),
                "owner_id": str(self.bot_id),
                "last_message_id": None,
                "rate_limit_per_user": 0,
                "message_count": 0,
                "member_count": 1,
                "thread_metadata": {
                    "archived": False,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": _JOINED_AT,
                    "locked": False,
                },
                "flags": 0,
            }
        overwrites = []
        if self.bot_deny and self.bot_id is not None:
            overwrites.append(
                {"id": str(self.bot_id), "type": 1, "allow": "0", "deny": str(self.bot_deny)}
            )
        return {
            "id": str(self.id),
            "type": 0,
            "guild_id": str(self.guild_id),
            "name": self.name,
            "position": self.position,
            "permission_overwrites": overwrites,
            "nsfw": self.nsfw,
            "parent_id": None,
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "flags": 0,
        }


@dataclass(frozen=True)
class Upload:
    """A file a test user attaches to a slash command option (type 11)."""

    filename: str
    data: bytes
    content_type: str | None = None


@dataclass(eq=False)
class Attachment:
    id: int
    filename: str
    data: bytes
    url: str
    content_type: str | None = None
    description: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def spoiler(self) -> bool:
        return self.filename.startswith("SPOILER_")

    @property
    def dimensions(self) -> tuple[int, int] | None:
        return image_dimensions(self.data)

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(self.id),
            "filename": self.filename,
            "size": self.size,
            "url": self.url,
            "proxy_url": self.url,
            "content_type": self.content_type,
        }
        if self.description is not None:
            data["description"] = self.description
        dims = self.dimensions
        if dims is not None:
            data["width"], data["height"] = dims
        return data


def guess_content_type(filename: str) -> str | None:
    return mimetypes.guess_type(filename)[0]


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """Width and height for PNG, GIF and WebP headers; Discord reports them for images."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return width, height
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8X":
            width = 1 + int.from_bytes(data[24:27], "little")
            height = 1 + int.from_bytes(data[27:30], "little")
            return width, height
        if chunk == b"VP8L":
            bits = int.from_bytes(data[21:25], "little")
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", data[26:30])
            return width & 0x3FFF, height & 0x3FFF
    return None


@dataclass(frozen=True)
class Pings:
    """Who a message actually notifies, after ``allowed_mentions`` is applied."""

    users: frozenset[int]
    roles: frozenset[int]
    everyone: bool

    def __bool__(self) -> bool:
        return bool(self.users or self.roles or self.everyone)


_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")


def compute_pings(
    content: str, allowed_mentions: dict[str, Any] | None, replied_user: int | None
) -> Pings:
    """Worst case on purpose: the bot is assumed able to ping @everyone and every role (as with
    an admin bot role), so only ``allowed_mentions`` can keep a prompt from pinging anyone."""
    users = {int(x) for x in _USER_MENTION.findall(content)}
    roles = {int(x) for x in _ROLE_MENTION.findall(content)}
    everyone = "@everyone" in content or "@here" in content
    if allowed_mentions is None:
        # Without allowed_mentions Discord notifies everything the content mentions, and the
        # author of a replied-to message.
        if replied_user is not None:
            users.add(replied_user)
        return Pings(frozenset(users), frozenset(roles), everyone)
    parse = set(allowed_mentions.get("parse") or ())
    allowed_users = {int(x) for x in allowed_mentions.get("users") or ()}
    allowed_roles = {int(x) for x in allowed_mentions.get("roles") or ()}
    pinged_users = users if "users" in parse else users & allowed_users
    pinged_roles = roles if "roles" in parse else roles & allowed_roles
    if replied_user is not None and allowed_mentions.get("replied_user", False):
        pinged_users = pinged_users | {replied_user}
    return Pings(frozenset(pinged_users), frozenset(pinged_roles), everyone and "everyone" in parse)


@dataclass(frozen=True)
class MessageState:
    """One version of a message: what it looked like after its creation or an edit."""

    content: str
    embeds: tuple[dict[str, Any], ...]
    components: tuple[dict[str, Any], ...]
    attachments: tuple[Attachment, ...]
    flags: int
    at: float
    via: Via


# How a message was written: through an interaction token (webhook routes), with the bot token
# (channel routes), or by a test user (``FakeDiscord.say``).
Via = Literal["interaction", "bot", "user"]

_message_type_names = {0: "default", 19: "reply", 20: "chat_input_command"}


@dataclass(eq=False)
class Message:
    """A stored message with its whole edit history.

    ``via`` tells how it was created (see ``Via``); ``states[0]`` is the message as created and
    every edit appends one, so ``states`` is the message's whole visible history.
    """

    id: int
    channel_id: int
    guild_id: int | None
    author: User
    via: Via
    type: int
    states: list[MessageState]
    allowed_mentions: dict[str, Any] | None = None
    message_reference: dict[str, Any] | None = None
    referenced: Message | None = None
    interaction: FakeInteraction | None = None
    interaction_metadata: dict[str, Any] | None = None
    webhook_id: int | None = None
    application_id: int | None = None
    timestamp: str = field(default_factory=iso_now)
    edited_timestamp: str | None = None
    deleted: bool = False
    tts: bool = False

    # -- the current state --------------------------------------------------------------------
    @property
    def state(self) -> MessageState:
        return self.states[-1]

    @property
    def content(self) -> str:
        return self.state.content

    @property
    def embeds(self) -> list[dict[str, Any]]:
        return list(self.state.embeds)

    @property
    def components(self) -> list[dict[str, Any]]:
        return list(self.state.components)

    @property
    def attachments(self) -> list[Attachment]:
        return list(self.state.attachments)

    @property
    def flags(self) -> int:
        return self.state.flags

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def loading(self) -> bool:
        """True while this is the "Bot is thinking…" placeholder left by a type-5 defer."""
        return bool(self.flags & FLAG_LOADING)

    # -- history -------------------------------------------------------------------------------
    @property
    def edit_count(self) -> int:
        return len(self.states) - 1

    @property
    def contents(self) -> list[str]:
        """The content of every version in order, handy for asserting progress edits."""
        return [state.content for state in self.states]

    # -- components ----------------------------------------------------------------------------
    def iter_components(self) -> Iterator[dict[str, Any]]:
        """Every interactive component, however deeply nested in rows or containers."""
        stack = list(reversed(self.state.components))
        while stack:
            component = stack.pop()
            children = component.get("components")
            if children is None and "accessory" in component:
                children = [component["accessory"]]
            if children is not None:
                stack.extend(reversed(children))
            if component.get("type") in (2, 3, 5, 6, 7, 8):
                yield component

    @property
    def buttons(self) -> list[dict[str, Any]]:
        return [c for c in self.iter_components() if c.get("type") == 2]

    @property
    def custom_ids(self) -> list[str]:
        return [c["custom_id"] for c in self.iter_components() if "custom_id" in c]

    def button(self, label: str) -> dict[str, Any]:
        """The button whose label or emoji name is ``label`` (e.g. ``"U2"`` or ``"🔄"``)."""
        matches = [
            b
            for b in self.buttons
            if b.get("label") == label or (b.get("emoji") or {}).get("name") == label
        ]
        if len(matches) != 1:
            labels = [b.get("label") or (b.get("emoji") or {}).get("name") for b in self.buttons]
            raise LookupError(f"{len(matches)} buttons match {label!r}; buttons: {labels}")
        return matches[0]

    def component(self, custom_id: str) -> dict[str, Any] | None:
        return next((c for c in self.iter_components() if c.get("custom_id") == custom_id), None)

    # -- mentions ------------------------------------------------------------------------------
    @property
    def pings(self) -> Pings:
        """Who was notified when the message was created (edits never notify anyone)."""
        replied = None
        if self.referenced is not None:
            replied = self.referenced.author.id
        return compute_pings(self.states[0].content, self.allowed_mentions, replied)

    # -- wire ----------------------------------------------------------------------------------
    def payload(
        self, users: Mapping[int, User] | None = None, *, with_referenced: bool = True
    ) -> dict[str, Any]:
        """The message as Discord returns it; ``users`` resolves mentions into user objects."""
        state = self.state
        pings = self.pings
        known = users or {}
        data: dict[str, Any] = {
            "id": str(self.id),
            "channel_id": str(self.channel_id),
            "type": self.type,
            "content": state.content,
            "author": self.author.payload(),
            "timestamp": self.timestamp,
            "edited_timestamp": self.edited_timestamp,
            "tts": self.tts,
            "mention_everyone": pings.everyone,
            "mentions": [known[uid].payload() for uid in sorted(pings.users) if uid in known],
            "mention_roles": [str(rid) for rid in sorted(pings.roles)],
            "attachments": [a.payload() for a in state.attachments],
            "embeds": list(state.embeds),
            "components": list(state.components),
            "pinned": False,
            "flags": state.flags,
        }
        if self.guild_id is not None:
            data["guild_id"] = str(self.guild_id)
        if self.webhook_id is not None:
            data["webhook_id"] = str(self.webhook_id)
        if self.application_id is not None:
            data["application_id"] = str(self.application_id)
        if self.interaction_metadata is not None:
            data["interaction_metadata"] = self.interaction_metadata
        if self.message_reference is not None:
            data["message_reference"] = self.message_reference
            if with_referenced:
                ref = self.referenced
                data["referenced_message"] = (
                    None
                    if ref is None or ref.deleted
                    else ref.payload(users, with_referenced=False)
                )
        return data

    def __repr__(self) -> str:
        kind = _message_type_names.get(self.type, str(self.type))
        return (
            f"<Message id={self.id} {kind} via={self.via} content={self.content[:40]!r} "
            f"attachments={len(self.state.attachments)} edits={self.edit_count}"
            f"{' ephemeral' if self.ephemeral else ''}{' deleted' if self.deleted else ''}>"
        )
