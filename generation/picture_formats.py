"""Which picture formats a member's file may be, told from its first bytes.

Pillow reads dozens of formats, and `Image.open` without `formats=` tries each plugin's parser
on whatever it is given: EPS runs Ghostscript, and TIFF, DDS, SGI, ICO, PSD … are parsers few
people ever feed hostile files. A member's picture (an image prompt, a reference, a ControlNet
map, a Vary (Region) mask) is opened only as PNG, JPEG, WebP or GIF, each by its own plugin,
chosen by the magic number. Anything else is refused by name when its magic number is known
("it is TIFF"), so the member knows what to convert. A PNG or GIF is walked first, chunk by
chunk, and refused when it has more chunks, extension blocks or metadata than a real picture
(Pillow reads each in Python, holding the GIL). Pure: Pillow only, no I/O.
"""

from __future__ import annotations

import io

from PIL import Image

# Pillow's names of the formats taken, in the order messages list them.
MEMBER_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
TAKEN = "PNG, JPEG, WebP or GIF"

_TAKEN_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)

# Formats that are refused, by their magic numbers, so the refusal can name them.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "BigTIFF"),
    (b"MM\x00+", "BigTIFF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"DDS ", "DDS"),
    (b"\x01\xda", "SGI"),
    (b"icns", "ICNS"),
    (b"BM", "BMP"),
    (b"8BPS", "PSD"),
    (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"SIMPLE  =", "FITS"),
    (b"\x89HDF", "HDF5"),
    (b"BLP1", "BLP"),
    (b"BLP2", "BLP"),
    (b"\xd7\xcd\xc6\x9a", "WMF"),
    (b"gimp xcf", "XCF"),
    (b"#define", "XBM"),
    (b"/* XPM */", "XPM"),
    (b"<svg", "SVG"),
    (b"<?xml", "SVG"),
    (b"Image type:", "IM"),
    (b"DanM", "MSP"),
    (b"LinS", "MSP"),
    (b"\x0a\x05", "PCX"),
    (b"\x0a\x02", "PCX"),
    (b"\x0a\x03", "PCX"),
    (b"\x0a\x00", "PCX"),
)


class PictureFormatError(ValueError):
    """A member's file that is not a picture of a format taken; the message names what it is
    when that is known."""


def sniff(data: bytes) -> str | None:
    """The taken format the bytes really are (PNG, JPEG, WEBP, GIF), or None."""
    for magic, name in _TAKEN_SIGNATURES:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def other_format(data: bytes) -> str | None:
    """The name of a format that is not taken, when its magic number says so, else None."""
    for magic, name in _OTHER_SIGNATURES:
        if data.startswith(magic):
            return name
    # ICO and CUR: a zero, the type (1 or 2) and a count of at least one image (a TGA can
    # start like a CUR, with no count).
    if (
        data[:2] == b"\x00\x00"
        and data[2:4] in (b"\x01\x00", b"\x02\x00")
        and data[4:6]
        not in (
            b"",
            b"\x00\x00",
        )
    ):
        return "ICO" if data[2] == 1 else "CUR"
    if data.endswith(b"TRUEVISION-XFILE.\x00"):
        return "TGA"
    if len(data) >= 12 and data[4:8] == b"ftyp":
        brand = data[8:12]
        return "AVIF" if brand in (b"avif", b"avis") else "HEIC"
    if len(data) >= 2 and data[:1] == b"P" and data[1:2] in b"1234567":
        return "PPM"
    return None


def refusal(data: bytes, label: str) -> str:
    """Why `data` is refused, naming `label` (the file as the member knows it) and its format."""
    found = other_format(data)
    if found is not None:
        return f"{label} is not a picture the bot takes: it is {found}; only {TAKEN} are taken"
    return f"{label} is not a picture ({TAKEN} are taken)"


