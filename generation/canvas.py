"""Where an edit paints: canvas sizes for Zoom Out, Pan and Make Square, where the source image
sits on the canvas, and the masks (white = repaint) of Vary (Region)'s presets and of a mask a
member uploads.

Pure geometry on PIL images, no torch: the app checks a member's input with these before
anything is queued or charged, and the worker derives the same canvas from the stored request.
Refusals are ValueErrors naming the parameter (`direction`, `mask`, `regions`, `image`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from generation.contract import MAX_PIXELS, PanDirection, Region
from generation.picture_formats import PictureFormatError, open_member_picture

# Canvas sides are multiples of this (the VAE works on 8x8 pixel cells).
SIDE_STEP = 8
# A mask upload larger than this is refused before it is decoded.
MAX_MASK_PIXELS = 4 * MAX_PIXELS
# Pixels darker than this are black, brighter than 255 - this are white; antialiased edges
# may be grey, but a mask that is mostly grey (a photo, a colour drawing) is no mask.
_MASK_SLACK = 48
_MAX_GREY_SHARE = 0.05

Box = tuple[int, int, int, int]  # left, top, width, height


def _round_side(value: float) -> int:
    return max(SIDE_STEP, round(value / SIDE_STEP) * SIDE_STEP)


def pan_canvas(size: tuple[int, int], direction: PanDirection, max_pixels: int) -> tuple[int, int]:
    """The canvas after panning: the side facing `direction` grows by half."""
    width, height = size
    if direction in (PanDirection.LEFT, PanDirection.RIGHT):
        new = (width + _round_side(width / 2), height)
    else:
        new = (width, height + _round_side(height / 2))
    pixels = new[0] * new[1]
    if pixels > min(max_pixels, MAX_PIXELS):
        raise ValueError(
            f"direction: panning {direction.value} would make the image {new[0]}x{new[1]} "
            f"({pixels} pixels), over this server's limit of {min(max_pixels, MAX_PIXELS)}"
        )
    return new


def square_canvas(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """A square canvas as wide as the image's long side, smaller if the pixel budget says so."""
    width, height = size
    if width == height:
        raise ValueError(f"image: it is already square ({width}x{height})")
    side = max(width, height)
    budget = min(max_pixels, MAX_PIXELS)
    if side * side > budget:
        side = math.isqrt(budget) // SIDE_STEP * SIDE_STEP
    return side, side


def placement(
    source: tuple[int, int],
    canvas: tuple[int, int],
    *,
    zoom_factor: float = 1.0,
    pan_direction: PanDirection | None = None,
) -> Box:
    """Where the source goes on the canvas: scaled to fit, then shrunk by `zoom_factor`; in the
    middle, or against the edge opposite `pan_direction` (the new strip is on that side).

    A source that already fits exactly (a pan, a same-size region edit) keeps scale 1, so its
    pixels are kept exactly.
    """
    width, height = canvas
    scale = min(width / source[0], height / source[1]) / zoom_factor
    box_w = min(width, max(1, round(source[0] * scale)))
    box_h = min(height, max(1, round(source[1] * scale)))
    left, top = (width - box_w) // 2, (height - box_h) // 2
    if pan_direction is PanDirection.LEFT:
        left = width - box_w
    elif pan_direction is PanDirection.RIGHT:
        left = 0
    elif pan_direction is PanDirection.UP:
        top = height - box_h
    elif pan_direction is PanDirection.DOWN:
        top = 0
    return left, top, box_w, box_h


def place(source: Image.Image, box: Box) -> Image.Image:
    """The source at the box's size (Lanczos when it must be resized), as kept on the canvas."""
    size = (box[2], box[3])
    source = source.convert("RGB")
    return source if source.size == size else source.resize(size, Image.Resampling.LANCZOS)


def outpaint_mask(canvas: tuple[int, int], box: Box) -> Image.Image:
    """White everywhere on the canvas except the box the source sits in."""
    mask = Image.new("L", canvas, 255)
    mask.paste(0, (box[0], box[1], box[0] + box[2], box[1] + box[3]))
    return mask


