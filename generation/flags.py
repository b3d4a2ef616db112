"""The Midjourney flags this bot knows: what each one means here and how its value is checked.

`FLAGS` is the one table: the prompt parser (`generation.prompt`) reads flags with it and /help
renders it. Every value checker raises `PromptError` naming the flag as typed and what it
accepts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from generation.contract import MAX_CONTROLNET_WEIGHT, MAX_SEED, Sampler

# Beyond 4:1 Stable Diffusion models tile their subject; the corpus never goes past 1:2.
MAX_ASPECT = 4
MAX_GUIDANCE = 30.0
# Midjourney's --quality values, as multipliers of the configured default steps.
# Midjourney v1-v3 also took 5 (an experimental 5x mode), which 2022's prompts carry.
QUALITY_VALUES = (0.25, 0.5, 1.0, 2.0, 4.0, 5.0)
# Midjourney's --repeat range.
MAX_REPEAT = 40
# Legacy --w/--h were pixel sizes; anything longer is no size Midjourney ever drew.
MAX_LEGACY_SIDE = 10000


class PromptError(ValueError):
    """A user mistake in the prompt or the /imagine options; the message is safe to show.

    `flag` names what was wrong: `--ar` for an inline flag (as typed, with ASCII dashes), the
    option name (`aspect`, `seed` …) for a /imagine option, `::` for a multi-prompt weight,
    `{}` for permutation braces, and `prompt` for the prompt text itself.
    """

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(message)
        self.flag = flag


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
NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
# Longer digit strings are out of any range here; refusing them early also keeps int() away
# from Python's 4300-digit conversion limit.
_MAX_NUMBER_CHARS = 24


def show_value(value: str, limit: int = 40) -> str:
    """Quote a user value for a message, cut short so a 10,000-character value stays readable."""
    if not value:
        return "nothing"
    return repr(value if len(value) <= limit else value[:limit] + "…")


# What Discord's Markdown acts on inside a line: emphasis, spoilers, code, masked links, mentions,
# channel and emoji tags, escapes, and bare links (which it also previews).
_MARKDOWN = re.compile(r"[`*_~|\[\]<>\\@#]|://|www\.", re.IGNORECASE)


def shown_fragment(value: str, limit: int = 40, *, always_code: bool = False) -> str:
    """A member's text for a note that is posted publicly with the job: as typed when Markdown
    can't make anything of it ("--v 6"), else in a code span, where Discord renders no masked
    link, mention, emphasis or link preview ("`--style [a](https://e.x)`"). Cut short; a
    backtick would end the span early, so it becomes a look-alike."""
    text = " ".join(value.split())
    if len(text) > limit:
        text = text[:limit] + "…"
    if text and not always_code and not _MARKDOWN.search(text):
        return text
    return "`" + text.replace("`", "ˋ") + "`" if text else "`(empty)`"


def int_in(low: int, high: int) -> Check:
    def check(flag: str, value: str) -> int:
        if len(value) <= _MAX_NUMBER_CHARS and _INT.fullmatch(value):
            number = int(value)
            if low <= number <= high:
                return number
        raise PromptError(
            flag,
            f"{flag}: expected a whole number between {low} and {high}, got {show_value(value)}",
        )

    return check


def number_in(low: float, high: float, expected: str | None = None) -> Check:
    expected = expected or f"a number between {low:g} and {high:g}"

    def check(flag: str, value: str) -> float:
        if len(value) <= _MAX_NUMBER_CHARS and NUMBER.fullmatch(value):
            number = float(value)
            if math.isfinite(number) and low <= number <= high:
                return number
        raise PromptError(flag, f"{flag}: expected {expected}, got {show_value(value)}")

    return check


def one_of(*choices: str) -> Check:
    def check(flag: str, value: str) -> str:
        if value.lower() in choices:
            return value.lower()
        raise PromptError(
            flag, f"{flag}: expected one of {', '.join(choices)}, got {show_value(value)}"
        )

    return check


def any_word(flag: str, value: str) -> str:
    if not value:
        raise PromptError(flag, f"{flag}: expected a value, got nothing")
    return value


# A --p profile code as /info shows them (8 letters and digits); Midjourney's own codes have
# the same shape, so a pasted one is looked up and named if no profile here has it.
PROFILE_CODE = re.compile(r"[a-z0-9]{4,32}")
MAX_PROFILE_CODES = 5


def profile_codes(flag: str, value: str) -> tuple[str, ...]:
    """`--p abc123 def456` (or with commas): the codes, lower case; `--p` alone is one's own."""
    codes = tuple(dict.fromkeys(code.lower() for code in value.replace(",", " ").split()))
    for code in codes:
        if not PROFILE_CODE.fullmatch(code):
            raise PromptError(
                flag,
                f"{flag}: {show_value(code)} is not a profile code (4-32 letters and digits; "
                "/info shows yours)",
            )
    if len(codes) > MAX_PROFILE_CODES:
        raise PromptError(
            flag, f"{flag}: at most {MAX_PROFILE_CODES} profile codes, got {len(codes)}"
        )
    return codes


