"""What the dashboard's pages share (bot/web/routes_admin.py, routes_admin_live.py): the admin
desk and the live board, who asks and how far their rights reach, and rendering.

Who is an admin of which server is asked, on every request, of the `GuildRoles` the web home
was given (the Discord client's view of its servers), never of the session: owners everywhere;
a server admin over their own server only, which they pick with `?server=` when they admin
several; anyone else gets 403.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from bot.app.access import AdminScope
from bot.app.admin import (
    AdminDesk,
    AdminRefused,
    AdminSeat,
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
from bot.web.numbers import whole_number

PAGE_SIZE = 25
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


async def open_dashboard(app: web.Application) -> None:
    services = app[CONTEXT].services
    desk = open_desk(services.core)
    board = LiveBoard(desk, services.core.scheduler.add_listener, services.clock)
    roles: GuildRoles = services.guild_roles or OwnersOnly(services.owner_ids)
    app[DASHBOARD] = Dashboard(desk, board, roles)


async def close_dashboard(app: web.Application) -> None:
    # Open streams end at once instead of holding the shutdown until they time out.
    board = app.get(DASHBOARD)
    if board is not None:
        board.closing.set()


def dashboard(request: web.Request) -> Dashboard:
    return request.app[DASHBOARD]


# ----- who asks --------------------------------------------------------------------------------


def read_id(text: str, name: str) -> int:
    value = whole_number(text.strip(), MAX_ID_DIGITS)
    if not value:
        raise WebError(400, f"'{name}' must be a Discord id (digits only).")
    return value


async def seat_of(request: web.Request) -> AdminSeat:
    """The signed-in member's seat, asked of the servers now (never of the session's memory):
    an owner's anywhere; a server admin's in `?server=` (default: the server they signed in
    from, else the first listed one they admin); 403 for anyone else."""
    member = require_member(request)
    board = dashboard(request)
    settings = context(request).services.config.discord
    asked = request.query.get("server", "")
    server = read_id(asked, "server") if asked else member.guild_id
    seat = await seat_for(settings, board.roles, member.user_id, server)
    if seat.scope is AdminScope.NONE and not asked:
        for guild_id in await admin_servers(settings, board.roles, member.user_id):
            seat = await seat_for(settings, board.roles, member.user_id, guild_id)
            break
    if seat.scope is AdminScope.NONE:
        raise WebError(403, not_admin_text("the dashboard"))
    return seat


def refused(exc: AdminRefused) -> WebError:
    return WebError(403, str(exc))


async def render(request: web.Request, name: str, seat: AdminSeat, **values: Any) -> web.Response:
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


def back(path: str, seat: AdminSeat, **values: Any) -> str:
    query = {k: str(v) for k, v in values.items() if v not in (None, "")}
    if seat.scope is AdminScope.SERVER and seat.guild_id is not None:
        query["server"] = str(seat.guild_id)
    return f"{path}?{urlencode(query)}" if query else path
