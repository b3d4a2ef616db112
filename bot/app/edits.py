"""The requests behind the post-grid buttons and modals: Zoom Out, Custom Zoom, Pan, Make
Square, Vary (Region), Upscale (Subtle/Creative), and Remix's edited prompt.

Pure functions over a parent job's request and image (no Discord, no database): the app loads
what they need, calls them, and turns their ValueErrors into private messages before anything
is queued or charged. The geometry itself is generation.canvas's.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from generation.canvas import check_mask, pan_canvas, read_mask, square_canvas
from generation.contract import (
    MAX_ZOOM,
    GenerationRequest,
    InputImage,
    InputRole,
    JobKind,
    LoraWeight,
    PanDirection,
    PromptPart,
    Region,
    Sampler,
    UpscaleMode,
)
from generation.draft import make_draft
from generation.prompt import (
    ImagineOptions,
    PromptDefaults,
    PromptError,
    control_link,
    parse_prompt,
    typed_flags,
)
from generation.references import WEIGHT_ROLES
from generation.requests import (
    pan_request,
    region_request,
    square_request,
    upscale_request,
    zoom_request,
)
from generation.settings import EngineSettings

# An upscale doubles each side; its source was made at half the size.
UPSCALE_FACTOR = 2


@dataclass(frozen=True)
class Remix:
    """A member's edited prompt for a press (Remix mode, Custom Zoom, Vary (Region))."""

    prompt: str
    prompt_parts: tuple[PromptPart, ...]
    negative_prompt: str
    # The canvas the prompt's --ar asks for; None when it keeps the image's shape.
    size: tuple[int, int] | None = None
    # The parent's LoRAs, or the ones the edited prompt's --lora names instead.
    loras: tuple[LoraWeight, ...] = ()
    # Set when the edited prompt names a ControlNet (`--cn NAME`, following the parent's
    # control picture); None keeps the parent's ControlNet as it was.
    controlnet: tuple[str, float, InputImage] | None = None
    # New weights for the kept pictures of a role (`--iw`, `--sw`, `--ow`/`--cw`): (role, flag
    # as typed, weight).
    weights: tuple[tuple[InputRole, str, float], ...] = ()
    # The parser's notes (flags ignored, mapped or moved), for the job's reply as /imagine's.
    notes: tuple[str, ...] = ()
    # `--draft` in the edited prompt: the draft's (steps, sampler), made a draft by `apply`.
    draft: tuple[int, Sampler] | None = None
    # `--fast`, `--relax` or `--turbo` in the edited prompt: the mode this one job runs in and
    # is charged by (None: the member's), as the flag does in /imagine.
    speed: str | None = None

    def apply(self, request: GenerationRequest) -> GenerationRequest:
        by_role = {role: weight for role, _, weight in self.weights}
        inputs = tuple(
            replace(i, weight=by_role[i.role]) if i.role in by_role else i for i in request.inputs
        )
        changes: dict[str, Any] = {"inputs": inputs}
        if self.controlnet is not None:
            name, weight, picture = self.controlnet
            others = tuple(i for i in inputs if i.role is not InputRole.CONTROL)
            changes.update(controlnet=name, controlnet_weight=weight, inputs=(*others, picture))
        remixed = request.with_changes(
            prompt=self.prompt,
            prompt_parts=self.prompt_parts,
            negative_prompt=self.negative_prompt or request.negative_prompt,
            loras=self.loras,
            **changes,
        )
        if self.draft is None:
            return remixed
        steps, sampler = self.draft
        return make_draft(remixed, steps=steps, sampler=sampler)


