"""The one inpaint/outpaint routine behind Zoom Out, Pan, Make Square and Vary (Region).

Every edit is the same three moves on a canvas (the request's width x height):

1. `prepare`: the source goes where `generation.canvas.placement` says; a new area around it
   is pre-filled so the model has context (the source's edges stretched outwards, blurred, with
   seeded noise on top); the mask is white where the model paints.
2. The engine runs an inpainting pipeline inside the mask, on all candidates in one batch
   (`pipeline_kwargs`). A model with an `inpaint_source` gets that checkpoint's 9-channel UNet
   (`inpaint_pipeline`), sharing the text encoder and VAE, at full strength. Without one, the
   model's own 4-channel UNet paints by diffusers' masked latent blending
   (`AutoPipelineForInpainting.from_pipe`), from the pre-filled canvas noised to
   `edit_strength` (0.8) rather than from pure noise, so that the pre-fill conditions it.
3. `composite`: the painted pixels are pasted at full strength over the whole painted area,
   and the feather reaches `feather_px` pixels into the kept side: there the model's own
   repaint of the kept image (it paints the whole canvas, in the kept area from the kept
   image) fades into the kept pixels, so no line shows where the two meet. Every kept pixel
   farther than that from the painted area is the member's pixel exactly. (A feather inside
   the painted area would show the pre-fill, a blurred stretch of the source's edge, right
   beside the kept image: the model's painting would start only past it.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from generation.canvas import (
    check_mask,
    outpaint_mask,
    place,
    placement,
    region_mask,
)
from generation.contract import GenerationRequest, InputRole, JobKind
from generation.offload import offload_hook

__all__ = [
    "Canvas",
    "check_mask",
    "composite",
    "edit_strength",
    "inpaint_pipeline",
    "offload_unet",
    "pipeline_kwargs",
    "prepare",
    "region_mask",
    "seam_alpha",
]

# Noise on the pre-fill, in 0-255 steps: enough to give the model texture to work from.
PREFILL_NOISE = 12.0


@dataclass(frozen=True)
class Canvas:
    """What one edit paints on: the pre-filled canvas and the mask (white = paint)."""

    image: Image.Image
    mask: Image.Image
    # Where the source sits (left, top, width, height); the whole canvas for a region edit.
    box: tuple[int, int, int, int]
    feather_px: int


def prepare(request: GenerationRequest) -> Canvas:
    """The canvas of an edit request (its init_image is the parent's stored image)."""
    if not request.kind.is_edit:
        raise ValueError(f"kind: {request.kind.value} is not an edit")
    source = request.init_image
    if source is None:
        raise ValueError(f"init_image: a {request.kind.value} needs a source image")
    size = (request.width, request.height)
    box = placement(
        source.size,
        size,
        zoom_factor=request.zoom_factor,
        pan_direction=request.pan_direction,
    )
    kept = place(source, box)
    feather = seam_feather_px(size)
    if request.kind is JobKind.REGION:
        # The source fills the canvas; only the mask says what changes.
        return Canvas(kept, _region_mask(request, size), box, feather)
    mask = outpaint_mask(size, box)
    return Canvas(_prefill(kept, box, size, request.seed), mask, box, feather)


def _region_mask(request: GenerationRequest, size: tuple[int, int]) -> Image.Image:
    masks = request.inputs_for(InputRole.MASK)
    if masks:
        # Checked against the image the member saw; the canvas may be that image resized.
        return check_mask(masks[0].image, size)
    return region_mask(request.regions, size)


def _prefill(kept: Image.Image, box: tuple[int, int, int, int], size: tuple[int, int], seed: int):
    """The canvas with the source in its box and the new area filled from the source's edges.

    Each new pixel takes the colour of the nearest source pixel (the edges stretched out),
    blurred so no stripes survive, plus seeded noise; inside the box the source is untouched.
    """
    left, top, box_w, box_h = box
    source = np.asarray(kept, dtype=np.float32)
    columns = np.clip(np.arange(size[0]) - left, 0, box_w - 1)
    rows = np.clip(np.arange(size[1]) - top, 0, box_h - 1)
    stretched = Image.fromarray(source[rows][:, columns].astype(np.uint8))
    radius = max(2, min(size) // 16)
    blurred = np.asarray(stretched.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, PREFILL_NOISE, blurred.shape)
    filled = Image.fromarray(np.clip(blurred + noise, 0, 255).astype(np.uint8))
    filled.paste(kept, (left, top))
    return filled


def seam_feather_px(size: tuple[int, int]) -> int:
    """How far the seam's feather reaches into the kept side: a few pixels (2 at 256 px, 4 at
    512, 8 at 1024), enough to hide a one-pixel step between the VAE's repaint of the kept
    image and the kept pixels, little enough that the kept image stays the member's."""
    return max(2, min(size) // 128)


def seam_alpha(mask: Image.Image, feather_px: int) -> np.ndarray:
    """How much of the painted image each pixel takes (float32, 0..1): 1 on the whole painted
    area (white in `mask`), falling linearly to 0 over `feather_px` pixels into the kept side
    (chessboard distance), 0 beyond."""
    grown = mask.point(lambda v: 255 if v > 0 else 0)
    reached = (np.asarray(grown) > 0).astype(np.float32)
    for _ in range(feather_px):
        # Each 3x3 maximum grows the area by one pixel: after k passes it holds every pixel
        # within k of the mask, so the sum counts feather_px + 1 - distance.
        grown = grown.filter(ImageFilter.MaxFilter(3))
        reached += np.asarray(grown) > 0
    return reached / (feather_px + 1)


def composite(canvas: Canvas, painted: Image.Image) -> Image.Image:
    """`painted` over the canvas: all of it on the painted area, feathered into the kept side
    over `canvas.feather_px` pixels; the kept pixels beyond that stay exactly as they were."""
    painted = painted.convert("RGB")
    if painted.size != canvas.image.size:
        painted = painted.resize(canvas.image.size, Image.Resampling.LANCZOS)
    alpha = seam_alpha(canvas.mask, canvas.feather_px)[..., None]
    under = np.asarray(canvas.image.convert("RGB"), dtype=np.float32)
    over = np.asarray(painted, dtype=np.float32)
    blended = np.rint(over * alpha + under * (1.0 - alpha))
    return Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))


def edit_strength(unet_channels: int, configured: float, steps: int) -> float:
    """How strongly an edit repaints its new area.

    A 9-channel inpainting UNet sees the kept image and the mask beside its latents and paints
    from pure noise (1.0). The model's own 4-channel UNet sees only its latents: from pure
    noise it ignores the pre-fill and leaves an outline where the new area meets the kept one,
    so it starts from the pre-filled canvas noised to `configured` (`edit_strength`), at least
    one step's worth.
    """
    if unet_channels == 9 or int(steps * configured) < 1:
        return 1.0
    return configured


def pipeline_kwargs(canvas: Canvas, count: int, strength: float = 1.0) -> dict[str, Any]:
    """Inpainting pipeline arguments for `count` candidates (the list form, one per
    generator), but for the canvas picture, which the engine encodes once
    (generation.init_latents)."""
    return {
        "mask_image": [canvas.mask] * count,
        "width": canvas.image.width,
        "height": canvas.image.height,
        # The kept latents are blended back each step (4-channel UNet) or given to the UNet as
        # its masked-image input (9-channel).
        "strength": strength,
    }


def inpaint_pipeline(text2img: Any, unet: Any = None) -> Any:
    """An inpainting pipeline sharing `text2img`'s modules; `unet` replaces its UNet (a dedicated
    9-channel inpainting checkpoint's), else masked latent blending on the 4-channel one."""
    from diffusers import AutoPipelineForInpainting

    if unet is not None:
        channels = unet.config.in_channels
        if channels not in (4, 9):
            raise ValueError(f"inpaint_source: its UNet takes {channels} channels, not 4 or 9")
        pipe = AutoPipelineForInpainting.from_pipe(text2img, unet=unet)
    else:
        pipe = AutoPipelineForInpainting.from_pipe(text2img)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def offload_unet(unet: Any, text2img: Any, device: Any) -> Any:
    """Model CPU offload for an `inpaint_source` UNet beside a pipeline whose own modules are
    offloaded: the UNet moves to `device` when it runs, sending the text encoder that ran
    before it back to the CPU, as the pipeline's own UNet does. Returns the hook; its
    `offload()` puts the UNet back on the CPU after the edit (no pipeline chain does)."""
    # The last text encoder runs just before the UNet (SDXL has two).
    encoder = getattr(text2img, "text_encoder_2", None) or text2img.text_encoder
    return offload_hook(unet, device, after=encoder)
