"""The owners' and admins' dashboard: the queue and the workers live (server-sent events), a
member's credits (balance, ledger, grants and revokes), the allowance tiers, and the audit and
moderation logs.

Every page asks the admin desk (bot/app/admin.py), which Discord's `/admin` calls too: the same
rights, the same scoping, the same ledger and audit rows. Who is an admin of which server is
asked, on every request, of the `GuildRoles` the web home was given (the Discord client's view
of its servers): owners everywhere; a server admin over their own server only, which they pick
with `?server=` when they admin several; anyone else gets 403.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Collection
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from bot.app.access import AdminScope
from bot.app.admin import (
    AUDIT_KINDS,
    MODERATION_KINDS,
    AdminDesk,
    AdminOp,
    AdminRefused,
    AdminSeat,
    AuditFilter,
    GuildRoles,
    Membership,
    admin_servers,
    not_admin_text,
    open_desk,
    seat_for,
)
from bot.app.live import LiveBoard
from bot.web.context import CONTEXT, context, require_member
from bot.web.errors import WebError

log = logging.getLogger(__name__)

PAGE_SIZE = 25
# The live stream: how often it looks at the queue, and how often a quiet stream says it is
# alive (a comment line; proxies close idle connections).
POLL_S = 1.0
HEARTBEAT_S = 15.0
# Rights are asked again this often while a stream is open: a role taken away ends it.
RECHECK_S = 60.0
MAX_STREAMS_PER_MEMBER = 4
MAX_ID_DIGITS = 20


class OwnersOnly:
    """The owners alone, when the web home runs without a front end that knows the servers."""

    def __init__(self, owner_ids: Callable[[], Collection[int]]) -> None:
        self._owner_ids = owner_ids

    def owner_ids(self) -> frozenset[int]:
        return frozenset(self._owner_ids())

    async def membership(self, guild_id: int, user_id: int) -> Membership | None:
        return None


class Dashboard:
    """What the dashboard's handlers share: the desk, the live board, the server map, the open
    streams (ended at shutdown)."""

    def __init__(self, desk: AdminDesk, board: LiveBoard, roles: GuildRoles) -> None:
        self.desk = desk
        self.board = board
        self.roles = roles
        self.closing = asyncio.Event()
        self.streams: dict[int, int] = {}


DASHBOARD = web.AppKey("imagine_dashboard", Dashboard)


def setup(app: web.Application) -> None:
    """Adds the dashboard's routes to `app`, and its opening and closing."""
    app.on_startup.append(_open)
    app.on_shutdown.append(_close)
    router = app.router
    router.add_get("/admin", _index)
    router.add_get("/admin/queue", queue_page)
    router.add_get("/admin/queue/events", queue_events)
    router.add_post("/admin/queue/pause", queue_pause)
    router.add_post("/admin/queue/resume", queue_resume)
    router.add_get("/admin/credits", credits_page)
    router.add_post("/admin/credits/grant", credits_change)
    router.add_post("/admin/credits/revoke", credits_change)
    router.add_post("/admin/credits/set", credits_change)
    router.add_get("/admin/allowances", allowances_page)
    router.add_post("/admin/allowances/member", allowance_member)
    router.add_post("/admin/allowances/role", allowance_role)
    router.add_get("/admin/server", server_page)
    router.add_post("/admin/server/explore", server_explore)
    router.add_get("/admin/audit", audit_page)
    router.add_get("/admin/moderation", audit_page)


async def _open(app: web.Application) -> None:
    services = app[CONTEXT].services
    desk = open_desk(services.core)
    board = LiveBoard(desk, services.core.scheduler.add_listener, services.clock)
    roles: GuildRoles = services.guild_roles or OwnersOnly(services.owner_ids)
    app[DASHBOARD] = Dashboard(desk, board, roles)


async def _close(app: web.Application) -> None:
    # Open streams end at once instead of holding the shutdown until they time out.
    board = app.get(DASHBOARD)
    if board is not None:
        board.closing.set()


def dashboard(request: web.Request) -> Dashboard:
    return request.app[DASHBOARD]


# ----- who asks --------------------------------------------------------------------------------


def _int(text: str, name: str) -> int:
    text = text.strip()
    if not text.isdigit() or len(text) > MAX_ID_DIGITS or int(text) <= 0:
        raise WebError(400, f"'{name}' must be a Discord id (digits only).")
    return int(text)


