"""The owners' and admins' dashboard: the queue and the workers live (server-sent events), a
member's credits (balance, ledger, grants and revokes), the allowance tiers, and the audit and
moderation logs.

Every page asks the admin desk (bot/app/admin.py), which Discord's `/admin` calls too: the same
rights, the same scoping, the same ledger and audit rows; who asks is found per request
(bot/web/dashboard.py). The live queue's pages are in routes_admin_live.py; `setup` adds them all.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from aiohttp import web

from bot.app.access import AdminScope
from bot.app.admin import AUDIT_KINDS, MODERATION_KINDS, AdminRefused, AdminSeat, AuditFilter
from bot.web import routes_admin_live as live
from bot.web.context import context
from bot.web.dashboard import (
    PAGE_SIZE,
    back,
    close_dashboard,
    dashboard,
    open_dashboard,
    read_id,
    refused,
    render,
    seat_of,
)
from bot.web.errors import WebError
from bot.web.numbers import query_day, whole_number

log = logging.getLogger(__name__)


def setup(app: web.Application) -> None:
    """Adds the dashboard's routes to `app`, and its opening and closing."""
    app.on_startup.append(open_dashboard)
    app.on_shutdown.append(close_dashboard)
    router = app.router
    router.add_get("/admin", _index)
    router.add_get("/admin/queue", live.queue_page)
    router.add_get("/admin/queue/events", live.queue_events)
    router.add_post("/admin/queue/pause", live.queue_pause)
    router.add_post("/admin/queue/resume", live.queue_resume)
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


async def _index(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    raise web.HTTPSeeOther(back("/admin/queue", seat))


# ----- credits -----------------------------------------------------------------------------


def _before(query: Any) -> int | None:
    text = query.get("before", "")
    return read_id(text, "before") if text else None


async def credits_page(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    board = dashboard(request)
    asked = request.query.get("user", "")
    values: dict[str, Any] = {"user": asked, "credits": None, "done": request.query.get("done", "")}
    if asked:
        user_id = read_id(asked, "user")
        try:
            membership = await board.desk.require_member(
                seat, board.roles, user_id, f"Member {user_id}"
            )
            roles = membership.role_ids if membership is not None else None
            values["credits"] = await board.desk.member_credits(
                seat, user_id, roles, PAGE_SIZE, _before(request.query)
            )
        except AdminRefused as exc:
            raise refused(exc) from None
        except ValueError as exc:
            raise WebError(400, f"Not shown: {exc}") from None
        values["now"] = context(request).services.clock()
        page = values["credits"].ledger
        values["older"] = (
            back("/admin/credits", seat, user=user_id, before=page.next_before)
            if page.next_before is not None
            else None
        )
    return await render(request, "admin_credits.html", seat, **values)


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
    user_id = read_id(str(form.get("user", "")), "user")
    amount = whole_number(str(form.get("amount", "")).strip(), 9)
    if amount is None:
        raise WebError(400, "'amount' must be a whole number of credits.")
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
        raise refused(exc) from None
    except ValueError as exc:
        raise WebError(400, f"Not done: {exc}") from None
    log.info("web: %s %s %d credits of %s", seat.user_id, what, amount, user_id)
    message = f"{done} {amount}; granted balance now {balance.granted}."
    raise web.HTTPSeeOther(back("/admin/credits", seat, user=user_id, done=message))


# ----- allowance tiers -------------------------------------------------------------------------


async def allowances_page(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    try:
        tiers = await dashboard(request).desk.allowance_tiers(seat)
    except AdminRefused as exc:
        raise refused(exc) from None
    return await render(
        request, "admin_allowances.html", seat, tiers=tiers, done=request.query.get("done", "")
    )


def _allowance(form: Any) -> int | None:
    text = str(form.get("amount", "")).strip()
    if not text:
        return None
    amount = whole_number(text, 9)
    if amount is None:
        raise WebError(400, "'amount' must be a whole number of credits a day (or empty).")
    return amount


async def allowance_member(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    form = await request.post()
    user_id = read_id(str(form.get("user", "")), "user")
    amount = _allowance(form)
    try:
        await dashboard(request).desk.set_user_allowance(seat, user_id, amount)
    except AdminRefused as exc:
        raise refused(exc) from None
    except ValueError as exc:
        raise WebError(400, f"Not done: {exc}") from None
    what = f"{amount} credits a day" if amount is not None else "the default allowance"
    raise web.HTTPSeeOther(back("/admin/allowances", seat, done=f"{user_id} now gets {what}."))


async def allowance_role(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    form = await request.post()
    role_id = read_id(str(form.get("role", "")), "role")
    amount = _allowance(form)
    try:
        await dashboard(request).desk.set_role_allowance(seat, role_id, amount)
    except AdminRefused as exc:
        raise refused(exc) from None
    except ValueError as exc:
        raise WebError(400, f"Not done: {exc}") from None
    what = f"{amount} credits a day" if amount is not None else "no role allowance"
    message = f"Members with role {role_id} now get {what}."
    raise web.HTTPSeeOther(back("/admin/allowances", seat, done=message))


# ----- a server's own settings ------------------------------------------------------------------


def _target_server(request: web.Request, seat: AdminSeat, asked: str) -> int:
    """The server a settings page is about: a server admin's own; an owner's pick of the
    listed ones (default: the first)."""
    listed = sorted(context(request).services.config.discord.guild_ids)
    if seat.scope is AdminScope.SERVER and seat.guild_id is not None:
        return seat.guild_id
    if asked:
        guild_id = read_id(asked, "guild")
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
        raise refused(exc) from None
    ctx = context(request)
    return await render(
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
        raise refused(exc) from None
    ctx = context(request)
    await ctx.store.set_guild_default(guild_id, share == "on", seat.user_id)
    await ctx.services.core.audit.record(
        "explore_default", f"Explore default {share}", actor_id=seat.user_id, guild_id=guild_id
    )
    message = f"Explore is now {share} by default in server {guild_id}."
    raise web.HTTPSeeOther(back("/admin/server", seat, guild=guild_id, done=message))


# ----- the audit and moderation logs ---------------------------------------------------------


def _midnight(day: date | None, days: int = 0) -> datetime | None:
    if day is None or date.max - day < timedelta(days=days):
        # Past the calendar's last day: no bound.
        return None
    return datetime.combine(day + timedelta(days=days), time(), UTC)


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
    since, until = query_day(query, "from"), query_day(query, "to")
    filters = AuditFilter(
        kinds=tuple(kinds),
        user_id=read_id(member_text, "member") if member_text else None,
        since=_midnight(since),
        until=_midnight(until, 1),
    )
    try:
        page = await dashboard(request).desk.audit(seat, PAGE_SIZE, filters, _before(query))
    except AdminRefused as exc:
        raise refused(exc) from None
    kept = {
        "kind": kind,
        "member": member_text,
        "from": since.isoformat() if since else "",
        "to": until.isoformat() if until else "",
    }
    older = (
        back(request.path, seat, **kept, before=page.next_before)
        if page.next_before is not None
        else None
    )
    return await render(
        request,
        "admin_audit.html",
        seat,
        page=page,
        moderation=moderation,
        choices=choices,
        filters=kept,
        older=older,
    )
