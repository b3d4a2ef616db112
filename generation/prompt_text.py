"""Reading what a member typed, before any flag is understood: invisible characters and stray
quotes gone, whitespace collapsed, the `--flags` split off the words (with phone-typed dashes,
unknown flags refused or noted, values taken), and the `::` multi-prompt weights.

generation/prompt.py puts the pieces together into a request.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass

from generation.contract import PromptPart
from generation.flags import FLAGS, FLAGS_BY_NAME, NUMBER, Arity, FlagSpec, PromptError, Treatment

# Each `::` part may cost a text-encoder pass, so their number is bounded.
MAX_PROMPT_PARTS = 16
MAX_PART_WEIGHT = 100.0

# Hyphen-like characters phones and word processors put where the user typed "-".
_DASHES = "\\-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"
# A single one of these is how "--" comes out of iOS/macOS smart punctuation.
_LONG_DASHES = "\u2013\u2014\u2015\ufe58"
# A flag starts at a run of dashes not glued to a word, so "1970–present" and "well--known"
# stay text, while "sea.--ar 4:5" (corpus) is a flag.
_FLAG_CANDIDATE = re.compile(
    rf"(?<![\w{_DASHES}])(?P<marker>[{_DASHES}]+)(?P<space> ?)(?P<name>[A-Za-z]\S*)"
)
IMAGINE_PREFIX = re.compile(r"^/imagine\b\s*(?:prompt\s*:)?\s*", re.IGNORECASE)
# Image prompts. The corpus has links mangled by a scraper ("https://s. mj. run/qEPRlfloqJU"),
# so a host may contain ". " if the link goes on with a path.
URL = re.compile(r"<?https?://(?:(?:[\w-]+\. ?)+[\w-]+/\S*|\S+)", re.IGNORECASE)
_WEIGHT = re.compile(r"::(?P<weight>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?!\w))?")
EDGE_JUNK = " ,;"


def clean(text: str) -> str:
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


# Opening quote → the closing quotes that end it, as web pages and spreadsheets write them.
_QUOTE_PAIRS = {
    '"': '"',
    "\u201c": "\u201d",
    "\u201e": "\u201c\u201d",
    "\u00ab": "\u00bb",
    "'": "'",
    "\u2018": "\u2019",
}
_DOUBLE_OPENERS = '"\u201c\u201e\u00ab'
_DOUBLE_CLOSERS = '"\u201d\u00bb'


def unquote(text: str) -> str:
    """Take off the quotes a prompt copied from a web page or a spreadsheet cell comes in.

    A pair around the whole text goes when the quotes inside it balance (so `"a sign saying
    "OPEN""` loses only the outer pair); a spreadsheet's doubled quotes inside become single.
    A lone double quote at either end with no partner goes too; quotes that pair stay.
    """
    text = text.strip()
    closers = _QUOTE_PAIRS.get(text[:1], "")
    if len(text) >= 2 and text[-1] in closers:
        inner = text[1:-1]
        if text[0] == '"' and '""' in inner:
            inner = inner.replace('""', '"')
        if text[0] == "'" or _quotes_balance(inner):
            return inner.strip()
    if text[:1] in _DOUBLE_OPENERS and not _quotes_balance(text):
        text = text[1:].lstrip()
    if text[-1:] in _DOUBLE_CLOSERS and not _quotes_balance(text):
        text = text[:-1].rstrip()
    return text


def _quotes_balance(text: str) -> bool:
    """Every double quote in `text` opens or closes a pair, nested properly.

    A straight quote opens at the start, after a space or an opening bracket, and closes
    otherwise; typographic quotes say which they are.
    """
    depth = 0
    for index, char in enumerate(text):
        if char == '"':
            opening = index == 0 or text[index - 1] in " ([{"
        elif char in "\u201c\u201e\u00ab":
            opening = True
        elif char in "\u201d\u00bb":
            opening = False
        else:
            continue
        depth += 1 if opening else -1
        if depth < 0:
            return False
    return depth == 0


def is_blank(text: str) -> bool:
    return all(char in string.punctuation or char.isspace() for char in text)


@dataclass
class RawFlag:
    typed: str  # "--" + the name as typed, lower-cased: how messages refer to it
    spec: FlagSpec | None  # None: a well-formed flag unknown here, ignored with a note
    words: list[str]


# Flags of other tools (AUTOMATIC1111, other bots) that no Midjourney version had: ignoring
# them would silently drop what the member asked for, so they are refused with the way to say it.
_NOT_MIDJOURNEY = {
    "negative": "use --no for a negative prompt",
    "neg": "use --no for a negative prompt",
    "width": "use --ar W:H (or Midjourney's old --w W --h H)",
    "height": "use --ar W:H (or Midjourney's old --w W --h H)",
    "size": "use --ar W:H",
    "scale": "use --cfg for the guidance scale",
    "upscale": "use the U buttons under the grid",
    "help": "see /help",
}
# An unknown flag may be a parameter Midjourney added after this table was written.
_WELL_FORMED_NAME = re.compile(r"[a-z][a-z0-9]{0,23}")
_QUOTES = "\"'\u201c\u201d\u201e\u2018\u2019\u00ab\u00bb"


def split_flags(text: str) -> tuple[str, list[RawFlag]]:
    """Return the prompt text before the first flag, and each flag with the words after it."""
    starts: list[tuple[re.Match[str], FlagSpec | None, str]] = []
    for match in _FLAG_CANDIDATE.finditer(text):
        marker, spaced = match["marker"], bool(match["space"])
        if len(marker) < 2 and marker not in _LONG_DASHES:
            continue  # a single hyphen is text ("-ar", "Award - winning")
        name = match["name"].rstrip(",;." + _QUOTES).lower()
        spec = FLAGS_BY_NAME.get(name)
        if spaced and (marker != "--" or spec is None):
            continue  # "-- ar 51:81" (corpus) is a flag; "salon – flat view" is prose
        starts.append((match, spec, name))

    if not starts:
        return text, []
    flags = []
    for index, (match, spec, name) in enumerate(starts):
        end = starts[index + 1][0].start() if index + 1 < len(starts) else len(text)
        words = text[match.end() : end].split()
        if spec is None:
            _check_unknown_flag(name, words)
        flags.append(RawFlag(f"--{name}", spec, words))
    return text[: starts[0][0].start()], flags


def with_suffix(prompt: str, suffix: str) -> str:
    """`prompt` with a member's /prefer suffix added, as Midjourney does, but with the suffix's
    flags as defaults: a flag the prompt already sets (under any of its names) is left out, so
    what was typed wins instead of conflicting. The suffix's words go before the prompt's flags,
    where they are prompt text rather than the last flag's value."""
    suffix_text, suffix_flags = split_flags(suffix)
    if not suffix_text.strip() and not suffix_flags:
        return prompt
    prompt_text, typed_flags = split_flags(prompt)
    typed = {flag.spec.name for flag in typed_flags if flag.spec is not None}
    kept = [
        " ".join([flag.typed, *flag.words])
        for flag in suffix_flags
        if flag.spec is None or flag.spec.name not in typed
    ]
    flags_part = prompt[len(prompt_text) :].strip()
    pieces = [prompt_text.strip(), suffix_text.strip(), flags_part, *kept]
    return " ".join(piece for piece in pieces if piece)


