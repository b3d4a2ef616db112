"""bot/app/fetch.py against real local HTTP(S) servers: what is fetched, what is refused and why.

The servers are aiohttp on 127.0.0.1. The policy used here allows http and private addresses
explicitly (the bot's own policy never does), except where a test checks exactly those refusals.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import ssl
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from bot.app.fetch import (
    DISCORD_ATTACHMENT_HOSTS,
    FetchPolicy,
    FetchRefused,
    attachment_image,
    fetch_image,
    policy_from_config,
    sniff,
)
from bot.config import ImagesConfig

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def png(colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def local(**changes: Any) -> FetchPolicy:
    values: dict[str, Any] = {
        "allowed_hosts": frozenset({"127.0.0.1", "localhost"}),
        "allowed_schemes": frozenset({"http"}),
        "allow_private_addresses": True,
        "timeout_s": 5.0,
    }
    values.update(changes)
    return FetchPolicy(**values)


class Server:
    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.hits: list[str] = []
        self.port = 0

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"


@asynccontextmanager
async def serve(
    routes: dict[str, Handler], tls: ssl.SSLContext | None = None
) -> AsyncIterator[Server]:
    server = Server(routes)

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        server.hits.append(request.path)
        return await handler(request)

    app = web.Application(middlewares=[record])
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server
    finally:
        await runner.cleanup()


def body(data: bytes, content_type: str = "image/png") -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=data, content_type=content_type)

    return handler


def redirect(location: Callable[[], str], status: int = 302) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, headers={"Location": location()})

    return handler


async def refused(url: str, policy: FetchPolicy) -> str:
    with pytest.raises(FetchRefused) as caught:
        await fetch_image(url, policy)
    return caught.value.reason


# ----- what is fetched ------------------------------------------------------------------------


async def test_fetches_a_png_with_its_hash_and_source() -> None:
    data = png()
    async with serve({"/cat.png": body(data)}) as server:
        fetched = await fetch_image(server.url("/cat.png"), local())
    assert fetched.format == "PNG"
    assert fetched.image.mode == "RGB" and fetched.image.size == (48, 32)
    assert fetched.image.getpixel((3, 3)) == (200, 30, 30)
    assert fetched.sha256 == hashlib.sha256(data).hexdigest()
    assert fetched.source == server.url("/cat.png")


async def test_type_is_sniffed_not_taken_from_the_headers() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(buffer, "WEBP", lossless=True)
    async with serve(
        {
            "/lying.png": body(buffer.getvalue(), "image/png"),
            "/page.png": body(b"<html><body>not a picture</body></html>", "image/png"),
            "/script.jpg": body(b"#!/bin/sh\necho hi\n" * 10, "image/jpeg"),
        }
    ) as server:
        webp = await fetch_image(server.url("/lying.png"), local())
        assert webp.format == "WEBP" and webp.image.getpixel((5, 5)) == (10, 200, 10)
        for path in ("/page.png", "/script.jpg"):
            reason = await refused(server.url(path), local())
            assert "not an image" in reason and "PNG, JPEG, WebP or GIF" in reason


async def test_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    async with serve({"/anim.gif": body(buffer.getvalue(), "image/gif")}) as server:
        fetched = await fetch_image(server.url("/anim.gif"), local())
    assert fetched.format == "GIF"
    red, _green, blue = fetched.image.getpixel((8, 8))  # type: ignore[misc]
    assert red > 200 and blue < 50


async def test_exif_is_stripped_and_its_orientation_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    exif[0x010F] = "SecretCam"  # Make
    exif[0x0131] = "GPS-tracking-firmware"  # Software
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), (250, 250, 250)).save(buffer, "JPEG", exif=exif.tobytes())
    data = buffer.getvalue()
    assert b"SecretCam" in data
    async with serve({"/photo.jpg": body(data, "image/jpeg")}) as server:
        fetched = await fetch_image(server.url("/photo.jpg"), local())
    assert fetched.image.size == (32, 64), "the orientation tag was applied before stripping"
    assert "exif" not in fetched.image.info and not fetched.image.getexif()
    saved = io.BytesIO()
    fetched.image.save(saved, "PNG")
    assert b"SecretCam" not in saved.getvalue()


async def test_transparency_goes_over_white_and_large_pictures_are_scaled_down() -> None:
    buffer = io.BytesIO()
    Image.new("RGBA", (300, 150), (0, 0, 0, 0)).save(buffer, "PNG")
    async with serve({"/clear.png": body(buffer.getvalue())}) as server:
        fetched = await fetch_image(server.url("/clear.png"), local(max_side=100))
    assert fetched.image.mode == "RGB" and fetched.image.getpixel((0, 0)) == (255, 255, 255)
    assert fetched.image.size == (100, 50) and fetched.original_size == (300, 150)


async def test_same_host_redirects_are_followed_and_counted() -> None:
    data = png((1, 2, 3))
    servers: list[Server] = []
    routes = {
        "/a": redirect(lambda: "/b", 301),
        "/b": redirect(lambda: servers[0].url("/img.png"), 307),
        "/img.png": body(data),
        "/loop": redirect(lambda: "/loop"),
        "/nowhere": redirect(lambda: "", 302),
    }
    async with serve(routes) as server:
        servers.append(server)
        fetched = await fetch_image(server.url("/a"), local())
        assert fetched.sha256 == hashlib.sha256(data).hexdigest()
        assert "more than 3 times" in await refused(server.url("/loop"), local())
        assert server.hits.count("/loop") == 4


async def test_redirects_to_another_host_are_refused() -> None:
    servers: list[Server] = []
    routes = {
        # "localhost" is on the allow-list too; a redirect may still not change the host.
        "/away": redirect(lambda: servers[0].url("/img.png", host="localhost")),
        "/img.png": body(png()),
    }
    async with serve(routes) as server:
        servers.append(server)
        reason = await refused(server.url("/away"), local())
        assert "redirects to another host (localhost)" in reason
        assert server.hits == ["/away"]


async def test_scheme_host_and_user_info_are_checked_before_any_request() -> None:
    async with serve({"/img.png": body(png())}) as server:
        https_only = local(allowed_schemes=frozenset({"https"}))
        assert "only https links" in await refused(server.url("/img.png"), https_only)
        other_host = local(allowed_hosts=frozenset({"cdn.discordapp.com"}))
        reason = await refused(server.url("/img.png"), other_host)
        assert "only fetched from cdn.discordapp.com, not 127.0.0.1" in reason
        with_user = f"http://admin:secret@127.0.0.1:{server.port}/img.png"
        assert "user name" in await refused(with_user, local())
        assert "file:" not in await refused("file:///etc/passwd", local())
        assert server.hits == []


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.9", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::5", False),
        ("::ffff:127.0.0.1", False),
        # IPv6 forms that carry an IPv4 address the request would end up at.
        ("::ffff:10.0.0.1", False),  # IPv4-mapped
        ("::ffff:0:10.0.0.1", False),  # IPv4-translated (SIIT)
        ("::127.0.0.1", False),  # IPv4-compatible (deprecated)
        ("::8.8.8.8", False),  # deprecated whatever it carries
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("2002:a9fe:a9fe::1", False),  # 6to4 of the cloud metadata address
        ("2002:c0a8:101::", False),  # 6to4 of 192.168.1.1
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # Teredo, client 10.0.0.1
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo, client 192.0.2.45
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1
        ("64:ff9b:1::a00:1", False),  # NAT64 local-use prefix
        ("2a00:1450::5efe:a00:1", False),  # ISATAP, tunnel end 10.0.0.1
        ("2a00:1450::200:5efe:c0a8:101", False),  # ISATAP, tunnel end 192.168.1.1
        ("fec0::1", False),  # site-local (deprecated)
        ("2001:db8::1", False),  # documentation
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("2002:808:808::1", True),  # 6to4 of a public address
        ("64:ff9b::808:808", True),  # NAT64 (DNS64 networks) of a public address
    ],
)
def test_address_classes(address: str, public: bool) -> None:
    import ipaddress

    from bot.app.fetch import _public

    assert _public(ipaddress.ip_address(address)) is public


async def test_private_addresses_are_refused_after_dns() -> None:
    async with serve({"/img.png": body(png())}) as server:
        no_private = local(allow_private_addresses=False)
        for host in ("127.0.0.1", "localhost"):
            reason = await refused(server.url("/img.png", host=host), no_private)
            assert "private or local address" in reason and host in reason
        assert server.hits == [], "nothing is sent to a private address"


async def test_the_checked_address_is_the_one_connected_to() -> None:
    """One DNS lookup per fetch: aiohttp connects to the address that was checked instead of
    resolving the name again (where a rebinding DNS server could answer differently)."""
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    real = loop.getaddrinfo

    async def counting(host: Any, *args: Any, **kwargs: Any) -> Any:
        lookups.append(str(host))
        return await real(host, *args, **kwargs)

    loop.getaddrinfo = counting  # type: ignore[method-assign]
    try:
        async with serve({"/img.png": body(png())}) as server:
            await fetch_image(server.url("/img.png", host="localhost"), local())
    finally:
        del loop.getaddrinfo
    assert lookups == ["localhost"]


async def test_oversize_bodies_are_cut_off() -> None:
    big = png(size=(300, 300)) + b"\0" * 20_000

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(big), 1000):
            await response.write(big[start : start + 1000])
        await response.write_eof()
        return response

    async with serve({"/declared.png": body(big), "/chunked.png": chunked}) as server:
        small = local(max_bytes=5000)
        for path in ("/declared.png", "/chunked.png"):
            assert "larger than" in await refused(server.url(path), small)
        assert (await fetch_image(server.url("/chunked.png"), local())).format == "PNG"


async def test_slow_servers_time_out() -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response(body=png(), content_type="image/png")

    async def dripping(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        await response.prepare(request)
        for byte in png():
            await response.write(bytes([byte]))
            await asyncio.sleep(0.05)
        return response

    async with serve({"/silent.png": silent, "/drip.png": dripping}) as server:
        quick = local(timeout_s=0.3)
        started = asyncio.get_running_loop().time()
        for path in ("/silent.png", "/drip.png"):
            assert "longer than 0.3 s" in await refused(server.url(path), quick)
        assert asyncio.get_running_loop().time() - started < 3


async def test_http_errors_are_named() -> None:
    async def missing(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404)

    async with serve({"/gone.png": missing}) as server:
        assert "HTTP 404" in await refused(server.url("/gone.png"), local())


def bomb_png(width: int, height: int) -> bytes:
    """A small, valid PNG whose header claims width x height (the rows are never decoded)."""
    data = png(size=(8, 8))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return data[:8] + ihdr + data[8 + len(ihdr) :]


async def test_decompression_bombs_are_refused_from_the_header() -> None:
    bomb = bomb_png(60_000, 60_000)
    assert len(bomb) < 200
    real = png(size=(200, 200))
    async with serve({"/bomb.png": body(bomb), "/big.png": body(real)}) as server:
        reason = await refused(server.url("/bomb.png"), local())
        assert "too large" in reason and "at most 16 megapixels" in reason
        reason = await refused(server.url("/bomb.png"), local(max_pixels=10_000))
        assert "60000x60000 pixels" not in reason and "at most 0.01 megapixels" in reason
        reason = await refused(server.url("/big.png"), local(max_pixels=10_000))
        assert "200x200 pixels" in reason and "at most 0.01 megapixels" in reason


async def test_damaged_files_are_refused() -> None:
    truncated = png(size=(64, 64))[:60]
    async with serve({"/broken.png": body(truncated)}) as server:
        assert "damaged" in await refused(server.url("/broken.png"), local())


class Attached:
    def __init__(self, url: str, filename: str, size: int) -> None:
        self.url, self.filename, self.size = url, filename, size


async def test_attachments_go_through_the_same_policy() -> None:
    data = png()
    routes = {"/cdn/cat.png": body(data), "/cdn/notes.txt": body(b"some words\n", "text/plain")}
    async with serve(routes) as server:
        fetched = await attachment_image(
            Attached(server.url("/cdn/cat.png"), "cat.png", len(data)), local()
        )
        assert fetched.source == "attachment:cat.png"
        with pytest.raises(FetchRefused) as caught:
            huge = Attached(server.url("/cdn/cat.png"), "huge.png", 50 * 1024 * 1024)
            await attachment_image(huge, local())
        assert caught.value.reason == "huge.png is 50 MB; the limit is 10 MB"
        with pytest.raises(FetchRefused) as caught:
            await attachment_image(
                Attached(server.url("/cdn/cat.png"), "cat.png", 10), FetchPolicy()
            )
        assert caught.value.reason.startswith("cat.png: only https links")
        with pytest.raises(FetchRefused) as caught:
            await attachment_image(Attached(server.url("/cdn/notes.txt"), "notes.txt", 9), local())
        assert caught.value.reason == (
            "notes.txt: that is not an image (PNG, JPEG, WebP or GIF are taken)"
        )
        assert server.hits == ["/cdn/cat.png", "/cdn/notes.txt"]


def test_the_configured_policy_is_https_and_public_only() -> None:
    policy = policy_from_config(ImagesConfig())
    assert policy.allowed_schemes == {"https"} and not policy.allow_private_addresses
    assert policy.allowed_hosts == set(DISCORD_ATTACHMENT_HOSTS)
    assert sniff(png()) == "PNG" and sniff(b"GIF89a...") == "GIF" and sniff(b"<svg") is None


# ----- https with a certificate made here ------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    try:
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
                *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
                *("-addext", "subjectAltName=DNS:localhost"),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.CalledProcessError) as exc:  # pragma: no cover
        pytest.skip(f"openssl could not make a certificate: {exc}")
    return key, cert


async def test_https_verifies_the_host_name_while_connecting_to_the_checked_address(
    certificate: tuple[Path, Path],
) -> None:
    key, cert = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    trusted = ssl.create_default_context(cafile=str(cert))
    policy = local(allowed_schemes=frozenset({"https"}), ssl_context=trusted)
    async with serve({"/img.png": body(png())}, tls=server_tls) as server:
        fetched = await fetch_image(server.url("/img.png", "localhost", "https"), policy)
        assert fetched.format == "PNG"
        # The certificate names localhost only: by IP the name check fails, so the pinned
        # address never replaces the host name in verification.
        reason = await refused(server.url("/img.png", "127.0.0.1", "https"), policy)
        assert "could not be fetched" in reason
        # The system's trust store does not know the certificate.
        untrusted = local(allowed_schemes=frozenset({"https"}))
        reason = await refused(server.url("/img.png", "localhost", "https"), untrusted)
        assert "could not be fetched" in reason


# ----- logs --------------------------------------------------------------------------------------

SIGNATURE = "ex=6650a1b2&is=664f5032&hm=5ec12e7d0b1c2a3f4e5d6c7b8a99"


async def test_signed_links_are_logged_without_their_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A Discord attachment link's query is its signature: whoever reads it can fetch the file.
    caplog.set_level(logging.INFO, logger="bot.app.fetch")
    async with serve({"/cdn/broken.png": body(png(size=(64, 64))[:60])}) as server:
        assert "damaged" in await refused(f"{server.url('/cdn/broken.png')}?{SIGNATURE}", local())
        port = server.port
    # The server is gone now: the connection fails, and that is logged too.
    gone = f"http://127.0.0.1:{port}/cdn/gone.png?{SIGNATURE}#frag"
    assert "could not be fetched" in await refused(gone, local())
    text = caplog.text
    assert "/cdn/broken.png" in text and "/cdn/gone.png" in text
    assert "hm=" not in text and "ex=" not in text and "#frag" not in text


def _drawn(size: tuple[int, int], fmt: str) -> bytes:
    image = Image.new("RGB", size, (200, 100, 50))
    for x in range(0, size[0], 64):
        image.paste((x % 255, 20, 200), (x, 0, x + 8, size[1]))
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=80) if fmt == "JPEG" else image.save(buffer, fmt)
    return buffer.getvalue()


def test_pictures_are_decoded_no_larger_than_the_bot_uses() -> None:
    from bot.app.fetch import decode_image

    policy = FetchPolicy()
    assert policy.max_pixels == 16_000_000 and policy.max_side == 2048
    # A PNG is decoded whole: one past the cap is refused from its header.
    with pytest.raises(FetchRefused) as reason:
        decode_image(_drawn((4100, 4000), "PNG"), "x", policy)
    assert "4100x4000 pixels; at most 16 megapixels" in reason.value.reason
    # A JPEG is decoded at a reduced scale that still covers 2048 pixels: a 6000x6000 one
    # (36 MP in its header) decodes at 3000x3000 and is then scaled down like any other.
    picture = decode_image(_drawn((6000, 6000), "JPEG"), "x", policy)
    assert picture.original_size == (6000, 6000) and picture.image.size == (2048, 2048)
    # Seen from its decoder: at half size, it is within the cap only because of that.
    with Image.open(io.BytesIO(_drawn((6000, 6000), "JPEG"))) as opened:
        opened.draft(None, (2048, 2048))
        assert opened.size == (3000, 3000)


def _jpeg(size: tuple[int, int], progressive: bool) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 140, 200)).save(
        buffer, "JPEG", quality=30, progressive=progressive, subsampling=0
    )
    return buffer.getvalue()


def test_progressive_jpegs_are_held_to_the_cap_as_declared() -> None:
    from bot.app.fetch import decode_image

    # 400x400 is 0.16 MP; at 1/4 scale (which still covers 64 px a side) it decodes at 100x100,
    # well within 0.1 MP. libjpeg keeps every coefficient of a progressive file whatever the
    # scale, so the declared size is what a progressive one costs.
    policy = FetchPolicy(max_pixels=100_000, max_side=64)
    progressive = _jpeg((400, 400), progressive=True)
    with Image.open(io.BytesIO(progressive)) as opened:
        assert opened.info.get("progressive") or opened.info.get("progression")
    with pytest.raises(FetchRefused) as caught:
        decode_image(progressive, "x.jpg", policy)
    assert caught.value.reason == (
        "the image is a 400x400 progressive JPEG; at most 0.1 megapixels are taken "
        "for progressive JPEGs"
    )
    # The same picture as a baseline JPEG decodes at the reduced scale and is taken.
    picture = decode_image(_jpeg((400, 400), progressive=False), "x.jpg", policy)
    assert picture.original_size == (400, 400) and max(picture.image.size) == 64
    # A progressive one within the cap is taken too.
    small = decode_image(_jpeg((300, 300), progressive=True), "x.jpg", policy)
    assert small.original_size == (300, 300) and max(small.image.size) == 64


def test_baseline_jpegs_are_held_to_a_few_times_the_cap() -> None:
    from bot.app.fetch import BASELINE_JPEG_PIXELS_FACTOR, decode_image

    assert BASELINE_JPEG_PIXELS_FACTOR == 4
    # 700x700 (0.49 MP) decodes at 1/8 (88x88) but declares more than 4 x 0.1 MP.
    policy = FetchPolicy(max_pixels=100_000, max_side=64)
    with pytest.raises(FetchRefused) as caught:
        decode_image(_jpeg((700, 700), progressive=False), "x.jpg", policy)
    assert caught.value.reason == (
        "the image is 700x700 pixels; at most 0.4 megapixels are taken for a JPEG"
    )
