"""What the rest of imagine-bot may ask of the generation service, and what it gets back.

About 650 lines: only the contract's types and their validation (the request
builders are in generation.requests).

Everything here is a frozen dataclass or a `str` enum so a request can cross a process boundary
(the scheduler runs the engine in a worker process) and be stored as JSON. Validation raises a
`ValueError` that names the offending parameter instead of silently correcting it. The requests
made from another job's result (variations, upscales, edits) are built in generation.requests.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Protocol

from PIL import Image

# Hard ceilings that protect GPU memory whatever the config says; config may only lower them.
MAX_SEED = 2**32 - 1
MAX_STEPS = 150
MAX_CANDIDATES = 16
MAX_PIXELS = 2048 * 2048
MAX_PROMPT_CHARS = 2000
# Zoom Out shrinks the image by at most this factor (Midjourney's Custom Zoom range is 1-2).
MAX_ZOOM = 2.0


class JobKind(StrEnum):
    IMAGINE = "imagine"
    VARIATION = "variation"
    UPSCALE = "upscale"
    # Outpaint/inpaint edits of a parent image (generation.outpaint): a new grid each.
    ZOOM = "zoom"
    PAN = "pan"
    SQUARE = "square"
    REGION = "region"
    # Four prompt suggestions for a picture (generation.describe); no images are made.
    DESCRIBE = "describe"
    # Which words of a prompt matter to CLIP, and shorter prompts (generation.shorten); no
    # images are made.
    SHORTEN = "shorten"

    @property
    def makes_text(self) -> bool:
        """Answers in words, with no source image and no diffusion."""
        return self in (JobKind.DESCRIBE, JobKind.SHORTEN)

    @property
    def is_edit(self) -> bool:
        """Repaints part of a canvas around or inside its source image, at full strength."""
        return self in (JobKind.ZOOM, JobKind.PAN, JobKind.SQUARE, JobKind.REGION)


class PanDirection(StrEnum):
    LEFT = "left"
    RIGHT = "right"
    UP = "up"
    DOWN = "down"


class Region(StrEnum):
    """Vary (Region)'s preset areas: halves, the centre, and the cells of a 3x3 grid."""

    LEFT = "left"
    RIGHT = "right"
    TOP = "top"
    BOTTOM = "bottom"
    CENTRE = "centre"  # the middle half of each side
    TOP_LEFT = "top_left"
    TOP_CENTRE = "top_centre"
    TOP_RIGHT = "top_right"
    MIDDLE_LEFT = "middle_left"
    MIDDLE_CENTRE = "middle_centre"
    MIDDLE_RIGHT = "middle_right"
    BOTTOM_LEFT = "bottom_left"
    BOTTOM_CENTRE = "bottom_centre"
    BOTTOM_RIGHT = "bottom_right"

    @property
    def label(self) -> str:
        if self is Region.CENTRE:
            return "centre"
        if "_" in self.value:
            return self.value.replace("_", " ") + " cell"
        return self.value + " half"


class UpscaleMode(StrEnum):
    SUBTLE = "subtle"  # keeps detail: Real-ESRGAN when installed, else a low-strength hires fix
    CREATIVE = "creative"  # a higher-strength hires fix that adds detail


class Sampler(StrEnum):
    """Sampler names as users type them (and as AUTOMATIC1111 prints them, see `a1111_name`)."""

    DDIM = "ddim"
    # The original ancestral sampler that DDIM was made to speed up: it needs hundreds of steps
    # for a clean image (DDPM_CLEAN_STEPS), so a job with fewer says so and /help warns.
    DDPM = "ddpm"
    EULER = "euler"
    EULER_A = "euler_a"
    HEUN = "heun"
    LMS = "lms"
    LMS_KARRAS = "lms_karras"
    DPM2 = "dpm2"
    DPM2_KARRAS = "dpm2_karras"
    DPM2_A = "dpm2_a"
    DPM2_A_KARRAS = "dpm2_a_karras"
    DPMPP_2M = "dpmpp_2m"
    DPMPP_2M_KARRAS = "dpmpp_2m_karras"
    DPMPP_2M_SDE = "dpmpp_2m_sde"
    DPMPP_2M_SDE_KARRAS = "dpmpp_2m_sde_karras"
    DPMPP_SDE = "dpmpp_sde"
    DPMPP_SDE_KARRAS = "dpmpp_sde_karras"
    UNIPC = "unipc"

    @property
    def a1111_name(self) -> str:
        return _A1111_SAMPLER_NAMES[self]

    @property
    def model_calls_per_step(self) -> int:
        """UNet evaluations per step: second-order single-step samplers (Heun, DPM2, DPM++ SDE)
        evaluate the model twice, so a step of theirs costs twice the GPU time."""
        return 2 if self in _TWO_CALL_SAMPLERS else 1

    @classmethod
    def parse(cls, text: str) -> Sampler:
        """Accept `dpmpp_2m_karras`, `DPM++ 2M Karras`, `euler-a`, `Euler a`, ComfyUI's
        `euler_ancestral` …"""
        key = _sampler_key(text)
        for sampler in cls:
            if key in (sampler.value, _sampler_key(sampler.a1111_name)):
                return sampler
        if key in _SAMPLER_ALIASES:
            return _SAMPLER_ALIASES[key]
        accepted = ", ".join(s.a1111_name for s in cls)
        raise ValueError(f"sampler: unknown sampler {text!r}; accepted: {accepted}")


