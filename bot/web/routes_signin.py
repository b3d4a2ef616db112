"""Signing in and out: Discord's OAuth2 (`/signin/discord` and its callback) and one-time
`/web` links (`/signin/link`: a page with a button, so a link-preview fetch can't use the link
up), and signing out (a form, with its CSRF token)."""

from __future__ import annotations

from urllib.parse import quote

from aiohttp import web
from yarl import URL

from bot.app.access import AdminScope
from bot.app.sign_in import LinkRefused
from bot.core.web_store import LinkUse
from bot.web.context import context, member_of, require_member
from bot.web.errors import WebError
from bot.web.middleware import client_address
from bot.web.oauth import STATE_COOKIE, STATE_TTL_S, OAuthFailed
from bot.web.sessions import clear_cookie, set_cookie

HOME = "/images"


def _next(request: web.Request) -> str:
    """Where to go after signing in: a path on this site only (never another site)."""
    target = request.query.get("next", "")
    # Browsers (and aiohttp's redirect) drop tabs and newlines inside an address: "/\t/x"
    # would become "//x", another site. So no control character at all, and the parsed
    # address must still have no host.
    if (
        target.startswith("/")
        and not target.startswith("//")
        and "\\" not in target
        and target.isprintable()
        and URL(target).host is None
    ):
        return target
    return HOME


def _limit_sign_in(request: web.Request) -> None:
    wait_s = context(request).sign_in_limits.hit(f"sign-in:{client_address(request)}")
    if wait_s is not None:
        raise WebError(
            429, "Too many sign-in attempts: wait a minute and try again.", retry_after_s=wait_s
        )


async def index(request: web.Request) -> web.StreamResponse:
    if member_of(request) is not None:
        raise web.HTTPSeeOther(HOME)
    raise web.HTTPSeeOther("/signin")


async def sign_in_page(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    if member_of(request) is not None:
        raise web.HTTPSeeOther(_next(request))
    return ctx.templates.render(
        request,
        "signin.html",
        title="Sign in",
        oauth=ctx.oauth is not None,
        next_path=quote(_next(request), safe=""),
    )


async def discord_begin(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    if ctx.oauth is None:
        raise WebError(404, "Signing in with Discord isn't set up here: type /web in the server.")
    _limit_sign_in(request)
    url, cookie = ctx.oauth.begin()
    response = web.HTTPSeeOther(url)
    set_cookie(response, ctx.config, STATE_COOKIE, cookie, STATE_TTL_S)
    raise response


async def discord_callback(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    if ctx.oauth is None:
        raise WebError(404, "Signing in with Discord isn't set up here.")
    _limit_sign_in(request)
    if "error" in request.query:
        raise WebError(400, "Sign-in was cancelled on Discord. Nothing changed.")
    code, state = request.query.get("code", ""), request.query.get("state", "")
    if not code or len(code) > 200:
        raise WebError(400, "Discord's answer had no sign-in code. Please try again.")
    if not ctx.oauth.state_matches(request.cookies.get(STATE_COOKIE, ""), state):
        raise WebError(
            400, "This sign-in didn't start from this browser, or took too long. Try again."
        )
    try:
        user = await ctx.oauth.identify(code)
    except OAuthFailed as failed:
        raise WebError(502, failed.reason) from None
    services = ctx.services
    owner = user.id in services.owner_ids()
    if not owner and not await ctx.gallery.member_guilds(
        user.id, services.config.discord.guild_ids
    ):
        # identify says who, not where: the bot knows a member by their jobs in its servers.
        raise WebError(
            403,
            "This bot doesn't know you yet: make an image in one of its servers, or type /web "
            "there for a sign-in link.",
        )
    response = web.HTTPSeeOther(HOME)
    clear_cookie(response, ctx.config, STATE_COOKIE)
    await ctx.sessions.start(
        response,
        user_id=user.id,
        name=user.name,
        guild_id=None,
        admin_scope=AdminScope.OWNER if owner else AdminScope.NONE,
        via="discord",
    )
    raise response


async def link_page(request: web.Request) -> web.StreamResponse:
    token = request.query.get("t", "")
    if not token or len(token) > 200:
        raise WebError(400, LinkRefused(LinkUse.UNKNOWN).reason)
    return context(request).templates.render(request, "link.html", title="Sign in", token=token)


async def link_redeem(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    if ctx.services.sign_in is None:
        raise WebError(404, "Sign-in links aren't set up here.")
    _limit_sign_in(request)
    form = await request.post()
    token = form.get("t")
    if not isinstance(token, str) or not token:
        raise WebError(400, LinkRefused(LinkUse.UNKNOWN).reason)
    try:
        grant = await ctx.services.sign_in.redeem(token)
    except LinkRefused as refused:
        status = 400 if refused.use is LinkUse.UNKNOWN else 410
        raise WebError(status, refused.reason) from None
    response = web.HTTPSeeOther(HOME)
    old = member_of(request)
    if old is not None:
        await ctx.sessions.end(response, old.session_id)
    await ctx.sessions.start(
        response,
        user_id=grant.user_id,
        name=grant.name,
        guild_id=grant.guild_id,
        admin_scope=grant.admin_scope,
        via="link",
    )
    raise response


async def sign_out(request: web.Request) -> web.StreamResponse:
    member = require_member(request)
    response = web.HTTPSeeOther("/signin")
    await context(request).sessions.end(response, member.session_id)
    raise response


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", index)
    router.add_get("/signin", sign_in_page)
    router.add_get("/signin/discord", discord_begin)
    router.add_get("/signin/discord/callback", discord_callback)
    router.add_get("/signin/link", link_page)
    router.add_post("/signin/link", link_redeem)
    router.add_post("/signout", sign_out)
