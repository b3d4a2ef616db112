"""Every picture a member gives (a link, an attachment, a ControlNet map, a Vary (Region) mask)
is opened only as PNG, JPEG, WebP or GIF: any other format Pillow knows is refused, by name
where its magic number tells it, and no other plugin's parser ever sees the bytes (EPS's runs
Ghostscript). Files here are real ones Pillow writes in each format."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from PIL import Image

from bot.app.fetch import FetchPolicy, FetchRefused, attachment_image, decode_image, fetch_image
from generation.canvas import read_mask
from generation.picture_formats import MEMBER_FORMATS
from tests.bot.test_fetch import Attached, body, local, serve

# (Pillow's format, the name a refusal gives it or None when no magic number tells it).
OTHER_FORMATS: list[tuple[str, str | None]] = [
    ("EPS", "EPS"),
    ("TIFF", "TIFF"),
    ("DDS", "DDS"),
    ("SGI", "SGI"),
    ("ICO", "ICO"),
    ("BMP", "BMP"),
    ("PDF", "PDF"),
    ("PCX", "PCX"),
    ("PPM", "PPM"),
    ("TGA", "TGA"),
    ("QOI", "QOI"),
    ("JPEG2000", "JPEG 2000"),
    ("ICNS", "ICNS"),
    ("IM", "IM"),
    ("MSP", "MSP"),
    ("XBM", "XBM"),
    ("AVIF", "AVIF"),
    ("DIB", None),
    ("SPIDER", None),
    ("PALM", None),
]


def encoded(fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, size[0] // 2, size[1]))
    if fmt in ("MSP", "XBM", "PALM"):
        image = image.convert("1")
    elif fmt == "SPIDER":
        image = image.convert("F")
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def plugins_opened(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Records every Pillow plugin whose parser is handed a file (a spy: each still runs)."""
    Image.init()
    opened: list[str] = []
    for name, (factory, accept) in list(Image.OPEN.items()):

        def spy(*args: Any, _name: str = name, _factory: Callable[..., Any] = factory) -> Any:
            opened.append(_name)
            return _factory(*args)

        monkeypatch.setitem(Image.OPEN, name, (spy, accept))
    yield opened


def _named(message: str, name: str | None) -> bool:
    if name is None:
        return "is not a picture (PNG, JPEG, WebP or GIF are taken)" in message or (
            "not an image (PNG, JPEG, WebP or GIF are taken)" in message
        )
    return f"{name}" in message and "PNG, JPEG, WebP or GIF" in message


@pytest.mark.parametrize(("fmt", "name"), OTHER_FORMATS)
def test_masks_of_other_formats_are_refused_by_name_unopened(
    fmt: str, name: str | None, plugins_opened: list[str]
) -> None:
    data = encoded(fmt)
    if fmt in Image.OPEN and fmt != "IM":  # (Pillow writes PDF and Palm only; IM is deprecated)
        # Pillow itself would open it: the refusal is the bot's choice, not an unreadable file.
        with Image.open(io.BytesIO(data)) as probe:
            assert probe.format == fmt
        plugins_opened.clear()
    with pytest.raises(ValueError) as caught:
        read_mask(data, "mask.file")
    message = str(caught.value)
    assert message.startswith("mask: mask.file is not a picture"), message
    assert _named(message, name), message
    assert plugins_opened == []


@pytest.mark.parametrize(("fmt", "name"), OTHER_FORMATS)
def test_links_and_attachments_of_other_formats_are_refused_by_name_unopened(
    fmt: str, name: str | None, plugins_opened: list[str]
) -> None:
    data = encoded(fmt)
    with pytest.raises(FetchRefused) as caught:
        decode_image(data, "https://cdn.discordapp.com/x", FetchPolicy())
    assert _named(caught.value.reason, name), caught.value.reason
    assert plugins_opened == []


@pytest.mark.parametrize("fmt", MEMBER_FORMATS)
def test_the_four_formats_are_taken_each_by_its_own_plugin(
    fmt: str, plugins_opened: list[str]
) -> None:
    data = encoded(fmt)
    picture = decode_image(data, "https://cdn.discordapp.com/x", FetchPolicy())
    assert picture.format == fmt and picture.image.size == (32, 32)
    assert plugins_opened == [fmt]
    plugins_opened.clear()
    mask = read_mask(data, "mask.file")
    assert mask.size == (32, 32) and plugins_opened == [fmt]


async def test_over_the_wire_as_a_link_and_as_an_attachment(plugins_opened: list[str]) -> None:
    eps, tiff = encoded("EPS"), encoded("TIFF")
    routes = {"/art.png": body(eps), "/cdn/scan.png": body(tiff, "image/png")}
    async with serve(routes) as server:
        with pytest.raises(FetchRefused) as caught:
            await fetch_image(server.url("/art.png"), local())
        assert "EPS" in caught.value.reason
        with pytest.raises(FetchRefused) as caught:
            await attachment_image(
                Attached(server.url("/cdn/scan.png"), "scan.png", len(tiff)), local()
            )
        assert caught.value.reason.startswith("scan.png: ") and "TIFF" in caught.value.reason
    assert plugins_opened == []