# Below this many steps a DDPM image is visibly noisy: its reverse process adds fresh noise at
# every step and was trained for 1,000; DDIM reaches a clean image from the same model in 20-50.
DDPM_CLEAN_STEPS = 250

_TWO_CALL_SAMPLERS = frozenset(
    {
        Sampler.HEUN,
        Sampler.DPM2,
        Sampler.DPM2_KARRAS,
        Sampler.DPM2_A,
        Sampler.DPM2_A_KARRAS,
        Sampler.DPMPP_SDE,
        Sampler.DPMPP_SDE_KARRAS,
    }
)


def _sampler_key(text: str) -> str:
    return "_".join(text.strip().lower().replace("++", "pp").replace("-", " ").split())


_A1111_SAMPLER_NAMES = {
    Sampler.DDIM: "DDIM",
    Sampler.DDPM: "DDPM",
    Sampler.EULER: "Euler",
    Sampler.EULER_A: "Euler a",
    Sampler.HEUN: "Heun",
    Sampler.LMS: "LMS",
    Sampler.LMS_KARRAS: "LMS Karras",
    Sampler.DPM2: "DPM2",
    Sampler.DPM2_KARRAS: "DPM2 Karras",
    Sampler.DPM2_A: "DPM2 a",
    Sampler.DPM2_A_KARRAS: "DPM2 a Karras",
    Sampler.DPMPP_2M: "DPM++ 2M",
    Sampler.DPMPP_2M_KARRAS: "DPM++ 2M Karras",
    Sampler.DPMPP_2M_SDE: "DPM++ 2M SDE",
    Sampler.DPMPP_2M_SDE_KARRAS: "DPM++ 2M SDE Karras",
    Sampler.DPMPP_SDE: "DPM++ SDE",
    Sampler.DPMPP_SDE_KARRAS: "DPM++ SDE Karras",
    Sampler.UNIPC: "UniPC",
}
# Other spellings seen in shared prompts: ComfyUI's sampler names.
_SAMPLER_ALIASES = {
    "euler_ancestral": Sampler.EULER_A,
    "dpm_2": Sampler.DPM2,
    "dpm_2_ancestral": Sampler.DPM2_A,
    "uni_pc": Sampler.UNIPC,
}


@dataclass(frozen=True)
class PromptPart:
    """One piece of a Midjourney `::` multi-prompt; a plain prompt is a single part of weight 1."""

    text: str
    weight: float = 1.0


class InputRole(StrEnum):
    """What a member-supplied picture is for (beside `init_image`, the parent image a button
    works on)."""

    IMAGE_PROMPT = "image_prompt"  # an image prompt or one image of a /blend
    STYLE = "style"  # --sref: style only
    OBJECT = "object"  # --oref / --cref: content or character
    MASK = "mask"  # Vary (Region) with an uploaded mask: white is repainted
    CONTROL = "control"  # a ControlNet's input (preprocessed by the engine)


