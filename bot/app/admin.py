"""What admins do, whatever the front end: Discord's `/admin` and the web dashboard call the same
`AdminDesk`, so both follow one set of rules and write the same ledger and audit rows.

Who may do what (bot/app/access.py):

- Every operation needs an admin (`AdminScope.SERVER` or `OWNER`).
- What every server shares (credits and allowances, bans, pausing the queue, the workers)
  changes or shows only by an owner's hand (`OWNER_ONLY`).
- A server admin sees only their own server: its rows of the audit log and the queue, the
  recent failures of its jobs, and the balance and ledger of its members (their jobs there and
  the owners' grants), never anyone else's.

Whether someone is a server admin, or a member of a server, only the front end that knows the
servers can tell (Discord's gateway): Discord's cog reads it off the interaction; the web asks a
`GuildRoles` it is given, which the Discord client implements. Nothing here imports discord.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Generic, Protocol, TypeVar

from bot.app import access
from bot.app.access import AdminScope
from bot.app.actions import UserError
from bot.app.inputs import AUDIT_INPUT_FLAG
from bot.app.moderation import AUDIT_NSFW_FLAG, AUDIT_PROMPT_BLOCKED
from bot.config import DiscordConfig
from bot.core.models import AuditEntry, Balance, Job, LedgerEntry, QueueSnapshot
from bot.core.service import AdminService, Core, WorkersView

log = logging.getLogger(__name__)

# The audit kinds that make up the moderation log: what the filters refused or flagged, and
# who was banned.
MODERATION_KINDS = (AUDIT_PROMPT_BLOCKED, AUDIT_NSFW_FLAG, AUDIT_INPUT_FLAG, "ban", "unban")
# Every kind the audit table holds, for the filters' choices.
AUDIT_KINDS = (*MODERATION_KINDS, "pause", "resume", "explore_default")
PAGE_SIZE_MAX = 100

T = TypeVar("T", AuditEntry, LedgerEntry)


class AdminOp(StrEnum):
    """What an admin asks for; the value is the `/admin` subcommand's name."""

    CREDITS_GRANT = "credits grant"
    CREDITS_SET = "credits set"
    CREDITS_REVOKE = "credits revoke"
    CREDITS_SHOW = "credits show"
    QUOTA_USER = "quota user"
    QUOTA_ROLE = "quota role"
    QUOTAS_SHOW = "quotas show"
    BAN = "ban"
    UNBAN = "unban"
    LEDGER = "ledger"
    AUDIT = "audit"
    QUEUE_SHOW = "queue show"
    QUEUE_PAUSE = "queue pause"
    QUEUE_RESUME = "queue resume"
    WORKERS = "workers"


# Operations on what every server the bot serves shares.
OWNER_ONLY = frozenset(
    {
        AdminOp.CREDITS_GRANT,
        AdminOp.CREDITS_SET,
        AdminOp.CREDITS_REVOKE,
        AdminOp.QUOTA_USER,
        AdminOp.QUOTA_ROLE,
        AdminOp.QUOTAS_SHOW,
        AdminOp.BAN,
        AdminOp.UNBAN,
        AdminOp.QUEUE_PAUSE,
        AdminOp.QUEUE_RESUME,
        AdminOp.WORKERS,
    }
)


class AdminRefused(UserError):
    """An admin operation its asker may not do; nothing was read or changed."""


def not_admin_text(what: str) -> str:
    return f"Only this server's managers (Manage Server) or the bot's owners can use {what}."


def not_owner_text(what: str) -> str:
    return (
        f"{what} changes what every server the bot serves shares (credits, "
        "allowances, bans, the queue, the workers): only the bot's owners (admin_user_ids "
        "in its config) can use it. Nothing was changed."
    )


def not_a_member_text(who: str) -> str:
    return (
        f"{who} isn't a member of this server: as a server admin you see only "
        "this server's members."
    )


@dataclass(frozen=True)
class AdminSeat:
    """Who asks, and how far their rights reach: `guild_id` is the server they act in (a server
    admin's own; an owner's is whatever server they happen to be in)."""

    user_id: int
    scope: AdminScope
    guild_id: int | None = None

    @property
    def server(self) -> int | None:
        """The server a view is limited to: the admin's own; None (every server) for owners."""
        return None if self.scope is AdminScope.OWNER else self.guild_id


# ----- who is an admin where, asked of the front end that knows the servers ---------------------


@dataclass(frozen=True)
class Membership:
    """What a server says about one of its members: their roles (without @everyone) and
    whether their roles give them Manage Server there."""

    role_ids: tuple[int, ...]
    manage_guild: bool


class GuildRoles(Protocol):
    """The servers as the front end that is in them sees them (the Discord client implements
    it from its gateway cache, asking Discord for a member it lacks)."""

    def owner_ids(self) -> frozenset[int]:
        """The bot's owners: `admin_user_ids` and the application's owner or team."""
        ...

    async def membership(self, guild_id: int, user_id: int) -> Membership | None:
        """The member's roles in the server; None when they aren't a member (or the bot isn't
        in that server)."""
        ...


