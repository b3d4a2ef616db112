"""Discord's OAuth2 authorization-code flow, faked for the web home's sign-in.

* ``GET /oauth2/authorize`` checks the client id, the registered redirect URL and the scope,
  then shows a page with one button per user ("Authorize as alice"), as if that user were
  logged in to Discord and pressed Authorize; ``approve_as`` skips the page. Pressing redirects
  to ``redirect_uri?code=…&state=…``; ``deny`` redirects with ``error=access_denied``.
* ``POST /api/oauth2/token`` (also under ``/api/v10``) swaps a code, once, for a bearer token;
  the client authenticates with HTTP Basic or ``client_id``/``client_secret`` form fields, and
  the redirect URL must be the one the code was issued for.
* ``GET /api/users/@me`` (also under ``/api/v10``) with ``Authorization: Bearer …`` answers the
  user the token belongs to.

Refusals answer as Discord does (an error page, or ``{"error": "invalid_grant"}``); they are
not recorded in ``errors``, since tests provoke them on purpose.
"""

from __future__ import annotations

import base64
import html
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from aiohttp import web

from tests.fakediscord.model import User
from tests.fakediscord.wire import json_response

if TYPE_CHECKING:
    from tests.fakediscord.server import FakeDiscord

CODE_LIFETIME_S = 600.0
TOKEN_LIFETIME_S = 604800


@dataclass
class _Code:
    user_id: int
    redirect_uri: str
    scope: str
    issued_at: float
    used: bool = False


class FakeOAuth:
    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake
        self.client_secret = "fake-client-secret"
        # Redirect URLs registered in the "developer portal"; authorize refuses any other.
        self.redirect_uris: set[str] = set()
        # Set to a user to skip the authorize page (approve at once as them).
        self.approve_as: User | None = None
        self.codes: dict[str, _Code] = {}
        self.tokens: dict[str, int] = {}

    @property
    def client_id(self) -> str:
        return str(self.fake.application_id)

    def routes(
        self,
    ) -> list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]]:
        return [
            ("GET", "/oauth2/authorize", self._authorize),
            ("GET", "/oauth2/authorize/approve", self._approve),
            ("POST", "/api/oauth2/token", self._token),
            ("POST", "/api/v10/oauth2/token", self._token),
            ("GET", "/api/users/@me", self.bearer_me),
            # What a browser asks for on the authorize page.
            ("GET", "/favicon.ico", self._favicon),
        ]

    async def _favicon(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    # -- authorize ---------------------------------------------------------------------------
    def _check_authorize(self, query: Any) -> str | None:
        if query.get("client_id") != self.client_id:
            return "Unknown application"
        if query.get("redirect_uri") not in self.redirect_uris:
            return "Invalid OAuth2 redirect_uri"
        if query.get("response_type") != "code":
            return "Invalid response_type"
        if "identify" not in query.get("scope", "").split():
            return "Invalid scope"
        return None

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        problem = self._check_authorize(request.query)
        if problem is not None:
            return _page(f"<h1>{html.escape(problem)}</h1>", 400)
        if self.approve_as is not None:
            return self._redirect_with_code(request.query, self.approve_as)
        people = [u for u in self.fake.users.values() if not u.bot]
        buttons = "".join(
            f'<p><a class="authorize" data-user="{u.id}" href="/oauth2/authorize/approve?'
            f'{html.escape(urlencode({**request.query, "user": u.id}))}">Authorize as '
            f"{html.escape(u.name)}</a></p>"
            for u in people
        )
        deny = html.escape(urlencode({**request.query, "deny": "1"}))
        return _page(
            f"<h1>{html.escape(self.fake.bot_user.name)} wants to access your account</h1>"
            f"<p>Scope: identify</p>{buttons}"
            f'<p><a id="deny" href="/oauth2/authorize/approve?{deny}">Cancel</a></p>'
        )

    async def _approve(self, request: web.Request) -> web.StreamResponse:
        problem = self._check_authorize(request.query)
        if problem is not None:
            return _page(f"<h1>{html.escape(problem)}</h1>", 400)
        redirect = request.query["redirect_uri"]
        if request.query.get("deny"):
            query = {"error": "access_denied", "state": request.query.get("state", "")}
            return _redirect(f"{redirect}?{urlencode(query)}")
        try:
            user = self.fake.users[int(request.query.get("user", ""))]
        except (KeyError, ValueError):
            return _page("<h1>Unknown user</h1>", 400)
        return self._redirect_with_code(request.query, user)

    def _redirect_with_code(self, query: Any, user: User) -> web.StreamResponse:
        code = secrets.token_urlsafe(16)
        self.codes[code] = _Code(
            user.id, query["redirect_uri"], query.get("scope", ""), self.fake.clock.now()
        )
        state = {"state": query["state"]} if "state" in query else {}
        return _redirect(f"{query['redirect_uri']}?{urlencode({'code': code, **state})}")

    # -- token and identity -------------------------------------------------------------------
    def _client(self, request: web.Request, form: Any) -> tuple[str, str]:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            try:
                raw = base64.b64decode(header[6:]).decode()
            except ValueError:
                return "", ""
            client_id, _, client_secret = raw.partition(":")
            return client_id, client_secret
        return str(form.get("client_id", "")), str(form.get("client_secret", ""))

    async def _token(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/x-www-form-urlencoded":
            return json_response({"error": "invalid_request"}, 400)
        form = await request.post()
        client_id, client_secret = self._client(request, form)
        if client_id != self.client_id or client_secret != self.client_secret:
            return json_response({"error": "invalid_client"}, 401)
        if form.get("grant_type") != "authorization_code":
            return json_response({"error": "unsupported_grant_type"}, 400)
        code = self.codes.get(str(form.get("code", "")))
        if (
            code is None
            or code.used
            or code.redirect_uri != form.get("redirect_uri")
            or self.fake.clock.now() - code.issued_at > CODE_LIFETIME_S
        ):
            return json_response(
                {"error": "invalid_grant", "error_description": 'Invalid "code" in request.'},
                400,
            )
        code.used = True
        token = secrets.token_urlsafe(24)
        self.tokens[token] = code.user_id
        return json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": TOKEN_LIFETIME_S,
                "refresh_token": secrets.token_urlsafe(24),
                "scope": code.scope,
            }
        )

    def is_bearer(self, request: web.Request) -> bool:
        return request.headers.get("Authorization", "").startswith("Bearer ")

    async def bearer_me(self, request: web.Request) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        user_id = self.tokens.get(token)
        if user_id is None:
            return json_response({"message": "401: Unauthorized", "code": 0}, 401)
        user = self.fake.users[user_id]
        payload = user.payload()
        payload.pop("bot", None)
        return json_response({**payload, "flags": 0, "locale": user.locale, "mfa_enabled": False})


def _redirect(location: str) -> web.Response:
    # Returned, not raised: the fake's middleware counts raised exceptions as its own bugs.
    return web.Response(status=302, headers={"Location": location})


def _page(body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=f"<!doctype html><html><body>{body}</body></html>",
        status=status,
        content_type="text/html",
    )