@dataclass(frozen=True)
class InputImage:
    """A picture a member gave the job. Stored beside the job as a file; `source` (the link or
    attachment name) and `sha256` of the fetched bytes go into the PNG metadata."""

    role: InputRole
    image: Image.Image = field(compare=False, repr=False)
    weight: float = 1.0
    source: str = ""
    sha256: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.role, InputRole):
            raise ValueError(f"inputs: role must be an InputRole, got {self.role!r}")
        if not isinstance(self.image, Image.Image):
            raise ValueError(f"inputs: a {self.role.value} input needs an image")

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role.value,
            "weight": self.weight,
            "source": self.source,
            "sha256": self.sha256,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], image: Image.Image) -> InputImage:
        return cls(
            role=InputRole(data["role"]),
            image=image,
            weight=float(data.get("weight", 1.0)),
            source=str(data.get("source", "")),
            sha256=str(data.get("sha256", "")),
        )


# LoRA and ControlNet weights a member may ask for: 0 turns one off, 2 doubles it.
MAX_LORA_WEIGHT = 2.0
MAX_CONTROLNET_WEIGHT = 2.0


@dataclass(frozen=True)
class LoraWeight:
    """One configured LoRA (by name) applied to a job at `weight`."""

    name: str
    weight: float = 1.0


# A member's taste (`--p`) as ranking uses it: the weights of a linear preference over compact
# CLIP image embeddings (generation.taste), fitted by the bot from the member's picks.
MAX_TASTE_DIM = 1024
MAX_TASTE_STRENGTH = 10.0


@dataclass(frozen=True)
class Personalization:
    """Ranking adds `strength` x the member's preference (each side standardised over the job's
    candidates) to the prompt similarity. `space` names the embeddings the weights were fitted
    in (generation.taste.space_for); a ranker of another space ranks as usual."""

    weights: tuple[float, ...]
    space: str
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= len(self.weights) <= MAX_TASTE_DIM:
            raise ValueError(f"personalize: 1 to {MAX_TASTE_DIM} weights, got {len(self.weights)}")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError("personalize: weights must be finite numbers")
        if not 0.0 <= self.strength <= MAX_TASTE_STRENGTH:
            raise ValueError(
                f"personalize: strength must be between 0 and {MAX_TASTE_STRENGTH:g}, "
                f"got {self.strength:g}"
            )


@dataclass(frozen=True)
class CandidateEmbeddings:
    """Every ranked candidate's CLIP image embedding, compact (generation.taste.compact): row i
    is candidate i (seed + i), `dim` signed bytes each in `codes`, times `scales[i]`."""

    space: str
    dim: int
    codes: bytes = field(repr=False)
    scales: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.codes) != self.dim * len(self.scales):
            raise ValueError(
                f"embeddings: {len(self.codes)} bytes for {len(self.scales)} x {self.dim}"
            )