class PictureStructureError(PictureFormatError):
    """A picture of a taken format built to be slow to read (tens of thousands of chunks or
    blocks around a tiny image). `reason` says what, without the file's name."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(f"{label} {reason}")
        self.reason = reason


# Pillow reads every PNG chunk and every GIF extension sub-block in Python, holding the GIL:
# 800,000 empty chunks before an 8x8 image cost seconds of a stalled event loop. Real pictures
# have a handful of chunks (libpng's 8 KB image-data chunks count only when small), and
# metadata (ICC profile, XMP, text) of kilobytes, rarely a few hundred.
MAX_SMALL_CHUNKS = 1_000
MAX_METADATA_BYTES = 2 * 1024 * 1024
# An image-data chunk at least this large is real work for zlib, not Python overhead.
_LARGE_DATA_CHUNK_BYTES = 1024
# GIF: sub-blocks of the extensions before the first image (XMP written the Adobe way reads
# as one sub-block per ~100 bytes plus a 258-byte trailer).
MAX_GIF_SUB_BLOCKS = 4_096
_PNG_IMAGE_DATA = frozenset({b"IDAT", b"fdAT"})


def check_structure(data: bytes, kind: str, label: str) -> None:
    """PictureStructureError when a PNG or GIF has more chunks, blocks or metadata than a real
    picture would, counted over what Pillow reads to open and decode its first frame. Stops
    counting at the first limit passed, so a hostile file costs at most that many steps."""
    if kind == "PNG":
        _check_png(data, label)
    elif kind == "GIF":
        _check_gif(data, label)


def _check_png(data: bytes, label: str) -> None:
    small = 0
    metadata = 0
    seen_image = False
    position = 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if kind == b"IEND" or (seen_image and kind == b"fcTL"):
            # Pillow stops at the end, or at the second frame of an animated PNG.
            return
        if kind in _PNG_IMAGE_DATA:
            seen_image = True
            if length < _LARGE_DATA_CHUNK_BYTES:
                small += 1
        else:
            small += 1
            metadata += length
        if small > MAX_SMALL_CHUNKS:
            raise PictureStructureError(
                label, f"has more than {MAX_SMALL_CHUNKS:,} PNG chunks; at most that many are read"
            )
        if metadata > MAX_METADATA_BYTES:
            raise PictureStructureError(
                label,
                f"carries more than {MAX_METADATA_BYTES // (1024 * 1024)} MB of PNG metadata "
                "chunks; at most that much is read",
            )
        position += 12 + length


def _check_gif(data: bytes, label: str) -> None:
    if len(data) < 13:
        return
    position = 13
    flags = data[10]
    if flags & 0x80:
        position += 3 * (2 << (flags & 0x07))
    blocks = 0
    metadata = 0
    while position < len(data) and data[position] == 0x21:
        # An extension: introducer, label, then sub-blocks up to an empty one. Anything else
        # (the first image, the trailer, damage) ends what Pillow reads before the first frame.
        position += 2
        size = -1
        while size != 0 and position < len(data):
            size = data[position]
            position += 1 + size
            # An empty extension is still a step for Pillow, so its terminator counts once.
            blocks += 1
            metadata += size
            if blocks > MAX_GIF_SUB_BLOCKS:
                raise PictureStructureError(
                    label,
                    f"has more than {MAX_GIF_SUB_BLOCKS:,} GIF extension blocks before its "
                    "image; at most that many are read",
                )
            if metadata > MAX_METADATA_BYTES:
                raise PictureStructureError(
                    label,
                    f"carries more than {MAX_METADATA_BYTES // (1024 * 1024)} MB of GIF "
                    "extension data; at most that much is read",
                )


def open_member_picture(data: bytes, label: str) -> Image.Image:
    """`data` opened (not yet decoded) by the plugin of the taken format its first bytes name,
    once its structure is checked (`check_structure`); PictureFormatError otherwise. The caller
    closes it (`with`)."""
    kind = sniff(data)
    if kind is None:
        raise PictureFormatError(refusal(data, label))
    check_structure(data, kind, label)
    return Image.open(io.BytesIO(data), formats=[kind])