def reduced_ratio(value: str) -> tuple[int, int] | None:
    """A well-formed W:H, reduced so that 6:4 and 3:2 compare equal; None if malformed."""
    match = re.fullmatch(r"([0-9]{1,5}):([0-9]{1,5})", value)
    if not match or not int(match[1]) or not int(match[2]):
        return None
    width, height = int(match[1]), int(match[2])
    divisor = math.gcd(width, height)
    return width // divisor, height // divisor


def aspect_option(flag: str, value: str) -> tuple[int, int]:
    """The /imagine aspect option: its range is declared, so a ratio beyond it is refused."""
    ratio = reduced_ratio(value)
    if ratio is not None and 1 / MAX_ASPECT <= ratio[0] / ratio[1] <= MAX_ASPECT:
        return ratio
    raise PromptError(
        flag,
        f"{flag}: expected W:H with whole numbers between 1:{MAX_ASPECT} and {MAX_ASPECT}:1, "
        f"got {show_value(value)}",
    )


def inline_aspect(flag: str, value: str) -> tuple[int, int]:
    """An inline --ar: Midjourney v7 takes ratios beyond 4:1, so those are clamped later."""
    ratio = reduced_ratio(value)
    if ratio is None:
        raise PromptError(
            flag, f"{flag}: expected W:H with whole numbers, such as 16:9, got {show_value(value)}"
        )
    return ratio


def quality_value(flag: str, value: str) -> float:
    if len(value) <= _MAX_NUMBER_CHARS and NUMBER.fullmatch(value):
        if float(value) in QUALITY_VALUES:
            return float(value)
    accepted = ", ".join(f"{q:g}".removeprefix("0") for q in QUALITY_VALUES)
    raise PromptError(flag, f"{flag}: expected one of {accepted}, got {show_value(value)}")


def sampler_value(flag: str, value: str) -> Sampler:
    try:
        return Sampler.parse(value)
    except ValueError:
        accepted = ", ".join(s.value for s in Sampler)
        raise PromptError(
            flag,
            f"{flag}: expected a sampler, one of {accepted} (or AUTOMATIC1111's name, such as "
            f"DPM++ 2M SDE Karras or Euler a); got {show_value(value)}",
        ) from None


_VERSION = number_in(1, 10, "a Midjourney version number such as 5.2, 6 or 7")


LINK = re.compile(r"https?://[^\s<>]+", re.IGNORECASE)
_STYLE_CODE = re.compile(r"[0-9]{1,20}|random", re.IGNORECASE)


def reference_value(flag: str, value: str) -> tuple[str, ...]:
    """The words after --sref/--oref/--cref: image links (and, for --sref, style codes); what
    they mean is generation.references' business."""
    words = [word.strip("<>") for word in value.split()]
    if not words:
        raise PromptError(flag, f"{flag}: expected an image link (https://…), got nothing")
    for word in words:
        if LINK.fullmatch(word):
            continue
        if flag == "--sref" and _STYLE_CODE.fullmatch(word):
            continue
        also = " or a Midjourney style code" if flag == "--sref" else ""
        raise PromptError(
            flag, f"{flag}: expected an image link (https://…){also}, got {show_value(word)}"
        )
    return tuple(words)


# ---------------------------------------------------------------------------------------------
# The flag table, which /help can render as well.