@dataclass(frozen=True)
class Draft:
    """What a draft stands in for: the steps and sampler of the same job at full quality."""

    steps: int
    sampler: Sampler

    def __post_init__(self) -> None:
        if not isinstance(self.sampler, Sampler):
            raise ValueError(f"draft: sampler must be a Sampler, got {self.sampler!r}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"draft: steps must be between 1 and {MAX_STEPS}, got {self.steps}")

    def to_json(self) -> dict[str, Any]:
        return {"steps": self.steps, "sampler": self.sampler.value}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Draft:
        return cls(steps=int(data["steps"]), sampler=Sampler(data["sampler"]))


# The kinds a draft can be: new pictures from noise (or from a picture, a variation). An
# upscale or an edit (zoom, pan, square, region) finishes a picture that is already there, and
# a draft-quality patch beside full-quality pixels would show its seam.
DRAFT_KINDS = frozenset({JobKind.IMAGINE, JobKind.VARIATION})


@dataclass(frozen=True)
class GenerationRequest:
    """One job for the engine. For variation/upscale, `init_image` is the chosen source image."""

    kind: JobKind
    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    guidance: float = 7.0
    sampler: Sampler = Sampler.DPMPP_2M_KARRAS
    seed: int = 0
    num_candidates: int = 8
    num_kept: int = 4
    init_image: Image.Image | None = field(default=None, compare=False, repr=False)
    strength: float | None = None
    model: str = "tiny"
    # Midjourney parameters with an honest Stable Diffusion equivalent (see generation.prompt).
    prompt_parts: tuple[PromptPart, ...] = ()
    chaos: int = 0
    tile: bool = False
    stop_percent: int = 100
    # Pictures the member gave the job (image prompts, references, a mask, a control image).
    inputs: tuple[InputImage, ...] = field(default=(), compare=False, repr=False)
    # Configured LoRAs by name; a configured ControlNet by name, its picture the CONTROL input.
    loras: tuple[LoraWeight, ...] = ()
    controlnet: str | None = None
    controlnet_weight: float = 1.0
    # What an edit does to its source (generation.outpaint): ZOOM shrinks it by zoom_factor
    # into the canvas, PAN grows the canvas towards pan_direction, REGION repaints the
    # regions (or the MASK input).
    zoom_factor: float = 1.0
    pan_direction: PanDirection | None = None
    regions: tuple[Region, ...] = ()
    upscale_mode: UpscaleMode = UpscaleMode.SUBTLE
    # Small preview images of the candidates ride along with the progress (generation.preview).
    preview: bool = False
    # Set on a draft (`--draft`, generation.draft): the steps and sampler the same job has at
    # full quality, which Enhance renders; `steps` and `sampler` are the draft's own.
    draft: Draft | None = None
    # The member's taste, when the job is personalized (`--p`): added to the ranking.
    personalize: Personalization | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.kind, JobKind):
            raise ValueError(
                f"kind: must be one of {[k.value for k in JobKind]}, got {self.kind!r}"
            )
        if not isinstance(self.sampler, Sampler):
            raise ValueError(f"sampler: must be a Sampler, got {self.sampler!r}")
        # A /blend or an image prompt may come without words, and /describe reads a picture.
        pictured = self.kind is JobKind.DESCRIBE or bool(self.inputs_for(InputRole.IMAGE_PROMPT))
        if not self.prompt.strip() and not self.prompt_parts and not pictured:
            raise ValueError("prompt: must not be empty")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise ValueError(
                f"prompt: at most {MAX_PROMPT_CHARS} characters, got {len(self.prompt)}"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if value < 64 or value % 8:
                raise ValueError(f"{name}: must be a multiple of 8 and at least 64, got {value}")
        if self.width * self.height > MAX_PIXELS:
            raise ValueError(
                f"width x height: at most {MAX_PIXELS} pixels, got {self.width}x{self.height}"
            )
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"steps: must be between 1 and {MAX_STEPS}, got {self.steps}")
        if not 0.0 <= self.guidance <= 30.0:
            raise ValueError(f"guidance: must be between 0 and 30, got {self.guidance}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed: must be between 0 and {MAX_SEED}, got {self.seed}")
        if not 1 <= self.num_candidates <= MAX_CANDIDATES:
            raise ValueError(
                f"num_candidates: must be between 1 and {MAX_CANDIDATES}, got {self.num_candidates}"
            )
        if not 1 <= self.num_kept <= self.num_candidates:
            raise ValueError(
                f"num_kept: must be between 1 and num_candidates ({self.num_candidates}), "
                f"got {self.num_kept}"
            )
        if self.kind is JobKind.IMAGINE or self.kind.makes_text:
            if self.init_image is not None or self.strength is not None:
                raise ValueError("init_image/strength: only variation and upscale take an image")
        else:
            if self.init_image is None:
                raise ValueError(f"init_image: a {self.kind.value} needs a source image")
            if self.strength is None or not 0.0 < self.strength <= 1.0:
                raise ValueError(f"strength: must be in (0, 1], got {self.strength}")
        if not 0 <= self.chaos <= 100:
            raise ValueError(f"chaos: must be between 0 and 100, got {self.chaos}")
        if not 10 <= self.stop_percent <= 100:
            raise ValueError(f"stop_percent: must be between 10 and 100, got {self.stop_percent}")
        self._validate_edit()
        self._validate_draft()
        _validate_pictures(self)

    def _validate_edit(self) -> None:
        if self.kind is JobKind.ZOOM:
            if not 1.0 <= self.zoom_factor <= MAX_ZOOM:
                raise ValueError(
                    f"zoom_factor: must be between 1 and {MAX_ZOOM:g}, got {self.zoom_factor:g}"
                )
        elif self.zoom_factor != 1.0:
            raise ValueError(f"zoom_factor: only a zoom takes one, not a {self.kind.value}")
        if (self.kind is JobKind.PAN) != (self.pan_direction is not None):
            raise ValueError("pan_direction: a pan needs one, and only a pan takes one")
        if self.pan_direction is not None and not isinstance(self.pan_direction, PanDirection):
            raise ValueError(f"pan_direction: must be a PanDirection, got {self.pan_direction!r}")
        if any(not isinstance(r, Region) for r in self.regions):
            raise ValueError(f"regions: must be Region values, got {self.regions!r}")
        masks = self.inputs_for(InputRole.MASK)
        if self.kind is JobKind.REGION:
            if bool(self.regions) == bool(masks):
                raise ValueError("regions: a region edit needs preset regions or a mask, not both")
            if len(masks) > 1:
                raise ValueError("inputs: a region edit takes one mask")
        elif self.regions or masks:
            raise ValueError(
                f"regions: only a region edit takes regions or a mask, not a {self.kind.value}"
            )
        if self.kind.is_edit and self.strength != 1.0:
            raise ValueError(f"strength: a {self.kind.value} repaints at full strength (1.0)")
        self._validate_add_ons()

    def _validate_draft(self) -> None:
        if self.draft is None:
            return
        if not isinstance(self.draft, Draft):
            raise ValueError(f"draft: must be a Draft, got {self.draft!r}")
        if self.kind not in DRAFT_KINDS:
            raise ValueError(
                f"draft: a {self.kind.value} can't be a draft (only "
                + ", ".join(k.value for k in DRAFT_KINDS)
                + ")"
            )
        if self.steps > self.draft.steps:
            raise ValueError(
                f"draft: a draft runs at most the steps of its full render "
                f"({self.draft.steps}), got {self.steps}"
            )

    def _validate_add_ons(self) -> None:
        seen: set[str] = set()
        for lora in self.loras:
            if not isinstance(lora, LoraWeight) or not lora.name.strip():
                raise ValueError(f"loras: each must be a LoraWeight with a name, got {lora!r}")
            if not 0.0 <= lora.weight <= MAX_LORA_WEIGHT:
                raise ValueError(
                    f"loras: weight of {lora.name!r} must be between 0 and {MAX_LORA_WEIGHT:g}, "
                    f"got {lora.weight:g}"
                )
            if lora.name in seen:
                raise ValueError(f"loras: {lora.name!r} is given twice")
            seen.add(lora.name)
        if not 0.0 <= self.controlnet_weight <= MAX_CONTROLNET_WEIGHT:
            raise ValueError(
                f"controlnet_weight: must be between 0 and {MAX_CONTROLNET_WEIGHT:g}, "
                f"got {self.controlnet_weight:g}"
            )
        controls = self.inputs_for(InputRole.CONTROL)
        if self.controlnet is not None and len(controls) != 1:
            raise ValueError(
                f"controlnet: {self.controlnet!r} needs exactly one control image, "
                f"got {len(controls)}"
            )
        if self.controlnet is None and controls:
            raise ValueError("inputs: a control image was given without a controlnet")

    def with_changes(self, **changes: Any) -> GenerationRequest:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Everything but the image, for the jobs table; the image is stored as a file."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "init_image"}
        data["kind"] = self.kind.value
        data["sampler"] = self.sampler.value
        data["prompt_parts"] = [asdict(p) for p in self.prompt_parts]
        data["inputs"] = [i.to_json() for i in self.inputs]
        data["loras"] = [asdict(lora) for lora in self.loras]
        data["pan_direction"] = self.pan_direction.value if self.pan_direction else None
        data["regions"] = [r.value for r in self.regions]
        data["upscale_mode"] = self.upscale_mode.value
        data["draft"] = self.draft.to_json() if self.draft is not None else None
        data["personalize"] = asdict(self.personalize) if self.personalize else None
        return data

    @classmethod
    def from_json(
        cls,
        data: dict[str, Any],
        init_image: Image.Image | None = None,
        input_images: Sequence[Image.Image] = (),
    ) -> GenerationRequest:
        """`input_images` are the pictures of `data["inputs"]`, in order (stored as files by
        whoever stored the JSON; keys other than the `InputImage` fields are theirs)."""
        values = dict(data)
        values["kind"] = JobKind(values["kind"])
        values["sampler"] = Sampler(values["sampler"])
        values["prompt_parts"] = tuple(PromptPart(**p) for p in values.get("prompt_parts", ()))
        values["loras"] = tuple(LoraWeight(**lora) for lora in values.get("loras", ()))
        if values.get("pan_direction") is not None:
            values["pan_direction"] = PanDirection(values["pan_direction"])
        values["regions"] = tuple(Region(r) for r in values.get("regions", ()))
        values["upscale_mode"] = UpscaleMode(values.get("upscale_mode", UpscaleMode.SUBTLE))
        if values.get("draft") is not None:
            values["draft"] = Draft.from_json(values["draft"])
        taste = values.get("personalize")
        values["personalize"] = (
            Personalization(
                weights=tuple(float(w) for w in taste["weights"]),
                space=str(taste["space"]),
                strength=float(taste.get("strength", 1.0)),
            )
            if taste
            else None
        )
        described = values.pop("inputs", ())
        if len(described) != len(input_images):
            raise ValueError(
                f"inputs: {len(described)} described but {len(input_images)} images given"
            )
        values["inputs"] = tuple(
            InputImage.from_json(d, image) for d, image in zip(described, input_images, strict=True)
        )
        return cls(**values, init_image=init_image)

    def inputs_for(self, role: InputRole) -> tuple[InputImage, ...]:
        return tuple(i for i in self.inputs if i.role is role)


