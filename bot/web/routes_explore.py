"""Explore (a server's images for its members, from owners who share them) and the member's
own sharing switch (the same one as in Discord's /settings)."""

from __future__ import annotations

import dataclasses

from aiohttp import web

from bot.core.models import JobKind
from bot.web.context import context, require_member
from bot.web.errors import WebError
from bot.web.numbers import whole_number
from bot.web.routes_images import ASPECTS, page_query, read_filter
from bot.web.visibility import flagged_jobs, member_guilds


async def explore(request: web.Request) -> web.StreamResponse:
    member = require_member(request)
    ctx = context(request)
    guilds = await member_guilds(request, member)
    flt, before = read_filter(request.query)
    guild_text = request.query.get("guild", "")
    if guild_text:
        if whole_number(guild_text) not in guilds:
            # Not one of the member's servers: the same answer as one that doesn't exist.
            raise WebError(404, "There is no such server here (or you aren't a member).")
        guild_id: int | None = int(guild_text)
    else:
        guild_id = guilds[0] if guilds else None
    page = None
    if guild_id is not None:
        page = await ctx.gallery.explore_page(guild_id, flt, before, ctx.config.page_size)
        # Images Discord posts behind a spoiler stay out of Explore (visibility.py): the page
        # may hold fewer cards, and the next one still starts below the last id read.
        hidden = await flagged_jobs(request, (item.job_id for item in page.items))
        if hidden:
            kept = tuple(item for item in page.items if item.job_id not in hidden)
            page = dataclasses.replace(page, items=kept)
    extra = {"guild": guild_id} if guild_id is not None else {}
    return ctx.templates.render(
        request,
        "explore.html",
        title="Explore",
        guilds=guilds,
        guild_id=guild_id,
        page=page,
        flt=flt,
        kinds=[k.value for k in JobKind],
        aspects=ASPECTS,
        models=[],
        next_query=(
            page_query(flt, before=page.next_before, **extra) if page and page.next_before else ""
        ),
        first_query=page_query(flt, **extra) if before else None,
    )


async def settings_page(request: web.Request) -> web.StreamResponse:
    member = require_member(request)
    ctx = context(request)
    choice = await ctx.store.share_choice(member.user_id)
    guild_id = member.guild_id
    default = await ctx.store.guild_default(guild_id) if guild_id is not None else False
    return ctx.templates.render(
        request,
        "settings.html",
        title="Settings",
        choice=choice,
        shared=choice if choice is not None else default,
        server_default=default,
    )


async def settings_save(request: web.Request) -> web.StreamResponse:
    member = require_member(request)
    form = await request.post()
    value = form.get("share")
    if value not in ("on", "off"):
        raise WebError(400, "Choose whether to share your images in Explore.")
    await context(request).store.set_share(member.user_id, value == "on")
    raise web.HTTPSeeOther("/settings")


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/explore", explore)
    router.add_get("/settings", settings_page)
    router.add_post("/settings", settings_save)
