"""What every handler of the web home reaches through its request: the services it was
started with, the stores, the rate limiters and the templates (one `WebContext` per server),
and the signed-in member the middleware found."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from bot.app.companions import Services
from bot.config.web import WebConfig
from bot.core.gallery import Gallery
from bot.core.web_store import WebStore
from bot.web.errors import WebError
from bot.web.oauth import DiscordOAuth
from bot.web.ratelimit import RateLimiter
from bot.web.sessions import Member, Sessions
from bot.web.templates import MEMBER_REQUEST_KEY, Templates
from bot.web.thumbnails import Thumbnails


@dataclass
class WebContext:
    services: Services
    config: WebConfig
    key: bytes
    store: WebStore
    gallery: Gallery
    sessions: Sessions
    templates: Templates
    thumbnails: Thumbnails
    ip_limits: RateLimiter
    member_limits: RateLimiter
    sign_in_limits: RateLimiter
    # None without DISCORD_CLIENT_ID / DISCORD_CLIENT_SECRET: /web links only.
    oauth: DiscordOAuth | None


CONTEXT = web.AppKey("imagine_web", WebContext)
MEMBER = MEMBER_REQUEST_KEY


def context(request: web.Request) -> WebContext:
    return request.app[CONTEXT]


def member_of(request: web.Request) -> Member | None:
    """The signed-in member, or None."""
    member = request.get(MEMBER)
    return member if isinstance(member, Member) else None


def require_member(request: web.Request) -> Member:
    """The signed-in member; a signed-out visitor is sent to the sign-in page (a GET) or
    refused (anything else)."""
    member = member_of(request)
    if member is not None:
        return member
    if request.method == "GET":
        raise web.HTTPSeeOther(f"/signin?next={_quote(request.path_qs)}")
    raise WebError(403, "Sign in first.")


def _quote(path: str) -> str:
    from urllib.parse import quote

    return quote(path, safe="")