# Midjourney's ranges: --iw 0-3 for image prompts, --sw/--ow 0-1000 for style and object
# references (--cw 0-100 fits inside the latter). generation.conditioning maps them.
IMAGE_WEIGHT_RANGES = {
    InputRole.IMAGE_PROMPT: (0.0, 3.0),
    InputRole.STYLE: (0.0, 1000.0),
    InputRole.OBJECT: (0.0, 1000.0),
}
# /blend takes 2-5 pictures; an image prompt up to as many. References: up to 5 each.
MAX_IMAGES_PER_ROLE = 5


def _validate_pictures(request: GenerationRequest) -> None:
    """How many image prompts and references a job may carry and in what weight ranges."""
    for role, (low, high) in IMAGE_WEIGHT_RANGES.items():
        given = request.inputs_for(role)
        if len(given) > MAX_IMAGES_PER_ROLE:
            raise ValueError(
                f"inputs: at most {MAX_IMAGES_PER_ROLE} {role.value} images, got {len(given)}"
            )
        for picture in given:
            if not math.isfinite(picture.weight) or not low <= picture.weight <= high:
                raise ValueError(
                    f"weight: a {role.value} image takes a weight between {low:g} and {high:g}, "
                    f"got {picture.weight:g} ({picture.source or 'unnamed'})"
                )
    if request.kind is JobKind.DESCRIBE:
        prompts = request.inputs_for(InputRole.IMAGE_PROMPT)
        if len(prompts) != 1 or len(request.inputs) != 1:
            raise ValueError(
                f"inputs: a describe reads exactly one picture, got {len(request.inputs)}"
            )


