"""Which picture formats a member's file may be, told from its first bytes.

Pillow reads dozens of formats, and `Image.open` without `formats=` tries each plugin's parser
on whatever it is given: EPS runs Ghostscript, and TIFF, DDS, SGI, ICO, PSD … are parsers few
people ever feed hostile files. A member's picture (an image prompt, a reference, a ControlNet
map, a Vary (Region) mask) is opened only as PNG, JPEG, WebP or GIF, each by its own plugin,
chosen by the magic number. Anything else is refused by name when its magic number is known
("it is TIFF"), so the member knows what to convert. Pure: Pillow only, no I/O.
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


def open_member_picture(data: bytes, label: str) -> Image.Image:
    """`data` opened (not yet decoded) by the plugin of the taken format its first bytes name;
    PictureFormatError otherwise. The caller closes it (`with`)."""
    kind = sniff(data)
    if kind is None:
        raise PictureFormatError(refusal(data, label))
    return Image.open(io.BytesIO(data), formats=[kind])
