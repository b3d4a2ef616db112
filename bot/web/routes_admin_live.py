"""The dashboard's queue and workers, live: the page, its server-sent events, and pausing the
queue."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from bot.app.admin import AdminOp, AdminRefused, seat_for
from bot.web.context import context
from bot.web.dashboard import back, dashboard, refused, render, seat_of
from bot.web.errors import WebError

log = logging.getLogger(__name__)

# The live stream: how often it looks at the queue, and how often a quiet stream says it is
# alive (a comment line; proxies close idle connections).
POLL_S = 1.0
HEARTBEAT_S = 15.0
# Rights are asked again this often while a stream is open: a role taken away ends it.
RECHECK_S = 60.0
MAX_STREAMS_PER_MEMBER = 4


async def queue_page(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    try:
        view = await dashboard(request).board.view(seat)
    except AdminRefused as exc:
        raise refused(exc) from None
    return await render(
        request,
        "admin_queue.html",
        seat,
        view=view,
        view_json=json.dumps(view.to_json()),
        events_url=back("/admin/queue/events", seat),
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
        raise refused(exc) from None
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
        raise refused(exc) from None
    raise web.HTTPSeeOther(back("/admin/queue", seat))


async def queue_resume(request: web.Request) -> web.StreamResponse:
    seat = await seat_of(request)
    try:
        await dashboard(request).desk.resume(seat)
    except AdminRefused as exc:
        raise refused(exc) from None
    raise web.HTTPSeeOther(back("/admin/queue", seat))