def _check_unknown_flag(name: str, words: list[str]) -> None:
    """Refuse an unknown flag unless it looks like a Midjourney parameter newer than this table.

    Kept (and ignored with a note): a plain word name followed by at most one value word before
    the next flag or the end. Refused: a known name with its value glued on (`--ar16:9`), a
    flag of another tool, a near miss of a known name (a typo'd `--seed` silently ignored would
    surprise the member), and anything followed by more words, which is prompt text.
    """
    flag = f"--{short(name)}"
    for known in sorted(FLAGS_BY_NAME, key=len, reverse=True):
        rest = name[len(known) :]
        if name.startswith(known) and (rest[:1].isdigit() or rest[:1] in (":", ".")):
            raise PromptError(
                flag, f"{flag}: unknown flag; did you mean '--{known} {short(rest)}'?"
            )
    if name in _NOT_MIDJOURNEY:
        raise PromptError(
            flag, f"{flag}: unknown flag, not a Midjourney parameter; {_NOT_MIDJOURNEY[name]}"
        )
    near = _nearest_known(name)
    if near in _NOT_MIDJOURNEY:
        raise PromptError(
            flag,
            f"{flag}: unknown flag; did you mean --{near}? That is not a Midjourney parameter; "
            f"{_NOT_MIDJOURNEY[near]}",
        )
    if near is not None:
        raise PromptError(flag, f"{flag}: unknown flag; did you mean --{near}?")
    if not _WELL_FORMED_NAME.fullmatch(name) or len(words) > 1:
        honoured = ", ".join(
            f"--{spec.name}"
            for spec in FLAGS
            if spec.treatment is not Treatment.IGNORED and spec.name != "h"
        )
        raise PromptError(
            flag,
            f"{flag}: unknown flag; this bot understands {honoured} "
            "and ignores Midjourney's other parameters",
        )