def parse_remix(
    text: str, parent: GenerationRequest, image_size: tuple[int, int], settings: EngineSettings
) -> Remix:
    """The edited prompt read like an /imagine prompt for the parent's model; ValueError naming
    the flag when it is not one. Without `--ar` the canvas keeps the image's shape.

    The parent's LoRAs and ControlNet (with its picture) are kept; `--lora` replaces the LoRAs,
    `--cn NAME [--cnw W]` follows the parent's control picture with that ControlNet (a remix
    has no way to take a new picture) and `--cnw W` alone reweighs the parent's ControlNet.
    The parent's pictures are kept too; `--iw`, `--sw`, `--ow`/`--cw` reweigh those of their
    role (a weight for pictures the parent has none of is noted as ignored, as in /imagine)."""
    ratio_w, ratio_h = _ratio(image_size)
    flags = typed_flags(text)
    controls = parent.inputs_for(InputRole.CONTROL)
    if "cnw" in flags and "cn" not in flags:
        if parent.controlnet is None:
            raise ValueError(
                "--cnw: the job this comes from follows no ControlNet, so there is no weight "
                "to change"
            )
        # Parsed as if the member had named the parent's ControlNet beside the new weight.
        text = f"{text} --cn {parent.controlnet}"
        flags = typed_flags(text)
    if "cn" in flags and (not controls or control_link(text) is not None):
        raise ValueError(
            "--cn: a remix can only follow the control picture of the job it comes from "
            f"({'this one has none' if not controls else 'not a new one'}); start a new "
            "/imagine with --cn and a control_image for another picture"
        )
    kept_loras = ", ".join(f"{lora.name}:{lora.weight:g}" for lora in parent.loras)
    options = ImagineOptions(
        lora=(kept_loras or None) if "lora" not in flags else None,
        control_image=controls[0] if "cn" in flags else None,
        kept=frozenset(i.role for i in parent.inputs if i.role in WEIGHT_ROLES.values()),
    )
    try:
        parsed = parse_prompt(
            text,
            settings,
            model=parent.model,
            options=options,
            seed_source=lambda: parent.seed,
            defaults=PromptDefaults(aspect=f"{ratio_w}:{ratio_h}"),
        )
    except PromptError as exc:
        raise ValueError(str(exc)) from None
    if parsed.image_refs:
        # The pictures would never be fetched: the remix would silently run without them (and
        # links alone would leave a blend's placeholder as the prompt).
        asked = parsed.image_refs[0].asked_by
        shown = "an image link" if asked == "prompt" else asked
        raise ValueError(
            f"{shown}: a remix keeps the pictures of the job it comes from and can't take new "
            "ones; start a new /imagine with them"
        )
    if parsed.personalize is not None:
        # Codes are looked up (and refused) only for /imagine; dropped here, --p would do
        # nothing and a code naming no profile would pass.
        raise ValueError(
            "--p: a remix keeps the ranking of the job it comes from (personalized or not); "
            "start a new /imagine with --p"
        )
    request = parsed.request
    size = (request.width, request.height)
    same_shape = abs(math.log(size[0] / size[1] * image_size[1] / image_size[0])) < math.log(1.05)
    controlnet = None
    if request.controlnet is not None:
        (picture,) = request.inputs_for(InputRole.CONTROL)
        controlnet = (request.controlnet, request.controlnet_weight, picture)
    return Remix(
        prompt=request.prompt,
        prompt_parts=request.prompt_parts,
        negative_prompt=request.negative_prompt,
        size=None if same_shape else size,
        loras=request.loras,
        controlnet=controlnet,
        weights=_one_weight_per_role(parsed.kept_weights),
        notes=parsed.notes,
        draft=(request.steps, request.sampler) if request.draft is not None else None,
        speed=parsed.speed,
    )


def _one_weight_per_role(
    weights: tuple[tuple[InputRole, str, float], ...],
) -> tuple[tuple[InputRole, str, float], ...]:
    """`--ow` and `--cw` both weigh object references (the role --oref and --cref pictures
    share): a stored job no longer says which flag brought each one, so two different weights
    for them have no single meaning in a remix."""
    chosen: dict[InputRole, tuple[InputRole, str, float]] = {}
    for role, typed, weight in weights:
        earlier = chosen.get(role)
        if earlier is not None and earlier[2] != weight:
            raise ValueError(
                f"{typed}: {earlier[1]} and {typed} both weigh the object and character "
                "references the remix keeps; give one weight"
            )
        chosen.setdefault(role, (role, typed, weight))
    return tuple(chosen.values())


def _ratio(size: tuple[int, int]) -> tuple[int, int]:
    divisor = math.gcd(*size)
    return size[0] // divisor, size[1] // divisor


def working_size(kind: JobKind, size: tuple[int, int]) -> tuple[int, int]:
    """The size an edit of an image works at: an upscale goes back to the size it was generated
    at (editing at 2x would cost four times as much), anything else stays."""
    if kind is JobKind.UPSCALE:
        return size[0] // UPSCALE_FACTOR, size[1] // UPSCALE_FACTOR
    return size


def working_image(parent: GenerationRequest, image: Image.Image) -> Image.Image:
    size = working_size(parent.kind, image.size)
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


def zoom_factor(value: float | str) -> float:
    """A Custom Zoom factor as typed in its form ("1.5", "1,5", "2x"), or ValueError naming
    `factor` (the form's field)."""
    text = str(value).strip()
    refusal = ValueError(f"factor: expected a number from 1.0 to {MAX_ZOOM:g}, got {text!r}")
    try:
        factor = float(text.lower().removesuffix("x").replace(",", ".").strip())
    except ValueError:
        raise refusal from None
    if not math.isfinite(factor) or not 1.0 <= factor <= MAX_ZOOM:
        raise refusal
    return factor


def for_grid(parent: GenerationRequest, settings: EngineSettings) -> GenerationRequest:
    """The parent's request made ready to produce a new grid (an upscale made one image)."""
    return parent.with_changes(num_candidates=settings.num_candidates, num_kept=settings.num_kept)