async def seat_for(
    settings: DiscordConfig, roles: GuildRoles, user_id: int, guild_id: int | None
) -> AdminSeat:
    """The seat of someone who is not in an interaction (the web): an owner anywhere, else a
    server admin of `guild_id` by the same rule as in an interaction there."""
    owners = roles.owner_ids()
    if user_id in owners:
        return AdminSeat(user_id, AdminScope.OWNER, guild_id)
    if guild_id is None or not access.serves(settings, guild_id):
        return AdminSeat(user_id, AdminScope.NONE, guild_id)
    membership = await roles.membership(guild_id, user_id)
    if membership is None:
        return AdminSeat(user_id, AdminScope.NONE, guild_id)
    scope = access.admin_scope(
        settings,
        user_id=user_id,
        guild_id=guild_id,
        role_ids=membership.role_ids,
        manage_guild=membership.manage_guild,
        owner_ids=owners,
    )
    return AdminSeat(user_id, scope, guild_id)


async def admin_servers(
    settings: DiscordConfig, roles: GuildRoles, user_id: int
) -> tuple[int, ...]:
    """The listed servers `user_id` is an admin of (every listed one for an owner)."""
    found = []
    for guild_id in sorted(settings.guild_ids):
        seat = await seat_for(settings, roles, user_id, guild_id)
        if seat.scope is not AdminScope.NONE:
            found.append(guild_id)
    return tuple(found)


