"""A PNG or GIF of a taken format built to be slow to read: tens of thousands of chunks or
extension blocks around a tiny image (Pillow walks each in Python, holding the GIL). Every path
a member's picture takes (a link, an attachment, a Vary (Region) mask) refuses it, naming the
limit, before any Pillow plugin sees the bytes; real pictures with libpng's many 8 KB image-data
chunks, an animated PNG's later frames and ordinary metadata still pass."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from PIL import Image

from bot.app.fetch import FetchPolicy, FetchRefused, attachment_image, decode_image
from generation.canvas import read_mask
from generation.picture_formats import MAX_GIF_SUB_BLOCKS, MAX_METADATA_BYTES, MAX_SMALL_CHUNKS
from tests.bot.test_fetch import Attached, body, local, serve

PNG_LIMIT = f"more than {MAX_SMALL_CHUNKS:,} PNG chunks; at most that many are read"


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


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(extra_before: bytes = b"", extra_after: bytes = b"", side: int = 8) -> bytes:
    """A black greyscale `side`x`side` PNG with chunks added before and after its image data."""
    raw = (b"\x00" + b"\x00" * side) * side
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + extra_before
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + extra_after
        + chunk(b"IEND", b"")
    )


def gif(extensions: bytes) -> bytes:
    """An 8x8 two-colour GIF with `extensions` before its one image."""
    buffer = io.BytesIO()
    Image.new("P", (8, 8), 1).save(buffer, "GIF")
    data = buffer.getvalue()
    image_start = data.index(b"\x2c")  # no extensions in Pillow's output of a still image
    return data[:image_start] + extensions + data[image_start:]


def comment(text: bytes) -> bytes:
    return b"\x21\xfe" + bytes([len(text)]) + text + b"\x00"


def refused(data: bytes) -> str:
    with pytest.raises(FetchRefused) as caught:
        decode_image(data, "x", FetchPolicy())
    return caught.value.reason


def mask_refused(data: bytes) -> str:
    with pytest.raises(ValueError) as caught:
        read_mask(data, "mask.png")
    return str(caught.value)


def test_many_small_png_chunks_are_refused_on_every_path(plugins_opened: list[str]) -> None:
    # The reproduction: 800,000 empty private chunks before an 8x8 image (9.6 MB).
    hostile = png(extra_before=chunk(b"prIv", b"") * 800_000)
    assert refused(hostile) == f"the PNG file has {PNG_LIMIT}"
    assert mask_refused(hostile) == f"mask: mask.png has {PNG_LIMIT}"
    # 600,000 tEXt chunks, and the same after the image data (Pillow reads those too).
    assert refused(png(extra_before=chunk(b"tEXt", b"k\x00v") * 600_000)).endswith(PNG_LIMIT)
    assert refused(png(extra_after=chunk(b"tEXt", b"k\x00v") * 600_000)).endswith(PNG_LIMIT)
    # Empty image-data chunks are as many Python steps as empty private ones.
    idats = png(extra_before=chunk(b"IDAT", b"") * (MAX_SMALL_CHUNKS + 1))
    assert refused(idats).endswith(PNG_LIMIT)
    assert plugins_opened == []
    # At the limit (IHDR, the added chunks and the small IDAT are counted; IEND ends the walk)
    # it is read; one past it is refused.
    at_limit = png(extra_before=chunk(b"prIv", b"") * (MAX_SMALL_CHUNKS - 2))
    assert decode_image(at_limit, "x", FetchPolicy()).original_size == (8, 8)
    over = png(extra_before=chunk(b"prIv", b"") * (MAX_SMALL_CHUNKS - 1))
    assert refused(over).endswith(PNG_LIMIT)


def test_too_much_png_metadata_is_refused() -> None:
    megabytes = MAX_METADATA_BYTES // (1024 * 1024)
    reason = refused(png(extra_before=chunk(b"prIv", bytes(MAX_METADATA_BYTES + 1))))
    assert reason == (
        f"the PNG file carries more than {megabytes} MB of PNG metadata chunks; "
        "at most that much is read"
    )
    # An ICC-profile-sized chunk is ordinary.
    ordinary = png(extra_before=chunk(b"prIv", bytes(600_000)))
    assert decode_image(ordinary, "x", FetchPolicy()).original_size == (8, 8)


def test_real_pngs_with_many_large_image_chunks_or_frames_are_read() -> None:
    # libpng writes its image data in 8 KB chunks: a large photo has thousands. Here 1,200
    # chunks of 1 KB of incompressible noise.
    side = 1100
    raw = b"".join(b"\x00" + os.urandom(side) for _ in range(side))
    stream = zlib.compress(raw, 0)
    pieces = [stream[i : i + 1024] for i in range(0, len(stream), 1024)]
    assert len(pieces) > MAX_SMALL_CHUNKS
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
        + b"".join(chunk(b"IDAT", piece) for piece in pieces)
        + chunk(b"IEND", b"")
    )
    assert decode_image(data, "x", FetchPolicy()).original_size == (side, side)
    # An animated PNG of 700 frames (1,400 chunks after the first frame, which Pillow never
    # reads to open or decode the first).
    frames = [Image.new("L", (8, 8), i % 256) for i in range(700)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], duration=10)
    animated = buffer.getvalue()
    assert animated.count(b"fdAT") + animated.count(b"fcTL") > MAX_SMALL_CHUNKS
    assert decode_image(animated, "x", FetchPolicy()).format == "PNG"


def test_gifs_with_many_extension_blocks_are_refused(plugins_opened: list[str]) -> None:
    limit = f"more than {MAX_GIF_SUB_BLOCKS:,} GIF extension blocks before its image"
    many = gif(comment(b"hi") * 100_000)
    assert refused(many) == f"the GIF file has {limit}; at most that many are read"
    assert mask_refused(many).startswith(f"mask: mask.png has {limit}")
    # Empty extensions (no sub-blocks) are counted too.
    assert limit in refused(gif(b"\x21\xfe\x00" * 100_000))
    # One comment extension split into 1-byte sub-blocks.
    split = b"\x21\xfe" + b"\x01x" * (MAX_GIF_SUB_BLOCKS + 1) + b"\x00"
    assert limit in refused(gif(split))
    assert plugins_opened == []
    # A GIF with ordinary comments is read.
    assert decode_image(gif(comment(b"made by hand") * 3), "x", FetchPolicy()).format == "GIF"


async def test_an_attachment_of_many_chunks_is_refused_by_name() -> None:
    hostile = png(extra_before=chunk(b"prIv", b"") * 50_000)
    async with serve({"/cdn/cat.png": body(hostile)}) as server:
        with pytest.raises(FetchRefused) as caught:
            await attachment_image(
                Attached(server.url("/cdn/cat.png"), "cat.png", len(hostile)), local()
            )
    assert caught.value.reason == f"cat.png: the PNG file has {PNG_LIMIT}"