async def seat_of(request: web.Request) -> AdminSeat:
    """The signed-in member's seat, asked of the servers now (never of the session's memory):
    an owner's anywhere; a server admin's in `?server=` (default: the server they signed in
    from, else the first listed one they admin); 403 for anyone else."""
    member = require_member(request)
    board = dashboard(request)
    settings = context(request).services.config.discord
    asked = request.query.get("server", "")
    server = _int(asked, "server") if asked else member.guild_id
    seat = await seat_for(settings, board.roles, member.user_id, server)
    if seat.scope is AdminScope.NONE and not asked:
        for guild_id in await admin_servers(settings, board.roles, member.user_id):
            seat = await seat_for(settings, board.roles, member.user_id, guild_id)
            break
    if seat.scope is AdminScope.NONE:
        raise WebError(403, not_admin_text("the dashboard"))
    return seat


def _refused(exc: AdminRefused) -> WebError:
    return WebError(403, str(exc))


async def _render(request: web.Request, name: str, seat: AdminSeat, **values: Any) -> web.Response:
    ctx = context(request)
    servers = await admin_servers(
        ctx.services.config.discord, dashboard(request).roles, seat.user_id
    )
    return ctx.templates.render(
        request,
        name,
        seat=seat,
        is_owner=seat.scope is AdminScope.OWNER,
        servers=[str(s) for s in servers],
        server_query=_server_query(seat),
        **values,
    )


def _server_query(seat: AdminSeat) -> str:
    """The `server=` a server admin's links and forms carry (owners see every server)."""
    if seat.scope is AdminScope.SERVER and seat.guild_id is not None:
        return urlencode({"server": str(seat.guild_id)})
    return ""


def _back(path: str, seat: AdminSeat, **values: Any) -> str:
    query = {k: str(v) for k, v in values.items() if v not in (None, "")}
    if seat.scope is AdminScope.SERVER and seat.guild_id is not None:
        query["server"] = str(seat.guild_id)
    return f"{path}?{urlencode(query)}" if query else path


async def _index(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    raise web.HTTPSeeOther(_back("/admin/queue", seat))


# ----- the queue and the workers, live ----------------------------------------------------------


async def queue_page(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    try:
        view = await dashboard(request).board.view(seat)
    except AdminRefused as exc:
        raise _refused(exc) from None
    return await _render(
        request,
        "admin_queue.html",
        seat,
        view=view,
        view_json=json.dumps(view.to_json()),
        events_url=_back("/admin/queue/events", seat),
    )


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def queue_events(request: web.Request) -> web.StreamResponse:
    """The live view as server-sent events: `live` with the whole view at once and at each
    change, a comment line as a heartbeat when quiet, `bye` when the bot shuts down or the
    member's rights end."""
    seat = await seat_of(request)
    board = dashboard(request)
    settings = context(request).services.config.discord
    try:
        board.desk.authorize(seat, AdminOp.QUEUE_SHOW)
    except AdminRefused as exc:
        raise _refused(exc) from None
    if board.streams.get(seat.user_id, 0) >= MAX_STREAMS_PER_MEMBER:
        raise WebError(429, "Too many live pages open: close one and reload.")
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-store",
            # nginx would otherwise hold the events back in its buffer.
            "X-Accel-Buffering": "no",
        }
    )
    board.streams[seat.user_id] = board.streams.get(seat.user_id, 0) + 1
    loop = asyncio.get_running_loop()
    try:
        await response.prepare(request)
        await response.write(b"retry: 3000\n\n")
        last_write = checked = loop.time()
        async for view in board.board.views(seat, poll_s=POLL_S, closing=board.closing):
            now = loop.time()
            if view is not None:
                await response.write(_event("live", view.to_json()))
                last_write = now
            elif now - last_write >= HEARTBEAT_S:
                await response.write(b": heartbeat\n\n")
                last_write = now
            if now - checked >= RECHECK_S:
                checked = now
                again = await seat_for(settings, board.roles, seat.user_id, seat.guild_id)
                if again.scope is not seat.scope:
                    break
        await response.write(_event("bye", {}))
    except ConnectionResetError:
        # The browser went away: nothing to answer.
        pass
    except Exception:
        # The headers are sent: no error page can follow. The browser reconnects.
        log.exception("web: the live stream of %s failed", seat.user_id)
    finally:
        left = board.streams.get(seat.user_id, 1) - 1
        if left > 0:
            board.streams[seat.user_id] = left
        else:
            board.streams.pop(seat.user_id, None)
    return response


