"""Fetching a member's picture from a link or an attachment, safely.

A link is untrusted input: it may point into the bot's own network, redirect there, never end,
or decompress into gigabytes. So a fetch

* takes only the schemes and hosts of its `FetchPolicy` (by default https from Discord's
  attachment hosts), with no user name in the link;
* resolves the host itself, refuses private, loopback, link-local and other non-public
  addresses (an IPv6 address that carries an IPv4 one, as 6to4, Teredo, NAT64 and ISATAP
  do, is judged by both), and then connects to exactly the address it checked, so a second
  DNS answer (DNS rebinding) can't swap in another one;
* follows redirects only on the same host, each one checked again, at most `max_redirects`;
* stops reading at `max_bytes` and gives up after `timeout_s` in all;
* trusts the bytes, not the headers: the type is sniffed (PNG, JPEG, WebP, GIF's first frame),
  the pixel count is checked from the header before anything is decoded (a progressive JPEG's
  declared size, which libjpeg allocates whatever the draft scale), and the decoded picture
  is copied into a fresh RGB image, so EXIF (camera, GPS) and other metadata never go further.
  The EXIF orientation is applied first, so the picture stands the way the member saw it.

Every refusal is a `FetchRefused` whose `reason` is short, written for the member, and names
what was wrong. The API is small on purpose (other features reuse it): `fetch_image` for a link,
`attachment_image` for a Discord attachment.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import socket
import ssl
import warnings
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image, ImageOps

from bot.app.logs import without_queries
from bot.config import ImagesConfig
from generation.picture_formats import (
    TAKEN,
    PictureStructureError,
    open_member_picture,
    other_format,
    sniff,
)

log = logging.getLogger(__name__)

# Where Discord serves uploaded files.
DISCORD_ATTACHMENT_HOSTS = ("cdn.discordapp.com", "media.discordapp.net")
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
# Pixels decoded at most. A picture is used at most at the largest canvas (2048x2048) and is
# scaled down to `max_side` on arrival, so decoding far more only costs time and memory (a
# 40-megapixel PNG took 3.7 s and 490 MB); a JPEG is decoded at a reduced scale first.
DEFAULT_MAX_PIXELS = 16_000_000
DEFAULT_TIMEOUT_S = 10.0
# Pictures are used at the model's resolution at most (2048 px a side); larger ones are scaled
# down once here rather than stored and shipped to the worker at full size.
DEFAULT_MAX_SIDE = 2048
MAX_REDIRECTS = 3
_CHUNK_BYTES = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
ATTACHMENT_PREFIX = "attachment:"


class FetchRefused(Exception):
    """A picture that won't be used; `reason` is written for the member and names the cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FetchPolicy:
    """What may be fetched. `allow_private_addresses` and the `http` scheme exist for tests
    against a local server; the bot's configuration offers neither."""

    allowed_hosts: frozenset[str] = frozenset(DISCORD_ATTACHMENT_HOSTS)
    allowed_schemes: frozenset[str] = frozenset({"https"})
    allow_private_addresses: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_redirects: int = MAX_REDIRECTS
    # Certificates to trust instead of the system's (a test's self-signed one); None: the system.
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.max_redirects < 0:
            raise ValueError(f"max_redirects: must be >= 0, got {self.max_redirects}")
        lowered = frozenset(host.lower() for host in self.allowed_hosts)
        object.__setattr__(self, "allowed_hosts", lowered)


@dataclass(frozen=True)
class FetchedImage:
    """A member's picture, checked and cleaned: RGB, no metadata, at most `max_side` a side.
    `sha256` is of the bytes as fetched; `source` is the link or `attachment:<filename>`."""

    image: Image.Image = field(repr=False, compare=False)
    source: str
    sha256: str
    format: str  # "PNG", "JPEG", "WEBP" or "GIF": what the bytes are, whatever they claimed
    original_size: tuple[int, int] = (0, 0)


async def fetch_image(url: str, policy: FetchPolicy) -> FetchedImage:
    """The picture at `url`, or `FetchRefused` naming why not (never another exception)."""
    data = await fetch_bytes(url, policy)
    return await asyncio.to_thread(decode_image, data, url, policy)


