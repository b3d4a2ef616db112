"""The doors every request of the web home passes, outermost first:

1. `security_headers`: no framing, no sniffing, no referrer across sites, nothing cached that
   isn't meant to be, and a content policy that allows nothing from another site (the pages
   work on an offline box); on every answer, error pages included.
2. `errors`: a refusal (`WebError`, aiohttp's HTTP errors) becomes a plain page with its 4xx
   status; anything unexpected is logged and becomes a plain 500 page, never a traceback.
3. `doors`: the per-address rate limit, the session cookie (a bad or tampered one is cleared
   and the request is served signed out), the per-member rate limit, and the CSRF check of
   every state-changing request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from bot.app.access import AdminScope, serves
from bot.web.context import MEMBER, WebContext, context
from bot.web.csrf import (
    PRE_COOKIE,
    PRE_COOKIE_MAX_AGE_S,
    UNSAFE_METHODS,
    member_token,
    new_pre_value,
    pre_token,
    sent_token,
    tokens_match,
)
from bot.web.errors import WebError
from bot.web.sessions import SESSION_COOKIE, Member, clear_cookie, set_cookie
from bot.web.templates import CSRF_REQUEST_KEY

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATIC_PREFIX = "/static/"
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_REASONS = {
    400: "That request isn't one this site understands.",
    403: "You may not do that.",
    404: "There is nothing here (or it isn't yours to see).",
    405: "That page doesn't take that kind of request.",
    413: "That request is too large.",
    429: "Too many requests: wait a little and try again.",
}
CONTENT_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def client_address(request: web.Request) -> str:
    if context(request).config.trust_proxy:
        forwarded = request.headers.get("X-Forwarded-For", "")
        if forwarded:
            # The proxy appends the address it saw: the last entry is the one it vouches for.
            return forwarded.split(",")[-1].strip()
    return request.remote or "unknown"


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    try:
        return context(request).templates.render(
            request, "error.html", status=status, status_code=status, message=message
        )
    except Exception:
        log.exception("web: rendering the error page failed")
        return web.Response(text=f"{status}: {message}", status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except WebError as error:
        response = error_page(request, error.status, error.message)
        if error.retry_after_s is not None:
            response.headers["Retry-After"] = str(error.retry_after_s)
        return response
    except web.HTTPException as error:
        if error.status < 400:
            raise
        message = _REASONS.get(error.status, "That request can't be served.")
        return error_page(request, error.status, message)
    except Exception:
        log.exception("web: %s %s failed", request.method, request.path)
        return error_page(request, 500, "Something went wrong on our side. Please try again.")


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as error:
        _harden(error)
        raise
    if request.path.startswith(STATIC_PREFIX) and response.status == 200:
        # Their addresses carry a hash of their content (templates.py): cache them for good.
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
    _harden(response)
    return response


def _harden(response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_POLICY)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    # Sign-in links carry a token in their query: never hand it to another site.
    headers.setdefault("Referrer-Policy", "same-origin")
    headers.setdefault("Cache-Control", "no-store")


@web.middleware
async def doors(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = context(request)
    if request.path.startswith(STATIC_PREFIX):
        return await handler(request)
    wait_s = ctx.ip_limits.hit(client_address(request))
    if wait_s is not None:
        raise WebError(429, _REASONS[429], retry_after_s=wait_s)

    clear_session = False
    member: Member | None = None
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        loaded = await ctx.sessions.load(cookie)
        if loaded is None:
            clear_session = True
        else:
            session_id, session = loaded
            member = Member(
                user_id=session.user_id,
                name=session.name,
                guild_id=session.guild_id,
                admin_scope=_scope(request, session.user_id, session.guild_id, session.admin_scope),
                via=session.via,
                session_id=session_id,
            )
    request[MEMBER] = member
    if member is not None:
        wait_s = ctx.member_limits.hit(f"member:{member.user_id}")
        if wait_s is not None:
            raise WebError(429, _REASONS[429], retry_after_s=wait_s)

    new_pre = None
    if member is not None:
        request[CSRF_REQUEST_KEY] = member_token(ctx.key, member.session_id)
    else:
        pre = request.cookies.get(PRE_COOKIE, "")
        token = pre_token(ctx.key, pre) if pre else None
        if token is None:
            pre = new_pre = new_pre_value()
            token = pre_token(ctx.key, pre)
        request[CSRF_REQUEST_KEY] = token or ""
    if request.method in UNSAFE_METHODS:
        if request.content_type in FORM_TYPES:
            try:
                # Parsed once here (aiohttp keeps it for the handler): a body that isn't the
                # form it claims (not UTF-8, say) is a 400, not a 500 in whichever handler
                # reads it first.
                await request.post()
            except ValueError:
                raise WebError(400, _REASONS[400]) from None
        expected = request[CSRF_REQUEST_KEY] if new_pre is None else None
        if not tokens_match(expected, await sent_token(request)):
            raise WebError(
                403, "This form has expired or didn't come from this site. Reload the page."
            )

    try:
        response = await handler(request)
    except web.HTTPException as error:
        _cookies(error, ctx, clear_session, new_pre)
        raise
    _cookies(response, ctx, clear_session, new_pre)
    return response


def _cookies(
    response: web.StreamResponse, ctx: WebContext, clear_session: bool, new_pre: str | None
) -> None:
    config = ctx.config
    if clear_session and SESSION_COOKIE not in response.cookies:
        clear_cookie(response, config, SESSION_COOKIE)
    if new_pre is not None:
        set_cookie(response, config, PRE_COOKIE, new_pre, PRE_COOKIE_MAX_AGE_S)


def _scope(request: web.Request, user_id: int, guild_id: int | None, stored: str) -> AdminScope:
    services = context(request).services
    if user_id in services.owner_ids():
        return AdminScope.OWNER
    if stored == AdminScope.SERVER and serves(services.config.discord, guild_id):
        return AdminScope.SERVER
    return AdminScope.NONE
