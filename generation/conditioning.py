"""Pictures that steer a job: image prompts, /blend, style and object references.

A member's pictures reach the engine as `GenerationRequest.inputs`. Two mechanisms turn them
into conditioning:

- img2img: the picture, noised by a strength, is denoised toward the prompt. It keeps the
  picture's layout and colours and needs nothing but the model itself.
- an image adapter (IP-Adapter): the picture's CLIP image embedding is fed to the UNet's cross
  attention beside the text, at a scale, optionally only in the layers that carry style. It
  keeps what the picture shows and how it looks, not where things are.

Every model with an adapter (settings `ip_adapters`, per family) uses it for all image inputs;
a model without one makes image prompts and blends by img2img and refuses style and object
references. This module decides what a job gets and maps Midjourney's weights (`WEIGHT_HELP`).
It imports no torch, so the bot can call `check_inputs` before charging anything;
generation.ip_adapter does the work in the worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from generation.contract import GenerationRequest, InputImage, InputRole, JobKind
from generation.settings import EngineSettings, IPAdapterSpec

# The adapter is loaded once per model with one slot per role, in this order, so an image
# prompt, a style and an object reference can steer one job each at its own scale.
ADAPTER_ROLES = (InputRole.IMAGE_PROMPT, InputRole.STYLE, InputRole.OBJECT)

# Quoted in /help: how each Midjourney weight becomes a Stable Diffusion setting.
WEIGHT_HELP = (
    "--iw 0-3 (default 1): how strongly image prompts steer. With an image adapter the "
    "pictures' embedding is applied at scale iw/2 (1 -> 0.5, text and picture balanced; "
    "3 -> 1.5, the picture dominates). Without one the picture is the start of an img2img at "
    "strength 1 - iw/4 (1 -> 0.75, 3 -> 0.25 keeps most of it; 0 ignores it); several "
    "pictures are averaged first.\n"
    "--sw 0-1000 (default 100): style reference strength, applied only in the adapter's "
    "style layers at scale 2*sw/(sw+100) (0 -> off, 100 -> 1.0, 1000 -> 1.8).\n"
    "--ow 1-1000 / --cw 0-100 (default 100): object or character reference strength, the "
    "whole adapter at scale 2*w/(w+100) (100 -> 1.0; --cw 0 turns the reference off: Stable "
    "Diffusion cannot keep only a face).\n"
    "Style and object references need a model with an image adapter."
)


def image_prompt_scale(iw: float) -> float:
    """Adapter scale of image prompts: --iw 1 gives 0.5, IP-Adapter's text/picture balance."""
    return iw / 2.0


def image_prompt_strength(iw: float) -> float:
    """img2img strength of image prompts on a model without an adapter: 1 - iw/4."""
    return 1.0 - iw / 4.0


def reference_scale(weight: float) -> float:
    """Adapter scale of a style or object reference (--sw/--ow/--cw): 2w/(w+100).

    Midjourney's weights run to 1000, adapter scales much above 1.5 burn the image: the
    saturating curve gives 1.0 at the default 100 and never reaches 2.
    """
    return 2.0 * weight / (weight + 100.0)


@dataclass(frozen=True)
class AdapterSlot:
    """One role's pictures in its adapter slot: their weighted mean embedding at `scale`,
    in the style layers only when `style_only`."""

    role: InputRole
    images: tuple[Image.Image, ...]
    weights: tuple[float, ...]
    scale: float
    style_only: bool = False


@dataclass(frozen=True)
class ConditioningPlan:
    """What the pictures do to one job. Empty for a job without (usable) pictures."""

    # The img2img start made from image prompts (model without an adapter), and its strength.
    init_image: Image.Image | None = None
    strength: float | None = None
    # One slot per ADAPTER_ROLES when the adapter is used (unused roles at scale 0).
    slots: tuple[AdapterSlot, ...] = ()

    @property
    def uses_adapter(self) -> bool:
        return any(slot.scale != 0 for slot in self.slots)


NO_CONDITIONING = ConditioningPlan()


def supported_roles(settings: EngineSettings, model: str | None = None) -> frozenset[InputRole]:
    """The picture roles `model` can use, for the bot's listings and refusals (cheap)."""
    if settings.ip_adapter_for(model) is not None:
        return frozenset(ADAPTER_ROLES)
    return frozenset({InputRole.IMAGE_PROMPT})