def _nearest_known(name: str) -> str | None:
    """The known flag name `name` is a likely typo of: one edit away (two for long names)."""
    best: tuple[int, str] | None = None
    for known in [*FLAGS_BY_NAME, *_NOT_MIDJOURNEY]:
        allowed = 1 if len(known) <= 4 else 2
        distance = _edit_distance(name, known, allowed)
        if distance <= allowed and (best is None or distance < best[0]):
            best = (distance, known)
    return None if best is None else best[1]


def _edit_distance(a: str, b: str, cap: int) -> int:
    """Edits (insert, delete, replace, swap two neighbours) from a to b; cap + 1 if above cap."""
    if abs(len(a) - len(b)) > cap:
        return cap + 1
    previous: list[int] = []
    row = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        before, previous, row = previous, row, [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            row[j] = min(previous[j] + 1, row[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], before[j - 2] + 1)
    return min(row[len(b)], cap + 1)


def take_values(words: list[str], spec: FlagSpec) -> tuple[list[str], list[str]]:
    """Split the words after a flag into its values and leftover prompt text.

    A flag that needs a value and has none gets `[""]`, so that its checker reports it with
    the accepted range.
    """
    arity = spec.arity
    if arity is Arity.NONE:
        return [], words
    if arity is Arity.ONE:
        if not words:
            return [""], []
        return [_value_word(words[0])], words[1:]
    if arity is Arity.OPTIONAL:
        # "--niji 6" takes the number; "--niji" followed by text does not take the text.
        if words and NUMBER.fullmatch(_value_word(words[0])):
            return [_value_word(words[0])], words[1:]
        return [], words
    if arity is Arity.REST and not words:
        return [""], []
    return words, []


def _value_word(word: str) -> str:
    # NFKC turns full-width digits and colons from CJK keyboards into ASCII ("１６：９"); a
    # quote is what is left of a prompt copied from a spreadsheet cell ('--ar 16:9"').
    return unicodedata.normalize("NFKC", word).strip(_QUOTES).rstrip(",;").strip(_QUOTES)


def parse_weights(text: str) -> tuple[PromptPart, ...]:
    """Split a Midjourney multi-prompt: `a castle::2 fog::-0.5 sky` weighs what precedes `::`."""
    parts: list[PromptPart] = []
    position = 0
    for match in _WEIGHT.finditer(text):
        piece = text[position : match.start()].strip(EDGE_JUNK)
        weight_text = match["weight"]
        position = match.end()
        if is_blank(piece):
            if weight_text is not None:
                raise PromptError("::", f"'::{weight_text}': a weight needs text before it")
            continue
        parts.append(PromptPart(piece, _weight(weight_text) if weight_text else 1.0))
    tail = text[position:].strip(EDGE_JUNK)
    if not is_blank(tail):
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


def short(value: str, limit: int = 24) -> str:
    return value if len(value) <= limit else value[:limit] + "…"
