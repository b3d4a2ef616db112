"""Turn what users type into a validated `GenerationRequest`.

Long (about 870 lines) on purpose: it holds one idea, reading Midjourney's prompt syntax into
requests (the flags' table is generation/flags.py, `{…}` is generation/permutations.py), and
the readers of each field share one `_Inline` record of what was typed, which stays private here.

Users paste Midjourney prompts of every version, from 2022's v3 to v7, so this speaks
Midjourney's syntax: `--flags` at the end, `::` multi-prompt weights, phone-typed dashes.
Flags fall into three groups (see `generation.flags.FLAGS`), in any capitalisation
(`--AR`, `--Wallpaper`):

* honoured: `--ar`, `--seed`, `--no`, `--steps`, `--cfg`, `--sampler`, `--model`, `--repeat`,
  `--draft`, the configured LoRAs and ControlNets, `--lora`, `--cn`, `--cnw` (see
  `generation.addons`); and, for the bot to act on, `--p` (the profile codes, which add up over
  repeated flags) and the speed mode `--fast` / `--relax` / `--turbo`;
* mapped to an honest Stable Diffusion equivalent: `--q` (steps multiplier), `--chaos`
  (a more varied set of kept candidates), `--tile` (seamless tiling), `--stop` (stop early),
  and v1-v3's `--w W --h H` (the aspect ratio W:H; `--w` alone is v5's `--weird`);
* accepted and ignored with a note: Midjourney model, style, reference, video and legacy
  parameters that have no equivalent here. Their values are still checked against
  Midjourney's documented range, because a bad value is usually a typo that swallowed part
  of the prompt. Nothing is done with them, so one given several times with different values
  (`--sref 123 --sref 456`) is no conflict.

What is refused, with a message naming the flag: a bad value; an honoured or mapped flag given
twice with different values (the same value twice is harmless: pasted prompts do it); an
inline flag that contradicts a /imagine option; and an unknown flag, with one exception.

Unknown flags. A flag this table does not know is ignored with a note ("--foo 3 is not known
here; ignored") when it looks like a parameter Midjourney added since: a plain word followed
by at most one value word before the next flag or the end of the prompt. It is refused when it
is one or two edits from a known name (`--sed 5`: "did you mean --seed?"; a typo'd flag
silently ignored would surprise the member), when it is a known name with the value glued on
(`--ar16:9`), when it is another tool's flag (`--negative`, `--width`: the message says how
to ask for it here), or when more words follow it (`a --sparkly cat`), since those are the
prompt.

Other choices made here:

* `--ar` takes any whole-number ratio; beyond 4:1 (which v7 accepts) Stable Diffusion models
  tile their subject, so it is clamped to 4:1 or 1:4 with a note. Sizes come from
  `size_for_aspect`. The /imagine aspect option keeps its declared 1:4..4:1 range.
* A prompt wrapped in quotes, as copied from a web page or a spreadsheet cell, loses them; a
  stray quote glued to a value (`--ar 16:9"`) is dropped.
* A flag starts at a dash run not glued to a word: `--`, or one en/em dash as phones type it.
  `-- ar` with a space is read only for a known flag name, so prose dashes stay text.
* Words left after a one-value flag (`--ar 9:16, pixel art`) are kept as prompt text, with a
  note, rather than lost or refused.
* Image links at the start of the prompt are image prompts, as in Midjourney; with /imagine's
  attachment options and --sref/--oref/--cref they become `ParsedPrompt.image_refs` (see
  `generation.references`), which the bot fetches. A link later in the prompt is dropped with
  a note. Two or more image prompts need no words (a blend); a single one does.
* `::` weights lie in -100..100, at most 16 parts, and must add up to more than 0; the plain
  `request.prompt` keeps only the positively weighted parts, because CLIP ranks against it.
* `parse_jobs` is the /imagine entry point: it expands `{a, b}` permutations (see
  `generation.permutations`) and `--repeat`, and parses every job; `parse_prompt` parses one.

The module is pure (no torch, no diffusers) because the Discord front end imports it and must
start fast. Reading the typed text (clean-up, quotes, splitting off the flags, `::` weights) is
generation/prompt_text.py; what stays here is one idea, turning flags and options into a request,
long because every honoured and mapped flag's rule (and its conflicts with the /imagine options)
is spelled out here and nowhere else.
"""

from __future__ import annotations

import math
import operator
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast

