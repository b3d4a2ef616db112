"""The requests made from another job's result (variations, upscales, Zoom Out, Pan, Make
Square, Vary (Region)) and a /describe's, each validated as it is built.

Edits: `image` is the source as the member sees it (a grid cell, or an upscale brought back to
its generation size); the request's width/height are the canvas painted on. The worker gets the
parent's stored image and places it on the canvas with generation.canvas, so the geometry is
always derived from the request, never stored twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from PIL import Image

from generation.canvas import check_mask, pan_canvas, placement, region_mask, square_canvas
from generation.contract import (
    MAX_ZOOM,
    GenerationRequest,
    InputImage,
    InputRole,
    JobKind,
    PanDirection,
    Region,
    UpscaleMode,
)


def describe_request(
    image_input: InputImage, *, seed: int, model: str = "tiny", **changes: Any
) -> GenerationRequest:
    """A DESCRIBE of one picture: four prompt suggestions (generation.describe).

    `seed` decides which well-matching phrases are picked, so a new seed (the 🔄 button) gives
    other suggestions for the same picture. The picture is an IMAGE_PROMPT input.
    """
    if image_input.role is not InputRole.IMAGE_PROMPT:
        raise ValueError(f"inputs: a describe reads an image_prompt, got {image_input.role.value}")
    values: dict[str, Any] = {
        "kind": JobKind.DESCRIBE,
        "prompt": "",
        "seed": seed,
        "model": model,
        "inputs": (image_input,),
        "num_candidates": 1,
        "num_kept": 1,
    }
    values.update(changes)
    return GenerationRequest(**values)


def shorten_request(prompt: str, *, model: str = "tiny", **changes: Any) -> GenerationRequest:
    """A SHORTEN of a prompt as the member typed it (its flags are kept in the shorter prompts,
    generation.shorten): one CLIP text pass, no image."""
    values: dict[str, Any] = {
        "kind": JobKind.SHORTEN,
        "prompt": prompt,
        "model": model,
        "num_candidates": 1,
        "num_kept": 1,
    }
    values.update(changes)
    return GenerationRequest(**values)


def variation_request(
    parent: GenerationRequest, image: Image.Image, *, strength: float, seed: int
) -> GenerationRequest:
    """A VARIATION of `image` (one of `parent`'s results): same prompt, new seeds, same size.

    Subtle and strong variations differ only in `strength` (see EngineSettings).
    """
    return replace(
        parent,
        kind=JobKind.VARIATION,
        init_image=image,
        strength=strength,
        seed=seed,
        width=image.width,
        height=image.height,
        upscale_mode=UpscaleMode.SUBTLE,
        **_no_edit(parent),
    )


def upscale_request(
    parent: GenerationRequest,
    image: Image.Image,
    *,
    strength: float,
    seed: int,
    factor: int = 2,
    mode: UpscaleMode = UpscaleMode.SUBTLE,
) -> GenerationRequest:
    """An UPSCALE of `image`: the output is `factor` x its size (width/height are the output).

    One candidate is made and kept: an upscale refines a picture the user already chose.
    Subtle and creative upscales differ in `strength` (see EngineSettings) and in that only a
    subtle one goes through Real-ESRGAN first.
    """
    if factor < 1:
        raise ValueError(f"factor: must be at least 1, got {factor}")
    return replace(
        parent,
        kind=JobKind.UPSCALE,
        init_image=image,
        strength=strength,
        seed=seed,
        width=image.width * factor,
        height=image.height * factor,
        num_candidates=1,
        num_kept=1,
        chaos=0,
        stop_percent=100,
        upscale_mode=mode,
        **_no_edit(parent),
    )


def zoom_request(
    parent: GenerationRequest,
    image: Image.Image,
    *,
    factor: float,
    seed: int,
    size: tuple[int, int] | None = None,
    prompt: str | None = None,
) -> GenerationRequest:
    """Zoom Out: `image` shrunk by `factor` (1-2) into the middle of a canvas of `size` (default:
    the image's own size; another shape is Custom Zoom's `--ar`), the border painted."""
    if not 1.0 <= factor <= MAX_ZOOM:
        raise ValueError(f"factor: the zoom must be between 1 and {MAX_ZOOM:g}, got {factor:g}")
    width, height = size or image.size
    box = placement(image.size, (width, height), zoom_factor=factor)
    if box == (0, 0, width, height):
        raise ValueError(
            f"factor: zooming {factor:g}x at the same shape leaves nothing to paint; "
            "choose a larger factor or another --ar"
        )
    return _edit(parent, image, JobKind.ZOOM, seed, (width, height), prompt, zoom_factor=factor)


def pan_request(
    parent: GenerationRequest,
    image: Image.Image,
    *,
    direction: PanDirection,
    seed: int,
    max_pixels: int,
    prompt: str | None = None,
) -> GenerationRequest:
    """Pan: the canvas grows by half of the side facing `direction`, the old pixels stay where
    they are and the new strip is painted. ValueError (naming `direction`) past `max_pixels`."""
    size = pan_canvas(image.size, PanDirection(direction), max_pixels)
    return _edit(
        parent, image, JobKind.PAN, seed, size, prompt, pan_direction=PanDirection(direction)
    )


def square_request(
    parent: GenerationRequest, image: Image.Image, *, seed: int, max_pixels: int
) -> GenerationRequest:
    """Make Square: a non-square image outpainted to 1:1 along its short side."""
    return _edit(parent, image, JobKind.SQUARE, seed, square_canvas(image.size, max_pixels), None)


def region_request(
    parent: GenerationRequest,
    image: Image.Image,
    *,
    seed: int,
    regions: Iterable[Region] = frozenset(),
    mask: InputImage | None = None,
    prompt: str | None = None,
) -> GenerationRequest:
    """Vary (Region): only `regions` (presets) or the white of `mask` (a MASK input, checked
    against the image with generation.canvas.check_mask) is repainted."""
    chosen = tuple(r for r in Region if r in {Region(r) for r in regions})
    if chosen and mask is not None:
        raise ValueError("regions: give preset regions or a mask, not both")
    if not chosen and mask is None:
        raise ValueError("regions: choose at least one region, or attach a mask")
    inputs = tuple(i for i in parent.inputs if i.role is not InputRole.MASK)
    if mask is not None:
        if mask.role is not InputRole.MASK:
            raise ValueError(f"mask: must be an input of role mask, got {mask.role.value}")
        mask = replace(mask, image=check_mask(mask.image, image.size))
        inputs = (*inputs, mask)
    else:
        region_mask(chosen, image.size)  # refuses regions that cover the whole image
    return _edit(
        parent, image, JobKind.REGION, seed, image.size, prompt, regions=chosen, inputs=inputs
    )


def _no_edit(parent: GenerationRequest) -> dict[str, Any]:
    """What a parent's own edit must not pass on to the job made from its image."""
    return {
        "zoom_factor": 1.0,
        "pan_direction": None,
        "regions": (),
        "inputs": tuple(i for i in parent.inputs if i.role is not InputRole.MASK),
    }


def _edit(
    parent: GenerationRequest,
    image: Image.Image,
    kind: JobKind,
    seed: int,
    size: tuple[int, int],
    prompt: str | None,
    **changes: Any,
) -> GenerationRequest:
    values: dict[str, Any] = {
        **_no_edit(parent),
        "kind": kind,
        "init_image": image,
        "strength": 1.0,
        "seed": seed,
        "width": size[0],
        "height": size[1],
        "upscale_mode": UpscaleMode.SUBTLE,
        # Wrap-around padding would make the painted border continue the opposite edge.
        "tile": False,
        **changes,
    }
    if prompt is not None:
        values.update(prompt=prompt, prompt_parts=())
    # The parent's ControlNet stays behind: its map no longer lines up with the changed canvas,
    # and an inpainting UNet is not the one the ControlNet was trained beside.
    values.update(
        controlnet=None,
        controlnet_weight=1.0,
        inputs=tuple(i for i in values["inputs"] if i.role is not InputRole.CONTROL),
    )
    return replace(parent, **values)
