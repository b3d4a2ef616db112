"""Midjourney permutation prompts: `a {red, green} bird --ar {1:1, 16:9}` is four prompts.

Rules, as Midjourney applies them:

* Each `{…}` holds comma-separated options; the prompt is expanded into every combination, the
  first brace varying slowest (`a red bird --ar 1:1`, `a red bird --ar 16:9`, `a green bird
  --ar 1:1`, …), like `itertools.product`.
* Braces nest: `a {big {red, blue}, small} bird` is `a big red bird`, `a big blue bird`,
  `a small bird`.
* `\\,` is a comma inside an option, `\\{` and `\\}` are literal braces; any other backslash
  stays as typed (AUTOMATIC1111 prompts escape parentheses that way).
* An option may be empty (`a {, red} bird` is `a bird` and `a red bird`); whitespace is
  collapsed and taken off each option's ends.
* Braces work anywhere, flag values included, so expansion comes before flag parsing.

The number of combinations is worked out before any is built, so `{a,b}` repeated twenty times
is refused at once rather than expanded into a million strings; braces nest at most
`MAX_NESTING` deep. Pure: no torch, no Discord.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

# Midjourney's own limit on the jobs one permutation prompt may make.
DEFAULT_MAX_PROMPTS = 40
# Braces inside braces, at most this deep: counting and expanding recurse once per level, and
# a few hundred levels (a prompt of nothing but braces) would exhaust Python's stack.
MAX_NESTING = 8
_ESCAPES = {",": ",", "{": "{", "}": "}"}


class PermutationError(ValueError):
    """A malformed or too large permutation prompt; the message is safe to show."""


@dataclass(frozen=True)
class _Choice:
    options: tuple[_Sequence, ...]


# A sequence is a run of literal text and choices.
_Sequence = tuple[str | _Choice, ...]


def count_permutations(text: str) -> int:
    """How many prompts `text` expands into (1 without braces)."""
    return _count(_parse(text))


def expand_permutations(text: str, max_prompts: int = DEFAULT_MAX_PROMPTS) -> list[str]:
    """Every prompt `text` stands for, in Midjourney's order; raise PermutationError when
    the braces are unbalanced or there would be more than `max_prompts`."""
    if max_prompts < 1:
        raise ValueError(f"max_prompts: must be at least 1, got {max_prompts}")
    sequence = _parse(text)
    count = _count(sequence)
    if count > max_prompts:
        raise PermutationError(
            f"{{}}: this prompt makes {count} combinations; at most {max_prompts} are allowed"
        )
    return [" ".join(expanded.split()) for expanded in _expand(sequence)]


def _parse(text: str) -> _Sequence:
    """Parse `text` into literal text and choices; braces must balance."""
    # One entry per open brace: its finished options, the sequence it sits in, its position.
    stack: list[tuple[list[_Sequence], list[str | _Choice], int]] = []
    current: list[str | _Choice] = []
    literal: list[str] = []

    def flush() -> None:
        if literal:
            current.append("".join(literal))
            literal.clear()

    index = 0
    while index < len(text):
        char = text[index]
        following = text[index + 1 : index + 2]
        if char == "\\" and following in _ESCAPES:
            literal.append(_ESCAPES[following])
            index += 2
            continue
        if char == "{":
            if len(stack) == MAX_NESTING:
                raise PermutationError(
                    f"{{}}: '{{' at character {index + 1} nests braces more than "
                    f"{MAX_NESTING} deep (write \\{{ for a literal brace)"
                )
            flush()
            stack.append(([], current, index))
            current = []
        elif char == "," and stack:
            flush()
            stack[-1][0].append(tuple(current))
            current = []
        elif char == "}":
            if not stack:
                raise PermutationError(
                    f"{{}}: '}}' at character {index + 1} closes no '{{' "
                    "(write \\} for a literal brace)"
                )
            flush()
            options, outer, _ = stack.pop()
            options.append(tuple(current))
            options[:] = [_strip(option) for option in options]
            current = outer
            current.append(_Choice(tuple(options)))
        else:
            literal.append(char)
        index += 1
    if stack:
        opened_at = stack[-1][2] + 1
        raise PermutationError(
            f"{{}}: '{{' at character {opened_at} is never closed (write \\{{ for a literal brace)"
        )
    flush()
    return tuple(current)


def _strip(option: _Sequence) -> _Sequence:
    """An option without the spaces around it: `{red, green}` offers "green", not " green"."""
    items = list(option)
    if items and isinstance(items[0], str):
        items[0] = items[0].lstrip()
    if items and isinstance(items[-1], str):
        items[-1] = items[-1].rstrip()
    return tuple(item for item in items if item != "")


def _count(sequence: _Sequence) -> int:
    return math.prod(
        sum(_count(option) for option in item.options) if isinstance(item, _Choice) else 1
        for item in sequence
    )


def _expand(sequence: _Sequence) -> list[str]:
    alternatives = [
        [text for option in item.options for text in _expand(option)]
        if isinstance(item, _Choice)
        else [item]
        for item in sequence
    ]
    return ["".join(parts) for parts in itertools.product(*alternatives)]