def region_box(region: Region, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a preset region on an image of `size`."""
    width, height = size
    if region is Region.LEFT:
        return 0, 0, width // 2, height
    if region is Region.RIGHT:
        return width // 2, 0, width, height
    if region is Region.TOP:
        return 0, 0, width, height // 2
    if region is Region.BOTTOM:
        return 0, height // 2, width, height
    if region is Region.CENTRE:
        return width // 4, height // 4, width - width // 4, height - height // 4
    row_name, column_name = region.value.split("_")
    row = ("top", "middle", "bottom").index(row_name)
    column = ("left", "centre", "right").index(column_name)
    return (
        column * width // 3,
        row * height // 3,
        (column + 1) * width // 3,
        (row + 1) * height // 3,
    )


def region_mask(regions: Iterable[Region], size: tuple[int, int]) -> Image.Image:
    """The union of preset regions, white on black ("L"); refuses none, or the whole image."""
    chosen = [Region(r) for r in regions]
    if not chosen:
        raise ValueError("regions: choose at least one region, or attach a mask")
    mask = Image.new("L", size, 0)
    for region in chosen:
        mask.paste(255, region_box(region, size))
    if mask.getextrema() == (255, 255):
        names = ", ".join(r.label for r in chosen)
        raise ValueError(
            f"regions: {names} together cover the whole image; use Vary (Strong) to change "
            "all of it"
        )
    return mask


def read_mask(data: bytes, name: str = "") -> Image.Image:
    """Decode an uploaded mask (`name`: how the member knows the file), refusing what is not an
    image, and a huge one from its header, before it is decoded."""
    label = name or "it"
    try:
        # Only the plugin of a format taken from members ever sees the bytes (an EPS would
        # run Ghostscript).
        with open_member_picture(data, label) as probe:
            width, height = probe.size
            if width * height > MAX_MASK_PIXELS:
                side = math.isqrt(MAX_MASK_PIXELS)
                raise ValueError(f"mask: {label} is {width}x{height}; at most {side}x{side} pixels")
            probe.load()
            return probe.copy()
    except Image.DecompressionBombError:
        raise ValueError(f"mask: {label} is far too large to be a mask") from None
    except PictureFormatError as exc:
        raise ValueError(f"mask: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as exc:
        raise ValueError(f"mask: {label} is not a picture that can be read (damaged?)") from exc


def check_mask(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An uploaded mask made ready for an image of `size`: binary "L", white = repaint.

    A mask of the image's shape at another size is resized; another shape, a picture that is
    not black and white, and a mask that is all black (nothing to change) or all white
    (everything) are refused.
    """
    width, height = image.size
    if width * height > MAX_MASK_PIXELS:
        raise ValueError(f"mask: {width}x{height} is too large; at most {MAX_MASK_PIXELS} pixels")
    if abs(width / height - size[0] / size[1]) > 0.01 * size[0] / size[1]:
        raise ValueError(
            f"mask: it is {width}x{height}, not the shape of the image ({size[0]}x{size[1]}); "
            "draw it over the image at its own size"
        )
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent areas are "not painted": black.
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    grey = np.asarray(image.convert("L"), dtype=np.uint8)
    colour = np.asarray(image.convert("RGB"), dtype=np.int16)
    saturated = (colour.max(axis=2) - colour.min(axis=2)) > _MASK_SLACK
    mid = (grey > _MASK_SLACK) & (grey < 255 - _MASK_SLACK)
    share = float((mid | saturated).mean())
    if share > _MAX_GREY_SHARE:
        raise ValueError(
            f"mask: must be black and white (white = the part to change); {share:.0%} of its "
            "pixels are grey or coloured"
        )
    binary = Image.fromarray(np.where(grey >= 128, 255, 0).astype(np.uint8))
    if binary.size != tuple(size):
        binary = binary.resize(size, Image.Resampling.NEAREST)
    low, high = binary.getextrema()
    if high == 0:
        raise ValueError(
            "mask: it is all black, so nothing would change; paint white where "
            "the image should change"
        )
    if low == 255:
        raise ValueError(
            "mask: it is all white, which repaints the whole image; use Vary (Strong) for that"
        )
    return binary
