"""Web sessions: a signed, HttpOnly cookie naming a session row (stored by its hash), so a
session can be ended (sign out) and a stolen database can't be replayed as cookies.

The cookie is `<id>.<HMAC(id)>`: one altered byte and the signature fails, and the request is
served as signed out (the cookie is cleared). SameSite=Lax keeps it off other sites' forms;
Secure when the public address is https.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from aiohttp import web

from bot.app.access import AdminScope
from bot.app.sign_in import b64, secret_hash, sign, unb64
from bot.config.web import WebConfig
from bot.core.web_store import WebSession, WebStore

SESSION_COOKIE = "imagine_session"
SESSION_ID_BYTES = 24


@dataclass(frozen=True)
class Member:
    """Who a request is signed in as."""

    user_id: int
    name: str
    # The server of the /web link they signed in with (None after Discord sign-in).
    guild_id: int | None
    # Owners: `admin_user_ids` and the application's owner, checked on every request. Server
    # admins: the rights Discord showed when the /web link was made in that server.
    admin_scope: AdminScope
    via: str
    # The session's secret id: the CSRF token is derived from it.
    session_id: bytes

    @property
    def is_owner(self) -> bool:
        return self.admin_scope is AdminScope.OWNER


def session_cookie_value(key: bytes, session_id: bytes) -> str:
    return f"{b64(session_id)}.{sign(key, 'session', session_id)}"


def parse_session_cookie(key: bytes, value: str) -> bytes | None:
    """The session id of a well-signed cookie, else None."""
    raw, _, signature = value.partition(".")
    session_id = unb64(raw) if len(value) < 200 else None
    if session_id is None or len(session_id) != SESSION_ID_BYTES:
        return None
    if not secrets.compare_digest(signature, sign(key, "session", session_id)):
        return None
    return session_id


def set_cookie(
    response: web.StreamResponse, config: WebConfig, name: str, value: str, max_age_s: float
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=int(max_age_s),
        path="/",
        httponly=True,
        secure=config.secure_cookies,
        samesite="Lax",
    )


def clear_cookie(response: web.StreamResponse, config: WebConfig, name: str) -> None:
    response.del_cookie(name, path="/", secure=config.secure_cookies, httponly=True, samesite="Lax")


class Sessions:
    def __init__(self, store: WebStore, config: WebConfig, key: bytes) -> None:
        self._store = store
        self._config = config
        self._key = key

    async def start(
        self,
        response: web.StreamResponse,
        *,
        user_id: int,
        name: str,
        guild_id: int | None,
        admin_scope: str,
        via: str,
    ) -> WebSession:
        session_id = secrets.token_bytes(SESSION_ID_BYTES)
        session = await self._store.add_session(
            secret_hash(session_id),
            user_id=user_id,
            name=name,
            guild_id=guild_id,
            admin_scope=admin_scope,
            via=via,
            ttl_s=self._config.session_ttl_s,
        )
        set_cookie(
            response,
            self._config,
            SESSION_COOKIE,
            session_cookie_value(self._key, session_id),
            self._config.session_ttl_s,
        )
        return session

    async def load(self, cookie: str) -> tuple[bytes, WebSession] | None:
        session_id = parse_session_cookie(self._key, cookie)
        if session_id is None:
            return None
        session = await self._store.session(secret_hash(session_id))
        return None if session is None else (session_id, session)

    async def end(self, response: web.StreamResponse, session_id: bytes) -> None:
        await self._store.end_session(secret_hash(session_id))
        clear_cookie(response, self._config, SESSION_COOKIE)
