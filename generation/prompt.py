"""Turn what users type into a validated `GenerationRequest`.

Users paste Midjourney prompts, so this speaks Midjourney's syntax: `--flags` at the end,
`::` multi-prompt weights, phone-typed dashes. Flags fall into three groups (see `FLAGS`):

* honoured: `--ar`, `--seed`, `--no`, `--steps`, `--cfg`, `--sampler`, `--model`;
* mapped to an honest Stable Diffusion equivalent: `--q` (steps multiplier), `--chaos`
  (a more varied set of kept candidates), `--tile` (seamless tiling), `--stop` (stop early);
* accepted and ignored with a note: Midjourney model, style and reference parameters that have
  no equivalent here. Their values are still checked against Midjourney's documented range,
  because a bad value is usually a typo that swallowed part of the prompt.

Anything else that looks like a flag is an error naming it, as are bad values, a flag given
twice with different values (the same value twice is harmless and accepted: pasted prompts do
it) and an inline flag that contradicts a /imagine option. Other choices made here:

* `--ar` takes whole-number ratios from 1:4 to 4:1; sizes come from `size_for_aspect`.
* A flag starts at a dash run not glued to a word: `--`, or one en/em dash as phones type it.
  `-- ar` with a space is read only for a known flag name, so prose dashes stay text.
* Words left after a one-value flag (`--ar 9:16, pixel art`) are kept as prompt text, with a
  note, rather than lost or refused.
* Image links (Midjourney image prompts) are dropped with a note: there are no image prompts.
* `::` weights lie in -100..100, at most 16 parts, and must add up to more than 0; the plain
  `request.prompt` keeps only the positively weighted parts, because CLIP ranks against it.

The module is pure (no torch, no diffusers) because the Discord front end imports it and must
start fast.
"""

from __future__ import annotations

import math
import operator
import re
import secrets
import string
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any, cast

from generation.contract import (
    MAX_CANDIDATES,
    MAX_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    GenerationRequest,
    JobKind,
    PromptPart,
    Sampler,
)
from generation.settings import EngineSettings, ModelSpec

# Discord caps a slash-command string option at 6000 characters; anything longer came from
# somewhere else and is refused before any work is done on it.
MAX_INPUT_CHARS = 6000
MAX_NEGATIVE_CHARS = MAX_PROMPT_CHARS
# Each `::` part may cost a text-encoder pass, so their number is bounded.
MAX_PROMPT_PARTS = 16
MAX_PART_WEIGHT = 100.0
# Beyond 4:1 Stable Diffusion models tile their subject; the corpus never goes past 1:2.
MAX_ASPECT = 4
MAX_GUIDANCE = 30.0
# Midjourney's --quality values, as multipliers of the configured default steps.
QUALITY_VALUES = (0.25, 0.5, 1.0, 2.0, 4.0)
# Above the default steps the samplers have converged: more steps cost GPU time and credits but
# add no detail, so --q 2 and --q 4 keep the default.
MAX_QUALITY_MULTIPLIER = 1.0
SIZE_STEP = 64


class PromptError(ValueError):
    """A user mistake in the prompt or the /imagine options; the message is safe to show.

    `flag` names what was wrong: `--ar` for an inline flag (as typed, with ASCII dashes), the
    option name (`aspect`, `seed` …) for a /imagine option, `::` for a multi-prompt weight, and
    `prompt` for the prompt text itself.
    """

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


@dataclass(frozen=True)
class ImagineOptions:
    """The /imagine slash-command options; each one left as None is taken from the prompt."""

    negative: str | None = None
    aspect: str | None = None  # "W:H", e.g. "3:2"
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    sampler: str | None = None


@dataclass(frozen=True)
class ParsedPrompt:
    request: GenerationRequest
    # Short lines the reply can show: what was ignored, mapped or moved.
    notes: tuple[str, ...] = ()


class Treatment(StrEnum):
    HONOURED = "honoured"
    MAPPED = "mapped"
    IGNORED = "ignored"


class Arity(Enum):
    NONE = "none"  # a switch: --tile
    ONE = "one"  # exactly one word: --ar 3:2
    OPTIONAL = "optional"  # one word if it looks like a value: --niji, --niji 6
    REST = "rest"  # every word up to the next flag, at least one: --no a, b
    OPTIONAL_REST = "optional_rest"  # every word up to the next flag, maybe none: --p


# A value checker gets the flag as typed and the value, and returns the parsed value or raises.
Check = Callable[[str, str], object]


