"""Discord's OAuth2 authorization-code flow with the `identify` scope: the address to send the
browser to (with a `state` bound to it by a signed cookie), and the code exchanged for the
member's id and name. Discord's address comes from `[web] discord_url` (tests point it at
their fake Discord)."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlencode

import aiohttp

from bot.app.sign_in import sign
from bot.config.web import WebConfig, WebSecrets

log = logging.getLogger(__name__)

STATE_COOKIE = "imagine_oauth"
STATE_TTL_S = 600
API_VERSION = "v10"
REQUEST_TIMEOUT_S = 10.0


class OAuthFailed(Exception):
    """Discord didn't confirm who the member is; `reason` is written for them."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DiscordUser:
    id: int
    name: str


class DiscordOAuth:
    def __init__(self, config: WebConfig, secrets_: WebSecrets, key: bytes) -> None:
        self._config = config
        self._client_id = secrets_.client_id
        self._client_secret = secrets_.client_secret
        self._key = key
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
            )
        return self._http

    def begin(self) -> tuple[str, str]:
        """(the authorize address, the state cookie's value)."""
        state = secrets.token_urlsafe(24)
        expires = int(time.time()) + STATE_TTL_S
        payload = f"{state}.{expires}"
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self._client_id,
                "scope": "identify",
                "state": state,
                "redirect_uri": self._config.oauth_redirect_url,
                "prompt": "none",
            }
        )
        url = f"{self._config.discord_url}/oauth2/authorize?{query}"
        return url, f"{payload}.{sign(self._key, 'oauth-state', payload.encode())}"

    def state_matches(self, cookie: str, state: str) -> bool:
        """Whether the state Discord sent back is the one this browser was sent off with."""
        try:
            saved, expires_text, signature = cookie.split(".")
            expires = int(expires_text)
        except ValueError:
            return False
        payload = f"{saved}.{expires_text}"
        return (
            secrets.compare_digest(signature, sign(self._key, "oauth-state", payload.encode()))
            and expires >= time.time()
            and bool(state)
            and secrets.compare_digest(saved, state)
        )

    async def identify(self, code: str) -> DiscordUser:
        """Exchange the code for a token and ask Discord who it belongs to."""
        api = f"{self._config.discord_url}/api/{API_VERSION}"
        http = self._session()
        try:
            async with http.post(
                f"{api}/oauth2/token",
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self._config.oauth_redirect_url,
                },
                headers={
                    "Authorization": aiohttp.encode_basic_auth(self._client_id, self._client_secret)
                },
            ) as response:
                if response.status != 200:
                    log.warning("web: Discord refused the OAuth code (HTTP %d)", response.status)
                    raise OAuthFailed("Discord didn't accept that sign-in. Please try again.")
                token = await response.json()
            access = token.get("access_token") if isinstance(token, dict) else None
            if not isinstance(access, str) or "identify" not in str(token.get("scope", "")):
                raise OAuthFailed("Discord's answer didn't include your identity.")
            async with http.get(
                f"{api}/users/@me", headers={"Authorization": f"Bearer {access}"}
            ) as response:
                if response.status != 200:
                    raise OAuthFailed("Discord didn't say who you are. Please try again.")
                user = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("web: Discord OAuth failed: %s", type(exc).__name__)
            raise OAuthFailed("Discord couldn't be reached. Please try again.") from None
        try:
            name = user.get("global_name") or user.get("username") or ""
            return DiscordUser(int(user["id"]), str(name))
        except (KeyError, TypeError, ValueError):
            raise OAuthFailed("Discord's answer didn't include your identity.") from None