async def queue_pause(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    try:
        await dashboard(request).desk.pause(seat)
    except AdminRefused as exc:
        raise _refused(exc) from None
    raise web.HTTPSeeOther(_back("/admin/queue", seat))


async def queue_resume(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    try:
        await dashboard(request).desk.resume(seat)
    except AdminRefused as exc:
        raise _refused(exc) from None
    raise web.HTTPSeeOther(_back("/admin/queue", seat))


# ----- credits -----------------------------------------------------------------------------


def _before(query: Any) -> int | None:
    text = query.get("before", "")
    return _int(text, "before") if text else None


async def credits_page(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    board = dashboard(request)
    asked = request.query.get("user", "")
    values: dict[str, Any] = {"user": asked, "credits": None, "done": request.query.get("done", "")}
    if asked:
        user_id = _int(asked, "user")
        try:
            membership = await board.desk.require_member(
                seat, board.roles, user_id, f"Member {user_id}"
            )
            roles = membership.role_ids if membership is not None else None
            values["credits"] = await board.desk.member_credits(
                seat, user_id, roles, PAGE_SIZE, _before(request.query)
            )
        except AdminRefused as exc:
            raise _refused(exc) from None
        except ValueError as exc:
            raise WebError(400, f"Not shown: {exc}") from None
        values["now"] = context(request).services.clock()
        page = values["credits"].ledger
        values["older"] = (
            _back("/admin/credits", seat, user=user_id, before=page.next_before)
            if page.next_before is not None
            else None
        )
    return await _render(request, "admin_credits.html", seat, **values)


_CHANGES = {
    "/admin/credits/grant": ("grant", "Granted"),
    "/admin/credits/revoke": ("revoke", "Revoked"),
    "/admin/credits/set": ("set", "Set"),
}


async def credits_change(request: web.Request) -> web.StreamResponse:
    """A grant, revoke or set, by the desk's rules (owners only, as `/admin credits …`); the
    ledger row carries the admin as its actor and the reason they gave."""
    seat = await seat_of(request)
    desk = dashboard(request).desk
    form = await request.post()
    what, done = _CHANGES[request.path]
    user_id = _int(str(form.get("user", "")), "user")
    amount_text = str(form.get("amount", "")).strip()
    if not amount_text.isdigit() or len(amount_text) > 9:
        raise WebError(400, "'amount' must be a whole number of credits.")
    amount = int(amount_text)
    reason = str(form.get("reason", "")).strip()
    if not reason:
        raise WebError(400, "Give a reason: it is kept in the member's ledger.")
    try:
        if what == "grant":
            balance = await desk.grant(seat, user_id, amount, reason)
        elif what == "revoke":
            balance = await desk.revoke(seat, user_id, amount, reason)
        else:
            balance = await desk.set_balance(seat, user_id, amount, reason)
    except AdminRefused as exc:
        raise _refused(exc) from None
    except ValueError as exc:
        raise WebError(400, f"Not done: {exc}") from None
    log.info("web: %s %s %d credits of %s", seat.user_id, what, amount, user_id)
    message = f"{done} {amount}; granted balance now {balance.granted}."
    raise web.HTTPSeeOther(_back("/admin/credits", seat, user=user_id, done=message))


# ----- allowance tiers -------------------------------------------------------------------------


async def allowances_page(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    try:
        tiers = await dashboard(request).desk.allowance_tiers(seat)
    except AdminRefused as exc:
        raise _refused(exc) from None
    return await _render(
        request, "admin_allowances.html", seat, tiers=tiers, done=request.query.get("done", "")
    )


def _allowance(form: Any) -> int | None:
    text = str(form.get("amount", "")).strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 9:
        raise WebError(400, "'amount' must be a whole number of credits a day (or empty).")
    return int(text)


async def allowance_member(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    form = await request.post()
    user_id = _int(str(form.get("user", "")), "user")
    amount = _allowance(form)
    try:
        await dashboard(request).desk.set_user_allowance(seat, user_id, amount)
    except AdminRefused as exc:
        raise _refused(exc) from None
    except ValueError as exc:
        raise WebError(400, f"Not done: {exc}") from None
    what = f"{amount} credits a day" if amount is not None else "the default allowance"
    raise web.HTTPSeeOther(_back("/admin/allowances", seat, done=f"{user_id} now gets {what}."))


async def allowance_role(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    form = await request.post()
    role_id = _int(str(form.get("role", "")), "role")
    amount = _allowance(form)
    try:
        await dashboard(request).desk.set_role_allowance(seat, role_id, amount)
    except AdminRefused as exc:
        raise _refused(exc) from None
    except ValueError as exc:
        raise WebError(400, f"Not done: {exc}") from None
    what = f"{amount} credits a day" if amount is not None else "no role allowance"
    message = f"Members with role {role_id} now get {what}."
    raise web.HTTPSeeOther(_back("/admin/allowances", seat, done=message))


# ----- a server's own settings ------------------------------------------------------------------


def _target_server(request: web.Request, seat: AdminSeat, asked: str) -> int:
    """The server a settings page is about: a server admin's own; an owner's pick of the
    listed ones (default: the first)."""
    listed = sorted(context(request).services.config.discord.guild_ids)
    if seat.scope is AdminScope.SERVER and seat.guild_id is not None:
        return seat.guild_id
    if asked:
        guild_id = _int(asked, "guild")
        if guild_id not in listed:
            raise WebError(404, "The bot doesn't serve that server.")
        return guild_id
    if not listed:
        raise WebError(404, "The bot serves no server.")
    return listed[0]


async def server_page(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    guild_id = _target_server(request, seat, request.query.get("guild", ""))
    try:
        dashboard(request).desk.check_server(seat, guild_id)
    except AdminRefused as exc:
        raise _refused(exc) from None
    ctx = context(request)
    return await _render(
        request,
        "admin_server.html",
        seat,
        guild=str(guild_id),
        listed=[str(g) for g in sorted(ctx.services.config.discord.guild_ids)],
        explore_default=await ctx.store.guild_default(guild_id),
        done=request.query.get("done", ""),
    )


async def server_explore(request: web.Request) -> web.StreamResponse:
    """The server's Explore default (members who haven't chosen follow it); kept in the audit
    log with who changed it."""
    seat = await seat_of(request)
    form = await request.post()
    guild_id = _target_server(request, seat, str(form.get("guild", "")))
    share = str(form.get("share", ""))
    if share not in ("on", "off"):
        raise WebError(400, "'share' must be on or off.")
    try:
        dashboard(request).desk.check_server(seat, guild_id)
    except AdminRefused as exc:
        raise _refused(exc) from None
    ctx = context(request)
    await ctx.store.set_guild_default(guild_id, share == "on", seat.user_id)
    await ctx.services.core.audit.record(
        "explore_default", f"Explore default {share}", actor_id=seat.user_id, guild_id=guild_id
    )
    message = f"Explore is now {share} by default in server {guild_id}."
    raise web.HTTPSeeOther(_back("/admin/server", seat, guild=guild_id, done=message))


# ----- the audit and moderation logs ---------------------------------------------------------


def _day(query: Any, name: str) -> date | None:
    text = query.get(name, "")
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise WebError(400, f"'{name}' must be a date like 2025-01-31.") from None


def _midnight(day: date | None, days: int = 0) -> datetime | None:
    return None if day is None else datetime.combine(day + timedelta(days=days), time(), UTC)


async def audit_page(request: web.Request) -> web.StreamResponse:
    """The audit log, or (/admin/moderation) its moderation part, filtered by kind, member and
    dates (`to` included), keyset-paged."""
    seat = await seat_of(request)
    query = request.query
    moderation = request.path == "/admin/moderation"
    choices = MODERATION_KINDS if moderation else AUDIT_KINDS
    kind = query.get("kind", "")
    if kind and kind not in choices:
        raise WebError(400, f"'kind' must be one of {', '.join(choices)}.")
    kinds = (kind,) if kind else (MODERATION_KINDS if moderation else ())
    member_text = query.get("member", "")
    since, until = _day(query, "from"), _day(query, "to")
    filters = AuditFilter(
        kinds=tuple(kinds),
        user_id=_int(member_text, "member") if member_text else None,
        since=_midnight(since),
        until=_midnight(until, 1),
    )
    try:
        page = await dashboard(request).desk.audit(seat, PAGE_SIZE, filters, _before(query))
    except AdminRefused as exc:
        raise _refused(exc) from None
    kept = {
        "kind": kind,
        "member": member_text,
        "from": since.isoformat() if since else "",
        "to": until.isoformat() if until else "",
    }
    older = (
        _back(request.path, seat, **kept, before=page.next_before)
        if page.next_before is not None
        else None
    )
    return await _render(
        request,
        "admin_audit.html",
        seat,
        page=page,
        moderation=moderation,
        choices=choices,
        filters=kept,
        older=older,
    )