def check_inputs(settings: EngineSettings, request: GenerationRequest) -> None:
    """Refuse what the request's model cannot do with its pictures; ValueError names it.

    Cheap (no torch, no images decoded beyond what the request holds), so the bot calls it
    before charging; the engine calls it again.
    """
    plan_conditioning(request, settings.ip_adapter_for(request.model))


def plan_conditioning(
    request: GenerationRequest, adapter: IPAdapterSpec | None
) -> ConditioningPlan:
    """How the request's pictures condition it, given the model's adapter (or None)."""
    if request.kind is JobKind.DESCRIBE or request.kind.is_edit:
        # generation.describe reads the picture; an edit repaints part of a source image the
        # pictures already shaped, with its own (inpainting) pipeline.
        return NO_CONDITIONING
    prompts = request.inputs_for(InputRole.IMAGE_PROMPT)
    styles = request.inputs_for(InputRole.STYLE)
    objects = request.inputs_for(InputRole.OBJECT)
    if adapter is None:
        if styles:
            raise ValueError(
                f"sref: style references need an image adapter (IP-Adapter), and model "
                f"{request.model!r} has none configured"
            )
        if objects:
            raise ValueError(
                f"oref: object and character references (--oref/--cref) need an image adapter "
                f"(IP-Adapter), and model {request.model!r} has none configured"
            )
        if not prompts or request.kind is not JobKind.IMAGINE:
            # A variation or upscale starts from its parent image, which the image prompts
            # already shaped.
            return NO_CONDITIONING
        return _img2img_plan(request, prompts)
    slots = []
    for role in ADAPTER_ROLES:
        given = request.inputs_for(role)
        if not given:
            slots.append(AdapterSlot(role, (), (), 0.0))
            continue
        weights = tuple(picture.weight for picture in given)
        mean = sum(weights) / len(weights)
        if role is InputRole.IMAGE_PROMPT:
            scale = image_prompt_scale(mean)
        else:
            scale = reference_scale(mean)
        slots.append(
            AdapterSlot(
                role=role,
                images=tuple(picture.image for picture in given),
                weights=weights,
                scale=scale,
                style_only=role is InputRole.STYLE,
            )
        )
    return ConditioningPlan(slots=tuple(slots))


def _img2img_plan(request: GenerationRequest, prompts: Sequence[InputImage]) -> ConditioningPlan:
    mean = sum(p.weight for p in prompts) / len(prompts)
    strength = image_prompt_strength(mean)
    if int(request.steps * strength) < 1:
        raise ValueError(
            f"iw: --iw {mean:g} keeps the picture so closely that {request.steps} steps leave "
            f"no denoising step (strength {strength:g}); lower --iw or raise --steps"
        )
    start = blend_pictures(
        [p.image for p in prompts], [p.weight for p in prompts], (request.width, request.height)
    )
    return ConditioningPlan(init_image=start, strength=strength)


def blend_pictures(
    images: Sequence[Image.Image], weights: Sequence[float], size: tuple[int, int]
) -> Image.Image:
    """The pictures cropped to the job's shape (centred) and averaged pixel by pixel, each by
    its weight (equally when all weights are 0): the img2img start of an image prompt."""
    if not images:
        raise ValueError("inputs: need at least one picture to blend")
    total = float(sum(weights))
    shares = [w / total for w in weights] if total > 0 else [1.0 / len(images)] * len(images)
    mixed = np.zeros((size[1], size[0], 3), dtype=np.float64)
    for image, share in zip(images, shares, strict=True):
        fitted = ImageOps.fit(image.convert("RGB"), size, Image.Resampling.LANCZOS)
        mixed += share * np.asarray(fitted, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))


def ranking_references(request: GenerationRequest) -> tuple[Image.Image, ...]:
    """Pictures to rank candidates against when the prompt has no words (a /blend)."""
    if request.prompt.strip() or any(p.text.strip() for p in request.prompt_parts):
        return ()
    return tuple(p.image for p in request.inputs_for(InputRole.IMAGE_PROMPT))


def style_scales(layers: Sequence[tuple[str, Sequence[float]]], scale: float) -> dict:
    """diffusers' per-layer scale dict for `set_ip_adapter_scale`, each layer's factor times
    `scale`; layers not named get 0 (diffusers' default for dicts)."""
    result: dict = {}
    for layer, factors in layers:
        values = [float(f) * scale for f in factors]
        if layer == "mid":
            result["mid"] = values[0] if len(values) == 1 else values
            continue
        updown, block = layer.split(".")
        result.setdefault(updown, {})[block] = values
    return result
