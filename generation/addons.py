"""LoRAs and ControlNets a member asks for: `--lora NAME[:W]`, `--cn NAME`, `--cnw W`, and the
/imagine `lora` and `control_image` options, checked against what the server configured.

A LoRA or ControlNet is trained for one model family (SD 1.x or SDXL), so the check needs the
model the job runs on: `generation.prompt` collects the flag values while it reads the prompt
and calls `choose_add_ons` once the model is known. Every mistake is a `PromptError` naming
the flag or option as the member typed it, raised before anything is queued or charged.

Pure (no torch): the Discord front end imports it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from generation.contract import (
    MAX_LORA_WEIGHT,
    InputImage,
    InputRole,
    LoraWeight,
)
from generation.flags import NUMBER, PromptError, show_value
from generation.settings import EngineSettings, ModelSpec

# `name:0.8`: the weight follows the last colon (A1111 writes `<lora:name:0.8>`).
WEIGHT_SEPARATOR = ":"
# Several LoRAs in one value: `--lora ink, watercolor:0.5` (or with spaces only), and the
# same in the /imagine `lora` option. Configured names have neither (bot.config checks).
_LIST = re.compile(r"[\s,]+")


@dataclass(frozen=True)
class LoraAsk:
    """One LoRA as typed: `where` is the flag (`--lora`) or option (`lora`) it came from."""

    where: str
    name: str
    weight: float | None  # None: the LoRA's configured default weight


@dataclass(frozen=True)
class AddOns:
    loras: tuple[LoraWeight, ...] = ()
    controlnet: str | None = None
    controlnet_weight: float = 1.0
    inputs: tuple[InputImage, ...] = ()


def lora_value(where: str, value: str) -> tuple[LoraAsk, ...]:
    """Read `name`, `name:0.8`, or several of them separated by commas or spaces; the names
    are only looked up in `choose_add_ons`, where the model is known."""
    asks = []
    for piece in _LIST.split(value):
        if not piece:
            continue
        name, separator, weight_text = piece.rpartition(WEIGHT_SEPARATOR)
        if not separator:
            asks.append(LoraAsk(where, piece, None))
            continue
        if not name.strip():
            raise PromptError(
                where, f"{where}: expected NAME or NAME:WEIGHT, got {show_value(piece)}"
            )
        asks.append(LoraAsk(where, name.strip(), _weight(where, piece, weight_text)))
    if not asks:
        raise PromptError(where, f"{where}: expected a LoRA name (see /models), got nothing")
    return tuple(asks)


def _weight(where: str, piece: str, text: str) -> float:
    if len(text) <= 12 and NUMBER.fullmatch(text):
        weight = float(text)
        if math.isfinite(weight) and 0.0 <= weight <= MAX_LORA_WEIGHT:
            return weight
    raise PromptError(
        where,
        f"{where} {_short(piece)}: the weight after ':' must be a number between 0 and "
        f"{MAX_LORA_WEIGHT:g}, got {show_value(text)}",
    )


def choose_add_ons(
    settings: EngineSettings,
    model: ModelSpec,
    *,
    loras: Sequence[LoraAsk] = (),
    controlnet: tuple[str, str] | None = None,
    controlnet_weight: tuple[str, float] | None = None,
    control_image: InputImage | None = None,
    control_link: str | None = None,
) -> AddOns:
    """The configured LoRAs and ControlNet the job uses, or a PromptError naming what is wrong.

    `controlnet` and `controlnet_weight` are (as typed, value) pairs of `--cn` and `--cnw`;
    `control_image` is the picture the ControlNet follows (the `control_image` option, or the
    picture at `control_link`, the link typed after `--cn NAME`, which the bot fetched with
    the link as its source).
    """
    chosen = _loras(settings, model, loras)
    if controlnet is None:
        if control_image is not None:
            raise PromptError(
                "control_image",
                "control_image: name the ControlNet to follow it with --cn NAME "
                f"({_offered(settings.controlnets, model, 'ControlNets')})",
            )
        if controlnet_weight is not None:
            typed, weight = controlnet_weight
            raise PromptError(
                typed, f"{typed} {weight:g}: only with --cn NAME and a control_image to follow"
            )
        return AddOns(loras=chosen)
    typed, wanted = controlnet
    spec = _find(settings.controlnets, wanted)
    if spec is None:
        raise PromptError(
            typed,
            f"{typed} {_short(wanted)}: no such ControlNet here "
            f"({_offered(settings.controlnets, model, 'ControlNets')})",
        )
    if spec.family != model.family:
        raise PromptError(
            typed,
            f"{typed} {spec.name}: made for {_family(spec.family)} models, but model "
            f"{model.name} is {_family(model.family)} "
            f"({_offered(settings.controlnets, model, 'ControlNets')})",
        )
    if control_link is not None and control_image is None:
        raise PromptError(
            typed,
            f"{typed} {spec.name} {_short(control_link)}: the linked picture can't be fetched "
            "here; use /imagine, or attach it with the control_image option",
        )
    if control_link is not None and control_image is not None:
        if control_image.source != control_link:
            raise PromptError(
                typed,
                f"{typed} {spec.name} {_short(control_link)}: the control_image option gives a "
                "picture to follow too; use one or the other",
            )
    if control_image is None:
        raise PromptError(
            typed,
            f"{typed} {spec.name}: attach the picture to follow with the control_image option, "
            f"or put its link after the name (it is turned into a {spec.preprocessor} map "
            "first)",
        )
    if control_image.role is not InputRole.CONTROL:
        raise ValueError(f"control_image: role must be {InputRole.CONTROL.value}")
    weight = 1.0 if controlnet_weight is None else controlnet_weight[1]
    return AddOns(
        loras=chosen, controlnet=spec.name, controlnet_weight=weight, inputs=(control_image,)
    )


def _loras(
    settings: EngineSettings, model: ModelSpec, asks: Sequence[LoraAsk]
) -> tuple[LoraWeight, ...]:
    chosen: dict[str, tuple[LoraAsk, LoraWeight]] = {}
    for ask in asks:
        spec = _find(settings.loras, ask.name)
        if spec is None:
            raise PromptError(
                ask.where,
                f"{ask.where} {_short(ask.name)}: no such LoRA here "
                f"({_offered(settings.loras, model, 'LoRAs')})",
            )
        if spec.family != model.family:
            raise PromptError(
                ask.where,
                f"{ask.where} {spec.name}: made for {_family(spec.family)} models, but model "
                f"{model.name} is {_family(model.family)} "
                f"({_offered(settings.loras, model, 'LoRAs')})",
            )
        weight = spec.default_weight if ask.weight is None else ask.weight
        if spec.name in chosen and not math.isclose(chosen[spec.name][1].weight, weight):
            earlier = chosen[spec.name][0]
            raise PromptError(
                ask.where,
                f"{ask.where} {spec.name}: given twice with different weights "
                f"({earlier.where} {spec.name}:{chosen[spec.name][1].weight:g} and "
                f"{ask.where} {spec.name}:{weight:g}); keep one",
            )
        chosen.setdefault(spec.name, (ask, LoraWeight(spec.name, weight)))
    return tuple(lora for _, lora in chosen.values())


class _Named(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def family(self) -> str: ...


_Spec = TypeVar("_Spec", bound=_Named)


def _find(specs: Sequence[_Spec], name: str) -> _Spec | None:
    # Names are matched without regard to case: members type them, owners configure them.
    for spec in specs:
        if spec.name.casefold() == name.casefold():
            return spec
    return None


def _offered(specs: Sequence[_Named], model: ModelSpec, what: str) -> str:
    if not specs:
        return f"this server has no {what}"
    fitting = [spec.name for spec in specs if spec.family == model.family]
    if not fitting:
        return f"none of this server's {what} fits model {model.name}; see /models"
    return f"{what} for model {model.name}: {', '.join(fitting)}"


def _family(family: str) -> str:
    return {"sd": "SD 1.x", "sdxl": "SDXL"}.get(family, family)


def _short(value: str, limit: int = 32) -> str:
    return value if len(value) <= limit else value[:limit] + "…"