@dataclass(frozen=True)
class GenerationResult:
    """The kept images in rank order (best first), with what is needed to reproduce each one."""

    images: tuple[Image.Image, ...] = field(repr=False)
    seeds: tuple[int, ...]
    clip_scores: tuple[float, ...]
    timings_s: dict[str, float] = field(default_factory=dict, compare=False)
    # Index into the generated batch of each kept image, so candidate i is seed + i.
    candidate_indices: tuple[int, ...] = ()
    # The preprocessed ControlNet input (edges, depth …) the job was conditioned on, to show.
    control_map: Image.Image | None = field(default=None, repr=False, compare=False)
    # Text a job produces instead of images: a DESCRIBE's four prompt suggestions.
    texts: tuple[str, ...] = ()
    # The strength the pipeline ran at (img2img and edits; None for text-to-image), which may
    # differ from the request's: an edit asks for 1.0 and runs at edit_strength on a model's own
    # UNet. The PNG metadata reports this one.
    denoising_strength: float | None = None
    # Every ranked candidate's compact CLIP image embedding (personalization learns from them),
    # and whether the member's taste took part in the ranking.
    embeddings: CandidateEmbeddings | None = field(default=None, compare=False)
    personalized: bool = False


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    # A small PNG of the candidates as they stand (only when the request asked for previews).
    preview_png: bytes | None = field(default=None, repr=False)

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 0.0


ProgressCallback = Callable[[Progress], None]


class GenerationCancelled(Exception):
    """Raised out of `Engine.generate` when the caller's cancel event was set between steps."""


class Engine(Protocol):
    """What a worker needs from the generation service; the real one is `generation.engine`."""

    def generate(
        self,
        request: GenerationRequest,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult: ...