FLAGS: tuple[FlagSpec, ...] = (
    # Honoured: they mean the same thing here as in Midjourney (or in AUTOMATIC1111).
    FlagSpec(("ar", "aspect"), Treatment.HONOURED, Arity.ONE, "aspect ratio", "W:H", inline_aspect),
    FlagSpec(("seed",), Treatment.HONOURED, Arity.ONE, "seed", "N", int_in(0, MAX_SEED)),
    FlagSpec(("no",), Treatment.HONOURED, Arity.REST, "negative prompt", "words", any_word),
    FlagSpec(("steps",), Treatment.HONOURED, Arity.ONE, "denoising steps", "N"),  # max: config
    FlagSpec(
        ("cfg", "guidance"),
        Treatment.HONOURED,
        Arity.ONE,
        "guidance scale",
        "X",
        number_in(0, MAX_GUIDANCE),
    ),
    # REST so that AUTOMATIC1111 spellings with spaces ("DPM++ 2M Karras") work.
    FlagSpec(("sampler",), Treatment.HONOURED, Arity.REST, "sampler", "NAME", sampler_value),
    FlagSpec(("model",), Treatment.HONOURED, Arity.REST, "model", "NAME", any_word),
    # LoRAs and ControlNets are checked against the configuration (generation.addons).
    FlagSpec(
        ("lora",),
        Treatment.HONOURED,
        Arity.REST,
        "LoRAs from /models, each at its default weight or NAME:W (0-2); several allowed",
        "NAME[:W]",
        any_word,
    ),
    FlagSpec(
        ("cn", "controlnet"),
        Treatment.HONOURED,
        Arity.ONE,
        "a ControlNet from /models, following the control_image you attach or the picture "
        "linked after its name",
        "NAME [LINK]",
        any_word,
    ),
    FlagSpec(
        ("cnw",),
        Treatment.HONOURED,
        Arity.ONE,
        "how strongly the ControlNet is followed",
        "0-2",
        number_in(0, MAX_CONTROLNET_WEIGHT),
    ),
    FlagSpec(
        ("repeat", "r"),
        Treatment.HONOURED,
        Arity.ONE,
        "that many jobs of the prompt, each with its own seeds",
        "1-40",
        int_in(1, MAX_REPEAT),
    ),
    # Mapped: a Stable Diffusion equivalent that does what the Midjourney user meant.
    FlagSpec(
        ("quality", "q"),
        Treatment.MAPPED,
        Arity.ONE,
        "fewer steps at .25 and .5; 1, 2 and 4 all use the default steps (more add no detail)",
        ".25|.5|1|2|4",
        quality_value,
    ),
    FlagSpec(
        ("chaos", "c"),
        Treatment.MAPPED,
        Arity.ONE,
        "more varied candidates",
        "0-100",
        # The corpus has "--c 1.5", which Midjourney took; it is rounded here.
        number_in(0, 100),
    ),
    FlagSpec(("tile",), Treatment.MAPPED, Arity.NONE, "seamless tiling"),
    # Pictures (generation.references): image prompts are links at the start of the prompt.
    FlagSpec(
        ("iw",),
        Treatment.MAPPED,
        Arity.ONE,
        "how strongly image prompts steer (default 1)",
        "0-3",
        number_in(0, 3),
    ),
    FlagSpec(
        ("sref",),
        Treatment.MAPPED,
        Arity.REST,
        "style reference: the style, not the content, of the linked image (Midjourney's "
        "numeric style codes are ignored)",
        "LINK",
        reference_value,
    ),
    FlagSpec(
        ("sw",),
        Treatment.MAPPED,
        Arity.ONE,
        "style reference weight (default 100)",
        "0-1000",
        number_in(0, 1000),
    ),
    FlagSpec(
        ("oref",),
        Treatment.MAPPED,
        Arity.ONE,
        "object reference: keep the subject of the linked image",
        "LINK",
        reference_value,
    ),
    FlagSpec(
        ("ow",),
        Treatment.MAPPED,
        Arity.ONE,
        "object reference weight (default 100)",
        "1-1000",
        number_in(1, 1000),
    ),
    FlagSpec(
        ("cref",),
        Treatment.MAPPED,
        Arity.REST,
        "character reference: keep the character of the linked image(s)",
        "LINK",
        reference_value,
    ),
    FlagSpec(
        ("cw",),
        Treatment.MAPPED,
        Arity.ONE,
        "character reference weight (default 100)",
        "0-100",
        number_in(0, 100),
    ),
    # Midjourney v1-v3 took a size in pixels; with --w it becomes the aspect ratio. (--w alone
    # is --weird from v5 on.)
    FlagSpec(
        ("h",),
        Treatment.MAPPED,
        Arity.ONE,
        "Midjourney v1-v3 height: --w W --h H is --ar W:H",
        "H",
        int_in(1, MAX_LEGACY_SIDE),
    ),
    FlagSpec(
        ("stop",), Treatment.MAPPED, Arity.ONE, "stop denoising early", "10-100", int_in(10, 100)
    ),
    # Ignored: Midjourney-only models, aesthetics, references, modes. Ranges are the widest any
    # Midjourney version documented (V3 took --stylize up to 60000, and the corpus has 6000),
    # and decimals pass: the value only has to look like what Midjourney would have taken.
    FlagSpec(
        ("version", "v"), Treatment.IGNORED, Arity.ONE, "Midjourney model version", "", _VERSION
    ),
    FlagSpec(("niji",), Treatment.IGNORED, Arity.OPTIONAL, "Midjourney anime model", "", _VERSION),
    FlagSpec(("style",), Treatment.IGNORED, Arity.ONE, "Midjourney style", "", any_word),
    FlagSpec(("raw",), Treatment.IGNORED, Arity.NONE, "Midjourney raw style"),
    FlagSpec(
        ("stylize", "s"),
        Treatment.IGNORED,
        Arity.ONE,
        "Midjourney stylize",
        "",
        number_in(0, 60000),
    ),
    FlagSpec(
        ("weird", "w"), Treatment.IGNORED, Arity.ONE, "Midjourney weird", "", number_in(0, 3000)
    ),
    FlagSpec(
        ("exp",), Treatment.IGNORED, Arity.ONE, "Midjourney aesthetics", "", number_in(0, 100)
    ),
    FlagSpec(("sv",), Treatment.IGNORED, Arity.ONE, "style reference version", "", _VERSION),
    FlagSpec(
        ("personalize", "p", "profile"),
        Treatment.HONOURED,
        Arity.OPTIONAL_REST,
        "rank by your taste, learnt from your U1–U4 picks and /rank (or by the members' "
        "whose profile codes follow)",
        "[CODE …]",
        profile_codes,
    ),
    FlagSpec(
        ("sameseed",),
        Treatment.IGNORED,
        Arity.OPTIONAL,
        "legacy Midjourney seed mode",
        "",
        int_in(0, MAX_SEED),
    ),
    FlagSpec(
        ("zoom",), Treatment.IGNORED, Arity.ONE, "Midjourney custom zoom", "", number_in(1, 2)
    ),
    FlagSpec(("hd",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney model"),
    FlagSpec(("beta",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney model"),
    FlagSpec(("vibe",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney model"),
    FlagSpec(("wallpaper",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney size preset"),
    FlagSpec(("test",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney model"),
    FlagSpec(("testp",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney model"),
    FlagSpec(("creative",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney model"),
    FlagSpec(("uplight",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney upscaler"),
    FlagSpec(("upbeta",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney upscaler"),
    FlagSpec(("upanime",), Treatment.IGNORED, Arity.NONE, "legacy Midjourney upscaler"),
    # Midjourney v7's draft mode (generation.draft); the steps, sampler and cost are the
    # server's ([generation] draft_steps/draft_sampler, [credits] cost_draft_percent).
    FlagSpec(
        ("draft",),
        Treatment.MAPPED,
        Arity.NONE,
        "a fast, cheap draft (fewer steps, a quick sampler); Enhance renders a draft image at "
        "full quality",
    ),
    # Speed modes: the bot queues and charges the job by them (ParsedPrompt.speed).
    FlagSpec(("fast",), Treatment.HONOURED, Arity.NONE, "fast mode for this job (credits)"),
    FlagSpec(
        ("relax",), Treatment.HONOURED, Arity.NONE, "relax mode: waits for a free GPU, costs less"
    ),
    FlagSpec(("turbo",), Treatment.HONOURED, Arity.NONE, "turbo mode: ahead of fast, costs more"),
    FlagSpec(("stealth",), Treatment.IGNORED, Arity.NONE, "Midjourney visibility mode"),
    FlagSpec(("public",), Treatment.IGNORED, Arity.NONE, "Midjourney visibility mode"),
    FlagSpec(("private",), Treatment.IGNORED, Arity.NONE, "Midjourney visibility mode"),
    FlagSpec(("video",), Treatment.IGNORED, Arity.NONE, "Midjourney video"),
    FlagSpec(
        ("motion",), Treatment.IGNORED, Arity.ONE, "Midjourney video", "", one_of("low", "high")
    ),
    FlagSpec(("loop",), Treatment.IGNORED, Arity.NONE, "Midjourney video"),
    FlagSpec(("end",), Treatment.IGNORED, Arity.ONE, "Midjourney video", "", any_word),
    FlagSpec(("bs",), Treatment.IGNORED, Arity.ONE, "Midjourney video", "", one_of("1", "2", "4")),
)

FLAGS_BY_NAME: dict[str, FlagSpec] = {name: spec for spec in FLAGS for name in spec.names}
# What --w means when --h is there too (see FLAGS).
LEGACY_WIDTH = FlagSpec(
    ("w",),
    Treatment.MAPPED,
    Arity.ONE,
    "Midjourney v1-v3 width: --w W --h H is --ar W:H",
    "W",
    int_in(1, MAX_LEGACY_SIDE),
)
