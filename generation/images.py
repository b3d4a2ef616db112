"""Grids, PNG metadata in AUTOMATIC1111's format, and encoding under an upload size limit.

The `parameters` text chunk is what AUTOMATIC1111's "PNG Info" tab (and ComfyUI, InvokeAI,
Civitai …) read, so a user can drop any image the bot made into another tool and reproduce it:

    a lighthouse at dusk
    Negative prompt: blurry
    Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 512x768, Model: sd15

Values that contain a comma, colon or newline are JSON-quoted, as AUTOMATIC1111 does.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from generation.contract import GenerationRequest, InputRole, JobKind
from generation.lora import a1111_lora_tags

log = logging.getLogger(__name__)

PARAMETERS_KEY = "parameters"
# EXIF UserComment, where AUTOMATIC1111 keeps the same text in JPEG and WebP files.
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286

# AUTOMATIC1111's own pattern for one `Key: value` pair of the last line.
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


def grid_shape(count: int) -> tuple[int, int]:
    """(columns, rows): 1 -> 1x1, 2 -> 2x1, 3 and 4 -> 2x2, larger counts as square as fits."""
    if count < 1:
        raise ValueError(f"images: need at least one image, got {count}")
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    return columns, rows


def make_grid(
    images: Sequence[Image.Image], background: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """Images left to right, top to bottom, each cell the images' own size, no gaps.

    Four images make Midjourney's 2x2 grid; a 3:2 image stays 3:2 in its cell, so the grid of
    four is 3:2 too. Empty cells (3 images) are filled with `background`.
    """
    columns, rows = grid_shape(len(images))
    width, height = images[0].size
    for index, image in enumerate(images):
        if image.size != (width, height):
            raise ValueError(
                f"images: all must have one size, image 0 is {width}x{height} "
                f"but image {index} is {image.size[0]}x{image.size[1]}"
            )
    grid = Image.new("RGB", (columns * width, rows * height), background)
    for index, image in enumerate(images):
        column, row = index % columns, index // columns
        grid.paste(image.convert("RGB"), (column * width, row * height))
    return grid


def _quote(value: object) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def a1111_parameters(
    request: GenerationRequest,
    seed: int,
    model_name: str,
    width: int | None = None,
    height: int | None = None,
    strength: float | None = None,
) -> str:
    """The `parameters` text for one image of `request` made with `seed`.

    `width`/`height` default to the request's size; pass the image's real size when it differs.
    `strength`: the denoising strength the job really ran at (`GenerationResult.
    denoising_strength`), which an edit's request does not hold (it says 1.0); None: the
    request's, for jobs that take a picture.
    """
    lines = [request.prompt.strip()]
    if request.loras:
        # A1111 keeps LoRAs in the prompt itself, where its PNG Info reads them back.
        lines[0] = f"{lines[0]} {a1111_lora_tags(request.loras)}".strip()
    if request.negative_prompt.strip():
        lines.append(f"Negative prompt: {request.negative_prompt.strip()}")
    fields: list[tuple[str, object]] = [
        ("Steps", request.steps),
        ("Sampler", request.sampler.a1111_name),
        ("CFG scale", f"{request.guidance:g}"),
        ("Seed", seed),
        ("Size", f"{width or request.width}x{height or request.height}"),
        ("Model", model_name),
    ]
    if strength is None and request.kind is not JobKind.IMAGINE:
        strength = request.strength
    if strength is not None:
        fields.append(("Denoising strength", f"{strength:g}"))
    if request.tile:
        fields.append(("Tiling", "True"))
    fields.extend(edit_fields(request))
    if request.controlnet is not None:
        # The shape of the A1111 ControlNet extension's own entry.
        control = f"Model: {request.controlnet}, Weight: {request.controlnet_weight:g}"
        fields.append(("ControlNet 0", control))
    fields.extend(input_fields(request))
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
    return "\n".join(lines)


_INPUT_LABELS = {
    InputRole.IMAGE_PROMPT: "Image prompt",
    InputRole.STYLE: "Style reference",
    InputRole.OBJECT: "Object reference",
    InputRole.MASK: "Mask",
    InputRole.CONTROL: "Control image",
}


def input_fields(request: GenerationRequest) -> list[tuple[str, object]]:
    """Every picture the member gave the job, numbered per role: its weight, the sha256 of
    the fetched bytes and where it came from (a link or `attachment:<name>`)."""
    fields: list[tuple[str, object]] = []
    counts: dict[InputRole, int] = {}
    for picture in request.inputs:
        counts[picture.role] = counts.get(picture.role, 0) + 1
        label = f"{_INPUT_LABELS[picture.role]} {counts[picture.role]}"
        value = f"Weight: {picture.weight:g}, Hash: {picture.sha256 or '-'}, "
        fields.append((label, value + f"Source: {picture.source or '-'}"))
    return fields


def edit_fields(request: GenerationRequest) -> list[tuple[str, object]]:
    """What a post-grid edit did to its source, for the metadata (none for other kinds)."""
    kind = request.kind
    if kind is JobKind.ZOOM:
        return [("Zoom out", f"{request.zoom_factor:g}")]
    if kind is JobKind.PAN and request.pan_direction is not None:
        return [("Pan", request.pan_direction.value)]
    if kind is JobKind.SQUARE:
        return [("Outpaint", "square")]
    if kind is JobKind.REGION:
        masks = request.inputs_for(InputRole.MASK)
        if masks:
            mask = masks[0]
            shown = mask.source or "uploaded mask"
            return [("Vary region", f"mask {shown}"), ("Mask hash", mask.sha256[:12] or "-")]
        return [("Vary region", " + ".join(r.value for r in request.regions))]
    if kind is JobKind.UPSCALE:
        return [("Upscale", request.upscale_mode.value)]
    return []


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Read `parameters` text back: `Prompt`, `Negative prompt` and each `Key: value` pair.

    Mirrors AUTOMATIC1111's reader: the last line holds the pairs when it has at least three;
    `Size` also yields `Size-1` and `Size-2` (width, height), as that reader does.
    """
    lines = text.strip().split("\n")
    result: dict[str, str] = {}
    last = lines[-1] if lines else ""
    pairs = _PARAM_RE.findall(last)
    if len(pairs) >= 3:
        lines = lines[:-1]
    else:
        pairs = []
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    result["Prompt"] = "\n".join(prompt_lines).strip()
    result["Negative prompt"] = "\n".join(negative_lines).strip()
    for key, value in pairs:
        key, value = key.strip(), _unquote(value.strip())
        result[key] = value
        size = _SIZE_RE.match(value)
        if key == "Size" and size:
            result["Size-1"], result["Size-2"] = size.group(1), size.group(2)
    return result


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """PNG-encode `image`, with `parameters` in a text chunk when given."""
    info = None
    if parameters is not None:
        info = PngInfo()
        # Pillow writes tEXt for Latin-1 text and switches to iTXt (UTF-8) otherwise.
        info.add_text(PARAMETERS_KEY, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    path = Path(path)
    path.write_bytes(png_bytes(image, parameters))
    return path


def read_parameters(source: str | Path | bytes | Image.Image) -> str | None:
    """The `parameters` text of a PNG, or the EXIF UserComment of a JPEG/WebP; None if absent."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, bytes):
        image = Image.open(io.BytesIO(source))
    else:
        image = Image.open(source)
    text = image.info.get(PARAMETERS_KEY)
    if text is not None:
        return str(text)
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if isinstance(comment, bytes) and comment.startswith(b"UNICODE\0"):
        return comment[8:].decode("utf-16-be", errors="replace")
    if isinstance(comment, bytes) and comment.startswith(b"ASCII\0\0\0"):
        return comment[8:].decode("ascii", errors="replace")
    if isinstance(comment, str):
        return comment
    return None


def _exif_with_comment(parameters: str | None) -> Image.Exif | None:
    if parameters is None:
        return None
    exif = Image.Exif()
    # The encoding prefix and UTF-16BE body are what AUTOMATIC1111 (via piexif) writes and reads.
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    return exif


_LOSSY_QUALITIES = (95, 90, 80, 70, 60, 50, 40)


def encode_for_upload(
    image: Image.Image,
    limit_bytes: int,
    parameters: str | None = None,
    stem: str = "image",
) -> tuple[bytes, str]:
    """Bytes and a file name that fit in `limit_bytes` (Discord refuses larger uploads).

    Lossless PNG when it fits; else WebP, then JPEG, at decreasing quality; if even the lowest
    quality is too big, the image is scaled down by 3/4 and the ladder repeats. Metadata goes in
    the PNG text chunk or the EXIF UserComment.
    """
    if limit_bytes < 1024:
        raise ValueError(f"limit_bytes: must be at least 1024, got {limit_bytes}")
    data = png_bytes(image, parameters)
    if len(data) <= limit_bytes:
        return data, f"{stem}.png"
    rgb = image.convert("RGB")
    exif = _exif_with_comment(parameters)
    while True:
        for fmt, extension in (("WEBP", "webp"), ("JPEG", "jpg")):
            for quality in _LOSSY_QUALITIES:
                buffer = io.BytesIO()
                options: dict[str, Any] = {"format": fmt, "quality": quality}
                if exif is not None:
                    options["exif"] = exif
                rgb.save(buffer, **options)
                if buffer.tell() <= limit_bytes:
                    log.debug(
                        "encoded %dx%d as %s q%d: %d bytes", *rgb.size, fmt, quality, buffer.tell()
                    )
                    return buffer.getvalue(), f"{stem}.{extension}"
        if min(rgb.size) <= 16:
            raise ValueError(f"limit_bytes: {limit_bytes} is too small for any encoding")
        rgb = rgb.resize(
            (max(16, rgb.width * 3 // 4), max(16, rgb.height * 3 // 4)), Image.Resampling.LANCZOS
        )