from generation.addons import AddOns, LoraAsk, choose_add_ons, lora_value
from generation.contract import (
    DDPM_CLEAN_STEPS,
    MAX_CANDIDATES,
    MAX_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    GenerationRequest,
    InputImage,
    InputRole,
    JobKind,
    PromptPart,
    Sampler,
)
from generation.draft import make_draft
from generation.flags import (
    FLAGS_BY_NAME,
    LEGACY_WIDTH,
    MAX_ASPECT,
    MAX_GUIDANCE,
    MAX_PROFILE_CODES,
    FlagSpec,
    PromptError,
    Treatment,
    aspect_option,
    int_in,
    sampler_value,
    show_value,
    shown_fragment,
)
from generation.lora import apply_trigger_words
from generation.permutations import PermutationError, expand_permutations
from generation.prompt_text import (
    EDGE_JUNK,
    IMAGINE_PREFIX,
    URL,
    RawFlag,
    clean,
    is_blank,
    parse_weights,
    short,
    split_flags,
    take_values,
    unquote,
)
from generation.references import LINK, REFERENCE_FLAGS, WEIGHT_ROLES, ImageRef, image_references
from generation.settings import EngineSettings, ModelSpec

# Discord caps a slash-command string option at 6000 characters; anything longer came from
# somewhere else and is refused before any work is done on it.
MAX_INPUT_CHARS = 6000
MAX_NEGATIVE_CHARS = MAX_PROMPT_CHARS
# Above the default steps the samplers have converged: more steps cost GPU time and credits but
# add no detail, so --q 2 and --q 4 keep the default.
MAX_QUALITY_MULTIPLIER = 1.0
SIZE_STEP = 64
# One prompt never asks for more jobs than this in all (permutations x --repeat).
MAX_JOBS = 40


@dataclass(frozen=True)
class ImagineOptions:
    """The /imagine slash-command options; each one left as None is taken from the prompt."""

    negative: str | None = None
    aspect: str | None = None  # "W:H", e.g. "3:2"
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None
    lora: str | None = None  # "name" or "name:0.8, other", as after --lora
    # The picture a --cn ControlNet follows, already fetched (role CONTROL).
    control_image: InputImage | None = None
    # Image prompts attached to the command, as "attachment:<filename>" (fetched by the bot).
    images: tuple[str, ...] = ()
    # The roles of pictures the job keeps from the one it comes from (a remix): weights typed
    # for them are returned in `ParsedPrompt.kept_weights` rather than noted as ignored.
    kept: frozenset[InputRole] = frozenset()


@dataclass(frozen=True)
class PromptDefaults:
    """A member's saved settings (/settings). Each applies only where neither the prompt's
    flags nor the slash options say anything, so it can never conflict with what was typed."""

    aspect: str | None = None  # "W:H"
    model: str | None = None
    sampler: str | None = None
    steps: int | None = None


@dataclass(frozen=True)
class ParsedPrompt:
    request: GenerationRequest
    # Short lines the reply can show: what was ignored, mapped or moved.
    notes: tuple[str, ...] = ()
    # How many jobs `--repeat` asks for; `parse_jobs` makes them, each with its own seeds.
    repeat: int = 1
    # Pictures to fetch and attach as `request.inputs` (image prompts and references).
    image_refs: tuple[ImageRef, ...] = ()
    # Pictures only, no words (a blend): until the pictures are attached the request's prompt
    # is a placeholder, since a request needs words or image prompts.
    wordless: bool = False
    # Weights typed for the roles in `ImagineOptions.kept`: (role, flag as typed, weight).
    kept_weights: tuple[tuple[InputRole, str, float], ...] = ()
    # `--p`: None when not asked; () for one's own taste; else the profile codes named. The bot
    # turns them into `request.personalize` (bot/core/taste.py).
    personalize: tuple[str, ...] | None = None
    # `--fast`, `--relax` or `--turbo`: the speed mode asked for this job (None: the member's).
    speed: str | None = None

    def with_pictures(self, inputs: tuple[InputImage, ...]) -> ParsedPrompt:
        """This job with its fetched pictures appended to `request.inputs` (a wordless job's
        placeholder prompt goes: the pictures are what it is about)."""
        changes: dict[str, Any] = {"inputs": (*self.request.inputs, *inputs)}
        if self.wordless:
            changes |= {"prompt": "", "prompt_parts": ()}
        return replace(self, request=self.request.with_changes(**changes), wordless=False)


# ---------------------------------------------------------------------------------------------
# Aspect ratio to pixel size.


