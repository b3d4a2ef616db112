"""One-time sign-in links for the web home (`/web`), whatever front end asks for them.

A link carries a random nonce and an HMAC of it under the web home's signing key: a forged or
altered link is refused before the database is asked. The database keeps only the nonce's
SHA-256 with who it signs in and until when; redeeming marks it used in the same statement
that checks it, so a link works once, within `[web] link_ttl_s`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass

from bot.config.web import MIN_SECRET_LENGTH, WebConfig, WebSecrets
from bot.core.web_store import LinkGrant, LinkUse, WebStore

log = logging.getLogger(__name__)

LINK_PATH = "/signin/link"
NONCE_BYTES = 24
SIGNATURE_BYTES = 16

REFUSALS = {
    LinkUse.USED: "This sign-in link was already used. Links work once: type /web again.",
    LinkUse.EXPIRED: "This sign-in link has expired. Type /web in the server for a new one.",
    LinkUse.UNKNOWN: "This sign-in link isn't valid. Type /web in the server for a new one.",
}


class LinkRefused(Exception):
    """A link that signs nobody in; `reason` is written for the member."""

    def __init__(self, use: LinkUse) -> None:
        self.use = use
        self.reason = REFUSALS[use]
        super().__init__(self.reason)


def signing_key(secrets_: WebSecrets) -> bytes:
    """The key cookies and links are signed with. Without IMAGINE_WEB_SECRET, a random one for
    this run (sign-ins then end at every restart)."""
    if secrets_.signing_key:
        if len(secrets_.signing_key) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"IMAGINE_WEB_SECRET: at least {MIN_SECRET_LENGTH} characters "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        return secrets_.signing_key.encode()
    log.warning(
        "web: IMAGINE_WEB_SECRET is not set; signing with a random key, so members are "
        "signed out at every restart"
    )
    return secrets.token_bytes(32)


def sign(key: bytes, purpose: str, value: bytes) -> str:
    digest = hmac.new(key, purpose.encode() + b"\0" + value, hashlib.sha256).digest()
    return b64(digest[:SIGNATURE_BYTES])


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unb64(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def secret_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def job_page_url(web: WebConfig, job_id: int) -> str | None:
    """The job's page on the web home, for a Web button under its grid; None when the web
    home is off or has no public address to link to."""
    if not web.enabled or not web.public_url:
        return None
    return f"{web.public_url}/jobs/{job_id}"


@dataclass(frozen=True)
class MintedLink:
    url: str
    ttl_s: float


class SignInLinks:
    def __init__(self, store: WebStore, web: WebConfig, key: bytes) -> None:
        self._store = store
        self._web = web
        self._key = key

    async def mint(
        self, user_id: int, name: str, guild_id: int | None, admin_scope: str
    ) -> MintedLink:
        nonce = secrets.token_bytes(NONCE_BYTES)
        await self._store.add_link(
            secret_hash(nonce), user_id, name, guild_id, admin_scope, self._web.link_ttl_s
        )
        token = f"{b64(nonce)}.{sign(self._key, 'link', nonce)}"
        return MintedLink(f"{self._web.base_url}{LINK_PATH}?t={token}", self._web.link_ttl_s)

    async def redeem(self, token: str) -> LinkGrant:
        """Who the link signs in; raises LinkRefused (used, expired, forged)."""
        nonce_text, _, signature = token.partition(".")
        nonce = unb64(nonce_text) if len(token) < 200 else None
        if (
            nonce is None
            or len(nonce) != NONCE_BYTES
            or not hmac.compare_digest(signature, sign(self._key, "link", nonce))
        ):
            raise LinkRefused(LinkUse.UNKNOWN)
        use, grant = await self._store.use_link(secret_hash(nonce))
        if grant is None:
            raise LinkRefused(use)
        return grant
