"""CSRF tokens: every form that changes something carries one, and the middleware refuses a
POST without the right one (403) before any handler runs.

A signed-in member's token is an HMAC of their session id (nothing to store; it changes with
the session). Before sign-in (the /web link's confirm form) it is an HMAC of a random value in
a short-lived cookie of its own, so another site can't sign a browser in as someone else.
"""

from __future__ import annotations

import secrets

from aiohttp import web

from bot.app.sign_in import b64, sign, unb64

FIELD = "csrf_token"
HEADER = "X-CSRF-Token"
PRE_COOKIE = "imagine_pre"
PRE_COOKIE_MAX_AGE_S = 3600
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def member_token(key: bytes, session_id: bytes) -> str:
    return sign(key, "csrf", session_id)


def new_pre_value() -> str:
    return b64(secrets.token_bytes(18))


def pre_token(key: bytes, pre_value: str) -> str | None:
    raw = unb64(pre_value) if len(pre_value) < 100 else None
    return None if not raw else sign(key, "csrf-pre", raw)


async def sent_token(request: web.Request) -> str:
    """The token a request carries: the form field, or the header (for small scripts)."""
    header = request.headers.get(HEADER)
    if header:
        return header
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        value = form.get(FIELD)
        return value if isinstance(value, str) else ""
    return ""


def tokens_match(expected: str | None, sent: str) -> bool:
    return bool(expected) and bool(sent) and secrets.compare_digest(expected or "", sent)