def size_for_aspect(
    ratio_w: int, ratio_h: int, base_resolution: int, max_pixels: int
) -> tuple[int, int]:
    """The size in multiples of 64 whose shape is closest to W:H and area closest to base².

    Both can rarely be exact on a 64-pixel grid (16:9 at 512 is 682.7x384), so candidates are
    scored by the log-error of the ratio plus half the log-error of the area: users see the
    shape, not the pixel count. The area target is lowered to `max_pixels` when the budget is
    smaller, and no candidate over the budget is considered. Ties go to the smaller image.
    """
    if ratio_w < 1 or ratio_h < 1:
        raise ValueError(f"aspect: both sides must be at least 1, got {ratio_w}:{ratio_h}")
    if base_resolution < SIZE_STEP or max_pixels < SIZE_STEP * SIZE_STEP:
        raise ValueError(
            f"base_resolution/max_pixels: need room for {SIZE_STEP}x{SIZE_STEP}, "
            f"got {base_resolution} and {max_pixels}"
        )
    ratio = ratio_w / ratio_h
    target_area = min(base_resolution * base_resolution, max_pixels)
    best: tuple[float, int, int, int] | None = None
    # For a given width the cost is convex in log(height) with its minimum at width / ratio
    # (the ratio term falls faster than the area term can rise), so the best height is one of
    # the two grid points around it, or the tallest one the budget allows if those do not fit.
    for width in range(SIZE_STEP, max_pixels // SIZE_STEP + 1, SIZE_STEP):
        exact = width / ratio
        below = max(SIZE_STEP, int(exact // SIZE_STEP) * SIZE_STEP)
        tallest = max_pixels // width // SIZE_STEP * SIZE_STEP
        for height in (below, below + SIZE_STEP, tallest):
            if height < SIZE_STEP:
                continue
            area = width * height
            if area > max_pixels:
                continue
            cost = abs(math.log(width / height / ratio)) + 0.5 * abs(math.log(area / target_area))
            # Rounded so that mirror-image candidates (0.5x vs 2x the area) tie exactly.
            key = (round(cost, 9), area, width, height)
            if best is None or key < best:
                best = key
    assert best is not None  # 64x64 always fits the budget checked above
    return best[2], best[3]


# ---------------------------------------------------------------------------------------------
# Putting it together.


@dataclass
class _Inline:
    """What the inline flags asked for, keyed by canonical flag name, with the spelling used."""

    values: dict[str, object] = field(default_factory=dict)
    typed: dict[str, str] = field(default_factory=dict)
    shown: dict[str, str] = field(default_factory=dict)
    # `--cn NAME https://…`: the picture the ControlNet follows, fetched by the bot beforehand.
    control_link: str | None = None


def _random_seed() -> int:
    # Leaves room for the seed + i of every candidate of one job to stay a valid seed.
    return secrets.randbelow(MAX_SEED - MAX_CANDIDATES + 2)


def parse_prompt(
    text: str,
    settings: EngineSettings,
    *,
    model: str | None = None,
    options: ImagineOptions | None = None,
    seed_source: Callable[[], int] = _random_seed,
    defaults: PromptDefaults | None = None,
) -> ParsedPrompt:
    """Parse a /imagine prompt with its options into an IMAGINE request, or raise PromptError.

    `seed_source` is called only when neither the prompt nor the options give a seed. Braces
    are prompt text here; `parse_jobs` is what expands permutations and repeats.
    """
    return _parse(text, settings, model, options, seed_source, defaults)[0]


def _parse(
    text: str,
    settings: EngineSettings,
    model: str | None,
    options: ImagineOptions | None,
    seed_source: Callable[[], int],
    defaults: PromptDefaults | None = None,
) -> tuple[ParsedPrompt, _Inline]:
    options = options or ImagineOptions()
    if len(text) > MAX_INPUT_CHARS:
        raise PromptError(
            "prompt", f"prompt: at most {MAX_INPUT_CHARS} characters with flags, got {len(text)}"
        )
    notes: list[str] = []
    cleaned = unquote(IMAGINE_PREFIX.sub("", unquote(clean(text))))
    prompt_text, raw_flags = split_flags(cleaned)
    legacy_size = any(flag.spec is FLAGS_BY_NAME["h"] for flag in raw_flags)

    inline = _Inline()
    for flag in raw_flags:
        if flag.spec is None:
            shown = shown_fragment(f"{flag.typed} {short(' '.join(flag.words))}".strip(), 60)
            notes.append(f"{shown} is not known here; ignored")
            continue
        spec = flag.spec
        if legacy_size and flag.typed == "--w":
            spec = LEGACY_WIDTH
        values, leftover = take_values(flag.words, spec)
        shown = " ".join(values)
        # A switch, or an optional value left out, is recorded as True.
        value = _check_value(flag, spec, shown, settings) if values else True
        if spec.treatment is Treatment.IGNORED:
            # Nothing is done with an ignored flag, so several values (v7 prompts carry several
            # --sref codes and --profile ids) cannot conflict; each is noted once.
            typed = shown_fragment(f"{flag.typed} {short(shown)}".strip(), 60)
            note = f"{typed} ignored ({spec.meaning})"
            if note not in notes:
                notes.append(note)
        elif spec.name == "personalize":
            # --p alone is one's own taste; codes name other members' (several add up).
            earlier_codes = cast(tuple[str, ...], inline.values.get("personalize", ()))
            codes = () if value is True else cast(tuple[str, ...], value)
            merged = tuple(dict.fromkeys((*earlier_codes, *codes)))
            # Each flag is checked alone; the cap is on all of them together.
            if len(merged) > MAX_PROFILE_CODES:
                raise PromptError(
                    flag.typed,
                    f"{flag.typed}: at most {MAX_PROFILE_CODES} profile codes, got {len(merged)}",
                )
            inline.values["personalize"] = merged
        elif spec.name == "lora":
            # Several --lora flags add up; generation.addons checks names and weights.
            earlier_loras = cast(tuple[LoraAsk, ...], inline.values.get("lora", ()))
            inline.values["lora"] = (*earlier_loras, *cast(tuple[LoraAsk, ...], value))
            inline.typed.setdefault("lora", flag.typed)
        elif spec.name in REFERENCE_FLAGS:
            # Several --sref/--cref links (or flags) add up, as in Midjourney.
            earlier_refs = cast(tuple[str, ...], inline.values.get(spec.name, ()))
            inline.values[spec.name] = (*earlier_refs, *cast(tuple[str, ...], value))
            inline.typed.setdefault(spec.name, flag.typed)
        elif spec.name in inline.values:
            # Pasted prompts repeat flags ("--v 5.1 … --v 5.1"), which is harmless; two
            # different values leave no way to know which one was meant.
            if value != inline.values[spec.name]:
                earlier = f"{inline.typed[spec.name]} {inline.shown[spec.name]}".strip()
                raise PromptError(
                    flag.typed,
                    f"{flag.typed}: given twice with different values "
                    f"({short(earlier)} and {short(f'{flag.typed} {shown}'.strip())}); keep one",
                )
        else:
            inline.values[spec.name] = value
            inline.typed[spec.name] = flag.typed
            inline.shown[spec.name] = shown
        if spec.name == "cn" and _cn_link(leftover):
            inline.control_link = _cn_link(leftover)
            leftover = leftover[1:]
        moved = " ".join(leftover).strip(EDGE_JUNK)
        if not is_blank(moved):
            # Midjourney wants flags last; rather than lose the words, keep them as prompt text.
            prompt_text = f"{prompt_text.rstrip(EDGE_JUNK)}, {moved}"
            kept = shown_fragment(short(moved), always_code=True)
            notes.append(f"{kept} after {flag.typed} was kept as prompt text")
    _legacy_aspect(inline, notes)
    options, model = _with_defaults(defaults, options, model, inline)

    prompt_text, leading_links = _take_image_prompts(prompt_text, notes)
    image_refs = image_references(
        inline.values, inline.typed, leading_links, options.images, notes, options.kept
    )
    parts = parse_weights(prompt_text)
    wordless = not parts
    if wordless:
        _check_wordless(image_refs)
        # Two or more pictures and no words: a blend, as in Midjourney. A request needs words
        # until its image prompts are attached, so it holds a placeholder till then
        # (`ParsedPrompt.with_pictures` empties it).
        parts = (PromptPart(f"a blend of {len(image_refs)} pictures", 1.0),)
    # What CLIP ranks against and what the metadata shows: the parts the user wants to see.
    prompt = ", ".join(part.text for part in parts if part.weight > 0)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError(
            "prompt", f"prompt: at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}"
        )
    # A single part is an ordinary prompt whatever its (positive) weight: weights are relative.
    prompt_parts = parts if len(parts) > 1 else ()

    model_spec = _model(settings, model, inline)
    add_ons = _add_ons(settings, model_spec, options, inline)
    width, height = _size(settings, model_spec.base_resolution, options, inline, notes)
    steps = _steps(settings, options, inline, notes)
    request = GenerationRequest(
        kind=JobKind.IMAGINE,
        prompt=prompt,
        negative_prompt=_negative(options, inline),
        width=width,
        height=height,
        steps=steps,
        guidance=_guidance(settings, options, inline),
        sampler=_chosen_sampler(settings, options, inline),
        seed=_seed(options, inline, seed_source),
        num_candidates=settings.num_candidates,
        num_kept=settings.num_kept,
        model=model_spec.name,
        prompt_parts=prompt_parts,
        chaos=math.floor(cast(float, inline.values.get("chaos", 0)) + 0.5),
        tile="tile" in inline.values,
        stop_percent=cast(int, inline.values.get("stop", 100)),
        loras=add_ons.loras,
        controlnet=add_ons.controlnet,
        controlnet_weight=add_ons.controlnet_weight,
        inputs=add_ons.inputs,
    )
    # The stored prompt (shown in the reply and written to the PNG) carries the LoRAs' trigger
    # words, so pasting it into AUTOMATIC1111 reproduces what the engine ran.
    request = apply_trigger_words(request, settings)
    if "draft" in inline.values:
        full_steps, full_sampler = request.steps, request.sampler
        try:
            request = make_draft(
                request, steps=settings.draft_steps, sampler=settings.draft_sampler
            )
        except ValueError as exc:
            raise PromptError(inline.typed["draft"], str(exc)) from None
        notes.append(
            f"{inline.typed['draft']} → a draft: {request.steps} steps with "
            f"{request.sampler.a1111_name} (full quality: {full_steps} with "
            f"{full_sampler.a1111_name}); ✨ Enhance renders an image at full quality"
        )
    if request.chaos:
        notes.append(f"{inline.typed['chaos']} {request.chaos} → a more varied grid")
    if request.stop_percent < 100:
        percent = request.stop_percent
        notes.append(f"{inline.typed['stop']} {percent} → denoising stops at {percent} %")
    if request.sampler is Sampler.DDPM and request.steps < DDPM_CLEAN_STEPS:
        notes.append(
            f"DDPM needs about {DDPM_CLEAN_STEPS} steps for a clean image; at {request.steps} "
            "expect noise (DDIM draws a clean one in 20-50)"
        )
    repeat = cast(int, inline.values.get("repeat", 1))
    kept_weights = tuple(
        (role, inline.typed[name], cast(float, inline.values[name]))
        for name, role in WEIGHT_ROLES.items()
        if name in inline.values and role in options.kept
    )
    parsed = ParsedPrompt(
        request=request,
        notes=tuple(notes),
        repeat=repeat,
        image_refs=image_refs,
        wordless=wordless,
        kept_weights=kept_weights,
        personalize=cast(tuple[str, ...] | None, inline.values.get("personalize")),
        speed=_speed(inline),
    )
    return parsed, inline


SPEED_FLAGS = ("fast", "relax", "turbo")


def _speed(inline: _Inline) -> str | None:
    """The one speed mode the flags ask for; two different ones leave no way to know which."""
    asked = [name for name in SPEED_FLAGS if name in inline.values]
    if len(asked) > 1:
        typed = " and ".join(inline.typed[name] for name in asked)
        raise PromptError(inline.typed[asked[1]], f"{typed}: choose one speed mode")
    return asked[0] if asked else None


def _check_wordless(image_refs: tuple[ImageRef, ...]) -> None:
    """A prompt without words is a blend of its image prompts: Midjourney takes two or more
    pictures alone, and wants words beside a single one."""
    count = sum(ref.role is InputRole.IMAGE_PROMPT for ref in image_refs)
    if count == 0:
        raise PromptError("prompt", "prompt: nothing to draw once the flags are taken out")
    if count == 1:
        raise PromptError(
            "prompt",
            "prompt: one image prompt needs words beside it (two to five pictures without "
            "words are blended)",
        )


def _with_defaults(
    defaults: PromptDefaults | None, options: ImagineOptions, model: str | None, inline: _Inline
) -> tuple[ImagineOptions, str | None]:
    """The member's defaults as if given as options, but only where nothing was typed: a
    default is never compared with a flag, so it can't make a prompt conflict."""
    if defaults is None:
        return options, model
    changes: dict[str, Any] = {}
    if defaults.aspect is not None and options.aspect is None and "ar" not in inline.values:
        changes["aspect"] = defaults.aspect
    typed_steps = {"steps", "quality"} & inline.values.keys()
    if defaults.steps is not None and options.steps is None and not typed_steps:
        changes["steps"] = defaults.steps
    if defaults.sampler is not None and options.sampler is None and "sampler" not in inline.values:
        changes["sampler"] = defaults.sampler
    if defaults.model is not None and model is None and "model" not in inline.values:
        model = defaults.model
    return replace(options, **changes), model


def _check_value(flag: RawFlag, spec: FlagSpec, value: str, settings: EngineSettings) -> object:
    if spec.name == "steps":
        return int_in(1, _max_steps(settings))(flag.typed, value)
    if spec.name == "lora":
        return lora_value(flag.typed, value)
    if spec.name == "model" and not value:
        raise _unknown_model(flag.typed, value, settings)
    assert spec.check is not None
    return spec.check(flag.typed, value)


def _add_ons(
    settings: EngineSettings, model: ModelSpec, options: ImagineOptions, inline: _Inline
) -> AddOns:
    """The LoRAs (the lora option's, then the flags') and the ControlNet with its picture."""
    loras = lora_value("lora", options.lora) if options.lora is not None else ()
    loras += cast(tuple[LoraAsk, ...], inline.values.get("lora", ()))
    controlnet = weight = None
    if "cn" in inline.values:
        controlnet = (inline.typed["cn"], cast(str, inline.values["cn"]))
    if "cnw" in inline.values:
        weight = (inline.typed["cnw"], cast(float, inline.values["cnw"]))
    return choose_add_ons(
        settings,
        model,
        loras=loras,
        controlnet=controlnet,
        controlnet_weight=weight,
        control_image=options.control_image,
        control_link=inline.control_link,
    )


def _cn_link(words: list[str]) -> str | None:
    """The link right after `--cn NAME`, if that is what follows the name."""
    if words and LINK.fullmatch(words[0].strip("<>")):
        return words[0].strip("<>")
    return None


def _known_flags(text: str) -> list[RawFlag] | None:
    """The prompt's flags, or None when it has one the parser refuses (a /prefer option such as
    `--mystyle` is only expanded by the bot later; parsing reports anything else)."""
    try:
        return split_flags(unquote(IMAGINE_PREFIX.sub("", unquote(clean(text)))))[1]
    except PromptError:
        return None


# `--cn NAME LINK` found without the flag splitter, for prompts it refuses as they stand.
_CN_LINK = re.compile(r"(?:^|\s)--(?:cn|controlnet)\s+\S+\s+<?(https?://[^\s<>]+)>?", re.IGNORECASE)


def typed_flags(text: str) -> frozenset[str]:
    """The canonical names of the known flags in a prompt (`--controlnet` counts as "cn");
    a prompt the parser would refuse has none here (parsing it says why)."""
    flags = _known_flags(text) or []
    return frozenset(flag.spec.name for flag in flags if flag.spec is not None)


def control_link(text: str) -> str | None:
    """The picture link after `--cn NAME` in a prompt (`--cn canny https://…`), or None. The bot
    fetches it before parsing, as it does the `control_image` option, and passes it as
    `ImagineOptions.control_image` with the link as its source."""
    flags = _known_flags(text)
    if flags is None:
        match = _CN_LINK.search(text)
        return match[1] if match else None
    for flag in flags:
        if flag.spec is not None and flag.spec.name == "cn":
            link = _cn_link(take_values(flag.words, flag.spec)[1])
            if link is not None:
                return link
    return None


def _legacy_aspect(inline: _Inline, notes: list[str]) -> None:
    """Turn Midjourney v1-v3's `--w W --h H` into the aspect ratio W:H they meant."""
    if "h" not in inline.values:
        return
    typed = f"{inline.typed['h']} {inline.shown['h']}"
    if "w" not in inline.values:
        notes.append(f"{typed} ignored (legacy height; it needs --w as well)")
        return
    width, height = cast(int, inline.values["w"]), cast(int, inline.values["h"])
    divisor = math.gcd(width, height)
    ratio = width // divisor, height // divisor
    label = f"--w {inline.shown['w']} --h {inline.shown['h']}"
    if "ar" in inline.values and inline.values["ar"] != ratio:
        raise PromptError(
            "--ar",
            f"{inline.typed['ar']} {inline.shown['ar']} conflicts with {label} "
            f"({ratio[0]}:{ratio[1]}); keep one",
        )
    if "ar" not in inline.values:
        inline.values["ar"] = ratio
        inline.typed["ar"] = inline.typed["w"]
        inline.shown["ar"] = label.removeprefix("--w ")
    notes.append(f"{label} → --ar {ratio[0]}:{ratio[1]}")


def _take_image_prompts(text: str, notes: list[str]) -> tuple[str, list[str]]:
    """The prompt without its links, and the links at its start: Midjourney's image prompts.
    A link after the first words is dropped with a note (Midjourney wants them first)."""
    leading: list[str] = []
    kept: list[str] = []
    position = 0
    for match in URL.finditer(text):
        before = text[position : match.start()]
        position = match.end()
        link = match[0].strip("<>").replace(" ", "")
        kept.append(before)
        if not kept or all(is_blank(piece) for piece in kept):
            leading.append(link)
            continue
        shown = shown_fragment(short(link, 32), always_code=True)
        notes.append(f"link {shown} ignored (image prompts go at the start)")
    kept.append(text[position:])
    return " ".join(" ".join(kept).split()), leading


def _max_steps(settings: EngineSettings) -> int:
    return min(settings.max_steps, MAX_STEPS)


def _conflict(flag: str, flag_value: str, option: str, option_value: object) -> PromptError:
    return PromptError(
        flag,
        f"{flag} {short(flag_value)} conflicts with the {option} option ({option_value}); "
        "use one or the other",
    )


def _agreed(
    inline: _Inline,
    flag: str,
    option: str,
    option_value: object,
    *,
    option_shown: object = None,
    same: Callable[[Any, Any], bool] = operator.eq,
) -> Any:
    """What the inline flag and the /imagine option agree on (None when neither was given);
    a flag contradicting its option is an error naming both."""
    if flag not in inline.values:
        return option_value
    asked = inline.values[flag]
    if option_value is not None and not same(asked, option_value):
        shown = option_value if option_shown is None else option_shown
        raise _conflict(inline.typed[flag], inline.shown[flag], option, shown)
    return asked


def _model(settings: EngineSettings, model: str | None, inline: _Inline) -> ModelSpec:
    wanted = cast(str | None, _agreed(inline, "model", "model", model))
    try:
        return settings.model(wanted)
    except ValueError:
        raise _unknown_model(inline.typed.get("model", "model"), wanted or "", settings) from None


def _unknown_model(flag: str, name: str, settings: EngineSettings) -> PromptError:
    names = ", ".join(spec.name for spec in settings.models)
    return PromptError(
        flag, f"{flag}: expected a configured model ({names}), got {show_value(name)}"
    )


def _size(
    settings: EngineSettings,
    base_resolution: int,
    options: ImagineOptions,
    inline: _Inline,
    notes: list[str],
) -> tuple[int, int]:
    aspect, label = (1, 1), ""
    if options.aspect is not None:
        aspect = aspect_option("aspect", clean(options.aspect).replace(" ", ""))
        label = f"aspect {options.aspect}"
    if "ar" in inline.values:
        given = aspect if options.aspect is not None else None
        aspect = _agreed(inline, "ar", "aspect", given, option_shown=options.aspect)
        label = f"{inline.typed['ar']} {inline.shown['ar']}".strip()
    if aspect[0] > MAX_ASPECT * aspect[1] or aspect[1] > MAX_ASPECT * aspect[0]:
        # Midjourney v7 draws up to 10:1 and beyond; Stable Diffusion models tile their
        # subject past 4:1, so the ratio is clamped rather than refused.
        aspect = (MAX_ASPECT, 1) if aspect[0] > aspect[1] else (1, MAX_ASPECT)
        notes.append(
            f"{label} → {aspect[0]}:{aspect[1]}, the most elongated ratio this model draws"
        )
        label = f"{aspect[0]}:{aspect[1]}"
    budget = min(settings.max_pixels, MAX_PIXELS)
    width, height = size_for_aspect(aspect[0], aspect[1], base_resolution, budget)
    off_by = abs(math.log(width / height * aspect[1] / aspect[0]))
    if off_by > math.log(1.05):
        notes.append(f"{label} → {width}x{height} (sizes go in steps of {SIZE_STEP})")
    return width, height


def _steps(
    settings: EngineSettings, options: ImagineOptions, inline: _Inline, notes: list[str]
) -> int:
    limit = _max_steps(settings)
    steps: int | None = None
    if options.steps is not None:
        steps = _option_int("steps", options.steps, 1, limit)
    steps = cast(int | None, _agreed(inline, "steps", "steps", steps))
    quality = cast(float | None, inline.values.get("quality"))
    if quality is None:
        return steps if steps is not None else min(settings.default_steps, limit)
    typed = f"{inline.typed['quality']} {inline.shown['quality']}"
    if steps is not None:
        notes.append(f"{typed} ignored: steps set to {steps}")
        return steps
    wanted = max(1, round(settings.default_steps * min(quality, MAX_QUALITY_MULTIPLIER)))
    wanted = min(wanted, limit)
    if quality > MAX_QUALITY_MULTIPLIER:
        notes.append(f"{typed} → {wanted} steps, the default (more steps add no detail here)")
    else:
        notes.append(f"{typed} → {wanted} steps")
    return wanted


def _guidance(settings: EngineSettings, options: ImagineOptions, inline: _Inline) -> float:
    guidance: float | None = None
    if options.guidance is not None:
        value = options.guidance
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PromptError("guidance", f"guidance: expected a number, got {value!r}")
        if not (math.isfinite(value) and 0 <= value <= MAX_GUIDANCE):
            raise PromptError(
                "guidance",
                f"guidance: expected a number between 0 and {MAX_GUIDANCE:g}, got {value}",
            )
        guidance = float(value)
    guidance = cast(float | None, _agreed(inline, "cfg", "guidance", guidance, same=math.isclose))
    return settings.default_guidance if guidance is None else guidance


def _chosen_sampler(settings: EngineSettings, options: ImagineOptions, inline: _Inline) -> Sampler:
    sampler: Sampler | None = None
    if options.sampler is not None:
        sampler = sampler_value("sampler", options.sampler)
    sampler = cast(Sampler | None, _agreed(inline, "sampler", "sampler", sampler))
    return settings.default_sampler if sampler is None else sampler


def _seed(options: ImagineOptions, inline: _Inline, seed_source: Callable[[], int]) -> int:
    seed: int | None = None
    if options.seed is not None:
        seed = _option_int("seed", options.seed, 0, MAX_SEED)
    seed = cast(int | None, _agreed(inline, "seed", "seed", seed))
    return seed_source() if seed is None else seed


def _negative(options: ImagineOptions, inline: _Inline) -> str:
    pieces = []
    if options.negative is not None:
        pieces.append(clean(options.negative).strip(EDGE_JUNK))
    if "no" in inline.values:
        pieces.append(cast(str, inline.values["no"]).strip(EDGE_JUNK))
    negative = ", ".join(piece for piece in pieces if piece)
    if len(negative) > MAX_NEGATIVE_CHARS:
        flag = inline.typed.get("no", "negative")
        raise PromptError(
            flag,
            f"{flag}: the negative prompt may have at most {MAX_NEGATIVE_CHARS} characters, "
            f"got {len(negative)}",
        )
    return negative


def _option_int(name: str, value: object, low: int, high: int) -> int:
    # bool is an int subclass; True as a seed is a caller bug worth refusing.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PromptError(
            name, f"{name}: expected a whole number between {low} and {high}, got {value!r}"
        )
    return value


# ---------------------------------------------------------------------------------------------
# Several jobs from one prompt: permutations and --repeat.


def parse_jobs(
    text: str,
    settings: EngineSettings,
    *,
    model: str | None = None,
    options: ImagineOptions | None = None,
    max_jobs: int = MAX_JOBS,
    seed_source: Callable[[], int] = _random_seed,
    defaults: PromptDefaults | None = None,
) -> list[ParsedPrompt]:
    """Every job a /imagine prompt asks for, each fully parsed, or PromptError for the whole.

    The prompt's `{…}` permutations are expanded first (see `generation.permutations`), each
    combination is parsed like `parse_prompt` would, and each is repeated as its `--repeat`
    says. Jobs come in Midjourney's order: combination by combination, repeats together. A
    request for more than `max_jobs` jobs, or with any combination invalid, is refused whole
    and the message says which combination.

    Seeds: one seed is drawn (or given by `--seed` or the seed option) and every combination
    starts from it, so the grids differ by their prompt only. The k-th repeat (from 0) uses
    seed + k × num_candidates, so that no two jobs share a candidate's seed and each can be
    re-run alone with `--seed`. Counting wraps around modulo MAX_SEED - num_candidates + 2,
    the number of seeds that leave room for every candidate's seed + i.
    """
    if len(text) > MAX_INPUT_CHARS:
        raise PromptError(
            "prompt", f"prompt: at most {MAX_INPUT_CHARS} characters with flags, got {len(text)}"
        )
    try:
        prompts = expand_permutations(text, max_jobs)
    except PermutationError as exc:
        raise PromptError("{}", str(exc)) from None

    drawn: list[int] = []

    def shared_seed() -> int:
        if not drawn:
            drawn.append(seed_source())
        return drawn[0]

    parsed: list[ParsedPrompt] = []
    repeat_typed: list[str] = []
    for index, prompt in enumerate(prompts, start=1):
        try:
            job, inline = _parse(prompt, settings, model, options, shared_seed, defaults)
            parsed.append(job)
            repeat_typed.append(inline.typed.get("repeat", "--repeat"))
        except PromptError as exc:
            if len(prompts) == 1:
                raise
            raise PromptError(
                exc.flag,
                f"combination {index} of {len(prompts)} ({show_value(prompt, 60)}): {exc}",
            ) from None

    total = sum(job.repeat for job in parsed)
    if total > max_jobs:
        most = max(range(len(parsed)), key=lambda i: parsed[i].repeat)
        flag = repeat_typed[most]
        how = ""
        if len(parsed) > 1 and len({job.repeat for job in parsed}) == 1:
            how = f" ({len(parsed)} combinations × {flag} {parsed[most].repeat})"
        elif len(parsed) > 1:
            how = f" ({len(parsed)} combinations, each with its {flag})"
        raise PromptError(
            flag, f"{flag}: this prompt makes {total} jobs{how}; at most {max_jobs} are allowed"
        )
    jobs: list[ParsedPrompt] = []
    for job, flag in zip(parsed, repeat_typed, strict=True):
        request = job.request
        seeds = [_repeat_seed(request.seed, k, request.num_candidates) for k in range(job.repeat)]
        notes = job.notes
        if job.repeat > 1:
            shown = ", ".join(str(seed) for seed in seeds[:4]) + (", …" if len(seeds) > 4 else "")
            notes = (*notes, f"{flag} {job.repeat} → {job.repeat} jobs, seeds {shown}")
        jobs.extend(
            replace(job, request=replace(request, seed=seed), notes=notes) for seed in seeds
        )
    return jobs


def _repeat_seed(seed: int, repeat_index: int, num_candidates: int) -> int:
    if repeat_index == 0:
        return seed
    # Room at the top for seed + i of every candidate, as _random_seed leaves.
    span = MAX_SEED - num_candidates + 2
    return (seed + repeat_index * num_candidates) % span
