"""What this server offers: its models, LoRAs and ControlNets, for /models, for the autocomplete
of the /imagine `model` and `lora` options, and for the line a finished job shows about them.

Pure text and choices (no discord import), so both front ends and the tests can use it; the
Discord commands that show it are in `bot.discord.cogs` (catalog.py, and imagine.py for the
autocomplete).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from bot.config import Config
from bot.core.credits import job_cost
from generation.addons import WEIGHT_SEPARATOR
from generation.contract import GenerationRequest, InputRole, JobKind
from generation.preprocess import fit_note
from generation.prompt import size_for_aspect
from generation.settings import ControlFit, ControlNetSpec, LoraSpec, ModelSpec

# Discord shows at most 25 suggestions, each name and value at most 100 characters.
MAX_CHOICES = 25
MAX_CHOICE_CHARS = 100
FAMILY_NAMES = {"sd": "SD 1.x", "sdxl": "SDXL"}
PREPROCESSOR_NAMES = {
    "canny": "edges (Canny)",
    "depth": "depth map",
    "lineart": "line art (the lines of your picture)",
    "none": "your picture as the map",
}
# What was typed before the LoRA being completed: `ink:0.5, pix` completes `pix`.
_LAST_PIECE = re.compile(r"^(?P<done>.*?[\s,]*)(?P<last>[^\s,]*)$", re.DOTALL)


@dataclass(frozen=True)
class Choice:
    """One autocomplete suggestion: `name` is shown, `value` is what the option becomes."""

    name: str
    value: str


def family_name(family: str) -> str:
    return FAMILY_NAMES.get(family, family)


def model_cost(config: Config, model: ModelSpec) -> int:
    """Credits a plain /imagine costs on `model`: its square base size, the default steps,
    sampler and candidates (the formula of bot.core.credits)."""
    engine = config.engine
    width, height = size_for_aspect(1, 1, model.base_resolution, engine.max_pixels)
    request = GenerationRequest(
        kind=JobKind.IMAGINE,
        prompt="cost",
        width=width,
        height=height,
        steps=min(engine.default_steps, engine.max_steps),
        sampler=engine.default_sampler,
        num_candidates=engine.num_candidates,
        num_kept=engine.num_kept,
        model=model.name,
    )
    return job_cost(request, config.credits)


# ----- /models -------------------------------------------------------------------------------


def models_section(config: Config) -> str:
    engine = config.engine
    lines = []
    for model in engine.models:
        default = " (default)" if model.name == engine.default_model else ""
        cost = model_cost(config, model)
        head = (
            f"• `{model.name}`{default} — {family_name(model.family)}, "
            f"{model.base_resolution}px, {cost} credit{'s' if cost != 1 else ''} a job"
        )
        lines.append(head + (f": {model.description}" if model.description else ""))
    lines.append("Pick one with the `model` option or `--model NAME`.")
    return "\n".join(lines)


def loras_section(config: Config) -> str:
    loras = config.engine.loras
    if not loras:
        return "This server offers no LoRAs."
    lines = []
    for lora in loras:
        lines.append(_lora_line(config, lora))
    lines.append(
        "Add them with `--lora NAME` or `--lora NAME:0.8` (weight 0–2; several allowed) or the "
        "`lora` option; trigger words are added for you."
    )
    return "\n".join(lines)


def _lora_line(config: Config, lora: LoraSpec) -> str:
    parts = [f"for {_models_of(config, lora.family)}", f"weight {lora.default_weight:g}"]
    if lora.trigger_words:
        parts.append("adds " + ", ".join(f"“{word}”" for word in lora.trigger_words))
    line = f"• `{lora.name}` — " + ", ".join(parts)
    return line + (f": {lora.description}" if lora.description else "")


def controlnets_section(config: Config) -> str:
    controlnets = config.engine.controlnets
    if not controlnets:
        return "This server offers no ControlNets."
    lines = [_controlnet_line(config, controlnet) for controlnet in controlnets]
    lines.append(
        "Use one with `--cn NAME` and a picture in the `control_image` option (or "
        "`--cn NAME https://…` with a link); `--cnw 0–2` sets how closely it is followed "
        "(default 1)."
    )
    extra = config.credits.cost_controlnet_percent
    if extra:
        lines.append(
            f"A job with a ControlNet costs {extra} % more (it runs beside the model at every "
            "step); LoRAs cost nothing extra."
        )
    return "\n".join(lines)


def _controlnet_line(config: Config, controlnet: ControlNetSpec) -> str:
    preprocessor = PREPROCESSOR_NAMES.get(controlnet.preprocessor.value, controlnet.preprocessor)
    line = (
        f"• `{controlnet.name}` — for {_models_of(config, controlnet.family)}, "
        f"follows {preprocessor}"
    )
    return line + (f": {controlnet.description}" if controlnet.description else "")


def _models_of(config: Config, family: str) -> str:
    names = [f"`{m.name}`" for m in config.engine.models if m.family == family]
    return f"{family_name(family)} models ({', '.join(names)})"


def catalog_sections(config: Config) -> list[tuple[str, str]]:
    """(title, text) of each part of /models."""
    return [
        ("Models", models_section(config)),
        ("LoRAs", loras_section(config)),
        ("ControlNets", controlnets_section(config)),
    ]


# ----- autocomplete --------------------------------------------------------------------------


def model_choices(config: Config, typed: str) -> list[Choice]:
    """Configured models whose name contains what was typed (those starting with it first)."""
    models = _matching(config.engine.models, typed.strip())
    choices = []
    for model in models:
        cost = model_cost(config, model)
        about = f"{family_name(model.family)}, {model.base_resolution}px, {cost} cr"
        if model.description:
            about += f" — {model.description}"
        choices.append(Choice(_clip(f"{model.name} · {about}"), model.name))
    return choices[:MAX_CHOICES]


def lora_choices(config: Config, typed: str, model: str | None) -> list[Choice]:
    """Completions of the last LoRA in `typed` (`ink:0.5, pix` → `ink:0.5, pixel-art`), among
    the LoRAs that fit `model` (all of them if the model is not known)."""
    match = _LAST_PIECE.match(typed)
    if match is None or len(typed) > MAX_CHOICE_CHARS:
        return []
    done, last = match["done"], match["last"]
    name, _, weight = last.partition(WEIGHT_SEPARATOR)
    family = _family_of(config, model)
    fitting = [lora for lora in config.engine.loras if family is None or lora.family == family]
    already = {
        piece.partition(WEIGHT_SEPARATOR)[0].casefold() for piece in re.split(r"[\s,]+", done)
    }
    choices = []
    for lora in _matching(fitting, name):
        if lora.name.casefold() in already:
            continue
        shown_weight = weight or f"{lora.default_weight:g}"
        value = f"{done}{lora.name}{WEIGHT_SEPARATOR + weight if weight else ''}"
        about = f"weight {shown_weight}" + (f" — {lora.description}" if lora.description else "")
        label = f"{done}{lora.name} · {about}" if done else f"{lora.name} · {about}"
        if len(value) <= MAX_CHOICE_CHARS:
            choices.append(Choice(_clip(label), value))
    return choices[:MAX_CHOICES]


def _family_of(config: Config, model: str | None) -> str | None:
    wanted = model or config.engine.default_model
    for spec in config.engine.models:
        if spec.name.casefold() == wanted.strip().casefold():
            return spec.family
    return None


_Spec = TypeVar("_Spec", ModelSpec, LoraSpec)


def _matching(specs: Sequence[_Spec], typed: str) -> list[_Spec]:
    needle = typed.casefold()
    starts = [s for s in specs if s.name.casefold().startswith(needle)]
    contains = [s for s in specs if needle in s.name.casefold() and s not in starts]
    return starts + contains


def _clip(text: str) -> str:
    return text if len(text) <= MAX_CHOICE_CHARS else text[: MAX_CHOICE_CHARS - 1] + "…"


# ----- a job's add-ons -----------------------------------------------------------------------

# The control map is shown small: it only has to say what the ControlNet followed.
CONTROL_THUMBNAIL_SIDE = 256


def control_thumbnail(path: Path) -> bytes | None:
    """The control map a job followed as a small PNG for its reply; None once it is gone
    (retention deletes it with the job's images)."""
    try:
        with Image.open(path) as image:
            image.thumbnail((CONTROL_THUMBNAIL_SIDE, CONTROL_THUMBNAIL_SIDE))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
    except FileNotFoundError:
        return None
    return buffer.getvalue()


# How an edit's reply names the member's pictures it does not use.
_PICTURE_NAMES = {
    InputRole.IMAGE_PROMPT: "image prompt",
    InputRole.STYLE: "style reference",
    InputRole.OBJECT: "object reference",
}


def edit_notes(parent_data: Mapping[str, Any], request: GenerationRequest) -> tuple[str, ...]:
    """What an edit (zoom, pan, square, region) leaves out, for its reply: the ControlNet,
    whose map no longer fits the changed canvas (the LoRAs are kept), and the member's
    pictures, which an edit doesn't use (generation.conditioning) though the reply lists them:
    they stay with the job, so variations of its images use them again."""
    if not request.kind.is_edit:
        return ()
    notes = []
    controlnet = parent_data.get("controlnet")
    if controlnet and request.controlnet is None:
        notes.append(
            f"ControlNet {controlnet} left out: a {request.kind.value} paints a changed canvas "
            "that its control map no longer fits"
        )
    unused = [name for role, name in _PICTURE_NAMES.items() if request.inputs_for(role)]
    if unused:
        notes.append(
            f"{' and '.join(unused)} not used by a {request.kind.value}: it repaints around an "
            "image the pictures already shaped (variations of the result use them again)"
        )
    return tuple(notes)


def control_notes(request: GenerationRequest, fit: ControlFit) -> tuple[str, ...]:
    """How the job's control picture was fitted to the image, when its shape differs (the
    engine crops or pads it, `[generation] controlnet_fit`; it never squashes it)."""
    controls = request.inputs_for(InputRole.CONTROL)
    if request.controlnet is None or not controls:
        return ()
    note = fit_note(controls[0].image.size, (request.width, request.height), fit)
    return (f"ControlNet {request.controlnet}: {note}",) if note else ()


def add_ons_text(request_data: Mapping[str, Any]) -> str:
    """The LoRAs and ControlNet of a stored request, as the reply shows them ("" if none);
    the weights are the ones used, A1111-style."""
    parts = []
    loras = request_data.get("loras") or ()
    if loras:
        shown = ", ".join(f"{lora['name']} {float(lora['weight']):g}" for lora in loras)
        parts.append(f"LoRA {shown}")
    controlnet = request_data.get("controlnet")
    if controlnet:
        weight = float(request_data.get("controlnet_weight", 1.0))
        parts.append(f"ControlNet {controlnet} {weight:g}")
    return " · ".join(parts)