async def attachment_image(attachment: Any, policy: FetchPolicy) -> FetchedImage:
    """A Discord attachment (anything with `filename`, `size` and `url`), fetched through the
    same policy as a link: Discord's own hosts are on the default allow-list."""
    name = str(getattr(attachment, "filename", "") or "file")
    source = f"{ATTACHMENT_PREFIX}{name}"
    size = int(getattr(attachment, "size", 0) or 0)
    if size > policy.max_bytes:
        raise FetchRefused(
            f"{name} is {_megabytes(size)}; the limit is {_megabytes(policy.max_bytes)}"
        )
    try:
        data = await fetch_bytes(str(attachment.url), policy)
        return await asyncio.to_thread(decode_image, data, source, policy)
    except FetchRefused as exc:
        raise FetchRefused(f"{name}: {exc.reason}") from None


# ----- the download -----------------------------------------------------------------------------


async def fetch_bytes(url: str, policy: FetchPolicy) -> bytes:
    """The body at `url` under the policy (redirects on the same host only)."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _follow(url, policy)
    except TimeoutError:
        raise FetchRefused(f"the link took longer than {policy.timeout_s:g} s to answer") from None


async def _follow(url: str, policy: FetchPolicy) -> bytes:
    first_host = _check_url(url, policy)
    current = url
    for hop in range(policy.max_redirects + 1):
        host = _check_url(current, policy)
        if host != first_host:
            raise FetchRefused(f"the link redirects to another host ({_shown(host)}); not followed")
        address = await _checked_address(current, host, policy)
        status, location, body = await _get(current, host, address, policy)
        if status in _REDIRECTS:
            if location is None:
                raise FetchRefused(f"the link answered {status} without saying where to")
            if hop == policy.max_redirects:
                raise FetchRefused(f"the link redirects more than {policy.max_redirects} times")
            current = urljoin(current, location)
            continue
        if status != 200:
            raise FetchRefused(f"the link answered HTTP {status}")
        return body
    raise AssertionError("unreachable: the loop returns or raises")


def _check_url(url: str, policy: FetchPolicy) -> str:
    """The link's host (lower case) if the policy allows the link."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        raise FetchRefused("that is not a valid link") from None
    scheme = parts.scheme.lower()
    if scheme not in policy.allowed_schemes:
        wanted = " or ".join(sorted(policy.allowed_schemes))
        raise FetchRefused(f"only {wanted} links are fetched, not {_shown(scheme or 'this')}")
    if parts.username is not None or parts.password is not None:
        raise FetchRefused("links with a user name or password are not fetched")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise FetchRefused("the link has no host")
    if host not in policy.allowed_hosts:
        allowed = ", ".join(sorted(policy.allowed_hosts)) or "none"
        raise FetchRefused(f"images are only fetched from {allowed}, not {_shown(host)}")
    return host