@dataclass(frozen=True)
class FlagSpec:
    names: tuple[str, ...]  # the canonical name first, then aliases; without dashes
    treatment: Treatment
    arity: Arity
    meaning: str  # for notes and /help
    value_hint: str = ""  # for /help, e.g. "W:H"
    check: Check | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.names[0]


# ---------------------------------------------------------------------------------------------
# Value checkers. Messages always name the flag and what is accepted.

_INT = re.compile(r"[+-]?[0-9]+")
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
# Longer digit strings are out of any range here; refusing them early also keeps int() away
# from Python's 4300-digit conversion limit.
_MAX_NUMBER_CHARS = 24


def _show(value: str, limit: int = 40) -> str:
    """Quote a user value for a message, cut short so a 10,000-character value stays readable."""
    if not value:
        return "nothing"
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _int_in(low: int, high: int) -> Check:
    def check(flag: str, value: str) -> int:
        if len(value) <= _MAX_NUMBER_CHARS and _INT.fullmatch(value):
            number = int(value)
            if low <= number <= high:
                return number
        raise PromptError(
            flag, f"{flag}: expected a whole number between {low} and {high}, got {_show(value)}"
        )

    return check


def _number_in(low: float, high: float, expected: str | None = None) -> Check:
    expected = expected or f"a number between {low:g} and {high:g}"

    def check(flag: str, value: str) -> float:
        if len(value) <= _MAX_NUMBER_CHARS and _NUMBER.fullmatch(value):
            number = float(value)
            if math.isfinite(number) and low <= number <= high:
                return number
        raise PromptError(flag, f"{flag}: expected {expected}, got {_show(value)}")

    return check


def _one_of(*choices: str) -> Check:
    def check(flag: str, value: str) -> str:
        if value.lower() in choices:
            return value.lower()
        raise PromptError(flag, f"{flag}: expected one of {', '.join(choices)}, got {_show(value)}")

    return check


def _any_word(flag: str, value: str) -> str:
    if not value:
        raise PromptError(flag, f"{flag}: expected a value, got nothing")
    return value


def _aspect(flag: str, value: str) -> tuple[int, int]:
    match = re.fullmatch(r"([0-9]{1,5}):([0-9]{1,5})", value)
    if match:
        width, height = int(match[1]), int(match[2])
        if width and height and 1 / MAX_ASPECT <= width / height <= MAX_ASPECT:
            # Reduced, so that 6:4 and 3:2 compare equal when a flag meets an option.
            divisor = math.gcd(width, height)
            return width // divisor, height // divisor
    raise PromptError(
        flag,
        f"{flag}: expected W:H with whole numbers between 1:{MAX_ASPECT} and {MAX_ASPECT}:1, "
        f"got {_show(value)}",
    )


def _quality(flag: str, value: str) -> float:
    if len(value) <= _MAX_NUMBER_CHARS and _NUMBER.fullmatch(value):
        if float(value) in QUALITY_VALUES:
            return float(value)
    accepted = ", ".join(f"{q:g}".removeprefix("0") for q in QUALITY_VALUES)
    raise PromptError(flag, f"{flag}: expected one of {accepted}, got {_show(value)}")


def _sampler(flag: str, value: str) -> Sampler:
    try:
        return Sampler.parse(value)
    except ValueError:
        accepted = ", ".join(f"{s.value} ({s.a1111_name})" for s in Sampler)
        raise PromptError(
            flag, f"{flag}: expected a sampler, one of {accepted}; got {_show(value)}"
        ) from None


_VERSION = _number_in(1, 10, "a Midjourney version number such as 5.2, 6 or 7")


# ---------------------------------------------------------------------------------------------
# The flag table, which /help can render as well.