def _edit_base(
    parent: GenerationRequest, remix: Remix | None, edit: str, settings: EngineSettings
) -> GenerationRequest:
    """The request an edit starts from. An edit repaints without the job's pictures (they
    already shaped the image; generation.conditioning), so a weight for them would change
    nothing the member pays for: refused, naming the flag."""
    not_a_draft(parent, edit)
    if remix is None:
        return for_grid(parent, settings)
    if remix.draft is not None:
        raise ValueError(
            f"--draft: {edit} paints into a finished picture, and a draft-quality patch beside "
            "its full-quality pixels would show; leave --draft out (it works with 🔄 and the "
            "V buttons)"
        )
    if remix.weights:
        _, typed, _ = remix.weights[0]
        raise ValueError(
            f"{typed}: {edit} repaints without the job's pictures (they already shaped the "
            "image), so their weight would change nothing; remix a variation or a reroll to "
            "reweigh them"
        )
    return for_grid(remix.apply(parent), settings)


def not_a_draft(parent: GenerationRequest, what: str) -> None:
    """ValueError when `parent` is a draft: upscales and edits finish a picture, and a draft's
    is only good for choosing; Enhance renders it at full quality first."""
    if parent.draft is not None:
        raise ValueError(
            f"This image is a draft: press ✨ Enhance under it to render it at full quality, "
            f"then use {what} on that."
        )


def zoom(
    parent: GenerationRequest,
    image: Image.Image,
    *,
    factor: float,
    seed: int,
    settings: EngineSettings,
    remix: Remix | None = None,
) -> GenerationRequest:
    base = _edit_base(parent, remix, "a zoom", settings)
    size = remix.size if remix else None
    return zoom_request(base, working_image(parent, image), factor=factor, seed=seed, size=size)


def pan(
    parent: GenerationRequest,
    image: Image.Image,
    *,
    direction: PanDirection,
    seed: int,
    settings: EngineSettings,
    remix: Remix | None = None,
) -> GenerationRequest:
    base = _edit_base(parent, remix, "a pan", settings)
    return pan_request(
        base,
        working_image(parent, image),
        direction=direction,
        seed=seed,
        max_pixels=settings.max_pixels,
    )


def square(
    parent: GenerationRequest, image: Image.Image, *, seed: int, settings: EngineSettings
) -> GenerationRequest:
    not_a_draft(parent, "Make Square")
    return square_request(
        for_grid(parent, settings),
        working_image(parent, image),
        seed=seed,
        max_pixels=settings.max_pixels,
    )


def regions_from(values: Iterable[Region | str]) -> frozenset[Region]:
    """Select-menu values as regions; ValueError naming `regions` for an unknown one."""
    chosen = set()
    for value in values:
        try:
            chosen.add(Region(value))
        except ValueError:
            known = ", ".join(r.value for r in Region)
            raise ValueError(f"regions: unknown region {value!r}; known: {known}") from None
    return frozenset(chosen)


def mask_input(mask: Image.Image | bytes, name: str = "") -> InputImage:
    """An uploaded mask as the job's MASK input (bytes are decoded and checked as an image)."""
    if isinstance(mask, bytes | bytearray):
        data = bytes(mask)
        image = read_mask(data, name)
    else:
        image = mask
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return InputImage(
        role=InputRole.MASK,
        image=image,
        source=name or "uploaded mask",
        sha256=hashlib.sha256(data).hexdigest(),
    )


def region(
    parent: GenerationRequest,
    image: Image.Image,
    *,
    seed: int,
    settings: EngineSettings,
    regions: frozenset[Region] = frozenset(),
    mask: InputImage | None = None,
    remix: Remix | None = None,
) -> GenerationRequest:
    """Vary (Region). A mask is checked against the image the member saw (`image`), before it
    is brought to the working size with it."""
    base = _edit_base(parent, remix, "Vary (Region)", settings)
    if mask is not None:
        checked = check_mask(mask.image, image.size)
        size = working_size(parent.kind, image.size)
        mask = InputImage(
            role=InputRole.MASK,
            image=checked.resize(size, Image.Resampling.NEAREST),
            source=mask.source,
            sha256=mask.sha256,
        )
    return region_request(base, working_image(parent, image), seed=seed, regions=regions, mask=mask)


def upscale(
    parent: GenerationRequest,
    image: Image.Image,
    *,
    mode: UpscaleMode,
    seed: int,
    settings: EngineSettings,
) -> GenerationRequest:
    not_a_draft(parent, "an upscale")
    if image.width * image.height * UPSCALE_FACTOR**2 > settings.max_pixels:
        raise ValueError("image: it is already as large as this server allows")
    strength = (
        settings.upscale_strength_creative
        if mode is UpscaleMode.CREATIVE
        else settings.upscale_strength
    )
    return upscale_request(parent, image, strength=strength, seed=seed, mode=mode)


def can_pan(size: tuple[int, int], direction: PanDirection, settings: EngineSettings) -> bool:
    try:
        pan_canvas(size, direction, settings.max_pixels)
    except ValueError:
        return False
    return True


def can_make_square(size: tuple[int, int], settings: EngineSettings) -> bool:
    try:
        square_canvas(size, settings.max_pixels)
    except ValueError:
        return False
    return True