@dataclass(frozen=True)
class AuditFilter:
    """The audit log's filters: kinds (none: every kind), one member, and when (UTC,
    `since` included, `until` not)."""

    kinds: tuple[str, ...] = ()
    user_id: int | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page, newest first; `next_before` is the id the next (older) page starts below,
    None on the last page."""

    items: tuple[T, ...]
    next_before: int | None


@dataclass(frozen=True)
class MemberCredits:
    balance: Balance
    ledger: Page[LedgerEntry]


@dataclass(frozen=True)
class AllowanceTiers:
    """Who gets which free daily allowance: the default, per role, per member."""

    default: int
    roles: tuple[tuple[int, int], ...]
    members: tuple[tuple[int, int], ...]


class AdminDesk:
    """Every admin operation, each checking the seat's rights first."""

    def __init__(self, service: AdminService, daily_allowance: int) -> None:
        self.service = service
        self._daily_allowance = daily_allowance

    # ----- rights -------------------------------------------------------------------------

    def require_admin(self, seat: AdminSeat, where: str = "the admin pages") -> None:
        """Raises AdminRefused unless the seat is an admin; `where` names what they tried to
        use (Discord: "/admin")."""
        if seat.scope is AdminScope.NONE:
            raise AdminRefused(not_admin_text(where))

    def authorize(self, seat: AdminSeat, op: AdminOp, what: str | None = None) -> None:
        """Raises AdminRefused unless the seat may do `op`; `what` names it in the refusal
        (Discord: "/admin credits grant")."""
        self.require_admin(seat)
        if op in OWNER_ONLY and seat.scope is not AdminScope.OWNER:
            raise AdminRefused(not_owner_text(what or op.value.capitalize()))

    def check_server(self, seat: AdminSeat, guild_id: int) -> None:
        """A server's own settings (its Explore default): its admins and the owners."""
        self.require_admin(seat)
        if not access.may_manage(seat.scope, seat.guild_id, guild_id):
            raise AdminRefused(
                "As a server admin you change only your own server's settings. Nothing was changed."
            )

    def check_member(self, seat: AdminSeat, is_member: bool, who: str) -> None:
        """A server admin may look only at members of their own server (`is_member`: whether
        `who` is one, as the front end knows)."""
        if seat.server is not None and not is_member:
            raise AdminRefused(not_a_member_text(who))

    async def require_member(
        self, seat: AdminSeat, roles: GuildRoles, user_id: int, who: str
    ) -> Membership | None:
        """`check_member`, asking `roles`; returns the member's roles in the seat's server."""
        membership = None
        if seat.guild_id is not None:
            membership = await roles.membership(seat.guild_id, user_id)
        self.check_member(seat, membership is not None, who)
        return membership

    # ----- credits and allowances -----------------------------------------------------------

    async def grant(self, seat: AdminSeat, user_id: int, amount: int, reason: str = "") -> Balance:
        self.authorize(seat, AdminOp.CREDITS_GRANT)
        return await self.service.grant(user_id, amount, seat.user_id, reason)

    async def set_balance(
        self, seat: AdminSeat, user_id: int, amount: int, reason: str = ""
    ) -> Balance:
        self.authorize(seat, AdminOp.CREDITS_SET)
        return await self.service.set_balance(user_id, amount, seat.user_id, reason)

    async def revoke(self, seat: AdminSeat, user_id: int, amount: int, reason: str = "") -> Balance:
        self.authorize(seat, AdminOp.CREDITS_REVOKE)
        return await self.service.revoke(user_id, amount, seat.user_id, reason)

    async def balance(
        self, seat: AdminSeat, user_id: int, role_ids: Sequence[int] | None = None
    ) -> Balance:
        """`role_ids`: the member's roles, which decide their allowance level (None: as last
        seen)."""
        self.authorize(seat, AdminOp.CREDITS_SHOW)
        return await self.service.balance(user_id, role_ids)

    async def ledger(
        self, seat: AdminSeat, user_id: int, limit: int = 10, before_id: int | None = None
    ) -> Page[LedgerEntry]:
        """The member's ledger as far as the seat sees it: a server admin only their own
        server's part (its jobs, and grants, which belong to no server)."""
        self.authorize(seat, AdminOp.LEDGER)
        limit = _page_size(limit)
        entries = await self.service.ledger(user_id, limit + 1, seat.server, before_id)
        return _page(entries, limit)

    async def member_credits(
        self,
        seat: AdminSeat,
        user_id: int,
        role_ids: Sequence[int] | None = None,
        limit: int = 20,
        before_id: int | None = None,
    ) -> MemberCredits:
        balance = await self.balance(seat, user_id, role_ids)
        return MemberCredits(balance, await self.ledger(seat, user_id, limit, before_id))

    async def set_user_allowance(
        self, seat: AdminSeat, user_id: int, amount: int | None
    ) -> Balance:
        self.authorize(seat, AdminOp.QUOTA_USER)
        return await self.service.set_user_allowance(user_id, amount, seat.user_id)

    async def set_role_allowance(self, seat: AdminSeat, role_id: int, amount: int | None) -> None:
        self.authorize(seat, AdminOp.QUOTA_ROLE)
        await self.service.set_role_allowance(role_id, amount, seat.user_id)

    async def allowance_tiers(self, seat: AdminSeat) -> AllowanceTiers:
        self.authorize(seat, AdminOp.QUOTAS_SHOW)
        roles = tuple(sorted(self.service.role_allowances().items()))
        members = tuple(await self.service.user_allowances())
        return AllowanceTiers(self._daily_allowance, roles, members)

    # ----- bans, the queue and the workers -------------------------------------------------------

    async def ban(self, seat: AdminSeat, user_id: int, reason: str = "") -> int:
        self.authorize(seat, AdminOp.BAN)
        return await self.service.ban(user_id, seat.user_id, reason)

    async def unban(self, seat: AdminSeat, user_id: int, reason: str = "") -> None:
        self.authorize(seat, AdminOp.UNBAN)
        await self.service.unban(user_id, seat.user_id, reason)

    async def queue(self, seat: AdminSeat) -> QueueSnapshot:
        self.authorize(seat, AdminOp.QUEUE_SHOW)
        return await self.service.queue(seat.server)

    async def pause(self, seat: AdminSeat) -> None:
        self.authorize(seat, AdminOp.QUEUE_PAUSE)
        await self.service.pause(seat.user_id)

    async def resume(self, seat: AdminSeat) -> None:
        self.authorize(seat, AdminOp.QUEUE_RESUME)
        await self.service.resume(seat.user_id)

    def workers(self, seat: AdminSeat) -> WorkersView:
        self.authorize(seat, AdminOp.WORKERS)
        return self.service.workers()

    async def recent_failures(self, seat: AdminSeat, limit: int = 10) -> list[Job]:
        """The newest failed jobs the seat may see (of their server for a server admin)."""
        self.authorize(seat, AdminOp.QUEUE_SHOW)
        return await self.service.recent_failures(_page_size(limit), seat.server)

    # ----- the audit and moderation logs -------------------------------------------------------

    async def audit(
        self,
        seat: AdminSeat,
        limit: int = 10,
        filters: AuditFilter | None = None,
        before_id: int | None = None,
    ) -> Page[AuditEntry]:
        """The audit log, newest first, as far as the seat sees it: a server admin only their
        own server's rows (a row of no server, such as a ban, is the owners')."""
        self.authorize(seat, AdminOp.AUDIT)
        filters = filters or AuditFilter()
        unknown = [kind for kind in filters.kinds if kind not in AUDIT_KINDS]
        if unknown:
            raise ValueError(f"kind: {unknown[0]!r} is not one of {', '.join(AUDIT_KINDS)}")
        limit = _page_size(limit)
        entries = await self.service.audit_page(
            limit + 1,
            user_id=filters.user_id,
            guild_id=seat.server,
            kinds=filters.kinds,
            since=filters.since,
            until=filters.until,
            before_id=before_id,
        )
        return _page(entries, limit)


def _page_size(limit: int) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= PAGE_SIZE_MAX:
        raise ValueError(f"limit: must be between 1 and {PAGE_SIZE_MAX}, got {limit!r}")
    return limit


def _page(entries: Sequence[T], limit: int) -> Page[T]:
    """`entries` were read with one row more than a page: its presence says another page
    follows, which starts below the page's last row."""
    items = tuple(entries[:limit])
    more = len(entries) > limit
    return Page(items, items[-1].id if more and items else None)


def open_desk(core: Core) -> AdminDesk:
    """The desk over an open core (both front ends use one)."""
    return AdminDesk(core.admin, core.config.credits.daily_allowance)