# IPv6 ranges whose low 32 bits are an IPv4 address the packet ends up at: IPv4-compatible
# (deprecated), IPv4-translated (SIIT) and NAT64's well-known prefix. IPv4-mapped, 6to4 (2002::/16)
# and Teredo (2001::/32) have their own accessors in `ipaddress`.
_LOW_32_EMBEDS = (
    ipaddress.IPv6Network("::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("64:ff9b::/96"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# ISATAP interface identifiers (`::5efe:a.b.c.d`, `::200:5efe:a.b.c.d`) name the IPv4 tunnel end.
_ISATAP_MARKERS = frozenset({0x00005EFE, 0x02005EFE})
_LOW_32 = 0xFFFFFFFF


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address carries (mapped, compatible, translated, NAT64, 6to4,
    Teredo's server and client, ISATAP): a relay or a translator sends the request there."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    value = int(address)
    low = ipaddress.IPv4Address(value & _LOW_32)
    if any(address in network for network in _LOW_32_EMBEDS):
        found.append(low)
    elif (value >> 32) & _LOW_32 in _ISATAP_MARKERS:
        found.append(low)
    return found


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A public unicast address, including every IPv4 address an IPv6 one embeds: 6to4 or
    Teredo of 127.0.0.1, or NAT64 of 10.0.0.1, reaches the bot's own network as surely as the
    plain IPv4 address would."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = embedded_ipv4(address)
        if embedded and not all(_public(inner) for inner in embedded):
            return False
        if address.ipv4_mapped is not None or address in _NAT64:
            # The IPv4 address is the destination; the IPv6 wrapper's own range (inside the
            # reserved ::/8) says nothing more.
            return bool(embedded)
        if address.is_site_local:
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


async def _checked_address(url: str, host: str, policy: FetchPolicy) -> str:
    """One address of `host`; every address DNS gives must be public unless the policy allows
    private ones (one bad answer among good ones is how rebinding attacks start)."""
    port = urlsplit(url).port or (443 if url.lower().startswith("https") else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except (OSError, UnicodeError):
        raise FetchRefused(f"the host {_shown(host)} could not be found") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise FetchRefused(f"the host {_shown(host)} could not be found")
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if not policy.allow_private_addresses and not _public(address):
            raise FetchRefused(
                f"the host {_shown(host)} points to a private or local address; not fetched"
            )
    return addresses[0]


class _PinnedResolver(AbstractResolver):
    """Answers every lookup with the one address already checked: aiohttp connects there, while
    TLS still verifies the certificate against the link's host name."""

    def __init__(self, host: str, address: str) -> None:
        self.host = host
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host.lower().rstrip(".") != self.host:
            raise OSError(f"unexpected host {host!r}")
        ip = ipaddress.ip_address(self.address.split("%", 1)[0])
        return [
            {
                "hostname": host,
                "host": self.address,
                "port": port,
                "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


async def _get(
    url: str, host: str, address: str, policy: FetchPolicy
) -> tuple[int, str | None, bytes]:
    """One GET without following redirects: status, Location, and the body (capped)."""
    connector = aiohttp.TCPConnector(
        resolver=_PinnedResolver(host, address), use_dns_cache=False, limit=1
    )
    try:
        async with (
            aiohttp.ClientSession(connector=connector, trust_env=False) as session,
            session.get(
                url,
                allow_redirects=False,
                ssl=policy.ssl_context if policy.ssl_context is not None else True,
                headers={"Accept": "image/png, image/jpeg, image/webp, image/gif"},
            ) as response,
        ):
            if response.status in _REDIRECTS:
                return response.status, response.headers.get("Location"), b""
            if response.status != 200:
                return response.status, None, b""
            declared = response.content_length
            if declared is not None and declared > policy.max_bytes:
                raise _too_big(policy)
            body = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
                body += chunk
                if len(body) > policy.max_bytes:
                    raise _too_big(policy)
            return response.status, None, bytes(body)
    except aiohttp.ClientError as exc:
        # Without the query: a signed attachment link's query is what grants access.
        log.info("fetch of %s failed: %s", without_queries(url), without_queries(str(exc)))
        raise FetchRefused("the link could not be fetched (connection failed)") from None


def _too_big(policy: FetchPolicy) -> FetchRefused:
    return FetchRefused(f"the file is larger than {_megabytes(policy.max_bytes)}")


# ----- the picture ------------------------------------------------------------------------------


def decode_image(data: bytes, source: str, policy: FetchPolicy) -> FetchedImage:
    """Check and clean fetched bytes (blocking: call in a thread)."""
    if len(data) > policy.max_bytes:
        raise _too_big(policy)
    kind = sniff(data)
    if kind is None:
        found = other_format(data)
        if found is not None:
            raise FetchRefused(f"that is a picture in {found} format ({TAKEN} are taken)")
        raise FetchRefused(f"that is not an image ({TAKEN} are taken)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_member_picture(data, source) as opened:
                width, height = opened.size
                if kind == "JPEG":
                    _check_jpeg_size(opened, width, height, policy)
                    # Decoded at 1/2, 1/4 or 1/8 of its size where that still covers
                    # `max_side`: the picture is scaled down to it below anyway.
                    opened.draft(None, _draft_size(width, height, policy.max_side))
                decoded = opened.size[0] * opened.size[1]
                if decoded > policy.max_pixels:
                    raise FetchRefused(
                        f"the image is {width}x{height} pixels; at most "
                        f"{policy.max_pixels / 1e6:g} megapixels are taken"
                    )
                opened.seek(0)  # a GIF's first frame
                opened.load()
                upright = ImageOps.exif_transpose(opened) or opened
                clean = _flatten(upright)
    except FetchRefused:
        raise
    except PictureStructureError as exc:
        raise FetchRefused(f"the {kind} file {exc.reason}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL refuses far larger headers itself, before the size check above can run.
        raise FetchRefused(
            f"the image is too large; at most {policy.max_pixels / 1e6:g} megapixels are taken"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        log.info("image from %s did not decode: %s", without_queries(source), exc)
        raise FetchRefused(f"the {kind} file is damaged and can't be read") from None
    if max(clean.size) > policy.max_side:
        clean.thumbnail((policy.max_side, policy.max_side), Image.Resampling.LANCZOS)
    return FetchedImage(
        image=clean,
        source=source,
        sha256=hashlib.sha256(data).hexdigest(),
        format=kind,
        original_size=(width, height),
    )


# A baseline JPEG decoded at a draft scale costs memory for the reduced picture only, but its
# header is still held to a few times the cap: at 1/8 scale anything up to 64 times would pass.
BASELINE_JPEG_PIXELS_FACTOR = 4


def _check_jpeg_size(opened: Image.Image, width: int, height: int, policy: FetchPolicy) -> None:
    """Refuse a JPEG whose declared size costs more than the cap to decode, before `draft`.

    libjpeg keeps every DCT coefficient of a progressive (or multi-scan) file for the whole
    picture, whatever the output scale: a 2.6 MB progressive 9400x9400 file took 570 MB to
    decode at 1/8. So a progressive JPEG is held to `max_pixels` as declared, like a PNG."""
    declared = width * height
    progressive = bool(opened.info.get("progressive") or opened.info.get("progression"))
    if progressive and declared > policy.max_pixels:
        raise FetchRefused(
            f"the image is a {width}x{height} progressive JPEG; at most "
            f"{policy.max_pixels / 1e6:g} megapixels are taken for progressive JPEGs"
        )
    limit = policy.max_pixels * BASELINE_JPEG_PIXELS_FACTOR
    if declared > limit:
        raise FetchRefused(
            f"the image is {width}x{height} pixels; at most {limit / 1e6:g} megapixels "
            "are taken for a JPEG"
        )


def _draft_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size a JPEG must still cover once its long side is scaled down to `max_side`."""
    scale = min(1.0, max_side / max(width, height, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _flatten(image: Image.Image) -> Image.Image:
    """A new RGB image with the pixels only: transparency over white, no EXIF, ICC or text."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGB", rgba.size, (255, 255, 255))
        backdrop.paste(rgba, mask=rgba.getchannel("A"))
        return backdrop
    clean = Image.new("RGB", image.size)
    clean.paste(image.convert("RGB"))
    return clean


# ----- messages ---------------------------------------------------------------------------------


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB".replace(".0 MB", " MB")


def _shown(text: str, limit: int = 60) -> str:
    text = "".join(ch for ch in text if ch.isprintable())
    return text if len(text) <= limit else text[:limit] + "…"


def describe_policy(policy: FetchPolicy) -> str:
    """One line for /help: where pictures may come from and how large they may be."""
    hosts = ", ".join(sorted(policy.allowed_hosts))
    return (
        f"links from {hosts}; at most {_megabytes(policy.max_bytes)} and "
        f"{policy.max_pixels / 1e6:g} megapixels; PNG, JPEG, WebP or GIF (first frame)"
    )


def policy_from_config(images: ImagesConfig) -> FetchPolicy:
    """The policy the bot runs with: https only, public addresses only, the configured hosts."""
    return FetchPolicy(
        allowed_hosts=frozenset(images.allowed_hosts),
        max_bytes=images.max_bytes,
        max_pixels=images.max_pixels,
        timeout_s=images.timeout_s,
    )
