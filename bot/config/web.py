"""`[web]`: the web home the bot serves (members' images, Explore, the owners' pages), and its
secrets, which come only from the environment.

Off by default. `public_url` is the address members' browsers use (behind a reverse proxy, the
proxy's https address): links in Discord and the OAuth redirect are built from it, and cookies
are marked Secure when it is https.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass

# The environment variables the web home reads (and takes out of the environment, so nothing
# the bot starts inherits them).
SECRET_ENV = "IMAGINE_WEB_SECRET"
CLIENT_ID_ENV = "DISCORD_CLIENT_ID"
CLIENT_SECRET_ENV = "DISCORD_CLIENT_SECRET"
# Shorter secrets are refused: cookies and sign-in links are signed with it.
MIN_SECRET_LENGTH = 32


@dataclass(frozen=True)
class WebConfig:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8080
    # What browsers see, without a trailing slash ("https://bot.example.org"); empty: built
    # from host and port (fine on one machine, not behind a proxy).
    public_url: str = ""
    # Discord's site: the OAuth pages and API live under it (tests point it at a fake).
    discord_url: str = "https://discord.com"
    # A /web sign-in link works once, for this long.
    link_ttl_s: float = 600.0
    # A web session lasts this long after sign-in.
    session_ttl_s: float = 7 * 24 * 3600.0
    # Requests per minute: from one address, and from one signed-in member.
    ip_requests_per_minute: int = 600
    member_requests_per_minute: int = 300
    # Sign-in attempts per minute from one address (OAuth starts, links redeemed).
    sign_in_per_minute: int = 20
    # Believe X-Forwarded-For / X-Forwarded-Proto (only behind your own reverse proxy).
    trust_proxy: bool = False
    # Thumbnails per page on My images and Explore.
    page_size: int = 48

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def secure_cookies(self) -> bool:
        return self.base_url.startswith("https://")

    @property
    def oauth_redirect_url(self) -> str:
        """The redirect URL to register in Discord's developer portal (OAuth2 → Redirects)."""
        return f"{self.base_url}/signin/discord/callback"


@dataclass(frozen=True)
class WebSecrets:
    """What the web home signs with, and the Discord application's OAuth2 credentials (both
    optional: without them, members sign in with `/web` links only)."""

    signing_key: str = ""
    client_id: str = ""
    client_secret: str = ""

    @property
    def oauth_enabled(self) -> bool:
        return bool(self.client_id and self.client_secret)

    def __repr__(self) -> str:
        return f"WebSecrets(client_id={self.client_id!r}, signing_key=…, client_secret=…)"


def take_web_secrets(environ: MutableMapping[str, str] | None = None) -> WebSecrets:
    """Read the web home's secrets and take them out of the environment (worker processes and
    anything else the bot starts never see them)."""
    env = os.environ if environ is None else environ
    return WebSecrets(
        signing_key=env.pop(SECRET_ENV, ""),
        client_id=env.pop(CLIENT_ID_ENV, ""),
        client_secret=env.pop(CLIENT_SECRET_ENV, ""),
    )