FLAGS: tuple[FlagSpec, ...] = (
    # Honoured: they mean the same thing here as in Midjourney (or in AUTOMATIC1111).
    FlagSpec(("ar", "aspect"), Treatment.HONOURED, Arity.ONE, "aspect ratio", "W:H", _aspect),
    FlagSpec(("seed",), Treatment.HONOURED, Arity.ONE, "seed", "N", _int_in(0, MAX_SEED)),
    FlagSpec(("no",), Treatment.HONOURED, Arity.REST, "negative prompt", "words", _any_word),
    FlagSpec(("steps",), Treatment.HONOURED, Arity.ONE, "denoising steps", "N"),  # max: config
    FlagSpec(
        ("cfg", "guidance"),
        Treatment.HONOURED,
        Arity.ONE,
        "guidance scale",
        "X",
        _number_in(0, MAX_GUIDANCE),
    ),
    # REST so that AUTOMATIC1111 spellings with spaces ("DPM++ 2M Karras") work.
    FlagSpec(("sampler",), Treatment.HONOURED, Arity.REST, "sampler", "NAME", _sampler),
    FlagSpec(("model",), Treatment.HONOURED, Arity.REST, "model", "NAME", _any_word),
    # Mapped: a Stable Diffusion equivalent that does what the Midjourney user meant.
    FlagSpec(
        ("quality", "q"),
        Treatment.MAPPED,
        Arity.ONE,
        "fewer steps at .25 and .5; 1, 2 and 4 all use the default steps (more add no detail)",
        ".25|.5|1|2|4",
        _quality,
    ),
    FlagSpec(
        ("chaos", "c"),
        Treatment.MAPPED,
        Arity.ONE,
        "more varied candidates",
        "0-100",
        # The corpus has "--c 1.5", which Midjourney took; it is rounded here.
        _number_in(0, 100),
    ),
    FlagSpec(("tile",), Treatment.MAPPED, Arity.NONE, "seamless tiling"),
    FlagSpec(
        ("stop",), Treatment.MAPPED, Arity.ONE, "stop denoising early", "10-100", _int_in(10, 100)
    ),
    # Ignored: Midjourney-only models, aesthetics, references, modes. Ranges are the widest any
    # Midjourney version documented (V3 took --stylize up to 60000, and the corpus has 6000),
    # and decimals pass: the value only has to look like what Midjourney would have taken.
    FlagSpec(
        ("version", "v"), Treatment.IGNORED, Arity.ONE, "Midjourney model version", "", _VERSION
    ),
    FlagSpec(("niji",), Treatment.IGNORED, Arity.OPTIONAL, "Midjourney anime model", "", _VERSION),
    FlagSpec(("style",), Treatment.IGNORED, Arity.ONE, "Midjourney style", "", _any_word),
    FlagSpec(("raw",), Treatment.IGNORED, Arity.NONE, "Midjourney raw style"),
    FlagSpec(
        ("stylize", "s"),
        Treatment.IGNORED,
        Arity.ONE,
        "Midjourney stylize",
        "",
        _number_in(0, 60000),
    ),
    FlagSpec(
        ("weird", "w"), Treatment.IGNORED, Arity.ONE, "Midjourney weird", "", _number_in(0, 3000)
    ),
    FlagSpec(
        ("exp",), Treatment.IGNORED, Arity.ONE, "Midjourney aesthetics", "", _number_in(0, 100)
    ),
    FlagSpec(("iw",), Treatment.IGNORED, Arity.ONE, "image prompt weight", "", _number_in(0, 3)),
    FlagSpec(("sref",), Treatment.IGNORED, Arity.REST, "style reference", "", _any_word),
    FlagSpec(
        ("sw",), Treatment.IGNORED, Arity.ONE, "style reference weight", "", _number_in(0, 1000)
    ),
    FlagSpec(("sv",), Treatment.IGNORED, Arity.ONE, "style reference version", "", _VERSION),
    FlagSpec(("cref",), Treatment.IGNORED, Arity.REST, "character reference", "", _any_word),
    FlagSpec(
        ("cw",), Treatment.IGNORED, Arity.ONE, "character reference weight", "", _number_in(0, 100)
    ),
    FlagSpec(("oref",), Treatment.IGNORED, Arity.ONE, "omni reference", "", _any_word),
    FlagSpec(
        ("ow",), Treatment.IGNORED, Arity.ONE, "omni reference weight", "", _number_in(1, 1000)
    ),
    FlagSpec(
        ("personalize", "p", "profile"),
        Treatment.IGNORED,
        Arity.OPTIONAL_REST,
        "Midjourney personalization",
        "",
        _any_word,
    ),
    FlagSpec(
        ("repeat", "r"), Treatment.IGNORED, Arity.ONE, "one grid per command", "", _int_in(1, 40)
    ),
    FlagSpec(
        ("sameseed",),
        Treatment.IGNORED,
        Arity.OPTIONAL,
        "legacy Midjourney seed mode",
        "",
        _int_in(0, MAX_SEED),
    ),
    FlagSpec(("hd",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney model"),
    FlagSpec(("test",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney model"),
    FlagSpec(("testp",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney model"),
    FlagSpec(("creative",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney model"),
    FlagSpec(("uplight",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney upscaler"),
    FlagSpec(("upbeta",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney upscaler"),
    FlagSpec(("upanime",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney upscaler"),
    FlagSpec(("draft",), Treatment.IGNORED, Arity.NONE, "Midjourney speed mode"),
    FlagSpec(("fast",), Treatment.IGNORED, Arity.NONE, "Midjourney speed mode"),
    FlagSpec(("relax",), Treatment.IGNORED, Arity.NONE, "Midjourney speed mode"),
    FlagSpec(("turbo",), Treatment.IGNORED, Arity.NONE, "Midjourney speed mode"),
    FlagSpec(("video",), Treatment.IGNORED, Arity.NONE, "Midjourney video"),
    FlagSpec(
        ("motion",), Treatment.IGNORED, Arity.ONE, "Midjourney video", "", _one_of("low", "high")
    ),
    FlagSpec(("loop",), Treatment.IGNORED, Arity.NONE, "Midjourney video"),
    FlagSpec(("end",), Treatment.IGNORED, Arity.ONE, "Midjourney video", "", _any_word),
    FlagSpec(("bs",), Treatment.IGNORED, Arity.ONE, "Midjourney video", "", _one_of("1", "2", "4")),
)

_BY_NAME: dict[str, FlagSpec] = {name: spec for spec in FLAGS for name in spec.names}


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
# Text clean-up, flag splitting, `::` weights.

# Hyphen-like characters phones and word processors put where the user typed "-".
_DASHES = "\\-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"
# A single one of these is how "--" comes out of iOS/macOS smart punctuation.
_LONG_DASHES = "\u2013\u2014\u2015\ufe58"
# A flag starts at a run of dashes not glued to a word, so "1970–present" and "well--known"
# stay text, while "sea.--ar 4:5" (corpus) is a flag.
_FLAG_CANDIDATE = re.compile(
    rf"(?<![\w{_DASHES}])(?P<marker>[{_DASHES}]+)(?P<space> ?)(?P<name>[A-Za-z]\S*)"
)
_IMAGINE_PREFIX = re.compile(r"^/imagine\b\s*(?:prompt\s*:)?\s*", re.IGNORECASE)
# Image prompts. The corpus has links mangled by a scraper ("https://s. mj. run/qEPRlfloqJU"),
# so a host may contain ". " if the link goes on with a path.
_URL = re.compile(r"<?https?://(?:(?:[\w-]+\. ?)+[\w-]+/\S*|\S+)", re.IGNORECASE)
_WEIGHT = re.compile(r"::(?P<weight>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?!\w))?")
_EDGE_JUNK = " ,;"


def _clean(text: str) -> str:
    """Drop control and invisible format characters, collapse whitespace."""
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if char.isspace():
            kept.append(" ")
        # Cc: NUL, ESC …; Cf: zero-width spaces, bidi overrides; Cs: lone surrogates, which
        # cannot even be encoded into PNG metadata.
        elif category not in ("Cc", "Cf", "Cs"):
            kept.append(char)
    return " ".join("".join(kept).split())


def _is_blank(text: str) -> bool:
    return all(char in string.punctuation or char.isspace() for char in text)


@dataclass
class _RawFlag:
    typed: str  # "--" + the name as typed, lower-cased: how messages refer to it
    spec: FlagSpec
    words: list[str]


def _split_flags(text: str) -> tuple[str, list[_RawFlag]]:
    """Return the prompt text before the first flag, and each flag with the words after it."""
    starts: list[tuple[re.Match[str], FlagSpec, str]] = []
    for match in _FLAG_CANDIDATE.finditer(text):
        marker, spaced = match["marker"], bool(match["space"])
        if len(marker) < 2 and marker not in _LONG_DASHES:
            continue  # a single hyphen is text ("-ar", "Award - winning")
        name = match["name"].rstrip(",;.").lower()
        spec = _BY_NAME.get(name)
        if spaced and (marker != "--" or spec is None):
            continue  # "-- ar 51:81" (corpus) is a flag; "salon – flat view" is prose
        if spec is None:
            raise PromptError(f"--{_short(name)}", _unknown_flag_message(name))
        starts.append((match, spec, name))

    if not starts:
        return text, []
    flags = []
    for index, (match, spec, name) in enumerate(starts):
        end = starts[index + 1][0].start() if index + 1 < len(starts) else len(text)
        flags.append(_RawFlag(f"--{name}", spec, text[match.end() : end].split()))
    return text[: starts[0][0].start()], flags


def _unknown_flag_message(name: str) -> str:
    for known in sorted(_BY_NAME, key=len, reverse=True):
        rest = name[len(known) :]
        if name.startswith(known) and (rest[:1].isdigit() or rest[:1] in (":", ".")):
            return f"--{_short(name)}: unknown flag; did you mean '--{known} {_short(rest)}'?"
    honoured = ", ".join(
        f"--{spec.name}" for spec in FLAGS if spec.treatment is not Treatment.IGNORED
    )
    return (
        f"--{_short(name)}: unknown flag; this bot understands {honoured} "
        "and ignores Midjourney's other parameters"
    )


def _take_values(flag: _RawFlag) -> tuple[list[str], list[str]]:
    """Split the words after a flag into its values and leftover prompt text.

    A flag that needs a value and has none gets `[""]`, so that its checker reports it with
    the accepted range.
    """
    words = flag.words
    arity = flag.spec.arity
    if arity is Arity.NONE:
        return [], words
    if arity is Arity.ONE:
        if not words:
            return [""], []
        return [_value_word(words[0])], words[1:]
    if arity is Arity.OPTIONAL:
        # "--niji 6" takes the number; "--niji" followed by text does not take the text.
        if words and _NUMBER.fullmatch(_value_word(words[0])):
            return [_value_word(words[0])], words[1:]
        return [], words
    if arity is Arity.REST and not words:
        return [""], []
    return words, []


def _value_word(word: str) -> str:
    # NFKC turns full-width digits and colons from CJK keyboards into ASCII ("１６：９").
    return unicodedata.normalize("NFKC", word).rstrip(",;")


def _parse_weights(text: str) -> tuple[PromptPart, ...]:
    """Split a Midjourney multi-prompt: `a castle::2 fog::-0.5 sky` weighs what precedes `::`."""
    parts: list[PromptPart] = []
    position = 0
    for match in _WEIGHT.finditer(text):
        piece = text[position : match.start()].strip(_EDGE_JUNK)
        weight_text = match["weight"]
        position = match.end()
        if _is_blank(piece):
            if weight_text is not None:
                raise PromptError("::", f"'::{weight_text}': a weight needs text before it")
            continue
        parts.append(PromptPart(piece, _weight(weight_text) if weight_text else 1.0))
    tail = text[position:].strip(_EDGE_JUNK)
    if not _is_blank(tail):
        parts.append(PromptPart(tail, 1.0))
    if len(parts) > MAX_PROMPT_PARTS:
        raise PromptError(
            "::", f"'::' prompts may have at most {MAX_PROMPT_PARTS} parts, got {len(parts)}"
        )
    if parts and sum(part.weight for part in parts) <= 0:
        # Midjourney's rule: the weights must add up to a positive number.
        raise PromptError(
            "::",
            "'::' weights must add up to more than 0, got "
            + " + ".join(f"{part.weight:g}" for part in parts),
        )
    return tuple(parts)


def _weight(text: str) -> float:
    value = float(text)
    if not -MAX_PART_WEIGHT <= value <= MAX_PART_WEIGHT:
        raise PromptError(
            "::",
            f"'::' weight must be between {-MAX_PART_WEIGHT:g} and {MAX_PART_WEIGHT:g}, got {text}",
        )
    return value


# ---------------------------------------------------------------------------------------------
# Putting it together.


@dataclass
class _Inline:
    """What the inline flags asked for, keyed by canonical flag name, with the spelling used."""

    values: dict[str, object] = field(default_factory=dict)
    typed: dict[str, str] = field(default_factory=dict)
    shown: dict[str, str] = field(default_factory=dict)


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
) -> ParsedPrompt:
    """Parse a /imagine prompt with its options into an IMAGINE request, or raise PromptError.

    `seed_source` is called only when neither the prompt nor the options give a seed.
    """
    options = options or ImagineOptions()
    if len(text) > MAX_INPUT_CHARS:
        raise PromptError(
            "prompt", f"prompt: at most {MAX_INPUT_CHARS} characters with flags, got {len(text)}"
        )
    notes: list[str] = []
    cleaned = _IMAGINE_PREFIX.sub("", _clean(text))
    prompt_text, raw_flags = _split_flags(cleaned)

    inline = _Inline()
    for flag in raw_flags:
        spec = flag.spec
        values, leftover = _take_values(flag)
        shown = " ".join(values)
        # A switch, or an optional value left out, is recorded as True.
        value = _check_value(flag, shown, settings) if values else True
        if spec.name in inline.values:
            # Pasted prompts repeat flags ("--v 5.1 … --v 5.1"), which is harmless; two
            # different values leave no way to know which one was meant.
            if value != inline.values[spec.name]:
                earlier = f"{inline.typed[spec.name]} {inline.shown[spec.name]}".strip()
                raise PromptError(
                    flag.typed,
                    f"{flag.typed}: given twice with different values "
                    f"({_short(earlier)} and {_short(f'{flag.typed} {shown}'.strip())}); keep one",
                )
        else:
            inline.values[spec.name] = value
            inline.typed[spec.name] = flag.typed
            inline.shown[spec.name] = shown
            if spec.treatment is Treatment.IGNORED:
                notes.append(f"{f'{flag.typed} {_short(shown)}'.strip()} ignored ({spec.meaning})")
        moved = " ".join(leftover).strip(_EDGE_JUNK)
        if not _is_blank(moved):
            # Midjourney wants flags last; rather than lose the words, keep them as prompt text.
            prompt_text = f"{prompt_text.rstrip(_EDGE_JUNK)}, {moved}"
            notes.append(f"{_short(moved)!r} after {flag.typed} was kept as prompt text")

    prompt_text = _strip_image_prompts(prompt_text, notes)
    parts = _parse_weights(prompt_text)
    if not parts:
        raise PromptError("prompt", "prompt: nothing to draw once the flags are taken out")
    # What CLIP ranks against and what the metadata shows: the parts the user wants to see.
    prompt = ", ".join(part.text for part in parts if part.weight > 0)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError(
            "prompt", f"prompt: at most {MAX_PROMPT_CHARS} characters, got {len(prompt)}"
        )
    # A single part is an ordinary prompt whatever its (positive) weight: weights are relative.
    prompt_parts = parts if len(parts) > 1 else ()

    spec = _model(settings, model, inline)
    width, height = _size(settings, spec.base_resolution, options, inline, notes)
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
        model=spec.name,
        prompt_parts=prompt_parts,
        chaos=math.floor(cast(float, inline.values.get("chaos", 0)) + 0.5),
        tile="tile" in inline.values,
        stop_percent=cast(int, inline.values.get("stop", 100)),
    )
    if request.chaos:
        notes.append(f"{inline.typed['chaos']} {request.chaos} → a more varied grid")
    if request.stop_percent < 100:
        percent = request.stop_percent
        notes.append(f"{inline.typed['stop']} {percent} → denoising stops at {percent} %")
    return ParsedPrompt(request=request, notes=tuple(notes))


def _check_value(flag: _RawFlag, value: str, settings: EngineSettings) -> object:
    if flag.spec.name == "steps":
        return _int_in(1, _max_steps(settings))(flag.typed, value)
    if flag.spec.name == "model" and not value:
        raise _unknown_model(flag.typed, value, settings)
    assert flag.spec.check is not None
    return flag.spec.check(flag.typed, value)


def _short(value: str, limit: int = 24) -> str:
    return value if len(value) <= limit else value[:limit] + "…"


def _strip_image_prompts(text: str, notes: list[str]) -> str:
    def drop(match: re.Match[str]) -> str:
        link = match[0].strip("<>").replace(" ", "")
        notes.append(f"image prompt {_short(link, 32)} ignored (image prompts are not supported)")
        return " "

    return " ".join(_URL.sub(drop, text).split())


def _max_steps(settings: EngineSettings) -> int:
    return min(settings.max_steps, MAX_STEPS)


def _conflict(flag: str, flag_value: str, option: str, option_value: object) -> PromptError:
    return PromptError(
        flag,
        f"{flag} {_short(flag_value)} conflicts with the {option} option ({option_value}); "
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
    return PromptError(flag, f"{flag}: expected a configured model ({names}), got {_show(name)}")


def _size(
    settings: EngineSettings,
    base_resolution: int,
    options: ImagineOptions,
    inline: _Inline,
    notes: list[str],
) -> tuple[int, int]:
    aspect, label = (1, 1), ""
    if options.aspect is not None:
        aspect = _aspect("aspect", _clean(options.aspect).replace(" ", ""))
        label = f"aspect {options.aspect}"
    if "ar" in inline.values:
        given = aspect if options.aspect is not None else None
        aspect = _agreed(inline, "ar", "aspect", given, option_shown=options.aspect)
        label = f"{inline.typed['ar']} {inline.shown['ar']}"
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
        sampler = _sampler("sampler", options.sampler)
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
        pieces.append(_clean(options.negative).strip(_EDGE_JUNK))
    if "no" in inline.values:
        pieces.append(cast(str, inline.values["no"]).strip(_EDGE_JUNK))
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
